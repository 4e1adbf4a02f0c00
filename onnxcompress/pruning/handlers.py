"""The op-type table: how channel indices flow through each operator.

Every handler takes a node and the graph facts and returns a :class:`~.spec.NodeSpec`. Roles:

* weight layers (sources of free output channels, consumers of input channels): ``Conv``
  (``group == 1``), ``ConvTranspose`` (``group == 1``), ``Gemm`` (``transA == 0``, ``transB``
  respected), ``MatMul`` with a constant 2-D weight and a 2-D input;
* depthwise ``Conv``/``ConvTranspose`` (``group == Cin``, ``m = Cout / Cin``): input channel ``i``
  is output channels ``[i*m, (i+1)*m)``; ``group`` is rewritten;
* grouped ``Conv``/``ConvTranspose`` (``1 < group < Cin``): a weight layer whose input and
  output channels form ``group`` equal blocks (``NodeSpec.blocks``); each block loses the same
  count, so ``group`` stays; the input columns are a *blocked* parameter reference;
* channel-wise pass-through (same channel in and out, per-channel constants sliced):
  BatchNormalization, activations, Clip, PRelu, Add/Sub/Mul/Div/Pow/Max/Min with a constant,
  pools, Pad (no channel padding), Resize/Upsample (channel scale 1; ``sizes`` rewritten),
  Dropout, Identity, Cast, Squeeze/Unsqueeze/Transpose that keep axis 1, reductions and
  Softmax over other axes;
* coupling: elementwise ops on two channel tensors (residual Add, squeeze-and-excite Mul),
  Concat (offsets), Split (sizes rewritten), Slice with step 1 (bounds rewritten),
  Flatten / constant-shape Reshape of ``[N, C, *S]`` into ``[N, C*prod(S)]`` (channel ``c`` is
  columns ``[c*S, (c+1)*S)``; an explicit shape value is rewritten) or ``[N, C, *S']``;
* anything else that touches a channel tensor freezes it, with a reason from
  :data:`~.spec.FREEZE_REASONS`.

Each handler also gives ``const_fn``: the op applied to per-channel constants, used to carry the
constant output of a removed channel (its bias through BN, activations, pools, ...) to the next
weight layer, where it is folded into the bias.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .spec import (
    CHANNEL_AXIS,
    R_BROADCAST,
    R_CONTROL_FLOW,
    R_MISMATCH,
    R_MOVES_AXIS,
    R_NO_HANDLER,
    R_NONCONST,
    R_REDUCES,
    R_RESHAPE,
    R_SHAPE_READ,
    R_TRAINING,
    R_UNKNOWN_DIM,
    R_UNSUPPORTED,
    ROLE_B_OUT,
    ROLE_GAMMA,
    ROLE_PARAM,
    ROLE_W_IN,
    ROLE_W_OUT,
    GraphInfo,
    Layer,
    NodeSpec,
    RewriteContext,
)

__all__ = ["HANDLERS", "Handler", "channel_vector", "handle", "has_padding"]

log = logging.getLogger(__name__)

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


def channel_vector(values: np.ndarray, rank: int, channels: int) -> Vec | None:
    """A constant operand as one float64 value per channel of a rank-``rank`` tensor.

    ``None`` if it varies along another axis or does not broadcast to ``channels``.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim > rank or rank <= CHANNEL_AXIS:
        return None
    v = v.reshape((1,) * (rank - v.ndim) + v.shape)
    flat = np.moveaxis(v, CHANNEL_AXIS, 0).reshape(v.shape[CHANNEL_AXIS], -1)
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


