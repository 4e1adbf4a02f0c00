"""Handlers of weight layers: Conv, ConvTranspose (dense, grouped, depthwise), Gemm, MatMul.

A dense layer's output channels are a source of free channels and its input channels consume
the producer's; a grouped layer (``1 < group < Cin``) splits both sides into ``group`` equal
blocks that each lose the same count; a depthwise layer (``group == Cin``) maps input channel
``i`` to output channels ``[i*m, (i+1)*m)`` and rewrites ``group``. A layer whose weights are
not constant (or not supported) still forms a frozen group.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import has_padding, weight_layout
from onnxcompress.pruning.handlers_common import Vec, _input, _nan, channel_vector
from onnxcompress.pruning.types import (
    R_MISMATCH,
    R_NONCONST,
    R_UNKNOWN_DIM,
    R_UNSUPPORTED,
    ROLE_B_OUT,
    ROLE_PARAM,
    ROLE_W_IN,
    ROLE_W_OUT,
    GraphInfo,
    Layer,
    NodeSpec,
    RewriteContext,
)

__all__ = ["_conv", "_conv_transpose", "_gemm", "_matmul"]


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
    layout = weight_layout(node, w.ndim)
    group, cin, cout = layout.group, layout.in_channels(w.shape), layout.out_channels(w.shape)
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
    layout = weight_layout(node, w.ndim)
    group, cin, cout = layout.group, layout.in_channels(w.shape), layout.out_channels(w.shape)
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


def _gemm(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    w = g.const(_input(node, 1))
    layout = weight_layout(node)
    if layout.trans_a:
        return _frozen_layer(spec, R_UNSUPPORTED)
    if w is None or w.ndim != 2:
        return _frozen_layer(spec, R_NONCONST if w is None else R_UNSUPPORTED)
    in_axis, out_axis = layout.in_axis, layout.out_axis
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
    rows = g.rank(x) == 2 or (g.last_axis and (g.rank(x) or 0) >= 3)  # [..., d] rows in the last-axis view
    if w.ndim != 2 or not rows:
        return _frozen_layer(spec, R_UNSUPPORTED if g.rank(x) is not None else R_UNKNOWN_DIM)
    if not _check_io(spec, w.shape[0], w.shape[1]):
        return spec
    return _dense(spec, "matmul", 0, 1, None, None)
