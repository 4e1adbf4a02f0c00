"""Cross-layer equalization (Nagel et al. 2019): rescale channels between consecutive weight layers."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import Names, const_values, node_label, opt_input
from onnxcompress.core.pass_api import Numerics, Option, Pass, PassContext, PassResult, register
from onnxcompress.core.shapes import infer_graph

__all__ = ["DECLINE_REASONS", "Equalize", "in_ranges", "out_ranges"]

log = logging.getLogger(__name__)

R_GRAPH_OUTPUT = "graph_output"  # a tensor on the way is a graph output
R_ADD = "residual_add"  # both inputs would need the same scale
R_CLIP = "clip_not_equivariant"  # Clip/Relu6 is not scale-equivariant
R_OP = "op_does_not_commute"  # not known to commute with a channel scale
R_WEIGHT = "weight_not_constant"
R_BIAS = "bias_not_constant"
R_LAYOUT = "unsupported_layout"
R_SHAPE = "unknown_static_shape"
R_NO_CONSUMER = "no_consumer_layer"  # no weight layer reads the channels
R_WEIGHT_INPUT = "feeds_weight_input"
R_SUBGRAPH = "read_in_subgraph"
R_REJOIN = "channels_rejoin"
R_PAD = "pad_not_spatial_zero"  # not zero padding of spatial axes
R_EXCLUDED = "excluded"

#: Every decline code :class:`Equalize` may give when it leaves a producer's channels alone.
DECLINE_REASONS = (
    R_GRAPH_OUTPUT, R_ADD, R_CLIP, R_OP, R_WEIGHT, R_BIAS, R_LAYOUT, R_SHAPE, R_NO_CONSUMER,
    R_WEIGHT_INPUT, R_SUBGRAPH, R_REJOIN, R_PAD, R_EXCLUDED,
)

_LAYER_OPS = frozenset({"Conv", "Gemm", "MatMul"})
_UNARY = frozenset({"Relu", "LeakyRelu", "PRelu", "Identity", "Dropout"})
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})
_BINARY = frozenset({"Add", "Sum", "Sub"})
_AFFINE = frozenset({"Add", "Sub", "Mul", "Div"})
_TINY = 1e-12  # ranges below this (relative to the layer's largest) count as dead channels


class _Decline(Exception):
    """Raised inside the walk: the group is left alone at ``where`` for ``reason``."""

    def __init__(self, where: str, reason: str):
        super().__init__(reason)
        self.where, self.reason = where, reason


# ------------------------------------------------------------------------------ weight layers


@dataclass(eq=False)
class _Layer:
    """Float64 working copy of a Conv/Gemm/MatMul's weight and bias.

    Attributes:
        node: The layer.
        w: Weight (original layout). Conv ``[O, I/g, k...]``; Gemm/MatMul ``op(B)`` axes given below.
        b: Bias per output channel, or ``None``.
        out_axis: Axis of ``w`` that follows the output channels.
        in_axis: Axis of ``w`` that follows the input features (within a group for Conv).
        group: Conv ``group`` (1 otherwise).
        bias_shape: Shape the bias is written back with.
        changed: Whether ``w`` or ``b`` were rescaled.
    """

    node: gs.Node
    w: np.ndarray
    b: np.ndarray | None
    out_axis: int
    in_axis: int
    group: int = 1
    bias_shape: tuple[int, ...] = ()
    changed: bool = False

    @property
    def channels(self) -> int:
        """Number of output channels."""
        return self.w.shape[self.out_axis]

    @property
    def features(self) -> int:
        """Number of input features (channels) the layer reads."""
        return self.w.shape[self.in_axis] * self.group

    def scale_out(self, v: np.ndarray) -> None:
        """Multiply output channel ``c`` (weight and bias) by ``v[c]``."""
        self.w = self.w * _expand(v, self.w.ndim, self.out_axis)
        if self.b is not None:
            self.b = self.b * v
        self.changed = True

    def scale_in(self, u: np.ndarray) -> None:
        """Multiply the weights reading input feature ``f`` by ``u[f]``."""
        if self.node.op == "Conv":
            per_out = self.w.shape[0] // self.group
            rows = np.repeat(u.reshape(self.group, -1), per_out, axis=0)  # [O, I/g]
            self.w = self.w * rows.reshape(rows.shape + (1,) * (self.w.ndim - 2))
        else:
            self.w = self.w * _expand(u, self.w.ndim, self.in_axis)
        self.changed = True


def _expand(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def out_ranges(layer: _Layer) -> np.ndarray:
    """``max |W|`` per output channel."""
    w = np.moveaxis(np.abs(layer.w), layer.out_axis, 0)
    return w.reshape(w.shape[0], -1).max(axis=1)


def in_ranges(layer: _Layer) -> np.ndarray:
    """``max |W|`` per input feature (for a grouped Conv, over the output channels of its group)."""
    w = np.abs(layer.w)
    if layer.node.op == "Conv":
        per = w.reshape(w.shape[0], w.shape[1], -1).max(axis=2)  # [O, I/g]
        return per.reshape(layer.group, -1, w.shape[1]).max(axis=1).reshape(-1)
    w = np.moveaxis(w, layer.in_axis, 0)
    return w.reshape(w.shape[0], -1).max(axis=1)


def _make_layer(node: gs.Node) -> _Layer | str:
    """A working copy of ``node``'s parameters, or the reason it cannot be rescaled."""
    w = const_values(opt_input(node, 1))
    if w is None:
        return R_WEIGHT
    if w.dtype.kind != "f":
        return R_LAYOUT
    bias_t = opt_input(node, 2)
    bias = const_values(bias_t)
    if bias_t is not None and (bias is None or bias.dtype.kind != "f"):
        return R_BIAS
    w64 = w.astype(np.float64)
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        if w.ndim < 3 or group < 1 or w.shape[0] % group:
            return R_LAYOUT
        return _with_bias(_Layer(node, w64, None, 0, 1, group), bias)
    if w.ndim != 2 or (node.op == "MatMul" and bias_t is not None):
        return R_LAYOUT
    trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0))
    return _with_bias(_Layer(node, w64, None, 0 if trans_b else 1, 1 if trans_b else 0), bias)


