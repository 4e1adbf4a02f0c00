"""Activation capture: run a model in onnxruntime exposing intermediate tensors, batch by batch.

The tensors of each batch are handed to a consumer (statistics, least-squares accumulators,
histograms) and then dropped, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx

from onnxcompress.core import proto
from onnxcompress.runtime.data import Batch, CalibSource
from onnxcompress.runtime.progress import track
from onnxcompress.runtime.session import make_session

__all__ = ["Consumer", "capture"]

log = logging.getLogger(__name__)

#: Called once per batch with the batch and ``{tensor name: array}``.
Consumer = Callable[[Batch, dict[str, np.ndarray]], None]


def capture(model: onnx.ModelProto, names: Iterable[str], data: CalibSource, consume: Consumer, *,
            batch_size: int = 32, threads: int = 0, progress: bool = False) -> int:
    """Run ``model`` on ``data`` and call ``consume(batch, tensors)`` for every batch.

    ``names`` may mix node outputs, graph inputs and initializers; inputs come from the batch and
    initializers from the model.

    Returns:
        The number of samples seen.
    """
    names = list(dict.fromkeys(names))
    constants = proto.initializer_arrays(model, names)
    inputs = set(proto.feed_names(model))
    computed = [n for n in names if n not in constants and n not in inputs]
    session = make_session(proto.with_outputs(model, computed), threads=threads) if computed else None
    seen = 0
    for batch in track(data.batches(batch_size), "capturing", enabled=progress):
        values = dict(zip(computed, session.run(computed, batch.feeds))) if session else {}
        values.update({n: batch.feeds[n] for n in names if n in inputs})
        values.update(constants)
        consume(batch, values)
        seen += len(batch)
    return seen
