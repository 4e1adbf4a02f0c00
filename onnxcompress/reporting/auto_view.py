"""``auto``'s results: the terminal summary (chosen pipeline, speed-up, size, accuracy, the table of
every candidate with the Pareto front) and the report section built from ``auto --json``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table as RichTable

from onnxcompress.reporting.display import human_bytes
from onnxcompress.reporting.document import Block, Heading, Para, Table
from onnxcompress.reporting.inputs import Source
from onnxcompress.reporting.pareto import Point

__all__ = ["show_auto", "auto_section", "candidate_rows", "AUTO_COLUMNS"]

#: Columns of the candidate table (terminal and report alike).
AUTO_COLUMNS = ["candidate", "stage", "gate", "latency", "size", "MACs", "accuracy % (change)", "cosine",
                "Pareto", "chosen"]


def _r(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}×"


def _acc(rec: dict) -> str:
    if rec.get("accuracy") is None:
        return "–"
    drop = rec.get("accuracy_drop")
    return f"{rec['accuracy']:.2f}" + ("" if drop is None else f" ({-drop:+.2f})")


def candidate_rows(payload: dict) -> list[list[str]]:
    """One row per evaluated candidate, fastest passing first, then the failed ones."""
    recs = sorted(payload["candidates"], key=lambda r: (not r.get("passed"), r.get("latency_ratio") or 9e9,
                                                        r.get("size_ratio") or 9e9, r["spec"]))
    return [[r["label"], r.get("stage", ""), "pass" if r.get("passed") else "fail", _r(r.get("latency_ratio")),
             _r(r.get("size_ratio")), _r(r.get("macs_ratio")), _acc(r),
             "–" if r.get("cosine") is None else f"{r['cosine']:.4f}", "yes" if r.get("front") else "",
             "◀" if r.get("winner") else ""] for r in recs]


def _targets(payload: dict) -> str:
    return ", ".join(f"{k} ≤ {v:g}" for k, v in payload["targets"].items())


def _quality(payload: dict) -> str:
    gate = payload["gate"]
    parts = ([f"accuracy drop ≤ {gate['max_top1_drop']:g} points"] if "max_top1_drop" in gate else []) + \
        [f"cosine ≥ {gate['min_cosine']:g}"]
    return ", ".join(parts)


def _summary(rec: dict, base_ms: float | None) -> str:
    lat = rec.get("latency_ratio")
    speed = f"speed-up {1 / lat:.2f}× (latency {lat:.3f}× of the original" + \
        (f", {rec['median_ms']:.3f} vs {base_ms:.3f} ms)" if base_ms and rec.get("median_ms") else ")") if lat else \
        "latency not measured"
    size = f"size {rec['size_ratio']:.3f}× ({human_bytes(rec['file_bytes'])})"
    acc = "" if rec.get("accuracy") is None else \
        f", accuracy {rec['ref_accuracy']:.2f} → {rec['accuracy']:.2f} %"
    return f"{speed}, {size}, MACs {rec['macs_ratio']:.3f}×{acc}, cosine {rec['cosine']:.4f}"


def show_auto(console: Any, payload: dict, reproduce: str | None = None) -> None:
    """The candidate table, then the chosen pipeline (or the best found) with its figures."""
    table = RichTable(title=f"auto: {_targets(payload)}; {_quality(payload)}")
    for i, col in enumerate(AUTO_COLUMNS):
        table.add_column(col, justify="right" if 3 <= i <= 7 else "left")
    for row in candidate_rows(payload):
        table.add_row(*row)
    console.print(table)
    sig = payload["signals"]
    console.print(f"{payload['evaluated']} evaluated, {payload['cached']} from the cache, {payload['seconds']:.0f} s"
                  + (" (budget spent)" if payload["budget_exhausted"] else "") +
                  ("" if sig.get("int8_latency_ratio") is None else f"; int8 vs float here: {sig['int8_latency_ratio']:.2f}×"))
    if payload.get("machine"):
        console.print(f"latency: {payload['machine']}")
    win = payload["winner"]
    if win is None:
        best = payload.get("best")
        console.print("no candidate met the targets" + ("" if best is None else
                      f"; closest: {best['spec']} ({'; '.join(best.get('misses') or [])})"))
        return
    console.print(f"chosen pipeline: {win['spec']}")
    console.print(_summary(win, sig.get("latency_base_ms")))
    if reproduce:
        console.print(f"reproduce: {reproduce}")


def _points(payload: dict, label: str) -> tuple[str, list[Point]]:
    metric = "accuracy %" if payload.get("quality") == "accuracy" else "cosine"
    key = "accuracy" if metric == "accuracy %" else "cosine"
    base_ms = payload["signals"].get("latency_base_ms")
    ref = next((r.get("ref_accuracy") for r in payload["candidates"] if r.get("ref_accuracy") is not None), None)
    points = [Point("original", label, ref if key == "accuracy" else 1.0, base_ms, 1.0, None, baseline=True)] \
        if base_ms else []
    for r in payload["candidates"]:
        if r.get("passed") and r.get("latency_ratio") is not None and base_ms:
            p = Point(r["label"], Path(r["model_path"]).name, r.get(key), r["latency_ratio"] * base_ms,
                      r["latency_ratio"], None, front=bool(r.get("front")))
            points.append(p)
    return metric, points


def auto_section(sources: list[Source], plot: Callable | None) -> list[Block]:
    """Per ``auto`` JSON: the targets, the chosen pipeline, the candidate table and the accuracy-vs-latency
    plot with the Pareto front (passed candidates, timed against the original in one run)."""
    blocks: list[Block] = []
    for src in sources:
        d = src.data
        blocks.append(Heading(2, f"auto search ({src.label})"))
        win = d.get("winner")
        chosen = f"Chosen pipeline: `{win['spec']}`; {_summary(win, d['signals'].get('latency_base_ms'))}." if win \
            else "No candidate met the targets."
        blocks.append(Para(f"Targets: {_targets(d)}; quality: {_quality(d)}. {chosen} {d['evaluated']} candidates "
                           f"evaluated ({d['cached']} from the cache). Latency: {d.get('machine') or 'not measured'}."))
        metric, points = _points(d, src.label)
        if plot is not None and len(points) >= 2:
            blocks.append(plot("pareto", f"auto-{src.label}", points, metric))
        blocks.append(Table(AUTO_COLUMNS, candidate_rows(d), {3, 4, 5, 6, 7}))
    return blocks