def _passthrough(node: gs.Node, g: GraphInfo, fn: Callable[[Vec], Vec] | None = None,
                 exact: bool = True) -> NodeSpec:
    """Same channels in and out; ``fn`` maps a channel's constant value (``exact=False``: unknown)."""
    spec = NodeSpec(node, g)
    x, y = node.inputs[0], node.outputs[0]
    for extra in node.outputs[1:]:
        if _used(extra):
            return spec.freeze(None, R_UNSUPPORTED)
        if extra.name and g.channels(extra) is not None and g.channels(extra) == g.channels(y):
            spec.identity(x, extra)  # an unread mask/indices output: its shape follows
        spec.touched.add(extra.name)
    if spec.identity(x, y):
        spec.const_fn = _identity_fn(x.name, y.name, fn) if exact else (lambda get: {y.name: _nan(len(get(x.name)))})
    return spec


# ----------------------------------------------------------------- activations


def _sigmoid(v: Vec) -> Vec:
    return 1.0 / (1.0 + np.exp(-v))


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
        "Sign": np.sign, "Round": np.round,
        "Identity": lambda v: v, "Dropout": lambda v: v,
    }
    if node.op == "Cast":
        return (lambda v: v) if int(a.get("to", 1)) in (1, 10, 11, 16) else None
    return table.get(node.op)


def _unary(node: gs.Node, g: GraphInfo) -> NodeSpec:
    fn = _unary_fn(node)
    return _passthrough(node, g, fn, exact=fn is not None)


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
        return _passthrough(node, g, exact=False)
    lo, hi = bounds
    return _passthrough(node, g, lambda v: np.clip(v, lo, hi))


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


# ----------------------------------------------------------------- elementwise with operands


def _const_operand(spec: NodeSpec, index: int, rank: int, channels: int, out: gs.Tensor) -> Vec | None | bool:
    """Slice a constant operand if it has the channels; returns its per-channel vector (or None).

    Returns False (and freezes the node) if it cannot broadcast safely.
    """
    values = spec.info.const(spec.node.inputs[index])
    if values.ndim > rank:
        spec.freeze(None, R_BROADCAST)
        return False
    axis = CHANNEL_AXIS - (rank - values.ndim)
    if axis >= 0 and values.shape[axis] == channels and channels != 1:
        spec.param(index, axis, out, ROLE_PARAM)
    elif axis >= 0 and values.shape[axis] != 1:
        spec.freeze(None, R_BROADCAST)
        return False
    return channel_vector(values, rank, channels)


def _var_operand(spec: NodeSpec, t: gs.Tensor, rank: int, channels: int, out: gs.Tensor) -> str | None | bool:
    """Couple a variable operand with the output; its name if coupled, None if it broadcasts."""
    g = spec.info
    r = g.rank(t)
    if r is None:
        spec.freeze(None, R_UNKNOWN_DIM)
        return False
    spec.touched.add(t.name)
    if r != rank:
        axis = CHANNEL_AXIS - (rank - r)
        shape = g.shape(t)
        if axis >= 0 and shape[axis] != 1:
            spec.freeze(None, R_BROADCAST)
            return False
        if r > CHANNEL_AXIS:
            spec.freeze([t], R_BROADCAST)  # its own axis 1 is not the output's channel axis
        return None
    ct = g.channels(t)
    if ct == channels:
        spec.link(t, np.arange(ct), out, np.arange(channels))
        return t.name
    if ct == 1:
        return None
    spec.freeze(None, R_UNKNOWN_DIM if ct is None else R_BROADCAST)
    return False


_BINARY: dict[str, Callable[[Vec, Vec], Vec]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
    "Max": np.maximum, "Min": np.minimum,
}


