"""The report's sections, each a list of blocks built from the inputs: summary (:mod:`.summary`),
passes and their declines, per-layer MACs, layer sensitivity, latency, accuracy vs latency. A
section (or a run's part of it) that would carry no information is left out."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from onnxcompress._version import __version__
from onnxcompress.reporting.auto_view import auto_section
from onnxcompress.reporting.chains import Lineage, link_runs
from onnxcompress.reporting.display import human_bytes, human_count
from onnxcompress.reporting.document import Block, Heading, Para, Table
from onnxcompress.reporting.inputs import Inputs, Source
from onnxcompress.reporting.pareto import Point, accuracy_points
from onnxcompress.reporting.runs import as_float, fmt_number, fmt_ratio, pipeline_label, short_name
from onnxcompress.reporting.summary import summary_section

__all__ = ["document_blocks", "layer_macs"]


def document_blocks(inputs: Inputs, title: str, top: int, plot: Callable | None, note: str | None) -> list[Block]:
    """The whole document: title, provenance, then each section its inputs allow."""
    names = ", ".join(f"`{Path(s.path).name}` ({s.kind})" for s in inputs.all())
    blocks: list[Block] = [Heading(1, title), Para(f"Made by onnxcompress {__version__} from {names}.")]
    if note:
        blocks.append(Para(note))
    lineages = link_runs(inputs.runs)
    if inputs.runs:
        blocks += summary_section(lineages) + passes_section(inputs.runs) + macs_section(inputs.runs, top, plot)
    if inputs.sensitivities:
        blocks += sensitivity_section(inputs.sensitivities, top, plot)
    if inputs.benches:
        blocks += bench_section(inputs.benches)
    if inputs.runs and inputs.benches:
        blocks += pareto_section(inputs, lineages, plot)
    if inputs.autos:
        blocks += auto_section(inputs.autos, plot)
    return blocks


def _stats_text(stats: dict) -> str:
    items = [(k, v) for k, v in (stats or {}).items() if v and not isinstance(v, (list, dict))]
    return ", ".join(f"{k}={fmt_number(v, '.4g') if isinstance(v, float) else v}" for k, v in items) or "-"


def _declines(passes: list[dict]) -> list[list[str]]:
    """Rows ``pass, code, count, examples``: declines grouped by ``code`` (older reports: ``reason``)."""
    rows = []
    for p in passes:
        groups: dict[str, list[str]] = {}
        for d in p.get("declined") or []:
            code = d.get("code", d.get("reason", "?"))
            groups.setdefault(str(code), []).append(str(d.get("where", "?")))
        for reason, where in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            examples = ", ".join(f"`{w}`" for w in where[:3]) + (f" (+{len(where) - 3} more)" if len(where) > 3 else "")
            rows.append([p["pass"], reason, str(len(where)), examples])
    return rows


def passes_section(runs: list[Source]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Passes")]
    for r in runs:
        passes = r.data["passes"]
        rows = [[p["pass"], str(p.get("numerics", "-")), "yes" if p.get("modified") else "no",
                 _stats_text(p.get("stats")), fmt_number(p.get("seconds"), ".2f")] for p in passes]
        blocks += [Heading(3, f"{r.label}: {pipeline_label(r.data)}"),
                   Table(["pass", "numerics", "changed", "stats", "seconds"], rows, {4})]
        declined = _declines(passes)
        if declined:
            blocks.append(Table(["pass", "declined (code)", "count", "where (first 3)"], declined, {2}))
    return blocks


# --- per-layer MACs -----------------------------------------------------------------------------


def _node_key(n: dict, i: int) -> str:
    return str(n.get("name") or f"#{i} {n.get('op_type', '?')}")


def layer_macs(run: dict) -> list[tuple[str, str, int | None, int | None]]:
    """``(layer, op, MACs before, MACs after)`` in model order; new layers after the old ones."""
    before = {_node_key(n, i): n for i, n in enumerate(run["before"]["per_node"])}
    after = {_node_key(n, i): n for i, n in enumerate(run["after"]["per_node"])}
    rows = [(k, str(n.get("op_type", "?")), int(n.get("macs", 0)), int(after[k]["macs"]) if k in after else None)
            for k, n in before.items()]
    rows += [(k, str(n.get("op_type", "?")), None, int(n.get("macs", 0))) for k, n in after.items() if k not in before]
    return rows


def _heaviest(rows: list[tuple], top: int) -> list[tuple]:
    """The ``top`` rows with the most MACs (before, else after), kept in model order."""
    weight = [max(r[2] or 0, r[3] or 0) for r in rows]
    keep = set(sorted(range(len(rows)), key=lambda i: (-weight[i], i))[:top])
    return [r for i, r in enumerate(rows) if i in keep]


def _changed(rows: list[tuple]) -> bool:
    """Whether any layer's MACs changed (or a layer was added or removed)."""
    return any(b != a for _, _, b, a in rows)


