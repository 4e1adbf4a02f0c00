"""Batches of input samples: :class:`Batch` and :func:`rebatch`, which re-cuts a stream of them to
another size, samples of different shapes apart (and :func:`cut_count`, how many it yields)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["Batch", "cut_count", "rebatch"]


@dataclass
class Batch:
    """One batch: arrays keyed by input name (leading sample axis) and optional labels."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.feeds.values()))) if self.feeds else 0

    def slice(self, start: int, stop: int) -> Batch:
        """Samples ``start:stop`` (views of the arrays, no copy)."""
        return _slice(self, start, stop)


def rebatch(chunks: Iterable[Batch], size: int, limit: int | None = None) -> Iterator[Batch]:
    """Re-cut a stream of chunks into batches of ``size`` samples (the first ``limit`` samples). Only
    samples of the same shapes share a batch: a chunk whose per-sample shapes differ from the pending
    ones (variable-length sequences) first flushes them, so a batch may be smaller than ``size``."""
    pending: list[Batch] = []
    have = seen = 0
    for chunk in chunks:
        if limit is not None and seen + len(chunk) > limit:
            chunk = _slice(chunk, 0, limit - seen)
        seen += len(chunk)
        if pending and _sample_shapes(chunk) != _sample_shapes(pending[0]):
            yield _concat(pending)
            pending, have = [], 0
        pending.append(chunk)
        have += len(chunk)
        while have >= size:
            merged = _concat(pending)
            yield _slice(merged, 0, size)
            rest = _slice(merged, size, have)
            pending, have = ([rest] if len(rest) else []), have - size
        if limit is not None and seen >= limit:
            break
    if have:
        yield _concat(pending)


def cut_count(runs: Iterable[int], size: int) -> int:
    """How many batches :func:`rebatch` cuts samples into, given the numbers of samples in each
    stretch of consecutive samples of the same shapes (``runs``, non-empty stretches)."""
    return sum(-(-n // max(1, size)) for n in runs)


def _sample_shapes(batch: Batch) -> dict[str, tuple[int, ...]]:
    return {k: v.shape[1:] for k, v in batch.feeds.items()}


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    labels = batch.labels[start:stop] if batch.labels is not None else None
    return Batch({k: v[start:stop] for k, v in batch.feeds.items()}, labels)


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    feeds = {k: np.concatenate([b.feeds[k] for b in batches]) for k in batches[0].feeds}
    has_labels = all(b.labels is not None for b in batches)
    labels = np.concatenate([b.labels for b in batches]) if has_labels else None
    return Batch(feeds, labels)