def _with_bias(layer: _Layer, bias: np.ndarray | None) -> _Layer | str:
    """Attach ``bias`` if it is per output channel (Gemm: also a broadcast scalar or ``[1, N]``)."""
    if bias is None:
        return layer
    n = layer.channels
    if bias.shape == (n,) or (layer.node.op == "Gemm" and bias.shape == (1, n)):
        layer.b, layer.bias_shape = bias.astype(np.float64).reshape(-1), bias.shape
    elif layer.node.op == "Gemm" and bias.size == 1 and bias.ndim <= 2:
        layer.b, layer.bias_shape = np.full(n, float(bias.reshape(-1)[0])), (n,)
    else:
        return R_LAYOUT
    return layer


# ------------------------------------------------------------------------------ groups


@dataclass
class _Path:
    """How a tensor's channel axis maps to the producer's output channels.

    Attributes:
        axis: ``1`` (NC... layout: Conv, Gemm outputs) or ``-1`` (last axis: MatMul outputs).
        rank: The tensor's rank, if known.
        chan: Producer channel of each index along the channel axis (``-1``: another producer's).
    """

    axis: int
    rank: int | None
    chan: np.ndarray
    gain: np.ndarray | None = None

    def with_gain(self, factor: np.ndarray, channels: int) -> _Path:
        """This path after a per-position factor ``|k|`` (BN, Mul): the producer's effective range grows by it."""
        mine = self.chan >= 0
        g = np.zeros(channels)
        np.maximum.at(g, self.chan[mine], np.abs(factor[mine]))
        g[np.bincount(self.chan[mine], minlength=channels) == 0] = 1.0
        base = np.ones(channels) if self.gain is None else self.gain
        return _Path(self.axis, self.rank, self.chan, base * g)


@dataclass(eq=False)
class _Param:
    """Float64 working copy of a per-channel constant on a group's path (BN mean/shift, Add operand).

    Attributes:
        node: The node reading it.
        index: Its input index.
        values: Values in the shape written back (expanded to every channel).
        axis: Axis of ``values`` along the tensor's channels.
    """

    node: gs.Node
    index: int
    values: np.ndarray
    axis: int

    def divide(self, chan: np.ndarray, s: np.ndarray) -> None:
        """Divide the positions carrying producer channel ``c`` by ``s[c]``."""
        u = np.ones(len(chan))
        mine = chan >= 0
        u[mine] = 1.0 / s[chan[mine]]
        self.values = self.values * _expand(u, self.values.ndim, self.axis)


