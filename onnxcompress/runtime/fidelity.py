"""Running-sum fidelity metrics of model outputs: what validation, mixed precision and sensitivity share.

An :class:`OutputAccumulator` takes batches of one output from a reference model and a candidate
and keeps only running sums: max and mean absolute error, relative max error, cosine similarity,
SQNR in dB, and for classifier-shaped outputs ``[N, C]`` top-1 agreement and, with labels, the
task accuracy of both models. :meth:`OutputAccumulator.result` turns them into
:class:`OutputMetrics`.

Channel slices. One output can mix quantities of very different scale along its feature axis
(axis 1): a YOLO head ``[N, 4+nc, A]`` holds box coordinates (0-320) and class scores (0-1), so
its whole-output cosine and SQNR only see the boxes. For outputs of rank >= 3 with at most
:data:`MAX_SLICE_CHANNELS` channels on axis 1, running sums are also kept per channel (never per
sample), and the same metrics are computed for *slices* ``[start:stop]`` of that axis:

* given slices (``--slices output0:0:4,output0:4:``, or a fixed set chosen once from the
  reference, see :class:`ReferenceScales`) always, for any output of rank >= 2;
* automatic slices when the channels fall into a few groups of clearly different scale: the
  channels' reference RMS values, sorted, are cut wherever one is more than
  :data:`AUTO_SLICE_RATIO` (10x) above the previous one (all-zero channels join the smallest
  group); each group's contiguous runs of channels become slices. A jump is needed, not a mere
  spread, so a smooth range of scales is never cut at an arbitrary point; more than
  :data:`MAX_AUTO_SLICES` runs means the scales are interleaved without a block layout, and no
  automatic slices are made (give ``--slices``).

:func:`worst` reduces a set of outputs to the one number every ranking uses: the lowest SQNR (then
cosine) over all outputs *and* their slices, with the name of the output or slice it comes from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from onnxcompress.core.errors import InputError, PassFailed
from onnxcompress.runtime.tasks import TaskMetrics

__all__ = ["AUTO_SLICE_RATIO", "ReferenceScales", "MAX_AUTO_SLICES", "MAX_SLICE_CHANNELS", "SliceSpec", "SliceMetrics",
           "OutputMetrics", "OutputAccumulator", "ChannelSums", "auto_slices", "fidelity_numbers",
           "worst"]

log = logging.getLogger(__name__)

#: Automatic slicing cuts the sorted per-channel reference RMS where it jumps by more than this.
AUTO_SLICE_RATIO = 10.0
#: More contiguous runs than this: scales are interleaved, no automatic slices.
MAX_AUTO_SLICES = 8
#: Per-channel sums only for outputs with at most this many channels on axis 1 (given slices: any).
MAX_SLICE_CHANNELS = 4096

#: ``{output name: [(start, stop or None), ...]}`` as parsed by
#: :func:`onnxcompress.pipeline.validate.parse_slices`.
SliceSpec = dict[str, list[tuple[int, int | None]]]


@dataclass
class SliceMetrics:
    """Agreement of the channels ``[start:stop]`` (axis 1) of one output."""

    start: int
    stop: int
    source: str  # "user" or "auto"
    max_abs: float = 0.0
    mean_abs: float = 0.0
    rel_max: float = 0.0
    cosine: float = 1.0
    sqnr_db: float = math.inf
    max_ref: float = 0.0
    rms_ref: float = 0.0

    def label(self, output: str) -> str:
        """``output[start:stop]``."""
        return f"{output}[{self.start}:{self.stop}]"


@dataclass
class OutputMetrics:
    """Agreement of one output between the reference and the candidate."""

    name: str
    samples: int = 0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    rel_max: float = 0.0
    cosine: float = 1.0
    sqnr_db: float = math.inf
    top1_agreement: float | None = None
    ref_accuracy: float | None = None
    cand_accuracy: float | None = None
    max_ref: float = 0.0
    slices: list[SliceMetrics] = field(default_factory=list)
    task: TaskMetrics | None = None

    def worst_slices(self, n: int | None = None) -> list[SliceMetrics]:
        """The slices, lowest SQNR (then cosine) first; at most ``n``."""
        ranked = sorted(self.slices, key=lambda s: (s.sqnr_db, s.cosine, s.start))
        return ranked if n is None else ranked[:n]

    @property
    def top1_drop(self) -> float | None:
        """Accuracy drop in percentage points (labels needed)."""
        if self.ref_accuracy is None or self.cand_accuracy is None:
            return None
        return 100.0 * (self.ref_accuracy - self.cand_accuracy)


def fidelity_numbers(ref_sq: float, cand_sq: float, err_sq: float, dot: float, max_abs: float,
              max_ref: float) -> tuple[float, float, float]:
    """``(cosine, SQNR dB, relative max error)`` from running sums."""
    norm = math.sqrt(ref_sq * cand_sq)
    cosine = dot / norm if norm > 0 else (1.0 if ref_sq == cand_sq else 0.0)
    sqnr = 10 * math.log10(ref_sq / err_sq) if err_sq > 0 else math.inf
    rel = max_abs / max_ref if max_ref > 0 else (0.0 if max_abs == 0 else math.inf)
    return cosine, sqnr, rel


class ChannelSums:
    """Running sums per channel of axis 1 (the feature axis)."""

    def __init__(self, channels: int):
        self.channels = channels
        self.per_channel = 0  # elements per channel so far
        z = np.zeros(channels)
        self.ref_sq, self.cand_sq, self.err_sq, self.dot = z.copy(), z.copy(), z.copy(), z.copy()
        self.sum_abs, self.max_abs, self.max_ref = z.copy(), z.copy(), z.copy()

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r = np.moveaxis(ref, 1, 0).reshape(self.channels, -1).astype(np.float64)
        c = np.moveaxis(cand, 1, 0).reshape(self.channels, -1).astype(np.float64)
        e = r - c
        self.per_channel += r.shape[1]
        self.ref_sq += np.einsum("ij,ij->i", r, r)
        self.cand_sq += np.einsum("ij,ij->i", c, c)
        self.err_sq += np.einsum("ij,ij->i", e, e)
        self.dot += np.einsum("ij,ij->i", r, c)
        if r.shape[1]:
            np.abs(e, out=e)
            self.sum_abs += e.sum(1)
            np.maximum(self.max_abs, e.max(1), out=self.max_abs)
            np.maximum(self.max_ref, np.abs(r).max(1), out=self.max_ref)

    def rms(self) -> np.ndarray:
        """Reference RMS per channel."""
        return np.sqrt(self.ref_sq / max(self.per_channel, 1))

    def metrics(self, start: int, stop: int, source: str) -> SliceMetrics:
        """Metrics of the channels ``[start:stop]``."""
        k = slice(start, stop)
        max_abs, max_ref = float(self.max_abs[k].max()), float(self.max_ref[k].max())
        ref_sq = float(self.ref_sq[k].sum())
        cosine, sqnr, rel = fidelity_numbers(ref_sq, float(self.cand_sq[k].sum()), float(self.err_sq[k].sum()),
                                      float(self.dot[k].sum()), max_abs, max_ref)
        count = max(self.per_channel * (stop - start), 1)
        return SliceMetrics(start, stop, source, max_abs, float(self.sum_abs[k].sum()) / count, rel, cosine, sqnr,
                            max_ref, math.sqrt(ref_sq / count))


def auto_slices(rms: np.ndarray, ratio: float = AUTO_SLICE_RATIO,
                max_runs: int = MAX_AUTO_SLICES) -> list[tuple[int, int]]:
    """Contiguous channel ranges of similar scale, or ``[]`` when the scales do not fall into groups
    (see the module docstring): sorted RMS cut at jumps above ``ratio``, each group's runs."""
    nonzero = np.flatnonzero(rms > 0)
    if len(nonzero) < 2:
        return []
    order = nonzero[np.argsort(rms[nonzero], kind="stable")]
    logs = np.log10(rms[order])
    group = np.zeros(len(rms), dtype=np.int64)  # all-zero channels stay in group 0, the smallest
    group[order] = np.concatenate([[0], np.cumsum(np.diff(logs) > math.log10(ratio))])
    if group.max() == 0:
        return []
    cuts = np.flatnonzero(np.diff(group)) + 1
    bounds = [0, *cuts.tolist(), len(rms)]
    if len(bounds) - 1 > max_runs:
        log.info("channel scales differ but are interleaved (%d runs); no automatic slices", len(bounds) - 1)
        return []
    return list(zip(bounds[:-1], bounds[1:]))


