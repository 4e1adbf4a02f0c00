"""The report's summary: one row per ``optimize`` run (with the model its metrics compare with),
the chains of runs traced to their true original, and the data each run used (calibration
source and sample count, validation data, image preprocessing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from onnxcompress.reporting.chains import Lineage
from onnxcompress.reporting.display import human_bytes, human_count
from onnxcompress.reporting.document import Block, Heading, Para, Table
from onnxcompress.reporting.runs import (
    fmt_number,
    fmt_pct,
    fmt_ratio,
    pipeline_label,
    run_accuracy,
    worst_entry,
    worst_metric,
)

__all__ = ["summary_section", "drop_empty_columns"]


def _gate(run: dict) -> str:
    v = run.get("validation")
    if not isinstance(v, dict):
        return "not validated"
    if v.get("passed", run.get("passed", True)):
        return "passed"
    failures = v.get("failures") or []
    return "FAILED" + (f": {failures[0]}" if failures else "")


def _before_after(before: dict, after: dict, key: str, fmt: Callable[[float], str]) -> str:
    b, a = before[key], after[key]
    return f"{fmt(b)} → {fmt(a)} ({fmt_ratio(b, a)})"


def _worst(run: dict, key: str, spec: str) -> str:
    """The worst value over outputs and slices; a slice is named (``0.91 (output0[4:84])``)."""
    entry = worst_entry(run, key)
    if entry is None:
        return fmt_number(None, spec)
    value, name = entry
    return fmt_number(value, spec) + (f" ({name})" if name else "")


#: The task metrics the summary shows: ``task: ((values key, label), ...)``.
_TASK_CELLS = {"detection": (("f1", "det. F1"),), "segmentation": (("miou", "mIoU"),),
               "embedding": (("cosine_min", "min cosine"), ("spearman", "Spearman")),
               "classification": (("top5_agreement", "top-5"),)}


def _task_cell(run: dict) -> str:
    """The task metrics of each output that has some (``det. F1 0.906``), ``-`` when none."""
    cells = []
    for o in (run.get("validation") or {}).get("outputs", []):
        task = o.get("task") or {}
        values = task.get("values") or {}
        for key, label in _TASK_CELLS.get(task.get("task", ""), ()):
            value = values.get(key)
            if isinstance(value, (int, float)):
                cells.append(f"{label} {value:.3f}")
    return "; ".join(cells) or "-"


def _model_cell(lin: Lineage) -> str:
    name = Path(str(lin.run.data["model"])).name if lin.run.data.get("model") else "-"
    return name if lin.parent is None else f"{name} (output of {lin.parent.label})"


def _reference_cell(lin: Lineage) -> str:
    if lin.reference == "parent":
        return f"vs {lin.reference_name} (its input, not the original)"
    return lin.vs


def drop_empty_columns(table: Table, keep: int = 1) -> Table:
    """``table`` without the columns (after the first ``keep``) in which every cell is ``-``."""
    cols = [i for i in range(len(table.headers))
            if i < keep or any(row[i] not in ("-", "") for row in table.rows)]
    return Table([table.headers[i] for i in cols], [[row[i] for i in cols] for row in table.rows],
                 {j for j, i in enumerate(cols) if i in table.right})


def summary_section(lineages: list[Lineage]) -> list[Block]:
    """Summary table, the notes on runs measured against another model than their original,
    the chains, and the data used."""
    rows = []
    for lin in lineages:
        d = lin.run.data
        ref, cand = run_accuracy(d)
        acc = "-" if ref is None else f"{fmt_pct(ref)} → {fmt_pct(cand)}"
        rows.append([lin.run.label, _model_cell(lin), f"`{pipeline_label(d)}`", str(d.get("numerics", "-")),
                     _before_after(d["before"], d["after"], "file_bytes", human_bytes),
                     _before_after(d["before"], d["after"], "params", human_count),
                     _before_after(d["before"], d["after"], "macs", human_count), _reference_cell(lin),
                     _worst(d, "cosine", ".6f"), _worst(d, "sqnr_db", ".1f"),
                     fmt_pct(worst_metric(d, "top1_agreement")), acc, _task_cell(d), _gate(d)])
    headers = ["run", "model", "pipeline", "numerics", "size", "params", "MACs", "measured", "cosine (worst)",
               "SQNR dB (worst)", "top-1 agreement", "accuracy ref → new", "task", "gate"]
    blocks: list[Block] = [Heading(2, "Summary"), drop_empty_columns(Table(headers, rows, {8, 9, 10}))]
    return blocks + _reference_notes(lineages) + _chains(lineages) + _data(lineages)


def _reference_notes(lineages: list[Lineage]) -> list[Block]:
    out: list[Block] = []
    for lin in lineages:
        if lin.reference == "parent":
            model = lin.run.data.get("model", "MODEL")
            original = lin.original_path or lin.original_name
            out.append(Para(f"`{lin.run.label}` is measured against `{lin.reference_name}`'s output (its input), not "
                            f"against the original `{lin.original_name}`: its metrics leave out what the runs before "
                            f"it lost. To measure it against the original: `onnxcompress optimize {model} "
                            f"--reference {original} ...`."))
        elif lin.reference == "other":
            out.append(Para(f"`{lin.run.label}` is measured against `{lin.reference_name}`, neither its input nor "
                            f"the original `{lin.original_name}` of its chain."))
    return out


def _chains(lineages: list[Lineage]) -> list[Block]:
    """One row per chain of two or more runs (from its last run): the original and the whole chain's effect."""
    parents = {id(lin.parent) for lin in lineages if lin.parent is not None}
    rows = []
    for lin in lineages:
        if len(lin.chain) < 2 or id(lin.run) in parents:
            continue
        first, last = lin.chain[0].data, lin.run.data
        sha = (first.get("input_model") or {}).get("sha256")
        original = f"`{lin.original_name}`" + (f" (sha256 {sha[:12]}…)" if sha else "")
        rows.append([original + " → " + " → ".join(s.label for s in lin.chain),
                     _before_after(first["before"], last["after"], "file_bytes", human_bytes),
                     _before_after(first["before"], last["after"], "params", human_count),
                     _before_after(first["before"], last["after"], "macs", human_count),
                     _reference_cell(lin)])
    if not rows:
        return []
    return [Para("Chains (each run optimized the previous run's output; linked by the models' sha256): size, "
                 "params and MACs from the original to the chain's last model, and what its metrics compare with."),
            Table(["chain", "size", "params", "MACs", "last run's metrics"], rows)]


