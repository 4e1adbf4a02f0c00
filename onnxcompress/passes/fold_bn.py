"""Fold BatchNormalization and constant per-channel Mul/Add/Sub/Div into Conv, ConvTranspose, Gemm and MatMul."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import Names, const_values, has_padding, node_label, opt_input, weight_layout
from onnxcompress.core.pass_api import BN_GAMMA, Numerics, Pass, PassContext, PassResult, register
from onnxcompress.core.shapes import infer_graph

__all__ = ["FoldBn", "DECLINE_REASONS"]

log = logging.getLogger(__name__)

R_TRAINING = "bn_training_mode"
R_BN_PARAMS = "bn_params_not_constant"
R_OPERAND = "operand_not_constant"
R_NOT_AFFINE = "not_affine_in_conv_output"
R_WEIGHT = "weight_not_constant"
R_BIAS = "bias_not_constant"
R_CONSUMERS = "conv_output_has_other_consumers"
R_GRAPH_OUTPUT = "conv_output_is_graph_output"
R_BN_CONSUMERS = "bn_output_has_other_consumers"
R_BN_GRAPH_OUTPUT = "bn_output_is_graph_output"
R_PADDING = "bn_before_padded_conv"
R_LAYOUT = "unsupported_layout"
R_RANK = "unknown_rank"
R_CHANNELS = "channel_count_mismatch"
R_BROADCAST = "not_per_channel"
R_NONFINITE = "non_finite_scale"
R_NO_TARGET = "no_conv_to_fold_into"

#: Every decline code :class:`FoldBn` may give when it leaves a candidate alone.
DECLINE_REASONS = (
    R_TRAINING, R_BN_PARAMS, R_OPERAND, R_NOT_AFFINE, R_WEIGHT, R_BIAS, R_CONSUMERS, R_GRAPH_OUTPUT,
    R_BN_CONSUMERS, R_BN_GRAPH_OUTPUT, R_PADDING, R_LAYOUT, R_RANK, R_CHANNELS, R_BROADCAST,
    R_NONFINITE, R_NO_TARGET,
)

_BN_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_ELEMENTWISE_PRODUCERS = frozenset({"Conv", "ConvTranspose"})
_ELEMENTWISE = frozenset({"Mul", "Add", "Sub", "Div"})

_Affine = tuple[np.ndarray, np.ndarray]  # per-channel (scale, shift), float64
_Weights = tuple[np.ndarray, np.ndarray]  # new (weight, bias) in the node's dtypes
_Layout = tuple[int, int, int]  # output rank, channel axis, channel count


def _keep_gamma(ctx: PassContext, name: str, gamma: np.ndarray) -> None:
    """Add ``name: gamma`` to the :data:`BN_GAMMA` slot (created on the first fold)."""
    kept = ctx.get(BN_GAMMA)
    if kept is None:
        kept = {}
        ctx.put(BN_GAMMA, kept)
    kept[name] = gamma.copy()


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 else None


def _all_finite(*arrays: np.ndarray) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays)


def _bn_affine(bn: gs.Node) -> str | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scale, shift, gamma)`` of an inference-mode BN with constant parameters, or a reason."""
    if int(bn.attrs.get("training_mode", 0)) or sum(1 for t in bn.outputs if t.name) > 1:
        return R_TRAINING
    params = [const_values(t) for t in bn.inputs[1:5]]
    if len(bn.inputs) != 5 or any(p is None for p in params):
        return R_BN_PARAMS
    if int(bn.attrs.get("spatial", 1)) == 0 or any(p.ndim != 1 for p in params):
        return R_LAYOUT
    if len({p.shape[0] for p in params}) != 1:
        return R_CHANNELS
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    with np.errstate(all="ignore"):
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
    if not _all_finite(scale, shift):
        return R_NONFINITE
    return scale, shift, gamma


def _per_channel(c: np.ndarray, layout: _Layout) -> str | np.ndarray:
    """``c`` as a float64 vector over the channel axis, or a reason if it broadcasts elsewhere."""
    rank, axis, channels = layout
    if c.ndim > rank:
        return R_BROADCAST
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != axis):
        return R_BROADCAST
    if shape[axis] not in (1, channels):
        return R_CHANNELS
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,))


