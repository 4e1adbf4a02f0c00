"""PNG plots: per-layer MACs, layer sensitivity and accuracy vs latency for ``onnxcompress report``,
and the sensitivity bar chart of ``onnxcompress sensitivity --plot`` (the same figure as the report's).

Figures are drawn with matplotlib's default style and written without software/date metadata, so
the same data gives the same bytes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxcompress.core.errors import InputError
from onnxcompress.core.fileio import atomic_write
from onnxcompress.reporting.document import Image
from onnxcompress.reporting.pareto import Point
from onnxcompress.reporting.runs import as_float

if TYPE_CHECKING:
    from onnxcompress.pipeline.sensitivity import SensitivityReport

__all__ = ["NO_MATPLOTLIB", "require_matplotlib", "plots_available", "sensitivity_figure", "plot_sensitivity",
           "Plotter"]

NO_MATPLOTLIB = "matplotlib is not installed: pip install 'onnxcompress[plot]'"


def require_matplotlib() -> None:
    """Raise :class:`InputError` (with the install hint) when matplotlib is missing."""
    if not plots_available():
        raise InputError(NO_MATPLOTLIB)


def plots_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        return False
    return True


def _clip(name: str, n: int = 40) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def _figure(rows: int) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(8, max(2.5, 0.28 * rows + 1.2)), dpi=100, layout="constrained")


def _plot_macs(rows: list[tuple], title: str) -> Any:
    fig = _figure(len(rows))
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    y = list(range(len(rows)))
    ax.barh([v - 0.2 for v in y], [(r[2] or 0) / 1e6 for r in rows], height=0.4, label="before", color="#9aa5b1")
    ax.barh([v + 0.2 for v in y], [(r[3] or 0) / 1e6 for r in rows], height=0.4, label="after", color="#1f77b4")
    ax.set_yticks(y, [_clip(r[0]) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MMACs per sample")
    ax.legend(loc="lower right")
    return fig


def sensitivity_figure(layers: list[dict], baseline: float | None, title: str) -> Any:
    """Bars of each layer's output SQNR with only it compressed (``layers`` as in the sensitivity JSON),
    the worst 3 in red, the whole model's SQNR dashed; infinite/missing values drawn at 1.1 x the best."""
    fig = _figure(len(layers))
    ax = fig.add_subplot()
    values = [as_float(layer.get("sqnr_db")) for layer in layers]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    cap = max(finite) * 1.1 if finite else 1.0
    shown = [cap if v is None or not math.isfinite(v) else v for v in values]
    worst = set(sorted(range(len(shown)), key=lambda i: (shown[i], i))[:3])
    ax.barh(range(len(shown)), shown, color=["#d62728" if i in worst else "#1f77b4" for i in range(len(shown))])
    if baseline is not None and math.isfinite(baseline):
        ax.axvline(baseline, color="k", linestyle="--", linewidth=1)
        title += f"; dashed: whole model {baseline:.1f} dB"
    ax.set_title(title, fontsize=10)
    ax.set_yticks(range(len(shown)), [_clip(str(layer["node"])) for layer in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output SQNR dB with only this layer compressed (lower = more sensitive; red: worst 3)")
    return fig


def _plot_pareto(points: list[Point], metric: str) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for p in points:
        ax.scatter([p.median_ms], [p.quality], marker="s" if p.baseline else "o", s=40, zorder=3,
                   color="#d62728" if p.front else "#7f7f7f")
    for (x, y), text in _point_labels(points):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((p.median_ms, p.quality) for p in points if p.front)
    ax.step([f[0] for f in front], [f[1] for f in front], where="post", color="#d62728", linewidth=1,
            label="Pareto front")
    ax.set_xlabel("median latency, ms (onnxruntime)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs latency (square: original; red: Pareto front)", fontsize=10)
    ax.grid(True, linewidth=0.3)
    ax.legend(loc="lower right")
    return fig


def _point_labels(points: list[Point]) -> list[tuple[tuple[float, float], str]]:
    """One label per cluster of points closer than 2 % of the axis spans ("original, default")."""
    xs, ys = [p.median_ms for p in points], [p.quality for p in points]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: list[tuple[tuple[float, float], list[str]]] = []
    for p in points:
        for (x, y), names in groups:
            if abs(p.median_ms - x) <= 0.02 * dx and abs(p.quality - y) <= 0.02 * dy:
                names.append(p.label)
                break
        else:
            groups.append(((p.median_ms, p.quality), [p.label]))
    return [(xy, ", ".join(names)) for xy, names in groups]


_PLOTTERS = {"macs": _plot_macs, "sensitivity": sensitivity_figure, "pareto": _plot_pareto}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


class Plotter:
    """Draws a figure into ``<stem>-<kind>-<label>.png`` next to the document and returns its Image."""

    def __init__(self, folder: Path, stem: str):
        self.folder, self.stem = folder, stem
        self.files: list[Path] = []

    def __call__(self, kind: str, label: str, *args: Any) -> Image:
        name = f"{self.stem}-{kind}-{_slug(label)}.png"
        path = self.folder / name
        _save_png(_PLOTTERS[kind], args, path)
        self.files.append(path)
        return Image(name, f"{kind} plot: {label}")


def _save_png(draw: Callable[..., Any], args: Sequence[Any], path: Path) -> None:
    """Draw ``draw(*args)`` in matplotlib's default style and write it to ``path`` as PNG, atomically."""
    import matplotlib.style

    with matplotlib.style.context("default"):
        fig = draw(*args)
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", metadata={"Software": None}))


def plot_sensitivity(report: SensitivityReport, path: str | os.PathLike, top: int = 20) -> None:
    """The sensitivity bar chart (:func:`sensitivity_figure`) of the ``top`` most sensitive layers (0: all).

    Raises:
        InputError: matplotlib missing, or the folder does not exist / is not writable.
    """
    require_matplotlib()
    data = report.as_dict()
    layers = data["layers"][:top] if top > 0 else data["layers"]
    title = f"{Path(report.model).name}: quantization sensitivity ({report.method}, {report.samples} samples)"
    _save_png(sensitivity_figure, (layers, report.baseline.sqnr_db, title), Path(path))
