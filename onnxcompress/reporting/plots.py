"""PNG plots: per-layer MACs, layer sensitivity and accuracy vs latency for ``onnxcompress report``,
and the sensitivity bar chart of ``onnxcompress sensitivity --plot`` (the same figure as the report's).

Figures are drawn with matplotlib's default style and written without software/date metadata, so
the same data gives the same bytes. Axes take data-driven limits with a small margin (a quality
axis never passes 100 % or a cosine of 1 unless the data does), long titles and labels are
wrapped, point labels are placed where they overlap nothing, and the saved area is fitted to
everything drawn, so no label is cut.
"""

from __future__ import annotations

import io
import math
import os
import re
import textwrap
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
           "Plotter", "axis_limits", "pareto_figure"]

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


def _wrap(text: str, width: int = 64) -> str:
    """``text`` broken into lines of at most ``width`` characters (titles fit the figure's width)."""
    return "\n".join(textwrap.wrap(text, width)) or text


def _figure(rows: int) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(8, max(2.5, 0.28 * rows + 1.2)), dpi=100, layout="constrained")


def _plot_macs(rows: list[tuple], title: str) -> Any:
    fig = _figure(len(rows))
    ax = fig.add_subplot()
    ax.set_title(_wrap(title), fontsize=10)
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
    ax.set_title(_wrap(title), fontsize=10)
    ax.set_yticks(range(len(shown)), [_clip(str(layer["node"])) for layer in layers], fontsize=7)
    ax.invert_yaxis()
    marks = [baseline] if baseline is not None and math.isfinite(baseline) else []
    ax.set_xlim(*axis_limits([0.0, *shown, *marks], floor=0.0, margin=0.03))
    ax.set_xlabel("output SQNR, dB, with only this layer compressed\n(lower = more sensitive; red: the worst 3)")
    return fig


#: Upper bounds of the quality metrics: an axis goes beyond them only when the data does.
_METRIC_CAP = {"accuracy %": 100.0, "top-1 agreement %": 100.0, "cosine": 1.0}


def axis_limits(values: Sequence[float], cap: float | None = None, floor: float | None = None,
                margin: float = 0.06) -> tuple[float, float]:
    """Data-driven axis limits: the data's range widened by ``margin`` of its span (a little
    around a single value), never above ``cap`` unless the data is, never below ``floor``."""
    lo, hi = min(values), max(values)
    pad = margin * (hi - lo) if hi > lo else max(abs(hi) * 0.01, 1e-3)
    top, bottom = hi + pad, lo - pad
    if cap is not None and hi <= cap:
        top = cap if hi == cap and lo == hi else min(top, cap)
        bottom = min(bottom, cap - 2 * pad) if lo == hi == cap else bottom
    if floor is not None and lo >= floor:
        bottom = max(bottom, floor)
    return bottom, top


def pareto_figure(points: list[Point], metric: str) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for p in points:
        color = "#d62728" if p.front else "#7f7f7f"
        ax.scatter([p.median_ms], [p.quality], marker="s" if p.baseline else "o", s=40, zorder=3, clip_on=False,
                   edgecolors=color, facecolors=color if p.comparable else "none")
    front = sorted((p.median_ms, p.quality) for p in points if p.front)
    ax.step([f[0] for f in front], [f[1] for f in front], where="post", color="#d62728", linewidth=1,
            label="Pareto front", clip_on=False)
    ax.set_xlim(*axis_limits([p.median_ms for p in points], floor=0.0))
    ax.set_ylim(*axis_limits([p.quality for p in points], cap=_METRIC_CAP.get(metric)))
    ax.set_xlabel("median latency, ms (onnxruntime)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs latency (square: original; red: Pareto front; hollow: not measured against "
                 "the original)" if any(not p.comparable for p in points) else
                 f"{metric} vs latency (square: original; red: Pareto front)", fontsize=9, wrap=True)
    ax.grid(True, linewidth=0.3)
    if len(front) > 1:
        ax.legend(loc="best", fontsize=8)
    _place_labels(fig, ax, [((p.median_ms, p.quality), p.label if p.comparable else f"{p.label} ({p.reference})")
                            for p in points])
    return fig


#: Where a point's label may go, in points from the point: (dx, dy, horizontal, vertical alignment).
_SPOTS = [(dx * k, dy * k, ha, va) for k in (1, 2, 3) for dx, dy, ha, va in (
    (5, 4, "left", "bottom"), (5, -4, "left", "top"), (-5, 4, "right", "bottom"), (-5, -4, "right", "top"),
    (0, 7, "center", "bottom"), (0, -7, "center", "top"))]


def _place_labels(fig: Any, ax: Any, items: list[tuple[tuple[float, float], str]]) -> None:
    """Annotate each point with its label at the first spot (see :data:`_SPOTS`) where the label stays
    inside the axes and overlaps neither another label nor a point; the layout is then frozen, so
    the labels stay where they were checked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.canvas.draw()  # runs the layout: display coordinates are final from here
    fig.set_layout_engine("none")
    renderer, frame = fig.canvas.get_renderer(), ax.get_window_extent()
    marks = [_box(*ax.transData.transform(xy), 5.0) for xy, _ in items]
    placed: list[Any] = [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    for xy, text in items:
        best = None
        for dx, dy, ha, va in _SPOTS:
            label = ax.annotate(text, xy, textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=8,
                                annotation_clip=False)
            box = label.get_window_extent(renderer)
            clashes = sum(box.overlaps(b) for b in placed + marks) + (0 if _inside(box, frame) else 1)
            if best is None or clashes < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clashes, label, box)
            else:
                label.remove()
            if clashes == 0:
                break
        assert best is not None
        placed.append(best[2])


def _box(x: float, y: float, half: float) -> Any:
    from matplotlib.transforms import Bbox

    return Bbox([[x - half, y - half], [x + half, y + half]])


def _inside(box: Any, frame: Any) -> bool:
    return box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1


_PLOTTERS = {"macs": _plot_macs, "sensitivity": sensitivity_figure, "pareto": pareto_figure}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


class Plotter:
    """Draws a figure and returns its :class:`Image` (the PNG's bytes, for HTML to embed); with
    ``write`` the PNG is also written to ``<stem>-<kind>-<label>.png`` next to the document
    (Markdown links it) and listed in ``files``."""

    def __init__(self, folder: Path, stem: str, write: bool = True):
        self.folder, self.stem, self.write = folder, stem, write
        self.files: list[Path] = []

    def __call__(self, kind: str, label: str, *args: Any) -> Image:
        name = f"{self.stem}-{kind}-{_slug(label)}.png"
        data = _png(_PLOTTERS[kind], args)
        if self.write:
            atomic_write(self.folder / name, lambda fh: fh.write(data))
            self.files.append(self.folder / name)
        return Image(name, f"{kind} plot: {label}", data)


def _png(draw: Callable[..., Any], args: Sequence[Any]) -> bytes:
    """``draw(*args)`` in matplotlib's default style as PNG bytes: no software/date metadata, and
    the saved area fitted to everything drawn (no label is cut)."""
    import matplotlib.style

    with matplotlib.style.context("default"):
        fig = draw(*args)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None}, bbox_inches="tight", pad_inches=0.1)
    return buffer.getvalue()


def _save_png(draw: Callable[..., Any], args: Sequence[Any], path: Path) -> None:
    """:func:`_png` written to ``path``, atomically."""
    data = _png(draw, args)
    atomic_write(path, lambda fh: fh.write(data))


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