@dataclass(eq=False)
class _Group:
    """One producer, the commuting ops after it and the weight layers that read its channels."""

    producer: _Layer
    consumers: list[tuple[_Layer, np.ndarray]]
    clips: list[gs.Node] = field(default_factory=list)
    params: list[tuple[_Param, np.ndarray]] = field(default_factory=list)
    gain: np.ndarray | None = None
    total: np.ndarray | None = None

    @property
    def name(self) -> str:
        return node_label(self.producer.node)

    def scales(self) -> np.ndarray:
        """``s_c = sqrt(r1_c / r2_c)`` for the current weights (1 where a range is ~0)."""
        r1 = out_ranges(self.producer) * (1.0 if self.gain is None else self.gain)
        r2 = np.zeros_like(r1)
        for layer, chan in self.consumers:
            mine = chan >= 0
            np.maximum.at(r2, chan[mine], in_ranges(layer)[mine])
        ok = (r1 > _TINY * max(r1.max(), _TINY)) & (r2 > _TINY * max(r2.max(), _TINY))
        s = np.ones_like(r1)
        s[ok] = np.sqrt(r1[ok] / r2[ok])
        return s

    def apply(self, s: np.ndarray) -> None:
        """Divide the producer's channels by ``s`` and multiply the consumers' inputs by it."""
        self.producer.scale_out(1.0 / s)
        for layer, chan in self.consumers:
            u = np.ones(len(chan))
            mine = chan >= 0
            u[mine] = s[chan[mine]]
            layer.scale_in(u)
        for param, chan in self.params:
            param.divide(chan, s)
        self.total = s if self.total is None else self.total * s


@dataclass
class _State:
    """Book-keeping for one run of the pass."""

    graph: gs.Graph
    opts: dict
    outputs: set[str]
    main: set[int]
    layers: dict[int, _Layer | str] = field(default_factory=dict)
    params: dict[tuple[int, int], _Param] = field(default_factory=dict)
    static: dict[str, tuple[int | None, ...]] | None = None

    def layer(self, node: gs.Node) -> _Layer | str:
        if id(node) not in self.layers:
            self.layers[id(node)] = _make_layer(node)
        return self.layers[id(node)]

    def param(self, node: gs.Node, index: int, values: np.ndarray, axis: int) -> _Param:
        """The working copy of constant input ``index`` of ``node`` (shared by every group touching it)."""
        key = (id(node), index)
        if key not in self.params:
            self.params[key] = _Param(node, index, values.astype(np.float64), axis)
        return self.params[key]

    def shape(self, tensor: gs.Tensor) -> tuple[int | None, ...] | None:
        """Dims of ``tensor`` (``None`` where not static), or ``None`` if its rank is unknown."""
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in np.shape(tensor.values))
        if self.static is None:
            self.static = _static_shapes(self.graph)
        return self.static.get(tensor.name)


def _static_shapes(graph: gs.Graph) -> dict[str, tuple[int | None, ...]]:
    """Shapes of every tensor shape inference can type (one weight-less inference)."""
    out: dict[str, tuple[int | None, ...]] = {}
    try:
        model = infer_graph(graph)
    except Exception as exc:
        log.debug("equalize: shape inference failed: %s", exc)
        return out
    for info in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = info.type.tensor_type
        if tt.HasField("shape"):
            out[info.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                   for d in tt.shape.dim)
    return out


def _attr_axis(node: gs.Node, default: int, rank: int | None) -> int | None:
    axis = int(node.attrs.get("axis", default))
    if axis < 0:
        return None if rank is None else axis + rank
    return axis


def _is_channel_axis(axis: int | None, path: _Path) -> bool:
    if axis is None:
        return False
    if path.axis == 1:
        return axis == 1
    return path.rank is not None and axis == path.rank - 1


