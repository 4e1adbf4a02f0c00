"""The op-type table: how channel indices flow through each operator.

Every handler takes a node and the graph facts and returns a :class:`~.spec.NodeSpec`. Roles:

* weight layers (sources of free output channels, consumers of input channels): ``Conv``
  (``group == 1``), ``ConvTranspose`` (``group == 1``), ``Gemm`` (``transA == 0``, ``transB``
  respected), ``MatMul`` with a constant 2-D weight and a 2-D input, or a ``[..., d]`` input whose
  channels are on the last axis (a transformer's linear layer, :mod:`.layout`);
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
  Flatten of ``[N, C, *S]`` into ``[N, C*prod(S)]`` (channel ``c`` is columns ``[c*S, (c+1)*S)``);
* Reshape (constant, ``0``/``-1`` or computed target): the channel dim passes through, merges
  with the next dims (``c`` is ``[c*m, (c+1)*m)``) or splits into blocks of ``m`` (whole blocks
  go); a literal channel count in the target is rewritten; a channel shuffle
  (Reshape -> Transpose -> Reshape) couples one channel of each shuffle group;
* anything else that touches a channel tensor freezes it, with a reason from
  :data:`~.spec.FREEZE_REASONS`.

A walker that follows one producer's channels forward reads the same table node by node
through :func:`.flow.channel_flow` (``equalize`` does). With :attr:`GraphInfo.last_axis
<.types.GraphInfo>` (the channels of a MatMul's output are on its last axis) only the
elementwise ops of :data:`LAST_AXIS_OPS` are followed; any other op freezes.

A node that touches a tensor of :attr:`GraphInfo.last <.types.GraphInfo>` (channels on the last
axis: ``[batch, seq, dim]``) gets the last-axis view of the facts: elementwise ops as above,
MatMul, Reshape, Shape, LayerNormalization and reductions through :data:`LAST_AXIS_HANDLERS`
(:mod:`.handlers_last`), any other op freezes.

Each handler also gives ``const_fn``: the op applied to per-channel constants, used to carry the
constant output of a removed channel (its bias through BN, activations, pools, ...) to the next
weight layer, where it is folded into the bias.

Layout: this module holds the table and :func:`handle`; the handlers live in
:mod:`.handlers_weights` (weight layers), :mod:`.handlers_channelwise` (channel-wise pass-through),
:mod:`.handlers_coupling` (two-operand elementwise, Concat/Split/Slice, Flatten),
:mod:`.handlers_reshape` (Reshape, channel shuffles) and :mod:`.shape_trace` (``Shape`` and
shape-vector tracing), built from :mod:`.handlers_common`.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import onnx_graphsurgeon as gs

from onnxcompress.pruning.handlers_channelwise import (
    _batchnorm,
    _clip,
    _pad,
    _pool,
    _prelu,
    _reduce,
    _resize,
    _softmax,
    _squeeze,
    _unary,
)
from onnxcompress.pruning.handlers_common import Handler, _frozen
from onnxcompress.pruning.handlers_coupling import _BINARY, _binary, _concat, _flatten, _slice, _split
from onnxcompress.pruning.handlers_last import MS_GELU_OPS, _ms_gelu, _reduce_last, _reshape_last, heads_reason
from onnxcompress.pruning.handlers_reshape import _reshape, _transpose
from onnxcompress.pruning.handlers_weights import _conv, _conv_transpose, _gemm, _matmul
from onnxcompress.pruning.shape_trace import _shape_op
from onnxcompress.pruning.types import (
    R_CONTROL_FLOW,
    R_LAST_AXIS,
    R_NO_HANDLER,
    R_NORMALIZES,
    R_SHAPE_READ,
    GraphInfo,
    NodeSpec,
)

__all__ = [
    "HANDLERS",
    "LAST_AXIS_HANDLERS",
    "LAST_AXIS_OPS",
    "handle",
]

log = logging.getLogger(__name__)


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
    "LayerNormalization": _frozen(R_NORMALIZES),
}


#: Op types whose handlers also read channels on the last axis (elementwise ops: the same channel
#: in and out wherever its axis is; constant operands broadcast along :meth:`GraphInfo.axis`).
LAST_AXIS_OPS = frozenset({*_UNARY_OPS, *_BINARY, "Clip", "PRelu"})


#: Handlers of the non-elementwise ops that read last-axis tensors (:mod:`.handlers_last`).
LAST_AXIS_HANDLERS: dict[str, Handler] = {
    "MatMul": _matmul, "Reshape": _reshape_last, "Shape": _shape_op, "LayerNormalization": _frozen(R_NORMALIZES),
    **{op: _reduce_last for op in _REDUCE_OPS if not op.startswith("Arg")},
}


def _handle_last(node: gs.Node, g: GraphInfo, handler: Handler | None) -> NodeSpec:
    """A node touching a :attr:`GraphInfo.last` tensor, handled in the last-axis view of ``g``."""
    view = replace(g, last_axis=True)
    if node.domain == "com.microsoft" and node.op in MS_GELU_OPS:
        return _ms_gelu(node, view)
    if handler is not None and node.op in LAST_AXIS_OPS:
        return handler(node, view)
    if handler is not None and node.op in LAST_AXIS_HANDLERS:
        return LAST_AXIS_HANDLERS[node.op](node, view)
    return NodeSpec(node, view).freeze(None, R_NO_HANDLER if handler is None else R_LAST_AXIS)


def handle(node: gs.Node, g: GraphInfo) -> NodeSpec:
    """The spec of ``node``: its handler's, or every channel tensor frozen (no handler)."""
    handler = HANDLERS.get(node.op) if (node.domain or "") in ("", "ai.onnx") else None
    if g.last and not g.last_axis and any(t.name in g.last for t in [*node.inputs, *node.outputs]):
        return _handle_last(node, g, handler)
    if handler is None:
        return NodeSpec(node, g).freeze(None, R_NO_HANDLER)
    if g.last_axis and node.op not in LAST_AXIS_OPS:
        return NodeSpec(node, g).freeze(None, R_LAST_AXIS)
    return heads_reason(handler(node, g)) if node.op == "Reshape" else handler(node, g)