def _binary(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    out = node.outputs[0]
    if len(node.inputs) != 2:
        return spec.freeze(None, R_UNSUPPORTED)
    rank, c = g.rank(out), g.channels(out)
    if rank is None or c is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    spec.touched.add(out.name)
    operands: list[tuple[str, object]] = []
    for i, t in enumerate(node.inputs):
        if isinstance(t, gs.Constant):
            got = _const_operand(spec, i, rank, c, out)
            kind = "const"
        else:
            got = _var_operand(spec, t, rank, c, out)
            kind = "var"
        if got is False:
            return spec
        operands.append((kind, got))
    fn = _BINARY[node.op]

    def const_fn(get):
        args = []
        for kind, got in operands:
            if got is None:
                args.append(_nan(c))
            else:
                args.append(get(got) if kind == "var" else got)
        with np.errstate(all="ignore"):
            return {out.name: fn(*args)}

    spec.const_fn = const_fn
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


def _set_channels(g: GraphInfo, t: gs.Tensor, rank: int, channels: int | None) -> None:
    """Record ``channels`` as the channel dim of ``t`` where shape inference left it unknown."""
    shape = g.shapes.get(t.name)
    if channels is None or (shape is not None and (len(shape) != rank or shape[CHANNEL_AXIS] is not None)):
        return
    dims = list(shape) if shape is not None else [None] * rank
    dims[CHANNEL_AXIS] = channels
    g.shapes[t.name] = tuple(dims)


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


# ----------------------------------------------------------------- shape ops


def _expand(spec: NodeSpec, x: gs.Tensor, y: gs.Tensor, m: int) -> NodeSpec:
    """Channel ``c`` of ``x`` is channels ``[c*m, (c+1)*m)`` of ``y``."""
    g = spec.info
    c = g.channels(x)
    if g.channels(y) != c * m:
        return spec.freeze([x, y], R_MISMATCH)
    spec.link(x, np.repeat(np.arange(c), m), y, np.arange(c * m))
    spec.const_fn = lambda get: {y.name: np.repeat(get(x.name), m)}
    return spec


def _flatten(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    x, y = node.inputs[0], node.outputs[0]
    shape = g.shape(x)
    if shape is None or g.channels(x) is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    if _axis(int(node.attrs.get("axis", 1)), len(shape)) != CHANNEL_AXIS:
        return spec.freeze(None, R_RESHAPE)
    spatial = _prod(shape[2:])
    if spatial is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    return _expand(spec, x, y, spatial)


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


def _reshape(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    x, shape_t, y = node.inputs[0], node.inputs[1], node.outputs[0]
    target = g.const(shape_t)
    xs, ys = g.shape(x), g.shape(y)
    if target is None:
        return _dynamic_reshape(spec, x, shape_t, y)
    if xs is None or ys is None or len(ys) <= CHANNEL_AXIS or g.channels(x) is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    c, spatial, out_spatial = xs[1], _prod(xs[2:]), _prod(ys[2:])
    if spatial is None or target.size <= CHANNEL_AXIS:
        return spec.freeze(None, R_UNKNOWN_DIM if spatial is None else R_RESHAPE)
    if ys[1] == c and out_spatial == spatial:
        spec.identity(x, y)
        spec.const_fn = _identity_fn(x.name, y.name)
    elif len(ys) == 2 and ys[1] == c * spatial and int(target[1]) != 0:
        _expand(spec, x, y, spatial)
    else:
        return spec.freeze([x, y], R_RESHAPE)
    spec.touched.add(shape_t.name)
    if int(target[1]) > 0:
        def rewrite(ctx: RewriteContext) -> None:
            new = target.copy()
            new[1] = ctx.count(y.name)
            node.inputs[1] = ctx.constant(shape_t.name, new)

        spec.rewrite = rewrite
    return spec


def _dynamic_reshape(spec: NodeSpec, x: gs.Tensor, shape_t: gs.Tensor, y: gs.Tensor) -> NodeSpec:
    """A computed target ``[x.shape[0] (or 0), -1]`` or ``[x.shape[0] (or 0), 0 or -1, *S]``.

    Nothing to rewrite; the output's shape (which inference may leave unknown) is derived here.
    """
    g = spec.info
    el = _shape_elements(shape_t, g)
    xs = g.shape(x)
    if el is None or len(el) <= CHANNEL_AXIS or el[CHANNEL_AXIS] not in (-1, 0):
        return spec.freeze([x, y], R_RESHAPE)
    if xs is None or g.channels(x) is None or _prod(xs[2:]) is None:
        return spec.freeze([x, y], R_UNKNOWN_DIM)
    batch_ok = el[0] in (0, (x.name, 0)) or (isinstance(el[0], int) and el[0] == xs[0])
    rest = el[2:]
    if batch_ok and len(el) == 2 and el[1] == -1:
        g.shapes[y.name] = (xs[0], xs[1] * _prod(xs[2:]))
        return _expand(spec, x, y, _prod(xs[2:]))
    if batch_ok and all(isinstance(v, int) and v > 0 for v in rest) and _prod(rest) == _prod(xs[2:]):
        g.shapes[y.name] = (xs[0], xs[1], *rest)
        if spec.identity(x, y):
            spec.const_fn = _identity_fn(x.name, y.name)
        return spec
    return spec.freeze([x, y], R_RESHAPE)


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
    return _passthrough(node, g, exact=False)


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
    if not start <= CHANNEL_AXIS < end:
        return spec
    index = CHANNEL_AXIS - start
    out = node.outputs[0]
    if out.name not in g.outputs and all(_reads_index(c, g, index, end - start) is False for c in out.outputs):
        return spec
    if _channel_use_follows(out, x, g):
        return spec
    return spec.freeze([x], R_SHAPE_READ)


_SHAPE_CHAIN = ("Slice", "Gather", "Unsqueeze", "Squeeze", "Cast", "Identity", "Concat")


def _channel_use_follows(t: gs.Tensor, x: gs.Tensor, g: GraphInfo, depth: int = 0) -> bool:
    """Whether shape vector ``t`` (computed from ``Shape(x)``) uses ``x``'s channel count only as
    the channel entry of the ``sizes`` of a ``Resize`` of ``x`` itself (or not at all)."""
    elements = _shape_elements(t, g)
    if elements is not None and None not in elements and (x.name, CHANNEL_AXIS) not in elements:
        return True  # fully traced and free of the channel count
    if t.name in g.outputs or depth > 8:
        return False
    for consumer in t.outputs:
        if (consumer.domain or "") not in ("", "ai.onnx"):
            return False
        if consumer.op == "Resize":
            uses = [i for i, inp in enumerate(consumer.inputs) if inp is t]
            if uses == [3] and consumer.inputs[0] is x and _own_channel_sizes(consumer, g) is not None:
                continue
            return False
        if consumer.op not in _SHAPE_CHAIN or not all(_channel_use_follows(o, x, g, depth + 1)
                                                      for o in consumer.outputs):
            return False
    return True


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


def _clamp(value: int, n: int) -> int:
    return min(max(value + n if value < 0 else value, 0), n)


# ----------------------------------------------------------------- concat / split / slice


def _concat(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    y = node.outputs[0]
    rank, c = g.rank(y), g.channels(y)
    if rank is not None and c is None and _axis(int(node.attrs["axis"]), rank) == CHANNEL_AXIS:
        known = [g.channels(t) for t in node.inputs]  # inference may stop at a computed Resize
        if None not in known and all(g.rank(t) == rank for t in node.inputs):
            _set_channels(g, y, rank, int(sum(known)))
            c = g.channels(y)
    if rank is None or c is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    axis = _axis(int(node.attrs["axis"]), rank)
    if axis != CHANNEL_AXIS:
        return _concat_other_axis(spec, rank, c)
    sizes = [g.channels(t) for t in node.inputs]
    if None in sizes or sum(sizes) != c:
        return spec.freeze(None, R_UNKNOWN_DIM if None in sizes else R_MISMATCH)
    offsets = np.cumsum([0, *sizes])
    for t, off, n in zip(node.inputs, offsets, sizes):
        spec.link(t, np.arange(n), y, np.arange(off, off + n))
    consts = [channel_vector(t.values, rank, n) if isinstance(t, gs.Constant) else None
              for t, n in zip(node.inputs, sizes)]

    def const_fn(get):
        parts = []
        for t, n, vec in zip(node.inputs, sizes, consts):
            parts.append(get(t.name) if not isinstance(t, gs.Constant) else (vec if vec is not None else _nan(n)))
        return {y.name: np.concatenate(parts) if parts else _nan(0)}

    spec.const_fn = const_fn
    return spec


def _concat_other_axis(spec: NodeSpec, rank: int, c: int) -> NodeSpec:
    """Concat along a non-channel axis: every input has the output's channels."""
    node, y = spec.node, spec.node.outputs[0]
    for i, t in enumerate(node.inputs):
        if isinstance(t, gs.Constant):
            if t.values.shape[CHANNEL_AXIS] != c:
                return spec.freeze(None, R_MISMATCH)
            spec.param(i, CHANNEL_AXIS, y, ROLE_PARAM)
        elif not spec.identity(t, y):
            return spec

    def const_fn(get):
        vals = []
        for t in node.inputs:
            vec = channel_vector(t.values, rank, c) if isinstance(t, gs.Constant) else get(t.name)
            vals.append(_nan(c) if vec is None else vec)
        stack = np.stack(vals)
        return {y.name: np.where(np.all(stack == stack[0], axis=0), stack[0], np.nan)}

    spec.const_fn = const_fn
    return spec


def _split_sizes(node: gs.Node, g: GraphInfo, c: int) -> list[int] | None:
    present, sizes = _ints(node, g, "split", 1 if g.opset >= 13 else None)
    if present:
        return sizes
    n = int(node.attrs.get("num_outputs", len(node.outputs)))
    if "num_outputs" in node.attrs:
        chunk = -(-c // n)
        return [chunk] * (n - 1) + [c - chunk * (n - 1)]
    return [c // n] * n if c % n == 0 else None


def _split(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    x = node.inputs[0]
    rank, c = g.rank(x), g.channels(x)
    if rank is None or c is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    if _axis(int(node.attrs.get("axis", 0)), rank) != CHANNEL_AXIS:
        return _split_other_axis(spec, x)
    sizes = _split_sizes(node, g, c)
    if sizes is None or len(sizes) != len(node.outputs) or sum(sizes) != c:
        return spec.freeze(None, R_UNSUPPORTED)
    offsets = np.cumsum([0, *sizes])
    for y, off, n in zip(node.outputs, offsets, sizes):
        if g.channels(y) != n:
            return spec.freeze(None, R_UNKNOWN_DIM if g.channels(y) is None else R_MISMATCH)
        spec.link(x, np.arange(off, off + n), y, np.arange(n))
    spec.const_fn = lambda get: {y.name: get(x.name)[off:off + n] for y, off, n in zip(node.outputs, offsets, sizes)}
    spec.rewrite = lambda ctx: _write_split(node, g, [ctx.count(y.name) for y in node.outputs], ctx)
    return spec


def _split_other_axis(spec: NodeSpec, x: gs.Tensor) -> NodeSpec:
    outs = spec.node.outputs
    if all(spec.identity(x, y) for y in outs):
        spec.const_fn = lambda get: {y.name: get(x.name) for y in outs}
    return spec


def _write_split(node: gs.Node, g: GraphInfo, sizes: list[int], ctx: RewriteContext) -> None:
    if g.opset < 13:
        node.attrs["split"] = sizes
        return
    node.attrs.pop("num_outputs", None)
    old = _input(node, 1)
    const = ctx.constant(old.name if old is not None else f"{node.name or node.outputs[0].name}_split",
                         np.asarray(sizes, dtype=np.int64))
    if len(node.inputs) > 1:
        node.inputs[1] = const
    else:
        node.inputs.append(const)


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


def _slice(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    x, y = node.inputs[0], node.outputs[0]
    rank, c = g.rank(x), g.channels(x)
    args = _slice_args(node, g)
    if rank is None or c is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    if args is None:
        return spec.freeze(None, R_UNSUPPORTED)
    starts, ends, axes, steps = args
    axes = [_axis(a, rank) for a in axes]
    if CHANNEL_AXIS not in axes:
        return _passthrough(node, g)
    j = axes.index(CHANNEL_AXIS)
    if steps[j] != 1:
        return spec.freeze(None, R_UNSUPPORTED)
    s, e = _clamp(starts[j], c), _clamp(ends[j], c)
    e = max(s, e)
    if g.channels(y) != e - s:
        return spec.freeze(None, R_MISMATCH)
    spec.link(x, np.arange(s, e), y, np.arange(e - s))
    spec.touched.update(t.name for t in node.inputs[1:])
    spec.const_fn = lambda get: {y.name: get(x.name)[s:e]}
    spec.rewrite = lambda ctx: _write_slice(node, g, j, _kept_bounds(ctx.kept(x.name), s, e), ctx)
    return spec


def _kept_bounds(kept: np.ndarray, s: int, e: int) -> tuple[int, int]:
    new_s = int(np.sum(kept < s))
    return new_s, new_s + int(np.sum((kept >= s) & (kept < e)))


def _write_slice(node: gs.Node, g: GraphInfo, j: int, bounds: tuple[int, int], ctx: RewriteContext) -> None:
    for k, (index, key) in enumerate(((1, "starts"), (2, "ends"))):
        if g.opset < 10:
            values = list(node.attrs[key])
            values[j] = bounds[k]
            node.attrs[key] = values
            continue
        old = node.inputs[index]
        values = g.const(old).copy()
        values.reshape(-1)[j] = bounds[k]
        node.inputs[index] = ctx.constant(old.name, values)


# ----------------------------------------------------------------- weight layers


def _dense(spec: NodeSpec, kind: str, in_axis: int, out_axis: int, bias: tuple[int, int] | None,
           bias_vec: Vec | None) -> NodeSpec:
    """A weight layer: output channels are a source; ``bias`` is ``(input index, axis)`` if sliced."""
    node = spec.node
    x, y = node.inputs[0], node.outputs[0]
    spec.sources.append(y.name)
    spec.touched.update({x.name, y.name})
    spec.param(1, out_axis, y, ROLE_W_OUT)
    spec.param(1, in_axis, x, ROLE_W_IN)
    if bias is not None:
        spec.param(bias[0], bias[1], y, ROLE_B_OUT)
    spec.layer = Layer(node, kind, x.name, y.name, in_axis, out_axis)
    n = spec.info.channels(y)
    vec = np.zeros(n) if bias_vec is None else bias_vec
    spec.const_fn = lambda get: {y.name: vec}
    return spec


def _frozen_layer(spec: NodeSpec, reason: str) -> NodeSpec:
    """A weight layer that cannot change: its output channels still form a (frozen) group."""
    x, y = spec.node.inputs[0], spec.node.outputs[0]
    if spec.info.channels(y) is not None:
        spec.sources.append(y.name)
    return spec.freeze([x, y], reason)


def _check_io(spec: NodeSpec, cin: int, cout: int) -> bool:
    x, y = spec.node.inputs[0], spec.node.outputs[0]
    have = (spec.info.channels(x), spec.info.channels(y))
    if have == (cin, cout):
        return True
    spec.freeze([x, y], R_UNKNOWN_DIM if None in have else R_MISMATCH)
    return False


def _conv_weights(spec: NodeSpec) -> tuple[np.ndarray, np.ndarray | None] | None:
    node, g = spec.node, spec.info
    w, b_t = g.const(_input(node, 1)), _input(node, 2)
    b = g.const(b_t) if b_t is not None else None
    if w is None or (b_t is not None and b is None):
        _frozen_layer(spec, R_NONCONST)
        return None
    if w.ndim < 3:
        _frozen_layer(spec, R_UNSUPPORTED)
        return None
    return w, b


def _conv(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    weights = _conv_weights(spec)
    if weights is None:
        return spec
    w, b = weights
    group = int(node.attrs.get("group", 1))
    cin, cout = w.shape[1] * group, w.shape[0]
    if not _check_io(spec, cin, cout):
        return spec
    bias_vec = None if b is None else b.astype(np.float64)
    if group == 1:
        return _dense(spec, "conv", 1, 0, (2, 0) if b is not None else None, bias_vec)
    if group == cin and cout % cin == 0:
        return _depthwise(spec, w, b, cout // cin, transpose=False)
    return _grouped(spec, b, group, transpose=False)


def _conv_transpose(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    weights = _conv_weights(spec)
    if weights is None:
        return spec
    w, b = weights
    group = int(node.attrs.get("group", 1))
    cin, cout = w.shape[0], w.shape[1] * group
    if not _check_io(spec, cin, cout):
        return spec
    bias_vec = None if b is None else b.astype(np.float64)
    if group == 1:
        return _dense(spec, "convtranspose", 0, 1, (2, 0) if b is not None else None, bias_vec)
    if group == cin:
        return _depthwise(spec, w, b, cout // cin, transpose=True)
    return _grouped(spec, b, group, transpose=True)


def _grouped(spec: NodeSpec, b: np.ndarray | None, g: int, transpose: bool) -> NodeSpec:
    """``1 < group < Cin``: output channels are a source, both sides split into ``g`` blocks.

    Conv weight ``[g*co, ci, k..]``: rows follow the output channels, the ``ci`` columns of
    block ``b`` read input channels ``[b*ci, (b+1)*ci)``. ConvTranspose weight ``[g*ci, co, k..]``:
    the other way round. Every block of the input and of the output loses the same count, so
    ``group`` stays valid and unchanged.
    """
    node = spec.node
    x, y = node.inputs[0], node.outputs[0]
    cin, cout = spec.info.channels(x), spec.info.channels(y)
    if cin % g or cout % g:
        return _frozen_layer(spec, R_UNSUPPORTED)
    ci, co = cin // g, cout // g
    spec.sources.append(y.name)
    spec.touched.update({x.name, y.name})
    if transpose:
        spec.param(1, 0, x, ROLE_W_IN)
        spec.blocked_param(1, 1, 0, y, ROLE_W_OUT, np.arange(cout).reshape(g, co))
    else:
        spec.param(1, 0, y, ROLE_W_OUT)
        spec.blocked_param(1, 1, 0, x, ROLE_W_IN, np.arange(cin).reshape(g, ci))
    if b is not None:
        spec.param(2, 0, y, ROLE_B_OUT)
    spec.blocks += [(x.name, np.repeat(np.arange(g), ci)), (y.name, np.repeat(np.arange(g), co))]
    kind, (in_axis, out_axis) = ("convtranspose", (0, 1)) if transpose else ("conv", (1, 0))
    spec.layer = Layer(node, kind, x.name, y.name, in_axis, out_axis, groups=g)
    vec = np.zeros(cout) if b is None else b.astype(np.float64)
    spec.const_fn = lambda get: {y.name: vec}
    return spec


def _depthwise(spec: NodeSpec, w: np.ndarray, b: np.ndarray | None, m: int, transpose: bool) -> NodeSpec:
    """``group == Cin``: input channel ``i`` is output channels ``[i*m, (i+1)*m)``; ``group`` follows."""
    node = spec.node
    x, y = node.inputs[0], node.outputs[0]
    cin = w.shape[0] // (1 if transpose else m)
    spec.link(x, np.repeat(np.arange(cin), m), y, np.arange(cin * m))
    spec.param(1, 0, x if transpose else y, ROLE_PARAM)
    if b is not None:
        spec.param(2, 0, y, ROLE_PARAM)
    sums = w.astype(np.float64).reshape(cin * m, -1).sum(axis=1)
    if transpose:
        sums = sums / float(np.prod(node.attrs.get("strides", [1])))
    bias = np.zeros(cin * m) if b is None else b.astype(np.float64)
    spec.const_fn = lambda get: {y.name: np.repeat(get(x.name), m) * sums + bias}
    spec.const_border = transpose or has_padding(node)

    def rewrite(ctx: RewriteContext) -> None:
        node.attrs["group"] = ctx.count(x.name)

    spec.rewrite = rewrite
    return spec


def has_padding(node: gs.Node) -> bool:
    """Whether a Conv pads its input (explicit pads or a SAME ``auto_pad``)."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    return auto_pad not in ("NOTSET", "VALID") or any(int(p) != 0 for p in node.attrs.get("pads", []))


def _gemm(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    w = g.const(_input(node, 1))
    if int(node.attrs.get("transA", 0)):
        return _frozen_layer(spec, R_UNSUPPORTED)
    if w is None or w.ndim != 2:
        return _frozen_layer(spec, R_NONCONST if w is None else R_UNSUPPORTED)
    in_axis, out_axis = (1, 0) if int(node.attrs.get("transB", 0)) else (0, 1)
    if not _check_io(spec, w.shape[in_axis], w.shape[out_axis]):
        return spec
    n = w.shape[out_axis]
    c_t = _input(node, 2)
    c = g.const(c_t) if c_t is not None else None
    if c_t is not None and c is None:
        return _frozen_layer(spec, R_NONCONST)
    bias = (2, c.ndim - 1) if c is not None and c.ndim >= 1 and c.shape[-1] == n else None
    bias_vec = None
    if c is not None:
        vec = channel_vector(c.reshape((1,) * (2 - c.ndim) + c.shape) if c.ndim <= 2 else c, 2, n)
        bias_vec = _nan(n) if vec is None else vec * float(node.attrs.get("beta", 1.0))
    return _dense(spec, "gemm", in_axis, out_axis, bias, bias_vec)


def _matmul(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    x = node.inputs[0]
    w = g.const(node.inputs[1])
    if w is None:
        spec.freeze(None, R_NONCONST)
        return _frozen_layer(spec, R_NONCONST)
    if w.ndim != 2 or g.rank(x) != 2:
        return _frozen_layer(spec, R_UNSUPPORTED if g.rank(x) is not None else R_UNKNOWN_DIM)
    if not _check_io(spec, w.shape[0], w.shape[1]):
        return spec
    return _dense(spec, "matmul", 0, 1, None, None)


def _frozen(reason: str) -> Handler:
    return lambda node, g: NodeSpec(node, g).freeze(None, reason)


# ----------------------------------------------------------------- the table

_UNARY_OPS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Celu", "Selu", "Softplus",
    "Softsign", "ThresholdedRelu", "Mish", "Neg", "Abs", "Exp", "Floor", "Ceil", "Identity", "Dropout", "Cast",
    "Log", "Sqrt", "Reciprocal", "Sin", "Cos", "Erf", "Round", "Sign", "Gelu",
)
_POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
_REDUCE_OPS = (
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
)

#: Op type -> handler.
HANDLERS: dict[str, Handler] = {
    **{op: _unary for op in _UNARY_OPS},
    **{op: _pool for op in _POOL_OPS},
    **{op: _binary for op in _BINARY},
    **{op: _reduce for op in _REDUCE_OPS},
    **{op: _softmax for op in ("Softmax", "LogSoftmax", "Hardmax")},
    **{op: _frozen(R_CONTROL_FLOW) for op in ("If", "Loop", "Scan")},
    "Clip": _clip, "BatchNormalization": _batchnorm, "PRelu": _prelu, "Pad": _pad,
    "Resize": _resize, "Upsample": _resize, "Flatten": _flatten, "Reshape": _reshape,
    "Squeeze": _squeeze, "Unsqueeze": _squeeze, "Transpose": _transpose, "Shape": _shape_op,
    "Size": _frozen(R_SHAPE_READ), "Concat": _concat, "Split": _split, "Slice": _slice,
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul,
}


def handle(node: gs.Node, g: GraphInfo) -> NodeSpec:
    """The spec of ``node``: its handler's, or every channel tensor frozen (no handler)."""
    handler = HANDLERS.get(node.op) if (node.domain or "") in ("", "ai.onnx") else None
    if handler is None:
        return NodeSpec(node, g).freeze(None, R_NO_HANDLER)
    return handler(node, g)
