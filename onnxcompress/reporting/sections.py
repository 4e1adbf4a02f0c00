"""The report's sections, each a list of blocks built from the inputs: summary, passes and their
declines, per-layer MACs, layer sensitivity, latency, accuracy vs latency."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from onnxcompress._version import __version__
from onnxcompress.reporting.display import human_bytes, human_count
from onnxcompress.reporting.document import Block, Heading, Para, Table
from onnxcompress.reporting.inputs import Inputs, Source
from onnxcompress.reporting.pareto import accuracy_points
from onnxcompress.reporting.runs import (
    as_float,
    fmt_number,
    fmt_pct,
    fmt_ratio,
    pipeline_label,
    run_accuracy,
    short_name,
    worst_entry,
    worst_metric,
)

__all__ = ["document_blocks", "layer_macs"]


def document_blocks(inputs: Inputs, title: str, top: int, plot: Callable | None, note: str | None) -> list[Block]:
    """The whole document: title, provenance, then each section its inputs allow."""
    names = ", ".join(f"`{Path(s.path).name}` ({s.kind})" for s in inputs.all())
    blocks: list[Block] = [Heading(1, title), Para(f"Made by onnxcompress {__version__} from {names}.")]
    if note:
        blocks.append(Para(note))
    if inputs.runs:
        blocks += summary_section(inputs.runs) + passes_section(inputs.runs) + macs_section(inputs.runs, top, plot)
    if inputs.sensitivities:
        blocks += sensitivity_section(inputs.sensitivities, top, plot)
    if inputs.benches:
        blocks += bench_section(inputs.benches)
    if inputs.runs and inputs.benches:
        blocks += pareto_section(inputs, plot)
    return blocks


def _gate(run: dict) -> str:
    v = run.get("validation")
    if not isinstance(v, dict):
        return "not validated"
    if v.get("passed", run.get("passed", True)):
        return "passed"
    failures = v.get("failures") or []
    return "FAILED" + (f": {failures[0]}" if failures else "")


def _model_name(run: dict) -> str:
    return Path(run["model"]).name if run.get("model") else "-"


def _before_after(run: dict, key: str, fmt: Callable[[float], str]) -> str:
    b, a = run["before"][key], run["after"][key]
    return f"{fmt(b)} → {fmt(a)} ({fmt_ratio(b, a)})"


def _worst(run: dict, key: str, spec: str) -> str:
    """The worst value over outputs and slices; a slice is named (``0.91 (output0[4:84])``)."""
    entry = worst_entry(run, key)
    if entry is None:
        return fmt_number(None, spec)
    value, name = entry
    return fmt_number(value, spec) + (f" ({name})" if name else "")


def summary_section(runs: list[Source]) -> list[Block]:
    rows = []
    for r in runs:
        d = r.data
        ref, cand = run_accuracy(d)
        acc = "-" if ref is None else f"{fmt_pct(ref)} → {fmt_pct(cand)}"
        rows.append([r.label, _model_name(d), f"`{pipeline_label(d)}`", str(d.get("numerics", "-")),
                     _before_after(d, "file_bytes", human_bytes), _before_after(d, "params", human_count),
                     _before_after(d, "macs", human_count), _worst(d, "cosine", ".6f"),
                     _worst(d, "sqnr_db", ".1f"), fmt_pct(worst_metric(d, "top1_agreement")),
                     acc, _gate(d)])
    headers = ["run", "model", "pipeline", "numerics", "size", "params", "MACs", "cosine (worst)", "SQNR dB (worst)",
               "top-1 agreement", "accuracy ref → new", "gate"]
    blocks: list[Block] = [Heading(2, "Summary"), Table(headers, rows, {7, 8, 9})]
    data = sorted({str(d.data["validation"].get("data")) for d in runs if isinstance(d.data.get("validation"), dict)})
    if data:
        blocks.append(Para("Validated on: " + "; ".join(f"`{x}`" for x in data) + "." + (
            " The runs used different data, so their metrics are not directly comparable." if len(data) > 1 else "")))
    return blocks


def _stats_text(stats: dict) -> str:
    items = [(k, v) for k, v in (stats or {}).items() if v]
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
        blocks.append(Table(["pass", "declined (code)", "count", "where (first 3)"], declined, {2})
                      if declined else Para("Nothing declined."))
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


def macs_section(runs: list[Source], top: int, plot: Callable | None) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Per-layer MACs")]
    for r in runs:
        rows = layer_macs(r.data)
        if not rows:
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
    return blocks


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


def pareto_section(inputs: Inputs, plot: Callable | None) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Accuracy vs latency")]
    metric, points = accuracy_points(inputs)
    if len(points) < 2:
        return blocks + [Para("Not enough points: run `onnxcompress bench` on the original and the optimized "
                              "models (the paths `optimize` wrote) and pass its JSON too.")]
    if plot is not None:
        blocks.append(plot("pareto", "runs", points, metric))
    benches = sorted({p.bench for p in points})
    note = "" if len(benches) == 1 else " Latencies come from different bench runs; compare with care."
    blocks.append(Para(f"Quality: {metric} on the validation data; latency: median ms from "
                       f"{', '.join(f'`{b}`' for b in benches)}. Pareto front: no other model is both at least as "
                       f"fast and at least as good.{note}"))
    rows = [[p.label, f"`{p.model}`", f"{p.quality:.4f}" if metric == "cosine" else f"{p.quality:.2f}",
             f"{p.median_ms:.3f}", "-" if p.ratio is None else f"{p.ratio:.3f}×", "yes" if p.front else ""]
            for p in points]
    blocks.append(Table(["run", "model", metric, "median ms", "vs first", "Pareto front"], rows, {2, 3, 4}))
    return blocks
