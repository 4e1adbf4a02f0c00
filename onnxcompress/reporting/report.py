"""Markdown/HTML reports from the JSON that ``optimize``, ``bench`` and ``sensitivity`` write.

:func:`build_report` reads any mix of those files and writes one document with these sections
(each only when its inputs are there):

* **Summary**: one row per ``optimize`` run: model, pipeline, size/params/MACs before → after
  with ratios, what its metrics compare with, validation metrics (worst over outputs), the
  gate's verdict; chains of runs traced to their original; calibration, validation data and
  preprocessing.
* **Passes**: per run, each pass's stats, and what it declined grouped by decline code (reports
  written before codes existed give a ``reason`` text instead, grouped the same way).
* **Per-layer MACs**: per run that changed them, MACs of each layer before and after (the heaviest ``top``).
* **Layer sensitivity**: per ``sensitivity`` file, SQNR/cosine per layer, worst first.
* **Latency**: per ``bench`` file, median/p90/min and the paired ratio vs its first model.
* **Accuracy vs latency**: every original and every run, joined with ``bench`` results by model
  path (latency "–" without one), with the Pareto front (no other point is both at least as
  fast and at least as accurate) marked.

Plots need matplotlib (``pip install 'onnxcompress[plot]'``); without it the report says so in
one line. Markdown links them as PNG files next to it; HTML embeds them (``data:`` URIs), so an
HTML file is self-contained (``-o report.html`` writes no PNG). The same JSON gives the same
bytes: no dates, input files named by their file name, PNGs written without software/date metadata.

Runs are linked into chains by the models' sha256 (:mod:`.chains`): each row says what its
metrics compare with, and each true original is one ``original`` point.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from onnxcompress.core.errors import InputError
from onnxcompress.core.fileio import atomic_write
from onnxcompress.reporting.document import render_html, render_markdown
from onnxcompress.reporting.inputs import load_inputs
from onnxcompress.reporting.plots import Plotter, plots_available
from onnxcompress.reporting.sections import document_blocks

__all__ = ["build_report", "PLOT_HINT", "DEFAULT_TOP"]

log = logging.getLogger(__name__)

#: The line a report carries instead of plots when matplotlib is missing.
PLOT_HINT = "Plots skipped: matplotlib is not installed (`pip install 'onnxcompress[plot]'` adds them)."

#: Layers shown per table and plot by default (the heaviest / most sensitive).
DEFAULT_TOP = 30


def _targets(output: Path, html_too: bool) -> tuple[Path | None, Path | None]:
    """(markdown path, html path): ``x.html`` gives HTML only; otherwise Markdown, plus HTML if asked."""
    if output.suffix.lower() in (".html", ".htm"):
        return None, output
    return output, (output.with_suffix(".html") if html_too else None)


def build_report(paths: Sequence[str | os.PathLike], output: str | os.PathLike, *, html: bool = False,
                 title: str | None = None, plots: bool = True, top: int = DEFAULT_TOP) -> list[Path]:
    """Write a report of the given ``optimize``/``bench``/``sensitivity`` JSON files.

    Args:
        paths: The JSON files (any order and mix).
        output: ``report.md`` (Markdown; with ``html`` also ``report.html``) or ``report.html``.
        html: Also write HTML next to the Markdown.
        title: The document's title (default: "onnxcompress report").
        plots: Draw PNG plots next to the document when matplotlib is installed.
        top: Layers shown per table and plot.

    Returns:
        The files written, PNGs first.

    Raises:
        InputError: A bad input file, a missing output folder, or ``top`` < 1.
    """
    if top < 1:
        raise InputError(f"--top must be at least 1, got {top}")
    inputs = load_inputs(paths)
    out = Path(output)
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: folder does not exist")
    md_path, html_path = _targets(out, html)
    plotter, note = None, None
    if plots and plots_available():
        plotter = Plotter(out.parent, out.stem, write=md_path is not None)
    elif plots:
        note = PLOT_HINT
        log.warning("matplotlib is not installed: the report has no plots (pip install 'onnxcompress[plot]')")
    title = title or "onnxcompress report"
    blocks = document_blocks(inputs, title, top, plotter, note)
    written = list(plotter.files) if plotter else []
    if md_path is not None:
        text = render_markdown(blocks)
        atomic_write(md_path, lambda fh: fh.write(text.encode("utf-8")))
        written.append(md_path)
    if html_path is not None:
        page = render_html(blocks, title)
        atomic_write(html_path, lambda fh: fh.write(page.encode("utf-8")))
        written.append(html_path)
    return written