def macs_section(runs: list[Source], top: int, plot: Callable | None) -> list[Block]:
    """Per run whose per-layer MACs changed: the heaviest layers before and after (none: no section)."""
    blocks: list[Block] = [Heading(2, "Per-layer MACs")]
    same = [r.label for r in runs if layer_macs(r.data) and not _changed(layer_macs(r.data))]
    if same and len(same) < len(runs):
        blocks.append(Para("No layer's MACs changed in " + ", ".join(f"`{x}`" for x in same) + " (not shown)."))
    for r in runs:
        rows = layer_macs(r.data)
        if not rows or not _changed(rows):
            continue
        shown = _heaviest(rows, top)
        blocks.append(Heading(3, f"{r.label}: {pipeline_label(r.data)}"))
        if len(shown) < len(rows):
            blocks.append(Para(f"The {len(shown)} heaviest of {len(rows)} layers, in model order."))
        if plot is not None:
            blocks.append(plot("macs", r.label, shown, f"MACs per layer: {r.label} ({pipeline_label(r.data)})"))
        table = [[f"`{name}`", op, "-" if b is None else f"{b:,}", "removed" if a is None else f"{a:,}",
                  fmt_ratio(b, a) if b is not None and a is not None else "-"] for name, op, b, a in shown]
        blocks.append(Table(["layer", "op", "MACs before", "MACs after", "ratio"], table, {2, 3, 4}))
    return blocks if any(isinstance(b, Table) for b in blocks) else []


# --- sensitivity --------------------------------------------------------------------------------


def sensitivity_section(sources: list[Source], top: int, plot: Callable | None) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Layer sensitivity")]
    for s in sources:
        d = s.data
        base = d.get("baseline") or {}
        blocks.append(Heading(3, f"{s.label}: {Path(str(d.get('model', '-'))).name}"))
        blocks.append(Para(f"Method `{d.get('method', '-')}` on {d.get('samples', '-')} samples; each layer "
                           f"compressed alone, the rest in float. Whole model: SQNR "
                           f"{fmt_number(base.get('sqnr_db'), '.1f')} dB, "
                           f"cosine {fmt_number(base.get('cosine'), '.6f')}. Lower SQNR = more sensitive."))
        layers = d["layers"]
        by_sqnr = sorted(range(len(layers)), key=lambda i: (_sort_sqnr(layers[i]), i))[:top]
        if plot is not None and layers:
            title = f"per-layer sensitivity: {s.label} ({d.get('method', '-')})"
            blocks.append(plot("sensitivity", s.label, [layers[i] for i in sorted(by_sqnr)],
                               as_float(base.get("sqnr_db")), title))
        rows = [[f"`{layers[i]['node']}`", str(layers[i].get("op_type", "-")),
                 fmt_number(layers[i].get("macs"), ",.0f"), fmt_number(layers[i].get("sqnr_db"), ".1f"),
                 fmt_number(layers[i].get("cosine"), ".6f")] for i in by_sqnr]
        blocks.append(Table(["layer (most sensitive first)", "op", "MACs", "SQNR dB", "cosine"], rows, {2, 3, 4}))
    return blocks


def _sort_sqnr(layer: dict) -> float:
    f = as_float(layer.get("sqnr_db"))
    return math.inf if f is None or math.isnan(f) else f