def _elementwise_affine(op: str, c: np.ndarray, x_first: bool) -> str | _Affine:
    """``y = op(x, c)`` (or ``op(c, x)``) written as ``y = x * scale + shift``."""
    ones, zeros = np.ones_like(c), np.zeros_like(c)
    with np.errstate(all="ignore"):
        if op == "Mul":
            scale, shift = c, zeros
        elif op == "Add":
            scale, shift = ones, c
        elif op == "Sub":
            scale, shift = (ones, -c) if x_first else (-ones, c)
        elif x_first:  # Div
            scale, shift = 1.0 / c, zeros
        else:
            return R_NOT_AFFINE
    if not _all_finite(scale, shift):
        return R_NONFINITE
    return scale, shift


def _scale_weight(node: gs.Node, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``w`` (float64) with every output channel ``o`` of ``node`` multiplied by ``scale[o]``."""
    return w * weight_layout(node, w.ndim).channel_array(scale, w.shape, "out")


def _scaled_weights(node: gs.Node, affine: _Affine) -> str | _Weights:
    """New weight and bias for ``node`` so that it computes ``node(x) * scale + shift``."""
    scale, shift = affine
    w = const_values(node.inputs[1])
    bias_t = opt_input(node, 2)
    bias = const_values(bias_t)
    if bias_t is not None and bias is None:
        return R_BIAS
    new_w = _scale_weight(node, w.astype(np.float64), scale).astype(w.dtype)
    old_b = 0.0 if bias is None else bias.astype(np.float64)
    if node.op == "Gemm":
        old_b = old_b * float(node.attrs.get("beta", 1.0))
    new_b = old_b * scale + shift
    return new_w, new_b.astype(w.dtype if bias is None else bias.dtype)


def _pre_scaled_weights(conv: gs.Node, affine: _Affine) -> str | _Weights:
    """New weight and bias for ``conv`` so that ``conv(x)`` equals the old ``conv(x * scale + shift)``."""
    scale, shift = affine
    w = const_values(conv.inputs[1])
    bias_t = opt_input(conv, 2)
    bias = const_values(bias_t)
    if w is None:
        return R_WEIGHT
    if bias_t is not None and bias is None:
        return R_BIAS
    layout = weight_layout(conv, w.ndim)
    if w.ndim < 3 or w.shape[0] % layout.group:
        return R_LAYOUT
    if scale.shape[0] != layout.in_channels(w.shape):
        return R_CHANNELS
    s = layout.channel_array(scale, w.shape, "in")  # input channel of W[o, i] is (o // (Cout/g)) * Cin/g + i
    t = layout.channel_array(shift, w.shape, "in")
    w64 = w.astype(np.float64)
    old_b = 0.0 if bias is None else bias.astype(np.float64)
    new_b = old_b + (w64 * t).reshape(w.shape[0], -1).sum(axis=1)
    return (w64 * s).astype(w.dtype), new_b.astype(w.dtype if bias is None else bias.dtype)


def _infer_ranks(graph: gs.Graph) -> dict[str, int]:
    """Ranks of every tensor shape inference can type (one weight-less inference)."""
    model = infer_graph(graph)
    ranks = {}
    for info in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            ranks[info.name] = len(tensor_type.shape.dim)
    return ranks


@dataclass
class _State:
    """Book-keeping for one run of the pass."""

    graph: gs.Graph
    ctx: PassContext
    result: PassResult
    names: Names
    graph_outputs: set[str]
    minted: set[str] = field(default_factory=set)
    removed: set[int] = field(default_factory=set)
    ranks: dict[str, int] | None = None

    @classmethod
    def create(cls, graph: gs.Graph, ctx: PassContext, result: PassResult) -> _State:
        return cls(graph, ctx, result, Names(graph), {t.name for t in graph.outputs})

    def rank(self, tensor: gs.Tensor) -> int | None:
        if tensor.shape is not None:
            return len(tensor.shape)
        if self.ranks is None:
            try:
                self.ranks = _infer_ranks(self.graph)
            except Exception as exc:
                log.debug("fold_bn: shape inference failed: %s", exc)
                self.ranks = {}
        return self.ranks.get(tensor.name)

    def constant(self, old: gs.Tensor | None, node: gs.Node, suffix: str, values: np.ndarray) -> gs.Constant:
        """A new constant replacing ``old`` for ``node`` (reusing the name only of our own unshared ones)."""
        if old is not None and old.name in self.minted and all(c is node for c in old.outputs):
            name = old.name
        else:
            if old is not None and any(c is not node for c in old.outputs):
                self.result.count("shared_copied")
            name = self.fresh(f"{node_label(node)}_{suffix}")
        return gs.Constant(name, np.ascontiguousarray(values))

    def fresh(self, base: str) -> str:
        name = self.names.fresh(base)
        self.minted.add(name)
        return name

    def remove(self, node: gs.Node) -> None:
        node.inputs.clear()
        node.outputs.clear()
        self.graph.nodes.remove(node)
        self.removed.add(id(node))


@register
class FoldBn(Pass):
    """Folds BatchNorm and constant per-channel Mul/Add into the adjacent Conv/ConvTranspose/Gemm/MatMul.

    Before: ``y = BN(Conv(x, W, b))``  or  ``y = Add(Mul(Conv(x, W, b), k1), k2)``
    After:  ``y = Conv(x, W', b')``

    Math:
        Every folded op is a per-channel affine ``y = x * s + t`` computed in float64 and cast
        back to the weight's dtype. BN: ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``
        (``epsilon`` defaults to 1e-5). Then ``W' = W * s`` per output channel and
        ``b' = b * s + t``:

        * Conv ``W[Cout, Cin/g, k...]``: ``W'[o] = W[o] * s[o]``.
        * ConvTranspose ``W[Cin, Cout/g, k...]``: output channel ``o = gi * Cout/g + j`` scales
          ``W[gi*Cin/g:(gi+1)*Cin/g, j]``.
        * Gemm with constant B: the columns of ``op(B)`` (``transB`` respected) are scaled,
          ``C' = beta * C * s + t`` and ``beta`` becomes 1; ``alpha``/``transA`` are kept.
        * MatMul with a constant 2-D B and a 2-D input becomes ``Gemm(x, B * s, t)``.
        * ``Mul``/``Add``/``Sub``/``Div`` by a constant after a Conv or ConvTranspose: the
          constant is ``s`` (Mul, Div as ``1/c``) or ``t`` (Add, Sub; ``c - x`` has ``s = -1``).
        * BN *before* a Conv, ``Conv(BN(x))``: ``W'[o, i, k] = W[o, i, k] * s[i]`` and
          ``b'[o] = b[o] + sum_{i,k} W[o, i, k] * t[i]`` (``i`` taken within ``o``'s group).

        Folds repeat until nothing changes, so ``Conv -> BN -> Mul -> Add`` becomes one Conv.
        The folded node takes over the removed op's output tensor, so downstream and graph-output
        names are kept. New weights are new constants ``<node>_W_folded``/``<node>_B_folded``
        (``<node>`` is the node name, else its output name; uniquified); initializers are never
        edited in place, so a weight shared with another node is in effect copied and the other
        user keeps the original. The ``|gamma|`` of each BN folded into a preceding node is kept in
        the context slot :data:`~onnxcompress.core.pass_api.BN_GAMMA` under that node's (new)
        output name, for pruning (``writes``).

    Fires when:
        A BN in inference form (one output, ``training_mode`` 0, ``spatial`` 1) or a Mul/Add/
        Sub/Div with a Conv/ConvTranspose input has constant parameters; the producer's weight
        (and bias) are constants; the producer's output feeds only this op and is not a graph
        output; and the op's channel axis is the producer's output channel axis (axis 1; for
        MatMul the input must be 2-D; a Mul/Add constant must be a scalar or broadcast only along
        axis 1: ``[C,1,1]``, ``[1,C,1,1]``, ``[1]`` -- a ``[C]`` vector aligns with the *last*
        axis and is declined). A BN that cannot fold backwards folds into the Conv it feeds when
        its output feeds only that Conv's data input, is not a graph output, and the Conv has no
        padding (pads all 0, auto_pad NOTSET or VALID); any group count is handled.

    Declines:
        Candidates are BNs and the Mul/Add/Sub/Div of a Conv/ConvTranspose output by a constant
        (a Mul/Add of two computed tensors -- a SiLU, a residual Add -- is no candidate and is not
        reported). One code per candidate left alone, from :data:`DECLINE_REASONS`:
        ``bn_training_mode``; ``bn_params_not_constant``; ``operand_not_constant`` (a constant
        without values); ``not_affine_in_conv_output``
        (``c / conv``); ``weight_not_constant``; ``bias_not_constant``;
        ``conv_output_has_other_consumers``; ``conv_output_is_graph_output``;
        ``bn_output_has_other_consumers``; ``bn_output_is_graph_output``;
        ``bn_before_padded_conv``; ``unsupported_layout`` (``spatial=0``, MatMul output not 2-D,
        malformed weights); ``unknown_rank`` (MatMul input rank not inferable);
        ``channel_count_mismatch``; ``not_per_channel`` (broadcasts over a non-channel axis or
        adds axes); ``non_finite_scale`` (``var + eps <= 0``, division by 0); ``no_conv_to_fold_into``.
        Subgraphs are not visited.

    Stats:
        ``folded`` (total), ``bn_folded``, ``bn_folded_forward``, ``elementwise_folded``,
        ``matmul_to_gemm``, ``shared_copied`` (constants copied because another node uses them).
    """

    name = "fold_bn"
    numerics = Numerics.EXACT
    writes = (BN_GAMMA,)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Fold until a sweep changes nothing; report the declines of that last sweep."""
        result = PassResult()
        state = _State.create(graph, ctx, result)
        folded = 0
        while True:
            declines: list[tuple[str, str]] = []
            done = self._sweep(state, declines)
            folded += done
            if not done:
                break
        for where, code in declines:
            result.decline(where, code, logger=ctx.logger)
        result.stats["folded"] = folded
        result.modified = folded > 0
        return result

    def _sweep(self, state: _State, declines: list[tuple[str, str]]) -> int:
        folded = 0
        for node in list(state.graph.nodes):
            if id(node) in state.removed:
                continue
            if node.op == "BatchNormalization":
                where, reason = node_label(node), self._try_bn(state, node)
            elif node.op in _ELEMENTWISE and (index := _conv_operand(node)) is not None:
                where, reason = node_label(node), self._try_elementwise(state, node, index)
            else:
                continue
            if reason is None:
                folded += 1
            else:
                declines.append((where, reason))
        return folded

    def _try_bn(self, state: _State, bn: gs.Node) -> str | None:
        affine = _bn_affine(bn)
        if isinstance(affine, str):
            return affine
        scale, shift, gamma = affine
        producer = _producer(bn.inputs[0])
        back = None
        if producer is not None and producer.op in _BN_PRODUCERS:
            back = self._bn_backward(state, bn, producer, (scale, shift))
            if back is None:
                _keep_gamma(state.ctx, producer.outputs[0].name, gamma)
                state.result.count("bn_folded")
                return None
        forward = self._bn_forward(state, bn, (scale, shift))
        if forward is None:
            state.result.count("bn_folded_forward")
            return None
        return back or forward

    def _bn_backward(self, state: _State, bn: gs.Node, producer: gs.Node, affine: _Affine) -> str | None:
        layout = _layout(state, producer)
        if isinstance(layout, str):
            return layout
        if layout[1] != 1:
            return R_LAYOUT
        if affine[0].shape[0] != layout[2]:
            return R_CHANNELS
        return self._fold_backward(state, bn, producer, affine)

    def _try_elementwise(self, state: _State, node: gs.Node, index: int) -> str | None:
        producer = node.inputs[index].inputs[0]
        if node.op == "Div" and index == 1:
            return R_NOT_AFFINE
        c = const_values(node.inputs[1 - index])
        if c is None:
            return R_OPERAND
        layout = _layout(state, producer)
        if isinstance(layout, str):
            return layout
        vector = _per_channel(c, layout)
        if isinstance(vector, str):
            return vector
        affine = _elementwise_affine(node.op, vector, index == 0)
        if isinstance(affine, str):
            return affine
        reason = self._fold_backward(state, node, producer, affine)
        if reason is None:
            state.result.count("elementwise_folded")
        return reason

    def _fold_backward(self, state: _State, node: gs.Node, producer: gs.Node, affine: _Affine) -> str | None:
        """Fold ``node`` (``x * s + t`` per channel) into ``producer``, which then outputs ``node``'s output."""
        out = producer.outputs[0]
        if out.name in state.graph_outputs:
            return R_GRAPH_OUTPUT
        if len(out.outputs) != 1:
            return R_CONSUMERS
        weights = _scaled_weights(producer, affine)
        if isinstance(weights, str):
            return weights
        self._set_weights(state, producer, weights)
        if producer.op == "MatMul":
            producer.op = "Gemm"
            producer.attrs.clear()
            state.result.count("matmul_to_gemm")
        elif producer.op == "Gemm":
            producer.attrs["beta"] = 1.0
        target = node.outputs[0]
        state.remove(node)
        producer.outputs[0] = target
        return None

    def _bn_forward(self, state: _State, bn: gs.Node, affine: _Affine) -> str | None:
        """Fold ``bn`` into the Conv it feeds, which then reads the BN's input."""
        out = bn.outputs[0]
        convs = [n for n in out.outputs if n.op == "Conv"]
        if not convs:
            return R_NO_TARGET
        if out.name in state.graph_outputs:
            return R_BN_GRAPH_OUTPUT
        if len(out.outputs) != 1:
            return R_BN_CONSUMERS
        conv = convs[0]
        if conv.inputs[0] is not out or any(t is out for t in conv.inputs[1:]):
            return R_LAYOUT
        if has_padding(conv):
            return R_PADDING
        weights = _pre_scaled_weights(conv, affine)
        if isinstance(weights, str):
            return weights
        self._set_weights(state, conv, weights)
        source = bn.inputs[0]
        state.remove(bn)
        conv.inputs[0] = source
        return None

    @staticmethod
    def _set_weights(state: _State, node: gs.Node, weights: _Weights) -> None:
        """Point ``node`` at new constants holding ``weights`` (input 1 and the bias input 2)."""
        new_w, new_b = weights
        node.inputs[1] = state.constant(node.inputs[1], node, "W_folded", new_w)
        old_b = opt_input(node, 2)
        bias = state.constant(old_b, node, "B_folded", new_b)
        if len(node.inputs) > 2:
            node.inputs[2] = bias
        else:
            node.inputs.append(bias)


