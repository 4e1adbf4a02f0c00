"""onnxcompress.reporting.plots."""

from __future__ import annotations

import os

from onnxcompress.core.errors import InputError
from onnxcompress.pipeline.sensitivity import SensitivityReport
from onnxcompress.reporting.display import _noise

NO_MATPLOTLIB = "matplotlib is not installed: pip install 'onnxcompress[plot]'"


def require_matplotlib() -> None:
    """Raise :class:`InputError` (with the install hint) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(NO_MATPLOTLIB) from None


def plot_sensitivity(report: SensitivityReport, path: str | os.PathLike, top: int = 20) -> None:
    """Horizontal bar chart (PNG) of each layer's output SQNR when quantized alone, most sensitive on top.

    Raises:
        InputError: matplotlib missing, or the folder does not exist / is not writable.
    """
    require_matplotlib()
    import tempfile
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{folder}: folder does not exist")
    shown = report.layers[:top] if top > 0 else report.layers
    noise = _noise(report.layers)[:len(shown)]
    labels = [f"{s.node} ({s.op_type})" for s in shown]
    width = 4 + 0.075 * max((len(x) for x in labels), default=10)
    fig = Figure(figsize=(width + 5, 1.4 + 0.3 * len(shown)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.barh(labels, noise, color="#4c72b0")
    for bar, s in zip(bars, shown):
        ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{s.sqnr_db:.1f} dB", va="center",
                fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.18)
    ax.set_xlabel("output noise power with only this layer int8, relative to the most sensitive layer")
    ax.set_title(f"{Path(report.model).name}: quantization sensitivity ({report.method}, {report.samples} samples; "
                 f"all int8: {report.baseline.sqnr_db:.1f} dB)", fontsize=10)
    fig.tight_layout()
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxcompress-", suffix=".png", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror})") from None
