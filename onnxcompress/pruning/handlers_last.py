"""Handlers for nodes that touch last-axis channel tensors (transformer ``[batch, seq, dim]``).

:func:`.layout.last_axis_tensors` marks the tensors whose channels are on the last axis;
:func:`.handlers.handle` gives every node that touches one a *last-axis view* of the graph facts
(:attr:`GraphInfo.last_axis`) and dispatches here for the ops that are not elementwise:

* ``MatMul`` with a constant 2-D weight: a weight layer (:func:`.handlers_weights._matmul`) on
  ``[..., dim]`` rows, input rows and output columns on the last axis;
* ``Reshape`` that keeps the last dim (``[1, s, d] <-> [s, d]`` around a Gemm, ``[b, s, d] ->
  [b*s, d]``): the same channels; a literal last entry of the target is rewritten (a ``-1``, or
  ``Shape(x)[-1]`` of its own input, follows by itself). The split into attention heads, ``[b, s,
  H*dh] <-> [b, s, H, dh]``, freezes with ``attention_heads``: whole heads are removed by
  ``prune_heads``, never single channels. Any other reshape of these tensors freezes
  (``reshape_mixes_channels``);
* onnxruntime's fused ``com.microsoft`` ``BiasGelu``/``FastGelu``/``Gelu``/``QuickGelu``: the
  same channels, a constant bias sliced with them;
* ``LayerNormalization`` freezes with ``normalizes_over_channels`` (the residual stream between
  blocks); reductions over the last axis with ``reduces_over_channels``; anything else with
  ``channels_not_on_axis_1``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.pruning.handlers_channelwise import _gelu, _sigmoid
from onnxcompress.pruning.handlers_common import _const_operand, _identity_fn, _input, _nan
from onnxcompress.pruning.handlers_reshape import _concat_writer, _constant_writer, _target, _zero_copies, out_shape
from onnxcompress.pruning.shape_trace import Element
from onnxcompress.pruning.types import (
    R_HEADS,
    R_LAST_AXIS,
    R_NONCONST,
    R_REDUCES,
    R_RESHAPE,
    R_RESHAPE_TARGET,
    R_UNKNOWN_DIM,
    GraphInfo,
    NodeSpec,
    RewriteContext,
)

__all__ = ["MS_GELU_OPS", "_ms_gelu", "_reduce_last", "_reshape_last", "heads_reason"]

#: onnxruntime's fused GELUs (``com.microsoft``): ``y = gelu(x + bias)``, elementwise per channel.
MS_GELU_OPS = ("BiasGelu", "FastGelu", "Gelu", "QuickGelu")

Dims = tuple[int | None, ...]


def _splits_heads(a: Dims, b: Dims) -> bool:
    """Whether ``b`` is ``a`` with its last dim split in two, ``[..., H*dh] -> [..., H, dh]`` (H > 1)."""
    if len(b) != len(a) + 1 or a[-1] is None or b[-1] is None or b[-2] is None:
        return False
    return b[-2] > 1 and b[-2] * b[-1] == a[-1]


def heads_reason(spec: NodeSpec) -> NodeSpec:
    """A Reshape between a Gemm's ``[s, H*dh]`` and ``[b, s, H, dh]`` (either way; the fixed-shape
    Gemm style) that its handler froze as mixing channels is the split into (or merge of) attention
    heads: say so (``attention_heads``)."""
    node, g = spec.node, spec.info
    if node.op != "Reshape" or not any(r == R_RESHAPE for _, r in spec.freezes):
        return spec
    xs, ys = g.shape(node.inputs[0]), out_shape(node, g, _target(node, g)) if len(node.inputs) > 1 else None
    if xs is None or ys is None:
        return spec
    flat, split = (xs, ys) if len(xs) == 2 else (ys, xs)
    if len(flat) == 2 and len(split) == 4 and _splits_heads(flat, split[1:]):
        spec.freezes = [(t, R_HEADS if r == R_RESHAPE else r) for t, r in spec.freezes]
    return spec


def _on_last(t: gs.Tensor, g: GraphInfo) -> bool:
    return t.name in g.last or g.rank(t) == 2


def _entry(node: gs.Node, p: int, e: Element, last: int, rx: int) -> str:
    """``keep`` / ``write`` / ``bad`` for entry ``p`` of the target (``last``: its channel entry)."""
    own = (node.inputs[0].name, rx - 1)
    copies = e == own or (e == 0 and _zero_copies(node) and p == rx - 1)
    if p == last:
        if e == -1 or copies:
            return "keep"
        return "write" if isinstance(e, int) and e > 0 else "bad"
    return "bad" if copies or e is None else "keep"


def _last_writer(node: gs.Node, g: GraphInfo, rx: int):
    """A writer of the target's last entry, ``None`` (nothing to write) or ``False`` (cannot)."""
    el = _target(node, g)
    if el is None or not el:
        return False
    last = len(el) - 1
    verdicts = [_entry(node, p, e, last, rx) for p, e in enumerate(el)]
    if "bad" in verdicts:
        return False
    if verdicts[last] != "write":
        return None
    values = g.const(node.inputs[1])
    return _constant_writer(node, values) if values is not None else _concat_writer(node, g, [last])


