"""Activation capture: run a model in onnxruntime exposing intermediate tensors, batch by batch.

The tensors of each batch are handed to a consumer (statistics, least-squares accumulators,
histograms) and then dropped, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx

from onnxcompress.core import proto
from onnxcompress.runtime.batching import Batch
from onnxcompress.runtime.data import CalibSource
from onnxcompress.runtime.progress import track
from onnxcompress.runtime.session import make_session

__all__ = ["CAPTURE_BUDGET", "Consumer", "Handoff", "capture"]

log = logging.getLogger(__name__)

#: Called once per batch with the batch and ``{tensor name: array}``.
Consumer = Callable[[Batch, dict[str, np.ndarray]], None]


#: Default bytes of captured tensors per run for callers that stream them (statistics, means): the
#: batch is split so that one run's captured tensors stay under it, whatever the number of samples.
CAPTURE_BUDGET = 128 * 2**20


def capture(model: onnx.ModelProto, names: Iterable[str], data: CalibSource, consume: Consumer, *,
            batch_size: int = 32, threads: int = 0, progress: bool = False,
            max_bytes: int | None = None, overlap: bool = False) -> int:
    """Run ``model`` on ``data`` and call ``consume(batch, tensors)`` for every batch.

    ``names`` may mix node outputs, graph inputs and initializers; inputs come from the batch and
    initializers from the model. Only the tensors of one run are alive at a time (two with
    ``overlap``): they are handed to ``consume`` and dropped before the next run.

    Args:
        max_bytes: Split each batch into runs whose captured tensors take at most about this many
            bytes (measured on a first run of one sample; at least one sample per run). ``None``
            runs whole batches. Consumers must accept any batch size (streaming sums do).
        overlap: Consume each run in a worker thread while onnxruntime computes the next one
            (numpy and onnxruntime release the GIL). The consumer still sees the runs one at a
            time and in order. Two runs are then alive at once: runs aim at an eighth of
            ``max_bytes`` (a quarter of it alive: nudenet's calibration peaked 40 MB lower than with
            a quarter per run, at onnxruntime MinMax's peak, and 65 MB lower than with half), and
            one-sample runs of up to half of it
            still overlap; when one sample's tensors (or a batch that cannot be cut) exceed that
            half, the runs are consumed one after the other as without ``overlap``.

    Returns:
        The number of samples seen.
    """
    names = list(dict.fromkeys(names))
    constants = proto.initializer_arrays(model, names)
    inputs = set(proto.feed_names(model))
    computed = [n for n in names if n not in constants and n not in inputs]
    session = None
    if computed:
        with proto.exposing(model, computed) as exposed:
            session = make_session(exposed, threads=threads)
    fixed = any(s.batch_dim_static() is not None for s in getattr(data, "specs", ()))  # a fixed batch cannot be cut
    budget = _Budget(max_bytes, overlap, cut=not fixed)
    seen = 0
    with Handoff(consume, budget.overlap) as handoff:
        for batch in track(data.batches(batch_size), "capturing", enabled=progress, unit=len):
            start = 0
            while start < len(batch):
                part = budget.cut(batch, start)
                values = dict(zip(computed, session.run(computed, part.feeds))) if session else {}
                budget.measure(values, len(part))
                handoff.overlap = budget.overlap
                values.update({n: part.feeds[n] for n in names if n in inputs})
                values.update(constants)
                handoff.give(part, values)
                del values
                start += len(part)
                seen += len(part)
    return seen


class Handoff:
    """Calls ``consume(*args)`` for each :meth:`give`, in order: directly, or (``overlap``) in one
    worker thread, waiting for the previous call before handing over the next (so the caller
    computes item ``k + 1`` while ``k`` is consumed: at most two items alive). The worker's
    exception is raised in the caller (at the next :meth:`give` or on leaving the ``with``)."""

    def __init__(self, consume: Callable[..., None], overlap: bool):
        self.consume = consume
        self.overlap = overlap  # may change between items (off: the next item is consumed in the caller)
        self.pool: ThreadPoolExecutor | None = None
        self.pending: Future[None] | None = None

    def give(self, *args: object) -> None:
        """Consume ``args`` (in the worker: after the previous item's call has returned)."""
        self.wait()
        if not self.overlap:
            self.consume(*args)
            return
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="onnxcompress-capture")
        self.pending = self.pool.submit(self.consume, *args)

    def wait(self) -> None:
        """Wait for the pending call (raising its exception)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)


class _Budget:
    """Samples per run under ``max_bytes`` of captured tensors: one sample first (consumed before the
    next run), then as measured; with ``overlap``, an eighth of ``max_bytes`` per run (at least one
    sample), or no overlap when one sample (or, where batches cannot be ``cut``, one batch) takes
    more than half of it."""

    def __init__(self, max_bytes: int | None, overlap: bool, *, cut: bool = True):
        self.max_bytes = max_bytes
        self.wanted = overlap
        self.overlap = overlap and max_bytes is None  # with a budget: decided once measured
        self.can_cut = cut
        self.step: int | None = 1 if max_bytes is not None and cut else None
        self.measured = False

    def cut(self, batch: Batch, start: int) -> Batch:
        if self.step is None or (start == 0 and self.step >= len(batch)):
            return batch
        return batch.slice(start, min(start + self.step, len(batch)))

    def measure(self, values: dict[str, np.ndarray], samples: int) -> None:
        if self.max_bytes is None or self.measured or not samples:
            return
        self.measured = True
        size = max(sum(v.nbytes for v in values.values()) / (samples if self.can_cut else 1), 1.0)
        self.overlap = self.wanted and 2 * size <= self.max_bytes
        if self.can_cut:
            self.step = max(1, int(self.max_bytes // (8 if self.overlap else 1) // size))
        log.debug("capture: %.1f MB per %s, %s per run, overlap %s", size / 1e6,
                  "sample" if self.can_cut else "batch", self.step or "whole batches", self.overlap)