def _calibration(d: dict) -> str:
    if "calibration" not in d:
        return "not recorded"
    c = d["calibration"]
    return "none" if not isinstance(c, dict) else f"`{c.get('source')}` ({c.get('samples', '?')} samples)"


def _validation_data(d: dict) -> str:
    v = d.get("validation")
    return "-" if not isinstance(v, dict) else f"`{v.get('data')}` ({v.get('samples', '?')} samples)"


def _preprocess(d: dict) -> str:
    if "preprocess" not in d:
        return "not recorded"
    return f"`{d['preprocess']}`" if d["preprocess"] else "none (arrays used as given)"


def _data(lineages: list[Lineage]) -> list[Block]:
    """The data each run used: one line when every run used the same, else a table."""
    rows = [[lin.run.label, _calibration(lin.run.data), _validation_data(lin.run.data), _preprocess(lin.run.data)]
            for lin in lineages]
    if not rows:
        return []
    validated = {r[2] for r in rows if r[2] != "-"}
    warn = " The runs used different validation data, so their metrics are not directly comparable." \
        if len(validated) > 1 else ""
    if len({tuple(r[1:]) for r in rows}) == 1:
        _, calib, data, pre = rows[0]
        return [Para(f"Calibration: {calib}. Validated on: {data}. Preprocess: {pre}.")]
    return [Para("Data used by each run." + warn), Table(["run", "calibration", "validated on", "preprocess"], rows)]
