"""Shared pieces of the op handlers (:mod:`.handlers`): argument readers and spec builders.

The handler type, readers of int-list arguments (attribute or constant input) and of a Slice's
bounds, the per-channel view of a constant (:func:`channel_vector`), the channel-wise
pass-through spec every same-channel op reuses, the slicing of a constant elementwise operand,
and a handler that freezes everything for a given reason.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.pruning.types import CHANNEL_AXIS, R_BROADCAST, R_UNSUPPORTED, ROLE_PARAM, GraphInfo, NodeSpec

__all__ = [
    "Handler", "Vec", "_axis", "_clamp", "_const_operand", "_frozen", "_identity_fn", "_input", "_ints",
    "_nan", "_passthrough", "_prod", "_same_shape", "_set_channels", "_slice_args", "_used", "channel_vector",
]


Handler = Callable[[gs.Node, GraphInfo], NodeSpec]
Vec = np.ndarray
_NAN = float("nan")


# ----------------------------------------------------------------- small helpers


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` if present and not an omitted optional input."""
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def _used(tensor: gs.Tensor) -> bool:
    return bool(tensor.name) and bool(tensor.outputs)


def _ints(node: gs.Node, g: GraphInfo, attr: str, index: int | None) -> tuple[bool, list[int] | None]:
    """``(present, values)`` of an int list given as attribute ``attr`` or constant input ``index``.

    ``values`` is ``None`` when the input is present but not a constant.
    """
    if index is not None and _input(node, index) is not None:
        values = g.const(node.inputs[index])
        return True, None if values is None else [int(v) for v in values.reshape(-1)]
    if attr in node.attrs and node.attrs[attr] is not None:
        return True, [int(v) for v in node.attrs[attr]]
    return False, None


def _axis(value: int, rank: int) -> int:
    return value + rank if value < 0 else value


def _nan(n: int) -> Vec:
    return np.full(n, _NAN)


def _prod(dims) -> int | None:
    if any(not isinstance(d, (int, np.integer)) for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if len(dims) else 1


def channel_vector(values: np.ndarray, rank: int, channels: int, axis: int = CHANNEL_AXIS) -> Vec | None:
    """A constant operand as one float64 value per channel (on ``axis``) of a rank-``rank`` tensor.

    ``None`` if it varies along another axis or does not broadcast to ``channels``.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim > rank or rank <= axis:
        return None
    v = v.reshape((1,) * (rank - v.ndim) + v.shape)
    flat = np.moveaxis(v, axis, 0).reshape(v.shape[axis], -1)
    if flat.shape[1] == 0 or not np.all(flat == flat[:, :1]):
        return None
    vec = flat[:, 0]
    if len(vec) == 1:
        return np.full(channels, vec[0])
    return vec if len(vec) == channels else None


def _identity_fn(x: str, y: str, fn: Callable[[Vec], Vec] | None = None):
    if fn is None:
        return lambda get: {y: get(x)}
    return lambda get: {y: fn(get(x))}


def _same_shape(g: GraphInfo, x: gs.Tensor, y: gs.Tensor) -> None:
    """Fill the dims of ``y`` (an elementwise op's output) that inference left unknown from ``x``'s
    (a dim a handler upstream derived, e.g. the output of a computed Reshape)."""
    xs, ys = g.shape(x), g.shape(y)
    if xs is not None and ys is not None and len(xs) == len(ys) and None in ys:
        g.shapes[y.name] = tuple(b if b is not None else a for a, b in zip(xs, ys))


def _passthrough(node: gs.Node, g: GraphInfo, fn: Callable[[Vec], Vec] | None = None,
                 exact: bool = True, elementwise: bool = False) -> NodeSpec:
    """Same channels in and out; ``fn`` maps a channel's constant value (``exact=False``: unknown);
    ``elementwise``: the output has the input's shape."""
    spec = NodeSpec(node, g)
    x, y = node.inputs[0], node.outputs[0]
    if elementwise:
        _same_shape(g, x, y)
    for extra in node.outputs[1:]:
        if _used(extra):
            return spec.freeze(None, R_UNSUPPORTED)
        if extra.name and g.channels(extra) is not None and g.channels(extra) == g.channels(y):
            spec.identity(x, extra)  # an unread mask/indices output: its shape follows
        spec.touched.add(extra.name)
    if spec.identity(x, y):
        spec.const_fn = _identity_fn(x.name, y.name, fn) if exact else (lambda get: {y.name: _nan(len(get(x.name)))})
    return spec


def _const_operand(spec: NodeSpec, index: int, rank: int, channels: int, out: gs.Tensor) -> Vec | None | bool:
    """Slice a constant operand if it has the channels; returns its per-channel vector (or None).

    Returns False (and freezes the node) if it cannot broadcast safely.
    """
    values = spec.info.const(spec.node.inputs[index])
    if values.ndim > rank:
        spec.freeze(None, R_BROADCAST)
        return False
    channel_axis = spec.info.axis(rank)
    axis = channel_axis - (rank - values.ndim)
    if axis >= 0 and values.shape[axis] == channels and channels != 1:
        spec.param(index, axis, out, ROLE_PARAM)
    elif axis >= 0 and values.shape[axis] != 1:
        spec.freeze(None, R_BROADCAST)
        return False
    return channel_vector(values, rank, channels, channel_axis)


def _set_channels(g: GraphInfo, t: gs.Tensor, rank: int, channels: int | None) -> None:
    """Record ``channels`` as the channel dim of ``t`` where shape inference left it unknown."""
    shape = g.shapes.get(t.name)
    if channels is None or (shape is not None and (len(shape) != rank or shape[CHANNEL_AXIS] is not None)):
        return
    dims = list(shape) if shape is not None else [None] * rank
    dims[CHANNEL_AXIS] = channels
    g.shapes[t.name] = tuple(dims)


def _clamp(value: int, n: int) -> int:
    return min(max(value + n if value < 0 else value, 0), n)


def _slice_args(node: gs.Node, g: GraphInfo) -> list[list[int]] | None:
    """``[starts, ends, axes, steps]`` as ints, or ``None`` if not constant."""
    if g.opset < 10:
        starts, ends = list(node.attrs.get("starts", [])), list(node.attrs.get("ends", []))
        axes = list(node.attrs.get("axes", range(len(starts))))
        return [starts, ends, axes, [1] * len(starts)]
    out = []
    for i in (1, 2, 3, 4):
        present, values = _ints(node, g, "", i)
        if present and values is None:
            return None
        out.append(values)
    n = len(out[0]) if out[0] is not None else 0
    out[2] = out[2] if out[2] is not None else list(range(n))
    out[3] = out[3] if out[3] is not None else [1] * n
    return out


def _frozen(reason: str) -> Handler:
    return lambda node, g: NodeSpec(node, g).freeze(None, reason)