def _channel_const(values: np.ndarray, path: _Path) -> tuple[np.ndarray, int] | None:
    """A constant operand that broadcasts along a path's channel axis only, as ``[C, 1, ...]``
    (the dims from the channel axis on; the result broadcasts the same) and its channel axis 0;
    ``None`` if it varies along another axis or could change the output's rank."""
    n = len(path.chan)
    if path.rank is None and (path.axis == 1 or values.ndim > 1):
        return None
    rank = 1 if path.rank is None else path.rank
    axis = 1 if path.axis == 1 else rank - 1
    if values.ndim > rank:
        return None
    shape = (1,) * (rank - values.ndim) + tuple(values.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, n):
        return None
    out_shape = (n,) + (1,) * (rank - 1 - axis)
    return np.broadcast_to(values.reshape(shape[axis:]), out_shape).copy(), 0


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """``(min, max)`` of a Clip with constant bounds (absent bounds are infinite), else ``None``."""
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        t = opt_input(node, index)
        if t is None:
            bounds.append(default)
            continue
        v = const_values(t)
        if v is None or v.size != 1:
            return None
        bounds.append(float(v.reshape(-1)[0]))
    return bounds[0], bounds[1]


class _Walker:
    """Follows one producer's output channels to the weight layers that read them."""

    def __init__(self, st: _State, producer: _Layer):
        self.st, self.producer = st, producer
        self.consumers: list[tuple[_Layer, np.ndarray]] = []
        self.clips: list[gs.Node] = []
        self.params: list[tuple[_Param, np.ndarray]] = []
        self.gains: list[np.ndarray] = []
        self.seen: set[int] = set()

    def run(self) -> _Group:
        node = self.producer.node
        if node_label(node) in self.st.opts["exclude"]:
            raise _Decline(node_label(node), R_EXCLUDED)
        rank = self.producer.w.ndim if node.op == "Conv" else (2 if node.op == "Gemm" else None)
        path = _Path(1 if node.op in ("Conv", "Gemm") else -1, rank, np.arange(self.producer.channels))
        queue = [(node.outputs[0], path)]
        while queue:
            tensor, path = queue.pop(0)
            queue.extend(self._visit(tensor, path))
        if not self.consumers:
            raise _Decline(node_label(node), R_NO_CONSUMER)
        gain = np.max(self.gains, axis=0) if self.gains else None
        return _Group(self.producer, self.consumers, self.clips, self.params, gain)

    def _visit(self, tensor: gs.Tensor, path: _Path) -> list[tuple[gs.Tensor, _Path]]:
        if tensor.name in self.st.outputs:
            raise _Decline(tensor.name, R_GRAPH_OUTPUT)
        out = []
        for node in list({id(n): n for n in tensor.outputs}.values()):
            where = f"{node_label(node)} ({node.op})"
            if id(node) not in self.st.main:
                raise _Decline(tensor.name, R_SUBGRAPH)
            if id(node) in self.seen:
                raise _Decline(where, R_REJOIN)
            self.seen.add(id(node))
            if node.op in _LAYER_OPS:
                self._consumer(node, tensor, path, where)
            else:
                out.extend((t, p) for t, p in self._through(node, tensor, path, where) if (p.chan >= 0).any())
        return out

    def _consumer(self, node: gs.Node, tensor: gs.Tensor, path: _Path, where: str) -> None:
        if node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
            raise _Decline(where, R_WEIGHT_INPUT)
        if node_label(node) in self.st.opts["exclude"]:
            raise _Decline(where, R_EXCLUDED)
        layer = self.st.layer(node)
        if isinstance(layer, str):
            raise _Decline(where, layer)
        if node.op == "Conv":
            ok = path.axis == 1
        else:
            ok = (path.axis == -1 or path.rank == 2) and not int(node.attrs.get("transA", 0))
        if not ok or layer.features != len(path.chan):
            raise _Decline(where, R_LAYOUT)
        self.consumers.append((layer, path.chan))
        if path.gain is not None:
            self.gains.append(path.gain)

    def _through(self, node: gs.Node, tensor: gs.Tensor, path: _Path, where: str) -> list[tuple[gs.Tensor, _Path]]:
        """The outputs of a commuting ``node`` with their channel maps, or a decline."""
        op = node.op
        if op in _UNARY or op in _POOLS or op in ("Clip", "Pad"):
            if node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
                raise _Decline(where, R_OP)
            if any(t.outputs or t.name in self.st.outputs for t in node.outputs[1:]):
                raise _Decline(where, R_OP)  # MaxPool indices, Dropout mask
            if op in _POOLS and path.axis != 1:
                raise _Decline(where, R_LAYOUT)
            if op == "Clip":
                self._clip(node, where)
            if op == "Pad":
                self._pad(node, path, where)
            if op == "Dropout" and opt_input(node, 2) is not None:
                raise _Decline(where, R_OP)
            return [(node.outputs[0], path)]
        if op == "Flatten":
            return [(node.outputs[0], self._flatten(node, tensor, path, where))]
        if op == "Concat":
            return [(node.outputs[0], self._concat(node, tensor, path, where))]
        if op == "Split":
            return self._split(node, tensor, path, where)
        if op == "BatchNormalization":
            return [(node.outputs[0], self._batchnorm(node, tensor, path, where))]
        if op in _AFFINE and len(node.inputs) == 2:
            return [(node.outputs[0], self._affine(node, tensor, path, where))]
        raise _Decline(where, R_OP)

    def _batchnorm(self, node: gs.Node, tensor: gs.Tensor, path: _Path, where: str) -> _Path:
        """``BN(x / s) = BN(x) / s`` with ``mean / s`` and ``beta / s``; the range grows by ``|gamma| / sigma``."""
        params = [const_values(t) for t in node.inputs[1:5]]
        if (node.inputs[0] is not tensor or len(params) != 4 or any(p is None for p in params)
                or int(node.attrs.get("training_mode", 0)) or any(t.outputs for t in node.outputs[1:])):
            raise _Decline(where, R_OP)
        if path.axis != 1 or any(p.shape != (len(path.chan),) for p in params):
            raise _Decline(where, R_LAYOUT)
        gamma, _, _, var = (p.astype(np.float64) for p in params)
        factor = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        if not np.isfinite(factor).all():
            raise _Decline(where, R_LAYOUT)
        for index in (2, 3):
            self.params.append((self.st.param(node, index, params[index - 1], 0), path.chan))
        return path.with_gain(factor, self.producer.channels)

    def _affine(self, node: gs.Node, tensor: gs.Tensor, path: _Path, where: str) -> _Path:
        """Mul/Div by a per-channel constant (range factor ``|k|``), Add/Sub of one (rescaled too)."""
        index = 0 if node.inputs[0] is tensor else 1
        other = node.inputs[1 - index]
        values = const_values(other)
        if values is None or other is tensor:
            raise _Decline(where, R_ADD if node.op in _BINARY else R_OP)
        if node.op == "Div" and index == 1:
            raise _Decline(where, R_OP)
        expanded = _channel_const(values, path)
        if expanded is None:
            raise _Decline(where, R_LAYOUT)
        vector, axis = expanded
        if node.op in ("Add", "Sub"):
            self.params.append((self.st.param(node, 1 - index, vector, axis), path.chan))
            return path
        flat = np.moveaxis(vector, axis, 0).reshape(len(path.chan)).astype(np.float64)
        with np.errstate(divide="ignore"):
            factor = flat if node.op == "Mul" else 1.0 / flat
        if not np.isfinite(factor).all():
            raise _Decline(where, R_LAYOUT)
        return path.with_gain(factor, self.producer.channels)

    def _clip(self, node: gs.Node, where: str) -> None:
        bounds = _clip_bounds(node)
        if bounds is None:
            raise _Decline(where, R_CLIP)
        lo, hi = bounds
        if lo not in (0.0, -np.inf):
            raise _Decline(where, R_CLIP)
        if hi != np.inf:
            if not (self.st.opts["relu6_as_relu"] and lo == 0.0 and hi > 0):
                raise _Decline(where, R_CLIP)
            self.clips.append(node)

    def _pad(self, node: gs.Node, path: _Path, where: str) -> None:
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if "pads" in node.attrs:  # opset < 11
            pads, value = np.asarray(node.attrs["pads"]), float(node.attrs.get("value", 0.0))
        else:
            pads = const_values(opt_input(node, 1))
            value_t = opt_input(node, 2)
            value_v = const_values(value_t)
            value = 0.0 if value_t is None else (float(value_v.reshape(-1)[0]) if value_v is not None else np.nan)
            if opt_input(node, 3) is not None:
                pads = None  # explicit axes: not followed
        if pads is None or path.axis != 1 or (mode == "constant" and value != 0.0):
            raise _Decline(where, R_PAD)
        half = len(pads) // 2
        if half < 2 or pads[1] != 0 or pads[half + 1] != 0:
            raise _Decline(where, R_PAD)

    def _flatten(self, node: gs.Node, tensor: gs.Tensor, path: _Path, where: str) -> _Path:
        axis = _attr_axis(node, 1, path.rank)
        if path.axis != 1 or axis != 1:
            raise _Decline(where, R_LAYOUT)
        shape = self.st.shape(tensor)
        if shape is None or any(d is None for d in shape[2:]):
            raise _Decline(where, R_SHAPE)
        inner = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
        return _Path(1, 2, np.repeat(path.chan, inner))

    def _concat(self, node: gs.Node, tensor: gs.Tensor, path: _Path, where: str) -> _Path:
        if not _is_channel_axis(_attr_axis(node, 0, path.rank), path):
            raise _Decline(where, R_LAYOUT)
        parts = []
        for t in node.inputs:
            if t is tensor:
                parts.append(path.chan)
                continue
            shape = self.st.shape(t)
            size = None if shape is None or len(shape) < 2 else shape[1 if path.axis == 1 else -1]
            if size is None:
                raise _Decline(where, R_SHAPE)
            parts.append(np.full(int(size), -1, dtype=np.int64))
        return _Path(path.axis, path.rank, np.concatenate(parts))

    def _split(self, node: gs.Node, tensor: gs.Tensor, path: _Path, where: str) -> list[tuple[gs.Tensor, _Path]]:
        if node.inputs[0] is not tensor or not _is_channel_axis(_attr_axis(node, 0, path.rank), path):
            raise _Decline(where, R_LAYOUT)
        sizes = const_values(opt_input(node, 1)) if "split" not in node.attrs else np.asarray(node.attrs["split"])
        n, total = len(node.outputs), len(path.chan)
        if sizes is None:
            if opt_input(node, 1) is not None or total % n:
                raise _Decline(where, R_SHAPE)
            sizes = np.full(n, total // n)
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if len(sizes) != n or int(sizes.sum()) != total:
            raise _Decline(where, R_SHAPE)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return [(t, _Path(path.axis, path.rank, path.chan[bounds[i]:bounds[i + 1]]))
                for i, t in enumerate(node.outputs)]


# ------------------------------------------------------------------------------ statistics


def _spread(layer: _Layer) -> float | None:
    """``max / min`` of the non-zero output-channel ranges of ``layer``."""
    r = out_ranges(layer)
    r = r[r > _TINY * max(r.max(), _TINY)]
    return float(r.max() / r.min()) if len(r) else None


def _summary(values: list[float]) -> tuple[float, float]:
    return (round(float(np.median(values)), 4), round(float(np.max(values)), 4)) if values else (0.0, 0.0)


# ------------------------------------------------------------------------------ the pass


@register
class Equalize(Pass):
    """Cross-layer equalization: per-channel rescaling of consecutive weight layers (data-free).

    Before: ``y = W2 · f(W1 · x + b1)``        After: ``y = W2' · f(W1' · x + b1')``
    with ``f`` any chain of ops that commutes with a positive per-channel scale.

    Math (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
    Correction"):
        For output channel ``c`` of the producer ``W1`` let ``r1_c = max|W1[c]|`` and for the
        matching input channel of the consumers ``r2_c = max|W2[:, c]|`` (max over every consumer
        and every feature that carries channel ``c``). With ``s_c = sqrt(r1_c / r2_c)``:
        ``W1'[c] = W1[c] / s_c``, ``b1'[c] = b1[c] / s_c``, ``W2'[:, c] = W2[:, c] * s_c``; both
        ranges become ``sqrt(r1_c · r2_c)``. ``f(x / s) = f(x) / s`` for ``s > 0`` when ``f`` is
        Relu, LeakyRelu, PRelu, Identity, inference Dropout, Max/Average/Global pooling, zero
        (or reflect/edge) Pad of spatial axes, Clip with ``min`` in {0, -inf} and no ``max``,
        channel-axis Concat/Split, and Flatten into a Gemm (channel ``c`` covers ``H·W``
        consecutive features). Per-channel affine ops commute after a rewrite: an inference
        BatchNormalization gets ``mean / s`` and ``beta / s``, an Add/Sub of a per-channel
        constant gets ``k / s`` (new constants; a scalar is expanded to ``[C, 1, ...]``), a
        Mul/Div by one is unchanged; BN (``|gamma| / sigma``) and Mul/Div (``|k|``, ``1/|k|``)
        scale the producer's *effective* range ``r1``, so equalizing before ``fold_bn`` targets
        the folded weights. A grouped/depthwise Conv is a layer on both sides: as consumer
        its input channel ``c`` is scaled inside its group; as producer its output channels are
        divided. Sweeps over all groups repeat (at most ``iterations``) until every
        ``|log s_c| < tolerance`` (a group whose scales are all within it is left as is), so
        chains ``conv -> dw -> conv`` converge. Ranges ~0 (dead channels) keep ``s_c = 1``.
        All arithmetic is float64, cast back to the weights' dtype once at the end.

    Fires when:
        A Conv (any group), Gemm or MatMul with constant weight (and constant bias; a Gemm
        bias ``[N]``, ``[1, N]`` or scalar) feeds, through commuting ops only, Conv/Gemm/MatMul
        layers with constant weights at their data input. Several consumers (branches) are fine
        when all of them absorb the scale. Shapes matter only for Flatten/Concat/Split (static
        channel and spatial dims); a dynamic batch is fine.

    Declines:
        One code per producer left alone, from :data:`DECLINE_REASONS`: ``graph_output`` (a
        tensor on the way is one); ``residual_add`` (both inputs would need the same scale);
        ``clip_not_equivariant`` (Clip/Relu6; ``relu6_as_relu=true`` replaces ``Clip(0, m)`` by
        Relu in the groups it equalizes, which makes the pass APPROX); ``op_does_not_commute``
        (Sigmoid, HardSwish, Resize, Transpose, ConvTranspose, ... are not followed);
        ``weight_not_constant``, ``bias_not_constant``; ``unsupported_layout`` (Gemm ``transA``,
        odd bias shapes, non-float weights, channel-count mismatch); ``unknown_static_shape``;
        ``no_consumer_layer``; ``feeds_weight_input`` (a tensor read as a weight);
        ``read_in_subgraph``; ``channels_rejoin`` (branches that rejoin);
        ``pad_not_spatial_zero``; ``excluded`` nodes.

    Numerics:
        EXACT (float rounding only, ~1e-6 relative) unless ``relu6_as_relu``. Weights shared with
        another node are copied (a new constant), never edited in place.

    Stats:
        ``groups`` (producers equalized), ``layers`` (weight layers changed), ``sweeps``,
        ``clip_to_relu``, ``spread_median_before/after`` and ``spread_max_before/after``: the
        median / largest over changed layers of ``max_c r_c / min_c r_c`` of the output-channel
        ranges of the weights as stored (what per-tensor weight quantization suffers from; run
        after ``fold_bn`` for the folded picture).
    """

    name = "equalize"
    numerics = Numerics.EXACT
    options: ClassVar[Mapping[str, Option]] = {
        "iterations": Option(int, 100, "maximum sweeps over all layer pairs", interval="[0, inf)"),
        "tolerance": Option(float, 0.01, "stop when every |log s_c| of a sweep is below this", interval="[0, inf)"),
        "relu6_as_relu": Option(bool, False, "equalize through Clip(0, 6) by turning it into Relu (approximate)"),
        "exclude": Option(list, [], "node names never rescaled"),
    }

    def effective_numerics(self) -> Numerics:
        """APPROX when Clip(0, m) may become Relu, else EXACT."""
        return Numerics.APPROX if self.opts["relu6_as_relu"] else Numerics.EXACT

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Find the groups, sweep until the scales settle, write the changed weights back."""
        result = PassResult()
        st = _State(graph, self.opts, {t.name for t in graph.outputs}, {id(n) for n in graph.nodes})
        groups = self._groups(st, result, ctx)
        spreads_before = _spreads(groups)
        sweeps = self._sweep(groups)
        changed = [g for g in groups if g.total is not None]
        layers = _changed_layers(changed)
        result.stats["groups"] = len(changed)
        result.stats["layers"] = len(layers)
        result.stats["sweeps"] = sweeps
        result.stats["clip_to_relu"] = sum(len(g.clips) for g in changed)
        spread_b = [spreads_before[id(la.node)] for la in layers if spreads_before.get(id(la.node)) is not None]
        spread_a = [s for s in (_spread(la) for la in layers) if s is not None]
        (result.stats["spread_median_before"], result.stats["spread_max_before"]) = _summary(spread_b)
        (result.stats["spread_median_after"], result.stats["spread_max_after"]) = _summary(spread_a)
        if changed:
            _write_back(graph, layers, changed)
            result.modified = True
        return result

    def _groups(self, st: _State, result: PassResult, ctx: PassContext) -> list[_Group]:
        groups = []
        for node in list(st.graph.nodes):
            if node.op not in _LAYER_OPS or not node.outputs:
                continue
            layer = st.layer(node)
            if isinstance(layer, str):
                result.decline(node_label(node), layer, logger=ctx.logger)
                continue
            try:
                groups.append(_Walker(st, layer).run())
            except _Decline as d:
                result.decline(f"{node_label(node)} -> {d.where}", d.reason, logger=ctx.logger)
        return groups

    def _sweep(self, groups: list[_Group]) -> int:
        """Rescale every group until no scale moves more than the tolerance; returns the sweeps run."""
        sweeps, tol = 0, self.opts["tolerance"]
        for _ in range(max(self.opts["iterations"], 0)):
            sweeps += 1
            moved = 0.0
            for g in groups:
                s = g.scales()
                worst = float(np.abs(np.log(s)).max())
                moved = max(moved, worst)
                if worst >= tol:
                    g.apply(s)
            log.debug("equalize: sweep %d, max |log s| = %.3g", sweeps, moved)
            if moved < tol:
                break
        return sweeps


def _spreads(groups: list[_Group]) -> dict[int, float | None]:
    """Range spread of every layer of ``groups`` (keyed by node id), before any rescaling."""
    out: dict[int, float | None] = {}
    for g in groups:
        for layer in [g.producer, *(la for la, _ in g.consumers)]:
            out.setdefault(id(layer.node), _spread(layer))
    return out


def _changed_layers(groups: list[_Group]) -> list[_Layer]:
    seen, out = set(), []
    for g in groups:
        for layer in [g.producer, *(la for la, _ in g.consumers)]:
            if layer.changed and id(layer) not in seen:
                seen.add(id(layer))
                out.append(layer)
    return out


def _write_back(graph: gs.Graph, layers: list[_Layer], groups: list[_Group]) -> None:
    """New constants for every changed layer and path constant; Clip(0, m) -> Relu in the groups that moved."""
    names = Names(graph)
    for layer in layers:
        node = layer.node
        w_old = node.inputs[1]
        node.inputs[1] = _constant(names, w_old, node, "W_eq", layer.w.astype(w_old.values.dtype))
        if layer.b is not None:
            b_old = opt_input(node, 2)
            values = layer.b.reshape(layer.bias_shape).astype(b_old.values.dtype)
            node.inputs[2] = _constant(names, b_old, node, "B_eq", values)
    params = {id(p): p for g in groups for p, _ in g.params}
    for param in params.values():
        old = param.node.inputs[param.index]
        values = param.values.astype(old.values.dtype)
        param.node.inputs[param.index] = _constant(names, old, param.node, f"in{param.index}_eq", values)
    for g in groups:
        for clip in g.clips:
            clip.op = "Relu"
            clip.attrs.clear()
            while len(clip.inputs) > 1:
                clip.inputs.pop()


def _constant(names: Names, old: gs.Constant, node: gs.Node, suffix: str, values: np.ndarray) -> gs.Constant:
    """A constant replacing ``old`` for ``node``: same name if only ``node`` used it, else a fresh one."""
    only_mine = all(user is node for user in old.outputs) and sum(t is old for t in node.inputs) == 1
    name = old.name if only_mine else names.fresh(f"{node_label(node)}_{suffix}")
    return gs.Constant(name, np.ascontiguousarray(values))