def _conv_operand(node: gs.Node) -> int | None:
    """Index of the first input of binary ``node`` produced by a Conv or ConvTranspose whose other
    input is a constant, if any: only those nodes are candidates (a SiLU's ``x * sigmoid(x)`` or a
    residual Add is not, and is not reported as declined)."""
    if len(node.inputs) != 2:
        return None
    for i, tensor in enumerate(node.inputs):
        producer = _producer(tensor)
        if producer is not None and producer.op in _ELEMENTWISE_PRODUCERS and isinstance(node.inputs[1 - i], gs.Constant):
            return i
    return None


def _layout(state: _State, node: gs.Node) -> str | _Layout:
    """``(rank, channel axis, channels)`` of ``node``'s output, or why its weight cannot take a fold."""
    w = const_values(opt_input(node, 1))
    if w is None:
        return R_WEIGHT
    layout = weight_layout(node, w.ndim)
    if node.op in ("Conv", "ConvTranspose"):
        if w.ndim < 3 or layout.group < 1 or w.shape[0] % layout.group:
            return R_LAYOUT
        return w.ndim, 1, layout.out_channels(w.shape)
    if w.ndim != 2:
        return R_LAYOUT
    if node.op == "Gemm":
        return 2, 1, layout.out_channels(w.shape)
    rank = state.rank(node.inputs[0])
    if rank is None:
        return R_RANK
    out_rank = rank if rank >= 2 else 1  # a 1-D input loses its axis: [K] @ [K, N] -> [N]
    return out_rank, out_rank - 1, layout.out_channels(w.shape)
