"""The streaming histogram behind every range observer (see :mod:`onnxcompress.quant.observers`).

:class:`HistogramCollector` keeps the exact ``min``/``max``, the sample and exact-zero counts, and
two histograms of ``|x|`` (one for ``x > 0``, one for ``x < 0``) sharing one bin width ``w`` with
edges at ``k * w``. ``w`` is a power of two: the smallest with ``max|x| < bins * w`` over the data
seen so far; when a batch exceeds the covered range, ``w`` doubles (adjacent bin pairs merge,
exactly). Streaming in any number of batches therefore builds the same histogram as one pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

try:  # the compiled kernel (pyproject's optional extension): the same counts ~2.3x faster per value
    import _onnxcompress_histogram as _kernel
except ImportError:  # no compiler at install time: numpy counts
    _kernel = None

__all__ = ["CHUNK", "DEFAULT_BINS", "SAMPLE_BLOCK", "SAMPLE_SEED", "HistogramCollector", "compiled", "grid_terms"]

log = logging.getLogger(__name__)

#: Bins per side of the ``|x|`` histograms (TensorRT uses 2048 too).
DEFAULT_BINS = 2048
#: Values binned at once by :meth:`HistogramCollector.update` (small enough to stay in cache).
CHUNK = 1 << 16
#: Values per block of a sampled histogram (see :meth:`HistogramCollector._update_sampled`).
SAMPLE_BLOCK = 64
#: Seed of the sampled blocks' places.
SAMPLE_SEED = 20261205


class HistogramCollector:
    """Streaming statistics of one tensor: count, exact zeros, min, max and ``|x|`` histograms.

    Args:
        bins: Bins of each of the two ``|x|`` histograms (positive and negative part).
        sample: Bin at most about this many values per :meth:`update` (see there); 0: all.
        minmax_only: Keep ``count``, ``min``, ``max`` and the width, and bin nothing: for a tensor
            whose range is its min/max whatever the method (binning is most of calibration's cost).
    """

    def __init__(self, bins: int = DEFAULT_BINS, *, sample: int = 0, minmax_only: bool = False):
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        if sample and sample < SAMPLE_BLOCK:
            raise ValueError(f"sample must be 0 (every value) or >= {SAMPLE_BLOCK}, got {sample}")
        self.bins = bins
        self.sample = sample
        self.minmax_only = minmax_only
        self.count = 0
        self.zeros = 0
        self.min = math.inf
        self.max = -math.inf
        self.width = 0.0
        self.pos = np.zeros(bins, np.int64)
        self.neg = np.zeros(bins, np.int64)
        self._buf: np.ndarray | None = None  # scratch of one update (see _bin)
        self._idx: np.ndarray | None = None
        self._lanes: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        """Add the values of ``x`` (any shape; non-finite values are ignored).

        The values are read in chunks of :data:`CHUNK` (min, max and binning of a chunk while it
        is in cache, with reused buffers): one pass over memory, and the same histogram as binning
        all at once (see the module docstring). With ``sample`` (> 0) and at least twice that many
        values, only a sample of them is binned (see :meth:`_update_sampled`).
        """
        a = np.asarray(x).ravel()
        if not a.size:
            return
        if self.minmax_only:
            a, lo, hi = _finite_part(a)
            if a.size:
                self._account(a, lo, hi)
            return
        if self.sample and a.size >= 2 * self.sample:
            self._update_sampled(a)
            return
        self._bin(a, self._update_chunk)

    def _update_sampled(self, a: np.ndarray) -> None:
        """``min``, ``max`` and ``count`` over all of ``a``; the histograms from a sample.

        ``k = a.size // sample``; the values are cut into blocks of :data:`SAMPLE_BLOCK` and one
        block of every ``k`` (at a seeded random place in its group: the same places for every
        tensor of this size) is binned, each count weighing ``k``. Contiguous blocks at random
        places keep the sample from following a stride of the layout (every other channel, say).
        """
        a, lo, hi = _finite_part(a)
        if a.size < 2 * self.sample:  # non-finite values dropped: too few left to sample
            if a.size:
                self._bin(a, self._update_chunk)
            return
        if not self._account(a, lo, hi):
            return
        weight = a.size // self.sample
        blocks = a.size // SAMPLE_BLOCK
        picked = a[: blocks * SAMPLE_BLOCK].reshape(blocks, SAMPLE_BLOCK)[_sample_blocks(blocks, weight)].ravel()
        self._bin(picked, lambda part: self._add(part, weight))

    def _bin(self, a: np.ndarray, each: Callable[[np.ndarray], None]) -> None:
        """``each(chunk)`` for the :data:`CHUNK`-sized pieces of ``a``; the lane counts numpy's path
        accumulates (in scratch buffers :meth:`_add` sets up on first use) are folded into the
        histograms at the end."""
        try:
            for start in range(0, a.size, CHUNK):
                each(a[start:start + CHUNK])
            if self._lanes is not None:
                self._fold()
        finally:
            self._idx = self._buf = self._lanes = None

    def _update_chunk(self, a: np.ndarray) -> None:
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float64)
        a, lo, hi = _finite_part(a)
        if a.size and self._account(a, lo, hi):
            self._add(a)

    def _account(self, a: np.ndarray, lo: float, hi: float) -> bool:
        """Count ``a`` (finite, with extremes ``lo``/``hi``) and widen the bins to cover it; False
        when it is all zeros (counted, nothing to bin)."""
        self.count += a.size
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        amax = max(hi, -lo)
        if amax == 0.0:
            self.zeros += a.size
            return False
        self._cover(amax)
        return True

    def _add(self, a: np.ndarray, weight: int = 1) -> None:
        """One ``bincount`` of ``floor(x / w) + bins``; exact zeros come out of the first positive bin.

        For ``x < 0`` this puts ``|x|`` in ``(k w, (k+1) w]`` (the upper edge closed), for ``x > 0``
        in ``[k w, (k+1) w)``. Binning by ``floor`` with a power-of-two ``w`` is exact and merges
        exactly when ``w`` doubles, on both sides. Every value counts ``weight`` times.

        Odd positions count in a second histogram (index ``+ 2 bins``), added to the first when
        the counts are folded (:meth:`_fold`): runs of equal values (the zeros of a Relu output)
        then increment two counters in turn rather than one, which halves ``bincount``'s chain of
        dependent increments. The counts are the same integers.

        With the compiled kernel (:func:`compiled`) one C loop does the same count, in lanes of its
        own folded into the histograms before it returns, with the same exact arithmetic
        (``x * (1 / w)`` is exact, then ``floor``).
        """
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float64)
        if _kernel is not None and self.width >= 2.0**-100:
            self.zeros += _kernel.count(np.ascontiguousarray(a), 1.0 / self.width, self.bins, self.pos, self.neg,
                                        weight) * weight
            return
        if self._lanes is None:  # scratch buffers, kept until the end of this update (see _bin)
            self._idx, self._lanes = np.empty(CHUNK, np.int32), np.zeros(4 * self.bins, np.int64)
            self._buf = np.empty(CHUNK, a.dtype)
        buf, idx = self._buf, self._idx
        if self.width < 2.0**-100 or a.dtype != buf.dtype:  # keep 1 / width finite in the arithmetic below
            a = a.astype(np.float64)
            signed = np.empty(a.size, np.float64)
        else:
            signed = buf[: a.size]
        np.multiply(a, a.dtype.type(1.0 / self.width), out=signed)  # exact: the width is a power of two
        np.floor(signed, out=signed)
        signed += _lane_offsets(self.bins, signed.dtype)[: a.size]  # exact: small integers
        index = idx[: a.size]
        index[...] = signed
        counts = np.bincount(index, minlength=4 * self.bins)[: 4 * self.bins]
        if counts[self.bins] or counts[3 * self.bins]:  # zeros land in those bins
            zeros = _count_zeros(a, index) * weight
            self.zeros += zeros
            self.pos[0] -= zeros
        if weight != 1:
            counts *= weight
        self._lanes += counts

    def _fold(self) -> None:
        """Add the lane counts gathered by :meth:`_add` since the last fold to the histograms."""
        lanes = self._lanes
        both = lanes.reshape(2, -1).sum(axis=0)
        self.pos += both[self.bins:]
        self.neg += both[self.bins - 1::-1]
        lanes[...] = 0

    def _cover(self, amax: float) -> None:
        """Grow the (power-of-two) bin width, merging bin pairs, until ``amax < bins * width``."""
        if self.width == 0.0:
            _, exp = math.frexp(amax / self.bins)
            self.width = math.ldexp(1.0, exp)
        factor = 1
        while amax >= self.width * factor * self.bins:
            factor *= 2
        if factor > 1:
            if self._lanes is not None:
                self._fold()  # counts gathered at the old width
            self.pos, self.neg = _merge(self.pos, factor), _merge(self.neg, factor)
            self.width *= factor

    @property
    def amax(self) -> float:
        """``max|x|`` (0 before any value)."""
        return 0.0 if self.count == 0 else max(abs(self.min), abs(self.max))

    def abs_histogram(self, *, with_zeros: bool = True) -> np.ndarray:
        """Counts of ``|x|`` per bin (exact zeros in bin 0 unless ``with_zeros`` is False)."""
        h = self.pos + self.neg
        if with_zeros:
            h = h.copy()
            h[0] += self.zeros
        return h

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for a cache file (see :meth:`from_arrays`)."""
        meta = np.array([self.count, self.zeros, self.min, self.max, self.width, self.bins, self.minmax_only], np.float64)
        return {"meta": meta, "pos": self.pos.copy(), "neg": self.neg.copy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> HistogramCollector:
        """Rebuild a collector saved by :meth:`to_arrays`."""
        count, zeros, lo, hi, width, bins, *flags = (float(v) for v in arrays["meta"])
        minmax_only = flags[0] if flags else 0.0  # absent before cache version 2
        c = cls(int(bins), minmax_only=bool(minmax_only))
        c.count, c.zeros, c.min, c.max, c.width = int(count), int(zeros), lo, hi, width
        c.pos, c.neg = arrays["pos"].astype(np.int64), arrays["neg"].astype(np.int64)
        return c


def grid_terms(x: np.ndarray, n: np.ndarray, step: np.ndarray, low: np.ndarray, high: np.ndarray,
               out: np.ndarray) -> bool:
    """``out[r] = (x - clip(round(x / step[r]), low[r], high[r]) * step[r]) ** 2 * n`` with the
    compiled kernel, in one pass and to the same bits as numpy's passes (see
    :func:`onnxcompress.quant.observers._grid_error`); False, nothing written, without it.
    Every argument is a C-contiguous float64 array, ``out`` of ``len(step) x len(x)``."""
    if _kernel is None:
        return False
    _kernel.grid_terms(x, n, step, low, high, out)
    return True


def compiled() -> bool:
    """Whether the compiled kernel is installed (else numpy counts and computes the MSE grid, to the same bits)."""
    return _kernel is not None


_LANES: dict[tuple[int, np.dtype], np.ndarray] = {}


def _finite_part(a: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``a`` without its non-finite values, and its min and max (NaN when nothing is left)."""
    lo, hi = float(a.min()), float(a.max())
    if math.isfinite(lo) and math.isfinite(hi):
        return a, lo, hi
    finite = np.isfinite(a)
    log.debug("ignoring %d non-finite values", int((~finite).sum()))
    a = a[finite]
    if not a.size:
        return a, math.nan, math.nan
    return a, float(a.min()), float(a.max())


def _lane_offsets(bins: int, dtype: np.dtype) -> np.ndarray:
    """``bins`` at even positions, ``3 bins`` at odd ones (:data:`CHUNK` values; see ``_add``)."""
    key = (bins, np.dtype(dtype))
    if key not in _LANES:
        lanes = np.full(CHUNK, bins, dtype)
        lanes[1::2] += 2 * bins
        _LANES[key] = lanes
    return _LANES[key]


_SAMPLES: dict[tuple[int, int], np.ndarray] = {}


def _sample_blocks(blocks: int, step: int) -> np.ndarray:
    """One block of each group of ``step`` among ``blocks`` (the last, partial group left out), at a
    place drawn from a generator seeded by ``(SAMPLE_SEED, blocks, step)``: ascending indices."""
    key = (blocks, step)
    if key not in _SAMPLES:
        groups = blocks // step
        rng = np.random.default_rng([SAMPLE_SEED, blocks, step])
        _SAMPLES[key] = np.arange(groups, dtype=np.intp) * step + rng.integers(0, step, groups)
    return _SAMPLES[key]


def _count_zeros(a: np.ndarray, scratch: np.ndarray) -> int:
    """Exact zeros in ``a``, using ``scratch`` (at least ``a.size`` bytes, no longer needed) for the
    comparison: a vectorised ``==`` then a count of bytes, several times faster than
    ``count_nonzero`` on floats."""
    equal = scratch.view(np.bool_)[: a.size]
    np.equal(a, 0, out=equal)
    return int(np.count_nonzero(equal))


def _merge(h: np.ndarray, factor: int) -> np.ndarray:
    """Merge groups of ``factor`` adjacent bins, keeping the length (zeros appended)."""
    out = np.zeros_like(h)
    if factor >= h.size:
        out[0] = h.sum()
        return out
    merged = h.reshape(-1, factor).sum(axis=1)
    out[: merged.size] = merged
    return out