class OutputAccumulator:
    """Running sums for one output (and per channel of axis 1 when slices may be needed).

    Args:
        name: The output's name (for messages and :class:`OutputMetrics`).
        slices: Fixed slices ``[(start, stop or None)]`` of axis 1; checked against the shape seen.
        auto: Without ``slices``, cut automatic slices from this run's reference scales.
        source: How ``slices`` were chosen (``"user"`` for ``--slices``; ``"auto"`` for a fixed set
            chosen from the reference by :class:`ReferenceScales`).
    """

    def __init__(self, name: str, slices: list[tuple[int, int | None]] | None = None, auto: bool = True,
                 source: str = "user"):
        self.name = name
        self.n = self.count = 0
        self.max_abs = self.sum_abs = self.max_ref = 0.0
        self.ref_sq = self.cand_sq = self.err_sq = self.dot = 0.0
        self.agree = self.ref_correct = self.cand_correct = self.labelled = 0
        self.classifier = True
        self.given = slices or []
        self.source = source
        self.auto = auto
        self.channels: ChannelSums | None = None
        self.sliced: bool | None = None  # decided on the first batch

    def add(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None) -> None:
        """Add one batch of the reference's and the candidate's output."""
        if ref.shape != cand.shape:
            raise PassFailed(f"output {self.name!r} changed shape: {list(ref.shape)} -> {list(cand.shape)}")
        r = ref.astype(np.float64).ravel()
        c = cand.astype(np.float64).ravel()
        err = np.abs(r - c)
        self.n += len(ref)
        self.count += r.size
        if r.size:
            self.max_abs = max(self.max_abs, float(err.max()))
            self.max_ref = max(self.max_ref, float(np.abs(r).max()))
        self.sum_abs += float(err.sum())
        self.ref_sq += float(r @ r)
        self.cand_sq += float(c @ c)
        self.err_sq += float(err @ err)
        self.dot += float(r @ c)
        self._add_top1(ref, cand, labels)
        self._add_channels(ref, cand)

    def _add_channels(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if self.sliced is None:
            self.sliced = self._start_channels(ref)
        if not self.sliced or self.channels is None:
            return
        if ref.shape[1] != self.channels.channels:
            if self.given:
                raise InputError(f"output {self.name!r}: axis 1 changed between batches "
                                 f"({self.channels.channels} -> {ref.shape[1]}); slices need a fixed size")
            self.sliced, self.channels = False, None
            return
        self.channels.add(ref, cand)

    def _start_channels(self, ref: np.ndarray) -> bool:
        """Whether to keep per-channel sums; checks the user slices against the output's shape."""
        if ref.dtype.kind != "f":
            if self.given:
                raise InputError(f"--slices: output {self.name!r} is not a float tensor")
            return False
        if self.given:
            if ref.ndim < 2:
                raise InputError(f"--slices: output {self.name!r} has rank {ref.ndim}; slices need an axis 1")
            size = ref.shape[1]
            for start, stop in self.given:
                end = size if stop is None else stop
                if start >= size or end > size or start >= end:
                    raise InputError(f"--slices: {self.name}:{start}:{'' if stop is None else stop} is empty or "
                                     f"outside axis 1 of size {size}")
        elif not (self.auto and ref.ndim >= 3 and 2 <= ref.shape[1] <= MAX_SLICE_CHANNELS):
            return False
        self.channels = ChannelSums(ref.shape[1])
        return True

    def _add_top1(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None) -> None:
        self.classifier &= ref.ndim == 2 and ref.shape[1] > 1 and ref.dtype.kind == "f"
        if not self.classifier:
            return
        r1, c1 = ref.argmax(1), cand.argmax(1)
        self.agree += int((r1 == c1).sum())
        if labels is not None and len(labels) == len(r1):
            self.labelled += len(labels)
            self.ref_correct += int((r1 == labels).sum())
            self.cand_correct += int((c1 == labels).sum())

    def _slices(self) -> list[SliceMetrics]:
        ch = self.channels
        if ch is None or not self.sliced:
            return []
        if self.given:
            return [ch.metrics(start, ch.channels if stop is None else stop, self.source)
                    for start, stop in self.given]
        return [ch.metrics(start, stop, "auto") for start, stop in auto_slices(ch.rms())]

    def result(self) -> OutputMetrics:
        """The metrics of everything added so far."""
        cosine, sqnr, rel = fidelity_numbers(self.ref_sq, self.cand_sq, self.err_sq, self.dot, self.max_abs, self.max_ref)
        m = OutputMetrics(self.name, self.n, self.max_abs, self.sum_abs / max(self.count, 1), rel,
                          cosine, sqnr, max_ref=self.max_ref, slices=self._slices())
        if self.classifier and self.n:
            m.top1_agreement = self.agree / self.n
            if self.labelled:
                m.ref_accuracy = self.ref_correct / self.labelled
                m.cand_accuracy = self.cand_correct / self.labelled
        return m




class ReferenceScales:
    """Per-channel RMS of a reference model's outputs, to fix one slice set for many comparisons.

    Validation cuts automatic slices from each run's own reference; an evaluator comparing many
    candidates (mixed precision, sensitivity, latency-aware choice) must judge them all on the same
    slices, so it feeds the reference outputs here once and passes :meth:`slices` to every
    :class:`OutputAccumulator` (``auto=False``).
    """

    def __init__(self) -> None:
        self._sums: dict[str, ChannelSums | None] = {}

    def add(self, name: str, ref: np.ndarray) -> None:
        """Add one batch of the reference output ``name``."""
        sums = self._sums.get(name, ...)
        if sums is ...:
            ok = ref.dtype.kind == "f" and ref.ndim >= 3 and 2 <= ref.shape[1] <= MAX_SLICE_CHANNELS
            sums = self._sums[name] = ChannelSums(ref.shape[1]) if ok else None
        if sums is None:
            return
        if ref.shape[1] != sums.channels:
            self._sums[name] = None
            return
        sums.add(ref, ref)

    def slices(self, given: Mapping[str, list[tuple[int, int | None]]] | None = None) -> dict[str, tuple[list, str]]:
        """``{output: (slices, source)}``: ``given`` ones (source ``"user"``), else automatic ones."""
        out: dict[str, tuple[list, str]] = {name: (list(s), "user") for name, s in (given or {}).items()}
        for name, sums in self._sums.items():
            if name not in out and sums is not None:
                cuts = auto_slices(sums.rms())
                if cuts:
                    out[name] = (list(cuts), "auto")
        return out


def worst(outputs: Iterable[OutputMetrics]) -> tuple[float, float, str]:
    """``(lowest SQNR, lowest cosine, name)`` over every output and slice; ``name`` is the output or
    slice with the lowest SQNR (then cosine)."""
    outputs = list(outputs)
    items = [(o.sqnr_db, o.cosine, o.name) for o in outputs]
    items += [(s.sqnr_db, s.cosine, s.label(o.name)) for o in outputs for s in o.slices]
    if not items:
        return math.inf, 1.0, ""
    sqnr, cos, name = min(items, key=lambda t: (t[0], t[1]))
    return sqnr, min(t[1] for t in items), name