def _reshape_last(node: gs.Node, g: GraphInfo) -> NodeSpec:
    """A Reshape with a last-axis tensor on one side (``g`` is the last-axis view)."""
    spec = NodeSpec(node, g)
    x, y = node.inputs[0], node.outputs[0]
    xs = g.shape(x)
    ys = out_shape(node, g, _target(node, g)) if len(node.inputs) > 1 else None
    if xs is None or ys is None or not xs or not ys:
        return spec.freeze([x, y], R_UNKNOWN_DIM)
    if _splits_heads(xs, ys) or _splits_heads(ys, xs):
        return spec.freeze([x, y], R_HEADS)
    if not (_on_last(x, g) and _on_last(y, g)) or xs[-1] is None or xs[-1] != ys[-1]:
        return spec.freeze([x, y], R_RESHAPE if xs[-1] is not None and ys[-1] is not None else R_UNKNOWN_DIM)
    writer = _last_writer(node, g, len(xs))
    if writer is False:
        return spec.freeze([x, y], R_RESHAPE_TARGET)
    if g.shape(y) is None or g.shape(y)[-1] is None:
        g.shapes[y.name] = tuple(ys)
    if spec.identity(x, y):
        spec.const_fn = _identity_fn(x.name, y.name)
    if writer is not None:
        last = len(ys) - 1

        def rewrite(ctx: RewriteContext) -> None:
            writer(ctx, {last: ctx.count(y.name)})

        spec.rewrite = rewrite
    return spec


def _reduce_last(node: gs.Node, g: GraphInfo) -> NodeSpec:
    """A reduction of a last-axis tensor: ``reduces_over_channels`` when it reduces the last axis
    (a decomposed LayerNorm's mean), else frozen (``channels_not_on_axis_1``)."""
    spec = NodeSpec(node, g)
    rank = g.rank(node.inputs[0])
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        values = g.const(node.inputs[1])
        axes = None if values is None else values.reshape(-1).tolist()
    if rank is not None and axes is not None and (rank - 1) in {int(a) % rank for a in np.asarray(axes).reshape(-1)}:
        return spec.freeze(None, R_REDUCES)
    return spec.freeze(None, R_REDUCES if axes is None else R_LAST_AXIS)


def _ms_gelu(node: gs.Node, g: GraphInfo) -> NodeSpec:
    """``com.microsoft`` BiasGelu / FastGelu / Gelu / QuickGelu: the same channels in and out; a
    constant bias (input 1) is sliced with them; a non-constant one freezes."""
    spec = NodeSpec(node, g)
    x, y = node.inputs[0], node.outputs[0]
    rank, c = g.rank(y), g.channels(y)
    if rank is None or c is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    bias_t = _input(node, 1)
    bias = None
    if bias_t is not None:
        if g.const(bias_t) is None:
            return spec.freeze(None, R_NONCONST)
        bias = _const_operand(spec, 1, rank, c, y)
        if bias is False:
            return spec
    if not spec.identity(x, y):
        return spec
    alpha = float(node.attrs.get("alpha", 1.702))
    fn = (lambda v: v * _sigmoid(alpha * v)) if node.op == "QuickGelu" else _gelu("tanh" if node.op == "FastGelu" else "none")
    if bias_t is not None and bias is None:
        spec.const_fn = lambda get: {y.name: _nan(c)}
    else:
        b = 0.0 if bias is None else bias
        spec.const_fn = lambda get: {y.name: fn(get(x.name) + b)}
    return spec
