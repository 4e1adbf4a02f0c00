"""Handlers of channel-wise pass-through ops: the same channel in and out.

Activations, Clip, BatchNormalization, PRelu, pools, Pad (no channel padding), Resize/Upsample
(channel scale 1; a constant ``sizes`` is rewritten), Squeeze/Unsqueeze/Transpose that keep
axis 1, reductions and Softmax over other axes. Per-channel constants are sliced with the
channels; ``const_fn`` carries a removed channel's constant value through the op.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.pruning.handlers_common import (
    Vec,
    _axis,
    _const_operand,
    _input,
    _ints,
    _nan,
    _passthrough,
    _prod,
    _set_channels,
    _used,
)
from onnxcompress.pruning.shape_trace import _own_channel_sizes
from onnxcompress.pruning.types import (
    CHANNEL_AXIS,
    R_MISMATCH,
    R_MOVES_AXIS,
    R_NONCONST,
    R_REDUCES,
    R_TRAINING,
    R_UNKNOWN_DIM,
    R_UNSUPPORTED,
    ROLE_GAMMA,
    ROLE_PARAM,
    GraphInfo,
    NodeSpec,
    RewriteContext,
)

__all__ = [
    "_batchnorm", "_clip", "_pad", "_pool", "_prelu", "_reduce", "_resize", "_softmax", "_squeeze",
    "_transpose", "_unary",
]


# ----------------------------------------------------------------- activations


def _sigmoid(v: Vec) -> Vec:
    return 1.0 / (1.0 + np.exp(-v))


def _erf(v: Vec) -> Vec:
    """``scipy.special.erf`` (imported on first use: scipy costs start-up time to every run)."""
    from scipy.special import erf as scipy_erf

    return scipy_erf(v)


def _gelu(approximate: str) -> Callable[[Vec], Vec]:
    """ONNX ``Gelu`` (opset 20): exact (``0.5 x (1 + erf(x / sqrt 2))``) or ``tanh``."""
    if approximate in ("tanh", "b'tanh'"):
        return lambda v: 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v ** 3)))
    return lambda v: 0.5 * v * (1.0 + _erf(v / np.sqrt(2.0)))


def _unary_fn(node: gs.Node) -> Callable[[Vec], Vec] | None:
    """The op as a numpy function of a constant (``None``: not known)."""
    a = node.attrs
    table: dict[str, Callable[[Vec], Vec]] = {
        "Relu": lambda v: np.maximum(v, 0.0),
        "LeakyRelu": lambda v: np.where(v >= 0, v, float(a.get("alpha", 0.01)) * v),
        "Sigmoid": _sigmoid,
        "HardSigmoid": lambda v: np.clip(float(a.get("alpha", 0.2)) * v + float(a.get("beta", 0.5)), 0, 1),
        "HardSwish": lambda v: v * np.clip(v / 6.0 + 0.5, 0, 1),
        "Tanh": np.tanh,
        "Elu": lambda v: np.where(v > 0, v, float(a.get("alpha", 1.0)) * np.expm1(v)),
        "Celu": lambda v: np.maximum(v, 0) + np.minimum(0, float(a.get("alpha", 1.0)) * np.expm1(v / float(a.get("alpha", 1.0)))),
        "Selu": lambda v: float(a.get("gamma", 1.0507009873554805)) * np.where(v > 0, v, float(a.get("alpha", 1.6732632423543772)) * np.expm1(v)),
        "Softplus": lambda v: np.logaddexp(0.0, v),
        "Softsign": lambda v: v / (1.0 + np.abs(v)),
        "ThresholdedRelu": lambda v: np.where(v > float(a.get("alpha", 1.0)), v, 0.0),
        "Mish": lambda v: v * np.tanh(np.logaddexp(0.0, v)),
        "Neg": np.negative, "Abs": np.abs, "Exp": np.exp, "Floor": np.floor, "Ceil": np.ceil,
        "Log": np.log, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Sin": np.sin, "Cos": np.cos,
        "Sign": np.sign, "Round": np.round, "Erf": _erf,
        "Gelu": _gelu(str(a.get("approximate", "none"))),
        "Identity": lambda v: v, "Dropout": lambda v: v,
    }
    if node.op == "Cast":
        return (lambda v: v) if int(a.get("to", 1)) in (1, 10, 11, 16) else None
    return table.get(node.op)


def _unary(node: gs.Node, g: GraphInfo) -> NodeSpec:
    fn = _unary_fn(node)
    return _passthrough(node, g, fn, exact=fn is not None, elementwise=True)


def _clip(node: gs.Node, g: GraphInfo) -> NodeSpec:
    bounds: list[float | None] = []
    for i, key, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        t = _input(node, i)
        if t is None:
            bounds.append(float(node.attrs.get(key, default)))
        else:
            c = g.const(t)
            bounds.append(None if c is None or c.size != 1 else float(c.reshape(-1)[0]))
    if None in bounds:
        return _passthrough(node, g, exact=False, elementwise=True)
    lo, hi = bounds
    return _passthrough(node, g, lambda v: np.clip(v, lo, hi), elementwise=True)


def _batchnorm(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    x, y = node.inputs[0], node.outputs[0]
    if int(node.attrs.get("training_mode", 0)) or any(_used(t) for t in node.outputs[1:]):
        return spec.freeze(None, R_TRAINING)
    params = [g.const(t) for t in node.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return spec.freeze(None, R_NONCONST)
    c = g.channels(y)
    if any(p.ndim != 1 for p in params) or int(node.attrs.get("spatial", 1)) == 0:
        return spec.freeze(None, R_UNSUPPORTED)
    if any(p.shape[0] != c for p in params):
        return spec.freeze(None, R_MISMATCH)
    if not spec.identity(x, y):
        return spec
    for i in range(1, 5):
        spec.param(i, 0, y, ROLE_GAMMA if i == 1 else ROLE_PARAM)
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    spec.const_fn = lambda get: {y.name: (get(x.name) - mean) * scale + beta}
    return spec


def _prelu(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    x, y = node.inputs[0], node.outputs[0]
    rank, c = g.rank(y), g.channels(y)
    if g.const(node.inputs[1]) is None:
        return spec.freeze(None, R_NONCONST)
    if rank is None or c is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    slope = _const_operand(spec, 1, rank, c, y)
    if slope is False or not spec.identity(x, y):
        return spec
    if slope is None:
        spec.const_fn = lambda get: {y.name: _nan(c)}
    else:
        spec.const_fn = lambda get: {y.name: np.where(get(x.name) < 0, get(x.name) * slope, get(x.name))}
    return spec


# ----------------------------------------------------------------- spatial ops


def _pool(node: gs.Node, g: GraphInfo) -> NodeSpec:
    exact = node.op not in ("LpPool", "GlobalLpPool")
    return _passthrough(node, g, exact=exact)


def _pad(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    rank = g.rank(node.inputs[0])
    if rank is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    present, pads = _ints(node, g, "pads", 1 if g.opset >= 11 else None)
    _, axes = _ints(node, g, "", 3)
    if not present or pads is None or (_input(node, 3) is not None and axes is None):
        return spec.freeze(None, R_UNSUPPORTED)
    axes = [_axis(a, rank) for a in (axes if axes is not None else range(rank))]
    if CHANNEL_AXIS in axes:
        j = axes.index(CHANNEL_AXIS)
        if pads[j] != 0 or pads[j + len(axes)] != 0:
            return spec.freeze(None, R_UNSUPPORTED)
    return _passthrough(node, g)


def _resize_params(node: gs.Node, g: GraphInfo) -> tuple[np.ndarray | None, np.ndarray | None, int | None] | None:
    """``(scales, sizes, sizes input index)`` (``None`` where absent), or ``None`` if not constant."""
    if node.op == "Upsample" and g.opset < 9:
        return np.asarray(node.attrs.get("scales", []), np.float32), None, None
    indices = (1, None) if node.op == "Upsample" or g.opset < 11 else (2, 3)
    values = []
    for index in indices:
        t = _input(node, index) if index is not None else None
        if t is not None and g.const(t) is None:
            return None
        values.append(g.const(t) if t is not None and g.const(t).size else None)
    return values[0], values[1], indices[1]


def _resize(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    y = node.outputs[0]
    rank, params = g.rank(node.inputs[0]), _resize_params(node, g)
    if rank is not None and params is None and _own_channel_sizes(node, g) is not None:
        _set_channels(g, y, rank, g.channels(node.inputs[0]))
        return _passthrough(node, g)
    if rank is None or params is None:
        return spec.freeze(None, R_UNKNOWN_DIM if rank is None else R_UNSUPPORTED)
    scales, sizes, sizes_index = params
    axes = [_axis(int(a), rank) for a in node.attrs.get("axes", range(rank))]
    if CHANNEL_AXIS not in axes:
        return _passthrough(node, g)
    pos = axes.index(CHANNEL_AXIS)
    if (scales is not None and float(scales[pos]) != 1.0) or (sizes is not None and sizes[pos] != g.channels(y)):
        return spec.freeze(None, R_UNSUPPORTED)
    spec = _passthrough(node, g)
    if sizes is not None:
        def rewrite(ctx: RewriteContext) -> None:
            new = sizes.copy()
            new[pos] = ctx.count(y.name)
            node.inputs[sizes_index] = ctx.constant(node.inputs[sizes_index].name, new)

        spec.rewrite = rewrite
    return spec


def _squeeze(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    x, y = node.inputs[0], node.outputs[0]
    rank, out_rank = g.rank(x), g.rank(y)
    present, axes = _ints(node, g, "axes", 1 if g.opset >= 13 else None)
    if rank is None or out_rank is None or (present and axes is None):
        return spec.freeze(None, R_UNKNOWN_DIM if rank is None or out_rank is None else R_UNSUPPORTED)
    if node.op == "Squeeze":
        axes = [_axis(a, rank) for a in axes] if present else [i for i, d in enumerate(g.shape(x)) if d == 1]
    else:
        axes = [_axis(a, out_rank) for a in axes or []]
    if any(a <= CHANNEL_AXIS for a in axes):
        return spec.freeze(None, R_MOVES_AXIS)
    return _passthrough(node, g)


def _transpose(node: gs.Node, g: GraphInfo) -> NodeSpec:
    rank = g.rank(node.inputs[0])
    if rank is None:
        return NodeSpec(node, g).freeze(None, R_UNKNOWN_DIM)
    perm = [int(p) for p in node.attrs.get("perm", list(range(rank))[::-1])]
    if perm[CHANNEL_AXIS] != CHANNEL_AXIS:
        return NodeSpec(node, g).freeze(None, R_MOVES_AXIS)
    return _passthrough(node, g)


def _softmax(node: gs.Node, g: GraphInfo) -> NodeSpec:
    rank = g.rank(node.inputs[0])
    if rank is None:
        return NodeSpec(node, g).freeze(None, R_UNKNOWN_DIM)
    axis = _axis(int(node.attrs.get("axis", -1 if g.opset >= 13 else 1)), rank)
    if axis == CHANNEL_AXIS or (g.opset < 13 and axis <= CHANNEL_AXIS):
        return NodeSpec(node, g).freeze(None, R_REDUCES)
    return _passthrough(node, g, exact=False, elementwise=True)


_KEEP_CONSTANT = ("ReduceMean", "ReduceMax", "ReduceMin")


def _reduce(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    x = node.inputs[0]
    rank = g.rank(x)
    if rank is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    if node.op in ("ArgMax", "ArgMin"):
        present, axes = True, [int(node.attrs.get("axis", 0))]
    else:
        as_input = node.op == "ReduceSum" and g.opset >= 13 or g.opset >= 18
        present, axes = _ints(node, g, "axes", 1 if as_input else None)
    if present and axes is None:
        return spec.freeze(None, R_UNSUPPORTED)
    if not present or not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            return _passthrough(node, g)
        return spec.freeze(None, R_REDUCES)
    axes = [_axis(a, rank) for a in axes]
    if CHANNEL_AXIS in axes:
        return spec.freeze(None, R_REDUCES)
    if 0 in axes and not int(node.attrs.get("keepdims", 1)):
        return spec.freeze(None, R_MOVES_AXIS)
    if node.op in _KEEP_CONSTANT:
        return _passthrough(node, g)
    count = _prod([g.shape(x)[a] for a in axes])
    if node.op == "ReduceSum" and count is not None:
        return _passthrough(node, g, lambda v: v * count)
    return _passthrough(node, g, exact=False)
