"""Activation capture: run a model in onnxruntime exposing intermediate tensors, batch by batch.

The tensors of each batch are handed to a consumer (statistics, least-squares accumulators,
histograms) and then dropped, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress.core.errors import InputError
from onnxcompress.core.shapes import infer_shapes
from onnxcompress.runtime.data import Batch, CalibSource
from onnxcompress.runtime.progress import track
from onnxcompress.runtime.session import make_session

__all__ = ["Consumer", "expose", "capture"]

log = logging.getLogger(__name__)

#: Called once per batch with the batch and ``{tensor name: array}``.
Consumer = Callable[[Batch, dict[str, np.ndarray]], None]


def expose(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include the intermediate tensors ``names``.

    Raises:
        InputError: A name is not a tensor produced by a node of the main graph.
    """
    names = list(dict.fromkeys(names))
    produced = {o for n in model.graph.node for o in n.output if o}
    unknown = [n for n in names if n not in produced]
    if unknown:
        raise InputError(f"cannot capture {unknown[:3]}: not produced by any node")
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    types = _tensor_types(model, [n for n in names if n not in present])
    for name in names:
        if name not in present:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    return exposed


def _tensor_types(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    if not names:
        return {}
    light = onnx.ModelProto()
    light.CopyFrom(model)
    inferred = infer_shapes(light)
    return {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info
            if vi.name in set(names) and vi.type.tensor_type.elem_type}


def capture(model: onnx.ModelProto, names: Iterable[str], data: CalibSource, consume: Consumer, *,
            batch_size: int = 32, threads: int = 0, progress: bool = False) -> int:
    """Run ``model`` on ``data`` and call ``consume(batch, tensors)`` for every batch.

    ``names`` may mix node outputs, graph inputs and initializers; inputs come from the batch and
    initializers from the model.

    Returns:
        The number of samples seen.
    """
    names = list(dict.fromkeys(names))
    inits = {i.name: i for i in model.graph.initializer}
    inputs = {i.name for i in model.graph.input} - set(inits)
    computed = [n for n in names if n not in inits and n not in inputs]
    constants = {n: numpy_helper.to_array(inits[n]) for n in names if n in inits}
    session = make_session(expose(model, computed), threads=threads) if computed else None
    seen = 0
    for batch in track(data.batches(batch_size), "capturing", enabled=progress):
        values = dict(zip(computed, session.run(computed, batch.feeds))) if session else {}
        values.update({n: batch.feeds[n] for n in names if n in inputs})
        values.update(constants)
        consume(batch, values)
        seen += len(batch)
    return seen
