"""Terminal rendering of reports (rich tables); plain text when stdout is not a terminal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from onnxcompress.core.metrics import ModelMetrics, NodeInfo
from onnxcompress.core.pass_api import PassRecord
from onnxcompress.core.shapes import describe_dims
from onnxcompress.pipeline.manager import registry
from onnxcompress.pipeline.sensitivity import LayerScore, SensitivityReport
from onnxcompress.pipeline.validate import ValidationReport
from onnxcompress.quant.channels import LayerOutliers
from onnxcompress.runtime.bench import _MIB, BenchReport

__all__ = ["show_report", "show_metrics", "show_nodes", "show_outliers", "show_transformer", "show_validation",
           "show_passes", "show_bench", "show_sensitivity", "human_bytes", "human_count"]


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _ratio(before: float, after: float) -> str:
    return f"{after / before:.3f}×" if before else "-"


def show_metrics(console: Console, m: ModelMetrics, top: int = 10) -> None:
    """The ``inspect`` view: totals, op counts and the heaviest nodes."""
    t = Table(title="model", show_header=False)
    t.add_row("file size", human_bytes(m.file_bytes))
    t.add_row("parameters", f"{m.params:,}")
    t.add_row("MACs / inference", f"{m.macs:,} ({human_count(m.macs)})")
    t.add_row("nodes", str(m.nodes))
    t.add_row("opset", str(m.opset))
    t.add_row("inputs", ", ".join(f"{k} {v}" for k, v in m.inputs.items()))
    if m.dims:
        t.add_row("symbolic dims", describe_dims(m.dims))
    t.add_row("outputs", ", ".join(f"{k} {v}" for k, v in m.outputs.items()))
    t.add_row("ops", ", ".join(f"{k}×{v}" for k, v in m.op_counts.items()))
    console.print(t)
    if m.per_node and top:
        nodes = Table(title=f"heaviest nodes (top {top})")
        for col in ("node", "op", "MACs", "share"):
            nodes.add_column(col, justify="right" if col in ("MACs", "share") else "left")
        for n in sorted(m.per_node, key=lambda n: -n.macs)[:top]:
            nodes.add_row(n.name or "?", n.op_type, f"{n.macs:,}", f"{100 * n.macs / m.macs:.1f}%")
        console.print(nodes)


def show_transformer(console: Console, blocks: dict) -> None:
    """The ``inspect`` view of transformer structure: attention blocks (heads × head size), FFN
    widths, and attention-like nodes that were not recognised (with the reason)."""
    t = Table(title="transformer blocks")
    for col in ("block", "kind", "heads", "head_dim", "width", "notes"):
        t.add_column(col, justify="right" if col in ("heads", "head_dim", "width") else "left")
    for b in blocks["attention"]:
        t.add_row(b["name"], f"attention ({b['style']})", str(b["heads"]), str(b["head_dim"]),
                  str(b["heads"] * b["head_dim"]), b["problem"] or "")
    for f in blocks["ffn"]:
        t.add_row(f["name"], "ffn", "", "", str(f["width"]), f["activation"])
    for u in blocks["unrecognised"]:
        t.add_row(u["node"], "not recognised", "", "", "", u["reason"])
    console.print(t)


def show_nodes(console: Console, nodes: list[NodeInfo]) -> None:
    """The ``inspect --nodes`` view: every node in order with its op type and output shapes."""
    t = Table(title=f"nodes ({len(nodes)})")
    for col in ("#", "node", "op", "outputs"):
        t.add_column(col, justify="right" if col == "#" else "left")
    for i, n in enumerate(nodes):
        outs = ", ".join(f"{name} {shape if shape else '?'}" for name, shape in n.outputs.items())
        t.add_row(str(i), n.name, n.op_type, outs)
    console.print(t)


def show_outliers(console: Console, layers: list[LayerOutliers]) -> None:
    """The ``inspect --calib`` outlier view: per MatMul/Gemm input, ``max / median`` of the per-channel
    ``max|x|`` (above ~10: a few channels carry outliers, ``smooth`` before int8 helps where it can act)."""
    t = Table(title="activation outliers per linear-layer input (per-channel max|x|)")
    for col in ("node", "op", "channels", "max", "median", "max/median", "smooth"):
        t.add_column(col, justify="left" if col in ("node", "op", "smooth") else "right")
    for o in layers:
        s = o.stats
        ratio = f"{s.ratio:.1f}" if math.isfinite(s.ratio) else "inf"
        t.add_row(o.node, o.op, str(s.channels), f"{s.max:.3g}", f"{s.median:.3g}", ratio,
                  "yes" if o.smoothable else o.reason)
    if not layers:
        t.add_row("(no MatMul/Gemm with a constant weight)", "", "", "", "", "", "")
    console.print(t)


def show_report(console: Console, before: ModelMetrics, after: ModelMetrics, records: list[PassRecord],
                validation: ValidationReport | None) -> None:
    """The ``optimize`` view: before/after, per-pass stats and declines, validation."""
    t = Table(title="before → after")
    for col in ("", "before", "after", "ratio"):
        t.add_column(col, justify="left" if not col else "right")
    t.add_row("file size", human_bytes(before.file_bytes), human_bytes(after.file_bytes),
              _ratio(before.file_bytes, after.file_bytes))
    t.add_row("parameters", f"{before.params:,}", f"{after.params:,}", _ratio(before.params, after.params))
    t.add_row("MACs", f"{before.macs:,}", f"{after.macs:,}", _ratio(before.macs, after.macs))
    t.add_row("nodes", str(before.nodes), str(after.nodes), _ratio(before.nodes, after.nodes))
    for op in sorted(set(before.op_counts) | set(after.op_counts)):
        b, a = before.op_counts.get(op, 0), after.op_counts.get(op, 0)
        if a != b:
            t.add_row(f"  {op}", str(b), str(a), "")
    console.print(t)
    if before.dims:
        console.print(_shapes_line(before), markup=False, highlight=False)
    _show_passes_run(console, records)
    _show_plans(console, records)
    if validation is not None:
        show_validation(console, validation)


def _shapes_line(m: ModelMetrics) -> str:
    """``MACs at images [1, 3, 320, 320]; symbolic dims height=320, width=320 (from --calib x.npz)``."""
    return f"MACs at {', '.join(f'{k} {v}' for k, v in m.inputs.items())}; symbolic dims {describe_dims(m.dims)}"


def _show_passes_run(console: Console, records: list[PassRecord]) -> None:
    t = Table(title="passes")
    for col in ("pass", "numerics", "changed", "MACs", "stats", "declined (code × count)", "s"):
        t.add_column(col)
    for r in records:
        stats = ", ".join(f"{k}={_num(v)}" for k, v in r.result.stats.items()
                          if v and not isinstance(v, (list, dict)))
        declined = "; ".join(f"{code} ×{n}" for code, n in r.result.decline_counts().items())
        macs = _ratio(r.macs_before, r.macs_after or 0) if r.macs_before is not None and r.macs_after != r.macs_before \
            else "-"
        t.add_row(r.name, r.numerics.name.lower(), "yes" if r.result.modified else "no", macs, stats or "-",
                  declined or "-", f"{r.seconds:.2f}")
    console.print(t)


def _show_plans(console: Console, records: list[PassRecord]) -> None:
    """Per-group pruning plans (``prune_channels`` stats ``plan``: ``macs=`` or ``dry_run``)."""
    for r in records:
        plan = r.result.stats.get("plan")
        if not isinstance(plan, list) or not plan:
            continue
        st = r.result.stats
        title = (f"{r.name} plan{' (dry run: nothing written)' if st.get('dry_run') else ''}: MACs "
                 f"{_num(st.get('macs_predicted'))} predicted" + (f", target {_num(st.get('macs_target'))}"
                                                                  if st.get("macs_target") else "")
                 + f", error by {st.get('sensitivity')}")
        t = Table(title=title)
        for col in ("group (anchor node)", "kept / total", "MACs", "predicted error"):
            t.add_column(col, justify="left" if col.startswith("group") else "right")
        for row in plan:
            t.add_row(str(row["anchor"]), f"{row['kept']} / {row['total']}", f"{row['macs']:,}",
                      f"{row['predicted_error']:.4g}")
        console.print(t)


def _num(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _fmt(v: float | None, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


#: Slices shown per output in the validation table (worst first).
WORST_SLICES_SHOWN = 3


def show_validation(console: Console, v: ValidationReport) -> None:
    """Per-output agreement metrics (and each output's worst channel slices) and the gate's verdict."""
    t = Table(title=f"validation: {v.data}, {v.samples} samples (onnxruntime CPU, optimizations off)")
    for col in ("output", "max abs err", "mean abs err", "rel max err", "cosine", "SQNR dB",
                "top-1 agree", "acc ref → new"):
        t.add_column(col, justify="left" if col == "output" else "right")
    for o in v.outputs:
        acc = "-" if o.ref_accuracy is None else f"{100 * o.ref_accuracy:.2f}% → {100 * o.cand_accuracy:.2f}%"
        t.add_row(o.name, _fmt(o.max_abs, ".3g"), _fmt(o.mean_abs, ".3g"), _fmt(o.rel_max, ".3g"),
                  _fmt(o.cosine, ".6f"), _fmt(o.sqnr_db, ".1f"),
                  _fmt(None if o.top1_agreement is None else 100 * o.top1_agreement, ".2f") + ("%" if o.top1_agreement is not None else ""),
                  acc)
        for sl in o.worst_slices(WORST_SLICES_SHOWN):
            t.add_row(f"  {sl.label(o.name)} ({sl.source})", _fmt(sl.max_abs, ".3g"), _fmt(sl.mean_abs, ".3g"),
                      _fmt(sl.rel_max, ".3g"), _fmt(sl.cosine, ".6f"), _fmt(sl.sqnr_db, ".1f"), "", "")
    console.print(t)
    hidden = sum(max(len(o.slices) - WORST_SLICES_SHOWN, 0) for o in v.outputs)
    if hidden:
        console.print(f"({hidden} better slice(s) not shown; all are in --json)")
    for o in v.outputs:
        if o.task is not None:
            console.print(f"task {o.name}: {o.task.summary()}")
    if v.task_note:
        console.print(v.task_note)
    if v.gate is not None:
        if v.passed:
            console.print("[green]gate passed[/green]")
        else:
            for failure in v.failures:
                console.print(f"[red]gate failed:[/red] {failure}")


def show_passes(console: Console, recipes: dict) -> None:
    """Every registered pass with its numerics, summary and options; then the recipes."""
    for name, cls in registry().items():
        console.print(f"[bold]{name}[/bold] ({cls.numerics.name.lower()}): {cls.summary()}")
        for key, opt in cls.options.items():
            choices = f" [{'|'.join(map(str, opt.choices))}]" if opt.choices else ""
            choices += f" {opt.interval}" if opt.interval else ""
            console.print(f"    {key}: {opt.type.__name__} = {opt.default!r}{choices}  {opt.help}", highlight=False)
    if recipes:
        console.print("\n[bold]recipes[/bold] (--recipe NAME):")
        for name, recipe in recipes.items():
            console.print(f"    {name}: {recipe}")


def _noise(layers: list[LayerScore]) -> list[float]:
    """Each layer's output noise power relative to the most sensitive layer's (1.0 for it)."""
    power = [10 ** (-s.sqnr_db / 10) if math.isfinite(s.sqnr_db) else 0.0 for s in layers]
    top = max(power, default=0.0)
    return [p / top if top > 0 else 0.0 for p in power]


def _bar(fraction: float, width: int = 24) -> str:
    blocks = " ▏▎▍▌▋▊▉█"
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, rest = divmod(eighths, 8)
    return ("█" * full + (blocks[rest] if rest else "")) or "▏"


def show_sensitivity(console: Any, report: SensitivityReport, top: int = 20) -> None:
    """Print the ranking on a rich ``console``: one row per layer, with a bar of its output noise."""
    from rich.table import Table

    from onnxcompress.reporting.display import human_count

    b = report.baseline
    acc = "" if report.float_accuracy is None or b.cand_accuracy is None else \
        f", accuracy {100 * report.float_accuracy:.2f}% -> {100 * b.cand_accuracy:.2f}%"
    console.print(f"{report.model}: {len(report.layers)} layers, method {report.method}, {report.samples} samples; "
                  f"all layers int8: SQNR {b.sqnr_db:.2f} dB, cosine {b.cosine:.6f}{acc}")
    if report.slices:
        cuts = "; ".join(f"{out} " + ", ".join(f"[{a}:{'' if z is None else z}]" for a, z in c)
                         for out, c in report.slices.items())
        console.print(f"scores are the worst over outputs and channel slices ({cuts}); column 'worst' names it")
    t = Table(title="layers quantized alone, most sensitive first (bar: output noise power, relative to the first)")
    cols = ("#", "node", "op", "MACs", "SQNR dB", "cosine") + (("worst",) if report.slices else ()) + ("noise",)
    for col in cols:
        t.add_column(col, justify="left" if col in ("node", "op", "noise", "worst") else "right")
    shown = report.layers[:top] if top > 0 else report.layers
    for i, (s, frac) in enumerate(zip(shown, _noise(report.layers)), 1):
        worst = (s.worst,) if report.slices else ()
        t.add_row(str(i), s.node, s.op_type, human_count(s.macs) if s.macs else "-", f"{s.sqnr_db:.2f}",
                  f"{s.cosine:.6f}", *worst, _bar(frac))
    console.print(t)
    if len(shown) < len(report.layers):
        console.print(f"({len(report.layers) - len(shown)} more layers; --top 0 shows all)")


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / _MIB:.1f}"


def _short_names(names: list[str]) -> list[str]:
    """File names without folders when that keeps them distinct, else the names as given."""
    short = [Path(n).name if n and not n.startswith("model[") else n for n in names]
    return short if len(set(short)) == len(set(names)) else names


def show_bench(console: Console, report: BenchReport) -> None:
    """Print the machine line and a table of the results on a rich ``console``."""
    console.print(report.machine.line())
    if report.dims:
        console.print(f"symbolic input dims: {describe_dims(report.dims)}", markup=False, highlight=False)
    shapes = ", ".join(f"{k} {v['shape']} {v['dtype']}" for k, v in report.inputs.items())
    s = report.settings
    t = Table(title=f"latency: {s['runs']} interleaved rounds after {s['warmup']} warm-up; inputs {shapes} ({s['data']})")
    for col in ("model", "size", "params", "MACs", "median ms", "p90 ms", "min ms", "vs first",
                "session ms", "RSS MiB (peak)"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for m, name in zip(report.models, _short_names([m.name for m in report.models])):
        ratio = "-" if math.isnan(m.ratio_vs_first) else f"{m.ratio_vs_first:.3f}×"
        t.add_row(name, human_bytes(m.file_bytes), human_count(m.params), human_count(m.macs),
                  f"{m.median_ms:.3f}", f"{m.p90_ms:.3f}", f"{m.min_ms:.3f}", ratio, f"{m.session_ms:.1f}",
                  f"{_mib(m.rss_delta_bytes)} ({_mib(m.peak_rss_delta_bytes)})")
    console.print(t)
    if len(report.models) > 1:
        console.print("vs first: median over rounds of (time in round) / (first model's time in the same round)")
