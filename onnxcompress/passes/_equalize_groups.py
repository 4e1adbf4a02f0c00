"""The arithmetic of cross-layer equalization (:mod:`.equalize`): layers, channel paths, groups.

A :class:`Layer` is a float64 working copy of a Conv/Gemm/MatMul's weight and bias that can be
scaled per output channel and per input feature; a :class:`ChannelPath` maps a tensor's channels
to a producer's; a :class:`Group` is one producer with the layers that read its channels and the
per-channel constants between them (:class:`Param`), and computes and applies the scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import broadcast_along, const_values, node_label, opt_input, weight_layout

__all__ = [
    "R_BIAS", "R_LAYOUT", "R_WEIGHT", "ChannelPath", "Group", "Layer", "Param", "in_ranges", "make_layer",
    "out_ranges", "spread", "summary",
]

R_WEIGHT = "weight_not_constant"
R_BIAS = "bias_not_constant"
R_LAYOUT = "unsupported_layout"

_TINY = 1e-12  # ranges below this (relative to the layer's largest) count as dead channels


# ------------------------------------------------------------------------------ weight layers


@dataclass(eq=False)
class Layer:
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
        self.w = self.w * broadcast_along(v, self.w.ndim, self.out_axis)
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
            self.w = self.w * broadcast_along(u, self.w.ndim, self.in_axis)
        self.changed = True


def out_ranges(layer: Layer) -> np.ndarray:
    """``max |W|`` per output channel."""
    w = np.moveaxis(np.abs(layer.w), layer.out_axis, 0)
    return w.reshape(w.shape[0], -1).max(axis=1)


def in_ranges(layer: Layer) -> np.ndarray:
    """``max |W|`` per input feature (for a grouped Conv, over the output channels of its group)."""
    w = np.abs(layer.w)
    if layer.node.op == "Conv":
        per = w.reshape(w.shape[0], w.shape[1], -1).max(axis=2)  # [O, I/g]
        return per.reshape(layer.group, -1, w.shape[1]).max(axis=1).reshape(-1)
    w = np.moveaxis(w, layer.in_axis, 0)
    return w.reshape(w.shape[0], -1).max(axis=1)


def make_layer(node: gs.Node) -> Layer | str:
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
    layout = weight_layout(node, w.ndim)
    if node.op == "Conv":
        if w.ndim < 3 or layout.group < 1 or w.shape[0] % layout.group:
            return R_LAYOUT
    elif w.ndim != 2 or (node.op == "MatMul" and bias_t is not None):
        return R_LAYOUT
    return _with_bias(Layer(node, w64, None, layout.out_axis, layout.in_axis, layout.group), bias)


def _with_bias(layer: Layer, bias: np.ndarray | None) -> Layer | str:
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
class ChannelPath:
    """How a tensor's channel axis maps to the producer's output channels.

    Attributes:
        axis: ``1`` (NC... layout: Conv, Gemm outputs) or ``-1`` (last axis: MatMul outputs).
        rank: The tensor's rank; ``None`` on a MatMul's path (its constants are then taken only
            as scalars or ``[C]`` vectors).
        chan: Producer channel of each index along the channel axis (``-1``: another producer's).
        gain: Per producer channel, how much larger its effective range is here (BN, Mul on the
            way), or ``None`` (1).
    """

    axis: int
    rank: int | None
    chan: np.ndarray
    gain: np.ndarray | None = None

    def with_gain(self, factor: np.ndarray, channels: int) -> ChannelPath:
        """This path after a per-position factor ``|k|`` (BN, Mul): the producer's effective range grows by it."""
        mine = self.chan >= 0
        g = np.zeros(channels)
        np.maximum.at(g, self.chan[mine], np.abs(factor[mine]))
        g[np.bincount(self.chan[mine], minlength=channels) == 0] = 1.0
        base = np.ones(channels) if self.gain is None else self.gain
        return ChannelPath(self.axis, self.rank, self.chan, base * g)


@dataclass(eq=False)
class Param:
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
        self.values = self.values * broadcast_along(u, self.values.ndim, self.axis)


@dataclass(eq=False)
class Group:
    """One producer, the commuting ops after it and the weight layers that read its channels."""

    producer: Layer
    consumers: list[tuple[Layer, np.ndarray]]
    clips: list[gs.Node] = field(default_factory=list)
    params: list[tuple[Param, np.ndarray]] = field(default_factory=list)
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


def spread(layer: Layer) -> float | None:
    """``max / min`` of the non-zero output-channel ranges of ``layer``."""
    r = out_ranges(layer)
    r = r[r > _TINY * max(r.max(), _TINY)]
    return float(r.max() / r.min()) if len(r) else None


def summary(values: list[float]) -> tuple[float, float]:
    return (round(float(np.median(values)), 4), round(float(np.max(values)), 4)) if values else (0.0, 0.0)
