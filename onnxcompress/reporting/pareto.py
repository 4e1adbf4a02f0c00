"""Accuracy vs latency: ``optimize`` runs joined with ``bench`` results by model path (the run's
``output`` for the optimized model, the ``model`` of its chain's first run for the true original),
Pareto front marked. Runs without a bench keep their row (no latency)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from onnxcompress.reporting.chains import Lineage, originals
from onnxcompress.reporting.inputs import Inputs, Source
from onnxcompress.reporting.runs import as_float, run_accuracy, run_outputs, short_name, worst_metric

__all__ = ["Point", "pareto_front", "accuracy_points"]


@dataclass
class Point:
    """One model on the accuracy/latency plane; ``median_ms`` None when no bench measured it,
    ``quality`` None when it was not validated. ``comparable``: its quality is measured against
    its true original (or is an accuracy on labels), so it may join the Pareto front."""

    label: str
    model: str
    quality: float | None
    median_ms: float | None
    ratio: float | None
    bench: str | None
    baseline: bool = False
    front: bool = False
    reference: str = "vs original"
    comparable: bool = True

    @property
    def plotted(self) -> bool:
        """Whether the point has both coordinates."""
        return self.quality is not None and self.median_ms is not None


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


def _baseline_entry(lin: Lineage, index: dict, benches: list[Source]) -> tuple[dict, str] | None:
    """The bench entry of a chain's true original: by path, else (older JSON without ``model``)
    the entry with the first run's size, params and MACs before."""
    found = _lookup(index, lin.original_path)
    if found or lin.original_path:
        return found
    before = lin.chain[0].data["before"]
    for b in benches:
        for m in b.data["models"]:
            if (m.get("file_bytes"), m.get("params"), m.get("macs")) == (
                    before["file_bytes"], before["params"], before["macs"]):
                return m, Path(b.path).name
    return None


def _original_points(lineages: list[Lineage], metric: str, quality: Callable, index: dict,
                     benches: list[Source]) -> list[Point]:
    """One point per true original, with its quality (100 %, 1.0, or its accuracy on labels)."""
    labels = originals(lineages)
    points: dict[str, Point] = {}
    for lin in lineages:
        d = lin.run.data
        q = quality(d, True) if run_outputs(d) and (lin.comparable or metric != "accuracy %") else None
        point = points.get(lin.original_key)
        if point is None:
            found = _baseline_entry(lin, index, benches)
            point = _point(labels[lin.original_key], lin.original_name, found, q, True)
            point.reference = ""
            points[lin.original_key] = point
        elif point.quality is None:
            point.quality = q
    return list(points.values())


def accuracy_points(inputs: Inputs, lineages: list[Lineage]) -> tuple[str, list[Point]]:
    """The metric's name and a point per true original and per run (originals first), with or
    without latency; the Pareto front marked among the points that have both coordinates and
    are measured against their original (accuracy on labels always is)."""
    validated = [r for r in inputs.runs if run_outputs(r.data)]
    metric, quality = _quality_metric(validated)
    index = _bench_index(inputs.benches)
    points = _original_points(lineages, metric, quality, index, inputs.benches)
    for lin in lineages:
        d = lin.run.data
        q = quality(d, False) if run_outputs(d) else None
        found = _lookup(index, d.get("output"))
        name = Path(str(d.get("output"))).name if d.get("output") else "(not written)"
        point = _point(lin.run.label, name, found, q, False)
        point.reference, point.comparable = lin.vs, lin.comparable or metric == "accuracy %"
        points.append(point)
    ranked = [p for p in points if p.plotted and p.comparable]
    for p, front in zip(ranked, pareto_front([(p.median_ms or 0.0, p.quality or 0.0) for p in ranked])):
        p.front = front
    return metric, points


def _point(label: str, model: str, found: tuple[dict, str] | None, quality: float | None, baseline: bool) -> Point:
    if found is None:
        return Point(label, model, quality, None, None, None, baseline)
    m, bench = found
    ratio = as_float(m.get("ratio_vs_first"))
    return Point(label, short_name(m["name"]), quality, float(m["median_ms"]),
                 None if ratio is None or math.isnan(ratio) else ratio, bench, baseline)
