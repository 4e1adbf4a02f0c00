"""Shape vectors: tracing what a computed shape holds, and the ``Shape`` op handler.

A 1-D shape tensor is traced element by element through ``Shape``/``Concat``/``Gather``/
``Slice``/``Cast``/``Unsqueeze`` (how exporters build ``x.view(x.size(0), -1)`` and
``interpolate(y, size=x.shape[2:])``); each element is a constant, a ``(tensor, axis)`` dim or
unknown. ``Shape`` is harmless to pruning when the channel dim it reads is never used, or used
only as the channel entry of a ``Resize`` or a ``Reshape`` of the same tensor.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.pruning.handlers_common import _axis, _clamp, _input, _slice_args
from onnxcompress.pruning.types import CHANNEL_AXIS, R_SHAPE_READ, GraphInfo, NodeSpec

__all__ = ["Element", "_channel_use_follows", "_own_channel_sizes", "_shape_elements", "_shape_op"]


Element = int | tuple[str, int] | None  # a constant, ("tensor", axis) = that tensor's dim, or unknown


def _dim_of(t: gs.Tensor, g: GraphInfo) -> tuple[str, int] | None:
    """``(tensor, axis)`` if ``t`` is ``Unsqueeze(Gather(Shape(tensor), axis))`` (or without Unsqueeze)."""
    node = t.inputs[0] if len(t.inputs) == 1 else None
    if node is not None and node.op in ("Unsqueeze", "Cast", "Identity"):
        node = node.inputs[0].inputs[0] if len(node.inputs[0].inputs) == 1 else None
    if node is None or node.op != "Gather" or int(node.attrs.get("axis", 0)) != 0:
        return None
    shape_node = node.inputs[0].inputs[0] if len(node.inputs[0].inputs) == 1 else None
    index = g.const(node.inputs[1])
    if shape_node is None or shape_node.op != "Shape" or index is None or index.size != 1 or "start" in shape_node.attrs:
        return None
    return shape_node.inputs[0].name, int(index.reshape(-1)[0])


def _shape_elements(t: gs.Tensor, g: GraphInfo, depth: int = 0) -> list[Element] | None:
    """Elements of a 1-D shape tensor: constants, ``(tensor, axis)`` dims, or ``None`` (unknown).

    Follows ``Shape`` (with ``start``/``end``), ``Concat``, ``Slice``/``Gather`` with constant
    indices, ``Cast``/``Identity``/``Unsqueeze``/``Squeeze`` (how exporters build
    ``x.view(x.size(0), -1)`` and ``interpolate(y, size=x.shape[2:])``); ``None`` if the length
    is unknown.
    """
    values = g.const(t)
    if values is not None:
        return [int(v) for v in values.reshape(-1)]
    producer = t.inputs[0] if len(t.inputs) == 1 else None
    if producer is not None and depth < 8 and (producer.domain or "") in ("", "ai.onnx"):
        traced = _trace_shape_op(producer, t, g, depth)
        if traced is not None:
            return traced
    shape = g.shape(t)
    if shape is None or len(shape) > 1 or (shape and shape[0] is None):
        return None
    n = shape[0] if shape else 1
    dim = _dim_of(t, g) if n == 1 else None
    return [dim] if dim is not None else [None] * n


def _trace_shape_op(producer: gs.Node, t: gs.Tensor, g: GraphInfo, depth: int) -> list[Element] | None:
    """Elements of ``t``, the output of ``producer`` (a shape-vector op), or ``None`` if not traced."""
    op = producer.op
    if op == "Shape" and producer.outputs[0] is t:
        rank = g.rank(producer.inputs[0])
        if rank is None:
            return None
        start = _clamp(int(producer.attrs.get("start", 0)), rank)
        end = _clamp(int(producer.attrs["end"]), rank) if "end" in producer.attrs else rank
        return [(producer.inputs[0].name, i) for i in range(start, end)]
    if op == "Concat" and int(producer.attrs.get("axis", 0)) in (0, -1):
        parts = [_shape_elements(i, g, depth + 1) for i in producer.inputs]
        return None if any(p is None for p in parts) else [v for p in parts for v in p]
    if op in ("Cast", "Identity"):
        if op == "Cast" and int(producer.attrs.get("to", 7)) not in (6, 7):  # int32 / int64 only
            return None
        return _shape_elements(producer.inputs[0], g, depth + 1)
    if op in ("Unsqueeze", "Squeeze") and g.rank(t) in (0, 1):  # scalar <-> [1]
        inner = _shape_elements(producer.inputs[0], g, depth + 1)
        return inner if inner is not None and len(inner) == 1 else None
    if op == "Gather" and int(producer.attrs.get("axis", 0)) == 0:
        inner, idx = _shape_elements(producer.inputs[0], g, depth + 1), g.const(producer.inputs[1])
        if inner is None or idx is None or idx.ndim > 1:
            return None
        n = len(inner)
        picks = [int(i) + n if int(i) < 0 else int(i) for i in idx.reshape(-1)]
        return [inner[i] for i in picks] if all(0 <= i < n for i in picks) else None
    if op == "Slice":
        args = _slice_args(producer, g)
        inner = _shape_elements(producer.inputs[0], g, depth + 1)
        if inner is None or args is None or None in args[:2] or len(args[0]) != 1 or args[2] not in ([0], [-1]):
            return None
        step = int(args[3][0])
        if step < 1:
            return None
        n = len(inner)
        return inner[_clamp(int(args[0][0]), n):_clamp(int(args[1][0]), n):step]
    return None


def _shape_op(node: gs.Node, g: GraphInfo) -> NodeSpec:
    """``Shape`` is harmless if nothing downstream reads the channel dim.

    Reading it only to give a ``Resize`` of the same tensor its own channel count (``sizes`` =
    ``Concat(Shape(x)[:2], ...)``, from ``interpolate(x, size=...)``) is harmless too: the count
    follows the pruned tensor at run time.
    """
    spec = NodeSpec(node, g)
    x = node.inputs[0]
    rank = g.rank(x)
    spec.touched.add(x.name)
    if rank is None:
        return spec.freeze([x], R_SHAPE_READ)
    start = _axis(int(node.attrs.get("start", 0)), rank)
    end = _axis(int(node.attrs.get("end", rank)), rank) if "end" in node.attrs else rank
    axis = g.axis(rank)  # the last axis in the last-axis view (a transformer's [b, s, d])
    if not start <= axis < end:
        return spec
    index = axis - start
    out = node.outputs[0]
    if out.name not in g.outputs and all(_reads_index(c, g, index, end - start) is False for c in out.outputs):
        return spec
    if axis == CHANNEL_AXIS and _channel_use_follows(out, x, g):
        return spec
    return spec.freeze([x], R_SHAPE_READ)


_SHAPE_CHAIN = ("Slice", "Gather", "Unsqueeze", "Squeeze", "Cast", "Identity", "Concat")


def _channel_use_follows(t: gs.Tensor, x: gs.Tensor, g: GraphInfo, depth: int = 0) -> bool:
    """Whether shape vector ``t`` (computed from ``Shape(x)``) uses ``x``'s channel count only as
    the channel entry of the ``sizes`` of a ``Resize`` of ``x`` itself or of the target of a
    ``Reshape`` of ``x`` itself (or not at all)."""
    elements = _shape_elements(t, g)
    if elements is not None and None not in elements and (x.name, CHANNEL_AXIS) not in elements:
        return True  # fully traced and free of the channel count
    if t.name in g.outputs or depth > 8:
        return False
    for consumer in t.outputs:
        if (consumer.domain or "") not in ("", "ai.onnx"):
            return False
        uses = [i for i, inp in enumerate(consumer.inputs) if inp is t]
        if consumer.op == "Resize":
            if uses == [3] and consumer.inputs[0] is x and _own_channel_sizes(consumer, g) is not None:
                continue
            return False
        if consumer.op == "Reshape":
            if uses == [1] and consumer.inputs[0] is x and _own_channel_entry(consumer, g):
                continue
            return False
        if consumer.op not in _SHAPE_CHAIN or not all(_channel_use_follows(o, x, g, depth + 1)
                                                      for o in consumer.outputs):
            return False
    return True


def _own_channel_entry(node: gs.Node, g: GraphInfo) -> bool:
    """Whether the target of Reshape ``node`` holds its input's channel count, ``Shape(x)[1]``, at
    position 1 and nowhere else (``x.view(x.size(0), x.size(1), -1)``: the count follows the pruned
    tensor; the Reshape handler checks that the channel dim passes through)."""
    elements = _shape_elements(node.inputs[1], g)
    own = (node.inputs[0].name, CHANNEL_AXIS)
    return elements is not None and len(elements) > CHANNEL_AXIS and elements[CHANNEL_AXIS] == own \
        and elements.count(own) == 1


def _own_channel_sizes(node: gs.Node, g: GraphInfo) -> list[Element] | None:
    """The traced ``sizes`` of a ``Resize`` (opset >= 11) that keeps its input's channel count by
    construction (its channel entry is ``Shape(x)[1]`` of its own input ``x``), else ``None``."""
    x = node.inputs[0]
    rank = g.rank(x)
    sizes_t = _input(node, 3)
    if node.op != "Resize" or g.opset < 11 or rank is None or sizes_t is None or g.const(sizes_t) is not None:
        return None
    scales = _input(node, 2)
    if scales is not None and (g.const(scales) is None or g.const(scales).size):
        return None
    mode = node.attrs.get("coordinate_transformation_mode", "half_pixel")
    if (mode.decode() if isinstance(mode, bytes) else str(mode)) == "tf_crop_and_resize":
        return None
    elements = _shape_elements(sizes_t, g)
    axes = [_axis(int(a), rank) for a in node.attrs.get("axes", range(rank))]
    if elements is None or None in elements or len(elements) != len(axes) or CHANNEL_AXIS not in axes:
        return None
    own = (x.name, CHANNEL_AXIS)
    if elements[axes.index(CHANNEL_AXIS)] != own or elements.count(own) != 1:
        return None
    return elements


def _reads_index(consumer: gs.Node, g: GraphInfo, index: int, length: int) -> bool:
    """Whether ``consumer`` of a shape vector may read element ``index``."""
    if consumer.op == "Gather" and int(consumer.attrs.get("axis", 0)) == 0:
        idx = g.const(consumer.inputs[1])
        return idx is None or index in {_axis(int(i), length) for i in idx.reshape(-1)}
    if consumer.op == "Slice" and len(consumer.inputs) >= 3:
        starts, ends = g.const(consumer.inputs[1]), g.const(consumer.inputs[2])
        steps = g.const(_input(consumer, 4)) if _input(consumer, 4) is not None else np.ones(1)
        if starts is None or ends is None or steps is None or starts.size != 1 or int(steps.reshape(-1)[0]) != 1:
            return True
        s, e = (_clamp(int(v.reshape(-1)[0]), length) for v in (starts, ends))
        return s <= index < e
    return True
