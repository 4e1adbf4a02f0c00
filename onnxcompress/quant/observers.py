"""Streaming range observers for activation calibration: minmax, percentile, entropy (KL), MSE.

Memory is a pair of histograms per tensor, never the samples. Every observer feeds the same
collector, :class:`HistogramCollector`, so statistics gathered once (and cached, see
:mod:`onnxcompress.quant.cache`) serve every method; a method only decides how to read them.

The collector keeps the exact ``min``/``max``, the sample and exact-zero counts, and two histograms
of ``|x|`` (one for ``x > 0``, one for ``x < 0``) sharing one bin width ``w`` with edges at
``k * w``. ``w`` is a power of two: the smallest with ``max|x| < bins * w`` over the data seen so
far. When a batch exceeds the covered range, ``w`` doubles (adjacent bin pairs merge, exactly)
until it fits. Because ``w`` depends only on the overall ``max|x|`` and binning by a power of two
is exact in floating point, streaming in any number of batches builds *the same* histogram as one
all-at-once pass, so every method gives the same range either way (at least ``bins / 2`` bins
cover ``[0, max|x|]``).

Ranges (``lo, hi``) for asymmetric quantization, or ``(-t, t)`` for symmetric:

* ``minmax``: ``(min, max)``.
* ``percentile``: asymmetric: the ``p`` and ``100 - p`` quantiles of ``x``; symmetric: the ``p``
  quantile of ``|x|``. Linear interpolation inside a bin, clamped to ``[min, max]``.
* ``entropy``: the TensorRT calibration rule. For each candidate threshold ``i`` (in bins), the
  reference ``P`` is ``h[:i]`` with the outliers ``sum(h[i:])`` added to its last bin; ``Q`` is
  ``h[:i]`` merged into ``L`` levels and spread back evenly over the bins of each level where
  ``P`` is non-zero.
  The threshold minimises ``KL(P || Q)`` (``Q`` smoothed with ``1e-6`` where ``P > 0 = Q``).
  Candidates: 128 spread over ``[L, used bins]``, then every bin around the best of them.
  The first bin's count is replaced by the second's before the search: the spike of exact zeros
  of a Relu output would otherwise dominate ``P`` and pull the threshold far too low.
  ``L = 256`` for one-sided tensors quantized asymmetrically, else 128 (per side). Symmetric
  ranges use the ``|x|`` histogram; asymmetric two-sided ones pick each tail's threshold from
  that side's histogram alone.
* ``mse``: the range minimising the squared quantization error over the histogram,
  ``sum_c n_c (c - dq(q(c)))^2`` with every bin centre ``c`` rounded to the candidate grid itself
  (clipping included; exact zeros are representable and add nothing). Rounding to the actual
  grid, rather than assuming ``step^2 / 12``, sees that values piled on a representable point
  (the saturated 6.0 of a Relu6, say) cost nothing. The search is a coarse grid of 256
  candidates over ``(max / 16, max]`` then a finer one around the best; asymmetric two-sided
  ranges alternate between ``hi`` and ``lo`` (three rounds).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from onnxcompress.quant.histogram import DEFAULT_BINS, HistogramCollector, grid_terms

__all__ = [
    "METHODS",
    "RANGE_RULES",
    "compute_range",
    "Observer",
    "MinMaxObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MseObserver",
    "make_observer",
]

log = logging.getLogger(__name__)

_KL_EPS = 1e-6


def _used_bins(h: np.ndarray) -> int:
    """Index one past the last non-empty bin."""
    nz = np.flatnonzero(h)
    return int(nz[-1]) + 1 if nz.size else 0


# ------------------------------------------------------------------------------------ percentile


def _signed_quantile(c: HistogramCollector, q: float) -> float:
    """The ``q`` quantile of ``x`` from the histograms (linear inside a bin)."""
    nb, w = c.bins, c.width
    counts = np.concatenate([c.neg[::-1], [c.zeros], c.pos]).astype(np.float64)
    lefts = np.concatenate([-np.arange(nb, 0, -1) * w, [0.0], np.arange(nb) * w])
    widths = np.concatenate([np.full(nb, w), [0.0], np.full(nb, w)])
    cum = np.cumsum(counts)
    target = q * cum[-1]
    k = min(int(np.searchsorted(cum, target, side="left")), counts.size - 1)
    before = cum[k - 1] if k else 0.0
    frac = (target - before) / counts[k] if counts[k] else 0.0
    return float(lefts[k] + frac * widths[k])


def _abs_quantile(c: HistogramCollector, q: float) -> float:
    h = c.abs_histogram().astype(np.float64)
    cum = np.cumsum(h)
    target = q * cum[-1]
    k = min(int(np.searchsorted(cum, target, side="left")), h.size - 1)
    before = cum[k - 1] if k else 0.0
    frac = (target - before) / h[k] if h[k] else 0.0
    return float((k + frac) * c.width)


def _percentile_range(c: HistogramCollector, percentile: float, symmetric: bool) -> tuple[float, float]:
    q = min(max(percentile / 100.0, 0.0), 1.0)
    if symmetric:
        t = min(_abs_quantile(c, q), c.amax)
        return -t, t
    hi = _signed_quantile(c, q)
    lo = _signed_quantile(c, 1.0 - q)
    return max(lo, c.min), min(hi, c.max)


# --------------------------------------------------------------------------------------- entropy


def _kl_divergence(h: np.ndarray, i: int, levels: int) -> float:
    """``KL(P || Q)`` for threshold bin ``i`` (TensorRT's reference/candidate construction)."""
    src = h[:i]
    p = src.copy()
    p[i - 1] += h[i:].sum()
    support = p > 0
    starts = (np.arange(levels) * i) // levels
    sums = np.add.reduceat(src, starts)
    nonzero = np.add.reduceat(support.astype(np.float64), starts)
    per_bin = np.where(nonzero > 0, sums / np.maximum(nonzero, 1.0), 0.0)
    q = np.repeat(per_bin, np.diff(np.append(starts, i))) * support
    if q.sum() <= 0:
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    q = np.where(support & (q == 0), _KL_EPS, q)
    q = q / q.sum()
    return float(np.sum(p[support] * np.log(p[support] / q[support])))


def _kl_threshold(h: np.ndarray, width: float, levels: int) -> float:
    """The KL-optimal threshold (an upper bin edge) for the ``|x|`` histogram ``h``."""
    h = h.astype(np.float64)
    if h.size > 1:
        h[0] = h[1]  # the spike of exact zeros (Relu outputs) would dominate P; take its neighbour
    used = _used_bins(h)
    if used <= levels:
        return used * width
    coarse = np.unique(np.linspace(levels, used, min(128, used - levels + 1)).round().astype(np.int64))
    best = int(coarse[int(np.argmin([_kl_divergence(h, int(i), levels) for i in coarse]))])
    step = int(coarse[1] - coarse[0]) if coarse.size > 1 else 1
    fine = np.arange(max(levels, best - step), min(used, best + step) + 1)
    return float(fine[int(np.argmin([_kl_divergence(h, int(i), levels) for i in fine]))]) * width


def _entropy_range(c: HistogramCollector, symmetric: bool) -> tuple[float, float]:
    if not symmetric and c.min >= 0:
        return 0.0, min(_kl_threshold(c.pos + _zeros_bin(c), c.width, 256), c.max)
    if not symmetric and c.max <= 0:
        return max(-_kl_threshold(c.neg + _zeros_bin(c), c.width, 256), c.min), 0.0
    if symmetric:
        t = min(_kl_threshold(c.abs_histogram(), c.width, 128), c.amax)
        return -t, t
    # two-sided asymmetric: each tail on its own (a spike on one side, e.g. the background value
    # of normalized images, must not set the threshold of the other)
    hi = min(_kl_threshold(c.pos + _zeros_bin(c), c.width, 128), c.max)
    lo = max(-_kl_threshold(c.neg + _zeros_bin(c), c.width, 128), c.min)
    return lo, hi


def _zeros_bin(c: HistogramCollector) -> np.ndarray:
    z = np.zeros(c.bins, np.int64)
    z[0] = c.zeros
    return z


# ------------------------------------------------------------------------------------------- mse


def _signed_centres(c: HistogramCollector) -> tuple[np.ndarray, np.ndarray]:
    """Centres and counts of the non-empty bins of ``x`` (exact zeros left out)."""
    centres = (np.arange(c.bins) + 0.5) * c.width
    x = np.concatenate([-centres[::-1], centres])
    n = np.concatenate([c.neg[::-1], c.pos]).astype(np.float64)
    keep = n > 0
    return x[keep], n[keep]


def _grid_error(x: np.ndarray, n: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, symmetric: bool) -> np.ndarray:
    """Squared error of rounding the values ``x`` (counts ``n``) to each candidate grid.

    Asymmetric: 256 levels ``(q - z) * step``, ``step = (hi - lo) / 255``, ``z = round(-lo / step)``.
    Symmetric: ``q * step`` for ``q`` in ``[-128, 127]``, ``step = hi / 127``.
    """
    if symmetric:
        step = np.maximum(hi, 1e-30) / 127.0
        zp, qmin, qmax = np.zeros_like(step), -128.0, 127.0
    else:
        step = np.maximum(hi - lo, 1e-30) / 255.0
        zp, qmin, qmax = np.clip(np.round(-lo / step), 0, 255), 0.0, 255.0
    err = np.zeros(step.shape)
    # clip(r + zp, qmin, qmax) - zp == clip(r, qmin - zp, qmax - zp): r, zp and the bounds are
    # integers (exact in float64), and a rounded value too large for r + zp to be exact is clipped
    # to the same bound either way
    step_col, low, high = step[:, None], (qmin - zp)[:, None], (qmax - zp)[:, None]
    flat = [np.ascontiguousarray(v.ravel(), np.float64) for v in (step, low, high)]
    work = np.empty(step.size * min(x.size, 1024))
    for start in range(0, x.size, 1024):  # bounded temporaries: candidates x 1024 values
        xs, ns = x[start:start + 1024], n[start:start + 1024]
        t = work[: step.size * xs.size].reshape(step.size, xs.size)
        if grid_terms(xs, ns, *flat, t):  # the compiled kernel: the same terms in one pass
            err += t.sum(axis=1)
            continue
        # in place: ((xs - (clip(round(xs / step) + zp) - zp) * step) ** 2 * ns).sum(1), the same bits
        np.divide(xs[None, :], step_col, out=t)
        np.round(t, out=t)
        np.clip(t, low, high, out=t)
        t *= step_col
        np.subtract(xs[None, :], t, out=t)
        np.square(t, out=t)
        t *= ns[None, :]
        err += t.sum(axis=1)
    return err


def _search(error: Callable[[np.ndarray], np.ndarray], limit: float) -> float:
    """Minimise ``error(candidates)`` over ``(0, limit]``: a coarse grid, then a finer one."""
    coarse = np.linspace(limit / 16.0, limit, 256)
    best = float(coarse[int(np.argmin(error(coarse)))])
    step = coarse[1] - coarse[0]
    fine = np.linspace(max(best - step, limit / 64.0), min(best + step, limit), 65)
    return float(fine[int(np.argmin(error(fine)))])


def _mse_range(c: HistogramCollector, symmetric: bool) -> tuple[float, float]:
    x, n = _signed_centres(c)
    if symmetric:
        t = _search(lambda t: _grid_error(x, n, -t, t, symmetric=True), c.amax)
        return -t, t
    lo, hi = min(c.min, 0.0), max(c.max, 0.0)
    # a side searched again from the same other bound gives the same result: once a round leaves a
    # bound where it was, the rest of the descent repeats itself and is read from here
    found: dict[tuple[bool, float], float] = {}

    def best(upper: bool, other: float) -> float:
        if (upper, other) not in found:
            found[upper, other] = (
                _search(lambda h: _grid_error(x, n, np.full(h.shape, other), h, symmetric=False), max(c.max, 0.0))
                if upper else
                -_search(lambda m: _grid_error(x, n, -m, np.full(m.shape, other), symmetric=False), -min(c.min, 0.0)))
        return found[upper, other]

    for _ in range(3):  # coordinate descent; one pass suffices for one-sided tensors
        if hi > 0:
            hi = best(True, lo)
        if lo < 0:
            lo = best(False, hi)
        if lo == 0.0 or hi == 0.0:
            break
    return lo, hi


# ------------------------------------------------------------------------------------ public API


#: Calibration method -> its range rule ``(collector, symmetric, percentile) -> (lo, hi)``. A new
#: method is one entry here: ``quantize_int8:method`` choices, :func:`compute_range` and
#: :func:`make_observer` follow this table.
RANGE_RULES: dict[str, Callable[[HistogramCollector, bool, float], tuple[float, float]]] = {
    "minmax": lambda c, symmetric, _p: (-c.amax, c.amax) if symmetric else (c.min, c.max),
    "percentile": lambda c, symmetric, p: _percentile_range(c, p, symmetric),
    "entropy": lambda c, symmetric, _p: _entropy_range(c, symmetric),
    "mse": lambda c, symmetric, _p: _mse_range(c, symmetric),
}
METHODS = tuple(RANGE_RULES)


def compute_range(c: HistogramCollector, method: str, *, percentile: float = 99.99,
                  symmetric: bool = False) -> tuple[float, float]:
    """The calibrated range of a tensor.

    Args:
        c: The tensor's collected statistics.
        method: One of :data:`METHODS`.
        percentile: For ``percentile``: the kept fraction in percent (e.g. 99.99).
        symmetric: Return ``(-t, t)`` for a symmetric (zero point 0) grid; otherwise ``(lo, hi)``
            for an asymmetric 256-level grid.

    Returns:
        ``(lo, hi)``; ``(0.0, 0.0)`` when nothing but zeros (or nothing) was seen.

    Raises:
        ValueError: Unknown method, or a method other than ``minmax`` on min/max-only statistics.
    """
    rule = RANGE_RULES.get(method)
    if rule is None:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    if c.minmax_only and method != "minmax":
        raise ValueError(f"calibration method {method!r} needs a histogram; these statistics are min/max only")
    if c.count == 0 or c.width == 0.0:
        return 0.0, 0.0
    return rule(c, symmetric, percentile)


class Observer:
    """A streaming range observer: ``update`` batch by batch, then ``range`` or ``threshold``.

    Args:
        bins: Histogram bins per side.
        percentile: For ``percentile``: the kept fraction in percent.
        method: The calibration method (subclasses fix it).
    """

    method: ClassVar[str] = ""
    _by_method: ClassVar[dict[str, type[Observer]]] = {}

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if cls.method:
            Observer._by_method[cls.method] = cls

    def __init__(self, bins: int = DEFAULT_BINS, *, percentile: float = 99.99, method: str | None = None):
        self.collector = HistogramCollector(bins)
        self.percentile = percentile
        if method is not None:
            self.method = method  # type: ignore[misc]

    def update(self, x: np.ndarray) -> None:
        """Add one batch of values."""
        self.collector.update(x)

    def range(self, *, symmetric: bool = False) -> tuple[float, float]:
        """``(lo, hi)`` (or ``(-t, t)`` with ``symmetric``)."""
        return compute_range(self.collector, self.method, symmetric=symmetric, percentile=self.percentile)

    def threshold(self) -> float:
        """The symmetric threshold ``t``."""
        return self.range(symmetric=True)[1]


class MinMaxObserver(Observer):
    """Exact running ``min``/``max``."""

    method = "minmax"


class PercentileObserver(Observer):
    """The ``percentile`` / ``100 - percentile`` quantiles (``|x|`` quantile when symmetric)."""

    method = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = DEFAULT_BINS):
        super().__init__(bins, percentile=percentile)


class EntropyObserver(Observer):
    """KL-divergence threshold (TensorRT's rule) on the growing histogram."""

    method = "entropy"


class MseObserver(Observer):
    """Threshold(s) minimising the expected quantization MSE on the histogram."""

    method = "mse"


def make_observer(method: str, *, percentile: float = 99.99, bins: int = DEFAULT_BINS) -> Observer:
    """An observer for ``method`` (one of :data:`METHODS`): its class if it has one, else a plain
    :class:`Observer` of that method."""
    if method not in RANGE_RULES:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    cls = Observer._by_method.get(method)
    if cls is None:
        return Observer(bins, percentile=percentile, method=method)
    return cls(bins=bins, percentile=percentile)