# --- bench --------------------------------------------------------------------------------------


def _machine_line(m: dict) -> str:
    threads = m.get("threads")
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, onnxruntime {m.get('onnxruntime', '?')}, "
            f"{m.get('provider', '?')}, intra-op threads {'default' if threads == 0 else threads}, "
            f"ORT graph optimizations {'on' if m.get('ort_optimization') else 'off'}")


def bench_section(benches: list[Source]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Latency")]
    for b in benches:
        d = b.data
        s = d.get("settings") or {}
        models = d["models"]
        first = Path(models[0]["name"]).name if models else "-"
        blocks += [Heading(3, b.label),
                   Para(f"{_machine_line(d.get('machine') or {})}. {s.get('runs', '?')} interleaved rounds after "
                        f"{s.get('warmup', '?')} warm-up. \"vs first\": median over rounds of the round's time / "
                        f"`{first}`'s time in the same round (p10–p90 of those ratios).")]
        rows = [[f"`{short_name(m['name'])}`", human_bytes(m.get("file_bytes") or 0), human_count(m.get("params") or 0),
                 human_count(m.get("macs") or 0), fmt_number(m["median_ms"], ".3f"), fmt_number(m["p90_ms"], ".3f"),
                 fmt_number(m["min_ms"], ".3f"), _bench_ratio(m)] for m in models]
        blocks.append(Table(["model", "size", "params", "MACs", "median ms", "p90 ms", "min ms", "vs first"],
                            rows, {1, 2, 3, 4, 5, 6, 7}))
    return blocks


def _bench_ratio(m: dict) -> str:
    r = as_float(m.get("ratio_vs_first"))
    if r is None or math.isnan(r):
        return "-"
    lo, hi = as_float(m.get("ratio_p10")), as_float(m.get("ratio_p90"))
    spread = f" ({lo:.3f}–{hi:.3f})" if lo is not None and hi is not None and not math.isnan(lo) else ""
    return f"{r:.3f}×{spread}"


def _latency_cell(p: Point) -> str:
    return "–" if p.median_ms is None else f"{p.median_ms:.3f}"


def pareto_section(inputs: Inputs, lineages: list[Lineage], plot: Callable | None) -> list[Block]:
    """Every true original and every run, with its latency where a bench measured it ("–" else);
    the plot when two points have both coordinates."""
    metric, points = accuracy_points(inputs, lineages)
    blocks: list[Block] = [Heading(2, "Accuracy vs latency")]
    shown = [p for p in points if p.plotted]
    if plot is not None and len(shown) >= 2:
        blocks.append(plot("pareto", "runs", shown, metric))
    benches = sorted({p.bench for p in shown if p.bench})
    note = "" if len(benches) <= 1 else " Latencies come from different bench runs; compare with care."
    source = f"median ms from {', '.join(f'`{b}`' for b in benches)}" if benches else "no bench matched"
    missing = [p.label for p in points if p.median_ms is None]
    if missing:
        note += (" No latency (\"–\") for " + ", ".join(f"`{m}`" for m in missing) + ": run `onnxcompress bench` "
                 "on those models (the paths `optimize` wrote) and pass its JSON too.")
    if any(not p.comparable for p in points):
        note += " Runs not measured against their original are left out of the Pareto front."
    blocks.append(Para(f"Quality: {metric} on the validation data; latency: {source}. Pareto front: no other "
                       f"model is both at least as fast and at least as good.{note}"))
    rows = [[p.label, f"`{p.model}`", p.reference,
             "-" if p.quality is None else f"{p.quality:.4f}" if metric == "cosine" else f"{p.quality:.2f}",
             _latency_cell(p), ("–" if p.median_ms is None else "-") if p.ratio is None else f"{p.ratio:.3f}×",
             "yes" if p.front else "" if p.plotted and p.comparable else "–"] for p in points]
    blocks.append(Table(["run", "model", "measured", metric, "median ms", "vs first", "Pareto front"], rows,
                        {3, 4, 5}))
    return blocks
