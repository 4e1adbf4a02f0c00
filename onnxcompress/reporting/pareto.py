"""Accuracy vs latency: ``optimize`` runs joined with ``bench`` results by model path (the run's
``output`` for the optimized model, its ``model`` for the original), Pareto front marked."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from onnxcompress.reporting.inputs import Inputs, Source
from onnxcompress.reporting.runs import as_float, run_accuracy, run_outputs, short_name, worst_metric

__all__ = ["Point", "pareto_front", "accuracy_points"]


@dataclass
class Point:
    """One model on the accuracy/latency plane."""

    label: str
    model: str
    quality: float
    median_ms: float
    ratio: float | None
    bench: str
    baseline: bool = False
    front: bool = False


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For ``(latency, quality)`` pairs: True where no other point is at least as fast and as good
    and strictly better in one of the two."""
    out = []
    for i, (t, q) in enumerate(points):
        dominated = any(t2 <= t and q2 >= q and (t2 < t or q2 > q) for j, (t2, q2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def _norm(path: str) -> str:
    return os.path.normpath(path)


def _bench_index(benches: list[Source]) -> dict[str, tuple[dict, str]]:
    """Bench entries by normalized path and, where unambiguous, by file name (first bench wins)."""
    by_path: dict[str, tuple[dict, str]] = {}
    by_name: dict[str, list[tuple[dict, str]]] = {}
    for b in benches:
        for m in b.data["models"]:
            by_path.setdefault(_norm(m["name"]), (m, Path(b.path).name))
            by_name.setdefault(Path(m["name"]).name, []).append((m, Path(b.path).name))
    for name, found in by_name.items():
        if len({_norm(m["name"]) for m, _ in found}) == 1:
            by_path.setdefault("name:" + name, found[0])
    return by_path


def _lookup(index: dict, path: str | None) -> tuple[dict, str] | None:
    if not path:
        return None
    return index.get(_norm(path)) or index.get("name:" + Path(path).name)


def _quality_metric(runs: list[Source]) -> tuple[str, Callable[[dict, bool], float | None]]:
    """The metric every validated run has: accuracy, else top-1 agreement, else cosine."""
    def acc(d: dict, base: bool) -> float | None:
        ref, cand = run_accuracy(d)
        value = ref if base else cand
        return None if value is None else 100 * value

    def agree(d: dict, base: bool) -> float | None:
        v = 1.0 if base else worst_metric(d, "top1_agreement")
        return None if v is None or not run_outputs(d) else 100 * v

    def cos(d: dict, base: bool) -> float | None:
        return 1.0 if base and run_outputs(d) else worst_metric(d, "cosine")

    for name, fn in (("accuracy %", acc), ("top-1 agreement %", agree), ("cosine", cos)):
        if runs and all(fn(r.data, False) is not None for r in runs if run_outputs(r.data)):
            return name, fn
    return "cosine", cos


def _baseline_entry(run: dict, index: dict, benches: list[Source]) -> tuple[dict, str] | None:
    found = _lookup(index, run.get("model"))
    if found:
        return found
    before = run["before"]
    for b in benches:  # older JSON without "model": the bench entry with the same size, params, MACs
        for m in b.data["models"]:
            if (m.get("file_bytes"), m.get("params"), m.get("macs")) == (
                    before["file_bytes"], before["params"], before["macs"]):
                return m, Path(b.path).name
    return None


def accuracy_points(inputs: Inputs) -> tuple[str, list[Point]]:
    """The metric's name and the joined points (Pareto front marked), originals first."""
    runs = [r for r in inputs.runs if run_outputs(r.data)]
    metric, quality = _quality_metric(runs)
    index = _bench_index(inputs.benches)
    points: list[Point] = []
    seen: set[str] = set()
    for r in runs:
        base = _baseline_entry(r.data, index, inputs.benches)
        q = quality(r.data, True)
        if base and q is not None and _norm(base[0]["name"]) not in seen:
            seen.add(_norm(base[0]["name"]))
            points.append(_point("original", base, q, True))
    for r in runs:
        found, q = _lookup(index, r.data.get("output")), quality(r.data, False)
        if found and q is not None:
            points.append(_point(r.label, found, q, False))
    for p, front in zip(points, pareto_front([(p.median_ms, p.quality) for p in points])):
        p.front = front
    return metric, points


def _point(label: str, found: tuple[dict, str], quality: float, baseline: bool) -> Point:
    m, bench = found
    ratio = as_float(m.get("ratio_vs_first"))
    return Point(label, short_name(m["name"]), quality, float(m["median_ms"]),
                 None if ratio is None or math.isnan(ratio) else ratio, bench, baseline)
