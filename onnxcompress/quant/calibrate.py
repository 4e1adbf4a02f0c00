"""Run a float model on calibration data and collect per-tensor histograms (with the cache)."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxcompress.quant.cache import cache_key, load_cache, save_cache
from onnxcompress.quant.histogram import DEFAULT_BINS, HistogramCollector
from onnxcompress.runtime.batching import Batch
from onnxcompress.runtime.capture import CAPTURE_BUDGET, Consumer, capture
from onnxcompress.runtime.data import CalibSource

__all__ = ["Calibration", "collect_statistics"]

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """What :func:`collect_statistics` gathered.

    Attributes:
        collectors: ``{tensor name: statistics}`` for every requested tensor.
        samples: Samples run through the model in this call (0 on a full cache hit).
        cached: Tensors whose statistics came from the cache.
        key: The cache key (empty without a cache).
    """

    collectors: dict[str, HistogramCollector]
    samples: int = 0
    cached: list[str] = field(default_factory=list)
    key: str = ""


def _run(model: onnx.ModelProto, names: list[str], source: CalibSource, batch_size: int, bins: int,
         progress: bool, observe: Consumer | None = None, also: list[str] = (),
         sample: int = 0, minmax: Collection[str] = ()) -> tuple[dict[str, HistogramCollector], int]:
    collectors = {n: HistogramCollector(bins, sample=sample, minmax_only=n in minmax) for n in names}

    def consume(batch: Batch, tensors: dict[str, np.ndarray]) -> None:
        for name in names:
            collectors[name].update(tensors[name])
        if observe is not None:
            observe(batch, tensors)

    samples = capture(model, [*names, *also], source, consume, batch_size=batch_size, progress=progress,
                      max_bytes=CAPTURE_BUDGET, overlap=True)
    return collectors, samples


def collect_statistics(model: onnx.ModelProto, names: list[str], source: CalibSource, *, batch_size: int = 32,
                       bins: int = DEFAULT_BINS, cache: str | os.PathLike | None = None,
                       progress: bool = False, observe: Consumer | None = None,
                       also: list[str] = (), sample: int = 0, minmax: Collection[str] = ()) -> Calibration:
    """Histograms of the tensors ``names`` of ``model`` over ``source``.

    With ``cache``, tensors already stored under the same model/data/settings key are read from
    the file and only the others are calibrated (no model run at all when every tensor is
    there); the union is written back. ``observe(batch, tensors)`` also sees every run's
    tensors (those of ``names`` not read from the cache, and ``also``: tensors captured for it
    only), e.g. to gather other statistics in the same run. The statistics do not depend on
    ``also`` (values are the same whatever the model's outputs, and the histograms do not depend
    on how the samples are split into runs).

    ``sample`` (> 0): bin at most about that many values of each tensor per run (``min``/``max``
    stay exact; see :class:`HistogramCollector`): faster, approximate histograms, which then do
    depend on how the samples are split into runs. 0 (the default): every value.

    ``minmax``: tensors whose range will be their min/max whatever the method: their statistics
    are min/max only (``HistogramCollector(minmax_only=True)``), nothing is binned. A cached
    histogram serves them; a cached min/max-only entry does not serve a tensor outside ``minmax``.

    Raises:
        InputError: The data does not fit the model, or the cache file is unreadable.
    """
    names = list(dict.fromkeys(names))
    key = cache_key(model, source, batch_size=batch_size, bins=bins, sample=sample) if cache else ""
    stored = load_cache(cache, key) if cache else {}
    minmax = set(minmax)
    cached = [n for n in names if n in stored and (not stored[n].minmax_only or n in minmax)]
    missing = [n for n in names if n not in cached]
    samples = 0
    fresh: dict[str, HistogramCollector] = {}
    if missing:
        fresh, samples = _run(model, missing, source, batch_size, bins, progress, observe, list(also), sample, minmax)
        log.info("calibrated %d tensors on %d samples", len(missing), samples)
    if cache and missing:
        save_cache(cache, key, {**stored, **fresh})
    if cached:
        log.info("calibration cache: %d of %d tensors from %s", len(cached), len(names), cache)
    collectors = {n: fresh[n] if n in fresh else stored[n] for n in names}
    return Calibration(collectors, samples, cached, key)
