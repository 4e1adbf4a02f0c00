"""Calibration cache: the collected histograms of a run, saved to an ``.npz`` file.

The statistics do not depend on the calibration *method* (every method reads the same
histograms, see :mod:`onnxcompress.quant.observers`), so a second run with another method or
percentile reuses them and skips the model runs. The file is keyed by a hash of

* the float model being calibrated (its serialized bytes: graph, weights, opsets),
* the calibration data (see :func:`data_fingerprint`), the batch size and the histogram bins,
* a format version.

A file with another key is a miss (and is overwritten by the next save). Entries are per tensor
name; a run needing tensors the file lacks calibrates only those and saves the union.

File layout (``np.savez``, no pickles): ``__key__`` (the hex key), ``__names__`` (tensor names)
and, for the ``i``-th name, ``t{i}_meta``, ``t{i}_pos``, ``t{i}_neg`` (see
:meth:`HistogramCollector.to_arrays`). Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcompress.core.errors import InputError
from onnxcompress.core.fileio import atomic_write
from onnxcompress.quant.histogram import HistogramCollector
from onnxcompress.runtime.data import CalibSource, FileSource, ImageFolderSource, RandomSource

__all__ = ["CACHE_VERSION", "cache_key", "data_fingerprint", "load_cache", "save_cache"]

log = logging.getLogger(__name__)

#: Bumped whenever the statistics or the file layout change meaning (2: ``meta`` gained ``minmax_only``).
CACHE_VERSION = 2
_FIELDS = ("meta", "pos", "neg")


def _files_digest(files: list[Path]) -> list[list[Any]]:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def data_fingerprint(source: CalibSource) -> str:
    """A stable description of the calibration data.

    Files and image folders are identified by path, size and modification time (the data is not
    read); random sources by count, seed, dims and integer input domains; any other source (an
    in-memory iterable) by a hash of its contents, which iterates it once without running a model.
    """
    h = hashlib.sha256()
    base = {"type": type(source).__name__, "limit": source.limit,
            "specs": [[s.name, str(s.dtype), list(s.shape)] for s in source.specs]}
    if isinstance(source, FileSource):
        base["files"] = _files_digest(source.files)
    elif isinstance(source, ImageFolderSource):
        base["files"] = _files_digest(source.files)
        base["preprocess"] = repr(source.pre)
    elif isinstance(source, RandomSource):
        base["random"] = [source.count_, source.seed, sorted(source.dims.items())]
        if source.domains:  # the integer inputs' ranges (what they index) decide their values too
            base["domains"] = sorted((k, d.kind, d.high) for k, d in source.domains.items())
    else:
        for batch in source.batches():
            for name in sorted(batch.feeds):
                arr = np.ascontiguousarray(batch.feeds[name])
                h.update(name.encode() + str(arr.dtype).encode() + str(arr.shape).encode())
                h.update(arr.tobytes())
    h.update(json.dumps(base, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(model: onnx.ModelProto, source: CalibSource, *, batch_size: int, bins: int, sample: int = 0) -> str:
    """The key of the statistics of ``model`` on ``source`` (hex SHA-256); ``sample`` (sampled
    histograms, see :class:`~onnxcompress.quant.histogram.HistogramCollector`) is part of it when set."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(model.SerializeToString(deterministic=True)).digest())
    h.update(data_fingerprint(source).encode())
    settings = {"batch_size": batch_size, "bins": bins, "version": CACHE_VERSION}
    if sample:
        settings["sample"] = sample
    h.update(json.dumps(settings).encode())
    return h.hexdigest()


def load_cache(path: str | os.PathLike, key: str) -> dict[str, HistogramCollector]:
    """The collectors stored in ``path`` under ``key``; empty when missing or keyed otherwise.

    Raises:
        InputError: The file exists but is not a readable cache.
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["__key__"]) != key:
                log.info("calibration cache %s: other model or data; recalibrating", path)
                return {}
            names = [str(n) for n in npz["__names__"]]
            return {name: HistogramCollector.from_arrays({f: npz[f"t{i}_{f}"] for f in _FIELDS})
                    for i, name in enumerate(names)}
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a calibration cache ({type(exc).__name__}: {exc})") from None


def save_cache(path: str | os.PathLike, key: str, collectors: dict[str, HistogramCollector]) -> None:
    """Write ``collectors`` to ``path`` under ``key`` (atomically; names sorted).

    Raises:
        InputError: The folder does not exist or is not writable.
    """
    path = Path(path)
    names = sorted(collectors)
    arrays: dict[str, np.ndarray] = {"__key__": np.array(key), "__names__": np.array(names, dtype=str)}
    for i, name in enumerate(names):
        for field, value in collectors[name].to_arrays().items():
            arrays[f"t{i}_{field}"] = value
    atomic_write(path, lambda fh: np.savez(fh, **arrays))
    log.info("calibration cache: saved %d tensors to %s", len(names), path)
