"""Cross-layer equalization (Nagel et al. 2019): rescale channels between consecutive weight layers.

The pass is documented on :class:`Equalize`. Where to add what:

* **How an op moves channel indices** (which output channel is which input channel, or why its
  channels cannot be followed): the pruning op table, :data:`onnxcompress.pruning.handlers.HANDLERS`
  (handlers in ``pruning/handlers_*.py``). The walker here asks it node by node through
  :func:`onnxcompress.pruning.flow.channel_flow`; when the table freezes a channel (an op with no
  handler, unknown dims, ...) the producer is declined with the table's reason. A MatMul's
  output has its channels on the last axis: only :data:`~onnxcompress.pruning.handlers.LAST_AXIS_OPS`
  are followed there.
* **Whether an op commutes with a positive per-channel scale**, and what must be rescaled for it
  (BN mean and beta, an Add constant) or how it changes the producer's effective range (BN, Mul):
  :data:`_RULES` below, one scaling rule per op type. An op the table follows but that has no
  rule declines with :data:`R_OP`.
* **Weight layers** (Conv/Gemm/MatMul as producer and consumer, depthwise on both sides):
  :func:`make_layer` and :class:`Layer`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import Names, check_names, clip_bounds, const_values, node_label, opt_input
from onnxcompress.core.pass_api import Numerics, Option, Pass, PassContext, PassResult, register
from onnxcompress.passes._equalize_groups import (
    R_BIAS,
    R_LAYOUT,
    R_WEIGHT,
    ChannelPath,
    Group,
    Layer,
    Param,
    make_layer,
    spread,
    summary,
)
from onnxcompress.pruning.dependency import graph_info
from onnxcompress.pruning.flow import channel_flow
from onnxcompress.pruning.types import FREEZE_REASONS, R_MISMATCH, GraphInfo

__all__ = ["DECLINE_REASONS", "Equalize"]

log = logging.getLogger(__name__)

R_GRAPH_OUTPUT = "graph_output"  # a tensor on the way is a graph output
R_ADD = "residual_add"  # both inputs would need the same scale
R_CLIP = "clip_not_equivariant"  # Clip/Relu6 is not scale-equivariant
R_OP = "op_does_not_commute"  # not known to commute with a channel scale
R_NO_CONSUMER = "no_consumer_layer"  # no weight layer reads the channels
R_WEIGHT_INPUT = "feeds_weight_input"
R_SUBGRAPH = "read_in_subgraph"
R_REJOIN = "channels_rejoin"
R_PAD = "pad_not_spatial_zero"  # not zero padding of spatial axes
R_EXCLUDED = "excluded"

#: Every decline code :class:`Equalize` may give when it leaves a producer's channels alone: its
#: own, and the pruning table's freeze codes (:data:`onnxcompress.pruning.FREEZE_REASONS`).
DECLINE_REASONS = tuple(dict.fromkeys((
    R_GRAPH_OUTPUT, R_ADD, R_CLIP, R_OP, R_WEIGHT, R_BIAS, R_LAYOUT, R_NO_CONSUMER, R_WEIGHT_INPUT,
    R_SUBGRAPH, R_REJOIN, R_PAD, R_EXCLUDED, *FREEZE_REASONS,
)))

_LAYER_OPS = frozenset({"Conv", "Gemm", "MatMul"})


class _Decline(Exception):
    """Raised inside the walk: the group is left alone at ``where`` for ``reason``."""

    def __init__(self, where: str, reason: str):
        super().__init__(reason)
        self.where, self.reason = where, reason


@dataclass
class _State:
    """Book-keeping for one run of the pass."""

    graph: gs.Graph
    opts: dict
    outputs: set[str]
    main: set[int]
    layers: dict[int, Layer | str] = field(default_factory=dict)
    params: dict[tuple[int, int], Param] = field(default_factory=dict)
    facts: GraphInfo | None = None

    def layer(self, node: gs.Node) -> Layer | str:
        if id(node) not in self.layers:
            self.layers[id(node)] = make_layer(node)
        return self.layers[id(node)]

    def param(self, node: gs.Node, index: int, values: np.ndarray, axis: int) -> Param:
        """The working copy of constant input ``index`` of ``node`` (shared by every group touching it)."""
        key = (id(node), index)
        if key not in self.params:
            self.params[key] = Param(node, index, values.astype(np.float64), axis)
        return self.params[key]

    def info(self, path: ChannelPath) -> GraphInfo:
        """The graph facts the op table reads (one shape inference, on first use), in ``path``'s layout."""
        if self.facts is None:
            self.facts = graph_info(self.graph)
        return replace(self.facts, last_axis=True) if path.axis == -1 else self.facts


def _channel_const(values: np.ndarray, path: ChannelPath) -> tuple[np.ndarray, int] | None:
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


class _Walker:
    """Follows one producer's output channels to the weight layers that read them.

    At each node it asks the pruning op table where the channels go (:func:`channel_flow`) and
    :data:`_RULES` whether the op commutes with the scale; weight layers end the walk.
    """

    def __init__(self, st: _State, producer: Layer):
        self.st, self.producer = st, producer
        self.consumers: list[tuple[Layer, np.ndarray]] = []
        self.clips: list[gs.Node] = []
        self.params: list[tuple[Param, np.ndarray]] = []
        self.gains: list[np.ndarray] = []
        self.seen: set[int] = set()

    def run(self) -> Group:
        node = self.producer.node
        if node_label(node) in self.st.opts["exclude"]:
            raise _Decline(node_label(node), R_EXCLUDED)
        rank = self.producer.w.ndim if node.op == "Conv" else (2 if node.op == "Gemm" else None)
        path = ChannelPath(1 if node.op in ("Conv", "Gemm") else -1, rank, np.arange(self.producer.channels))
        queue = [(node.outputs[0], path)]
        while queue:
            tensor, path = queue.pop(0)
            queue.extend(self._visit(tensor, path))
        if not self.consumers:
            raise _Decline(node_label(node), R_NO_CONSUMER)
        gain = np.max(self.gains, axis=0) if self.gains else None
        return Group(self.producer, self.consumers, self.clips, self.params, gain)

    def _visit(self, tensor: gs.Tensor, path: ChannelPath) -> list[tuple[gs.Tensor, ChannelPath]]:
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

    def _consumer(self, node: gs.Node, tensor: gs.Tensor, path: ChannelPath, where: str) -> None:
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

    def _through(self, node: gs.Node, tensor: gs.Tensor, path: ChannelPath,
                 where: str) -> list[tuple[gs.Tensor, ChannelPath]]:
        """The outputs of ``node`` that carry the channels, with their channel maps, or a decline.

        The op table says where the channels go; the op's scaling rule whether they may go there
        with a scale (and updates the gain and the constants to rescale).
        """
        info = self.st.info(path)
        flow = channel_flow(node, tensor, info)
        if flow.frozen is not None:
            raise _Decline(where, flow.frozen)
        rule = _RULES.get(node.op)
        if rule is None:
            raise _Decline(where, R_OP)
        if flow.outputs and info.channels(tensor) != len(path.chan):
            raise _Decline(where, R_MISMATCH)
        path = rule(self, node, tensor, path, where)
        out = []
        for t, source in flow.outputs:
            chan = np.where(source >= 0, path.chan[np.maximum(source, 0)], -1)
            out.append((t, ChannelPath(path.axis, None if path.rank is None else info.rank(t), chan, path.gain)))
        return out


# ------------------------------------------------------------------------------ scaling rules
#
# A rule ``(walker, node, tensor, path, where) -> path`` runs once the op table has said where the
# channels of ``tensor`` go (so shapes, constant operands and attributes it checks are valid). It
# declines (raises :class:`_Decline`) when ``node(x / s) != node(x) / s`` for a positive
# per-channel ``s``, records what must be rescaled, and returns the path with its range gain.


_Rule = Callable[["_Walker", gs.Node, gs.Tensor, ChannelPath, str], ChannelPath]


def _data_input(w: _Walker, node: gs.Node, tensor: gs.Tensor, where: str) -> None:
    """Decline unless ``tensor`` is only the data input and no second output (indices, mask) is used."""
    if node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
        raise _Decline(where, R_OP)
    if any(t.outputs or t.name in w.st.outputs for t in node.outputs[1:]):
        raise _Decline(where, R_OP)


def _commutes(w: _Walker, node: gs.Node, tensor: gs.Tensor, path: ChannelPath, where: str) -> ChannelPath:
    """Relu, LeakyRelu, PRelu, Identity, pools: ``f(x / s) = f(x) / s`` as they are."""
    _data_input(w, node, tensor, where)
    return path


def _dropout(w: _Walker, node: gs.Node, tensor: gs.Tensor, path: ChannelPath, where: str) -> ChannelPath:
    """Dropout without a ``training_mode`` input."""
    _data_input(w, node, tensor, where)
    if opt_input(node, 2) is not None:
        raise _Decline(where, R_OP)
    return path


def _clip(w: _Walker, node: gs.Node, tensor: gs.Tensor, path: ChannelPath, where: str) -> ChannelPath:
    """Clip with ``min`` in {0, -inf} and no ``max``; ``Clip(0, m)`` too with ``relu6_as_relu``."""
    _data_input(w, node, tensor, where)
    bounds = clip_bounds(node)
    if bounds is None:
        raise _Decline(where, R_CLIP)
    lo, hi = bounds
    if lo not in (0.0, -np.inf):
        raise _Decline(where, R_CLIP)
    if hi != np.inf:
        if not (w.st.opts["relu6_as_relu"] and lo == 0.0 and hi > 0):
            raise _Decline(where, R_CLIP)
        w.clips.append(node)
    return path


def _pad(w: _Walker, node: gs.Node, tensor: gs.Tensor, path: ChannelPath, where: str) -> ChannelPath:
    """Pad of spatial axes (the table checked the channel axis) with zeros, or reflect/edge."""
    _data_input(w, node, tensor, where)
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if "pads" in node.attrs:  # opset < 11
        value = float(node.attrs.get("value", 0.0))
    else:
        value_t = opt_input(node, 2)
        value_v = const_values(value_t)
        value = 0.0 if value_t is None else (float(value_v.reshape(-1)[0]) if value_v is not None else np.nan)
        if opt_input(node, 3) is not None:
            raise _Decline(where, R_PAD)  # explicit axes: not followed
    if mode == "constant" and value != 0.0:
        raise _Decline(where, R_PAD)
    return path


def _regroup(w: _Walker, node: gs.Node, tensor: gs.Tensor, path: ChannelPath, where: str) -> ChannelPath:
    """Concat/Split on the channel axis, Flatten: the table moves the channels, nothing is rescaled.

    Along another axis a Concat's other inputs would need the same scale (a Split would be fine,
    but is not followed). The path's range gain (BN, Mul before) is dropped here, as the walker
    always did: carrying it would target the folded ranges, but change what the pass produces.
    """
    if node.op != "Flatten":
        info, axis = w.st.info(path), int(node.attrs.get("axis", 0))
        rank = info.rank(tensor)
        if rank is None or (axis + rank if axis < 0 else axis) != info.axis(rank):
            raise _Decline(where, R_LAYOUT)
    return ChannelPath(path.axis, path.rank, path.chan)


def _batchnorm(w: _Walker, node: gs.Node, tensor: gs.Tensor, path: ChannelPath, where: str) -> ChannelPath:
    """``BN(x / s) = BN(x) / s`` with ``mean / s`` and ``beta / s``; the range grows by ``|gamma| / sigma``.

    The table follows only an inference BN whose four parameters are constant, one per channel.
    """
    params = [const_values(t) for t in node.inputs[1:5]]
    if any(p is None or p.shape != (len(path.chan),) for p in params):
        raise _Decline(where, R_LAYOUT)
    gamma, _, _, var = (p.astype(np.float64) for p in params)
    factor = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    if not np.isfinite(factor).all():
        raise _Decline(where, R_LAYOUT)
    for index in (2, 3):
        w.params.append((w.st.param(node, index, params[index - 1], 0), path.chan))
    return path.with_gain(factor, w.producer.channels)


def _affine(w: _Walker, node: gs.Node, tensor: gs.Tensor, path: ChannelPath, where: str) -> ChannelPath:
    """Mul/Div by a per-channel constant (range factor ``|k|``), Add/Sub of one (rescaled too)."""
    index = 0 if node.inputs[0] is tensor else 1
    other = node.inputs[1 - index]
    values = const_values(other)
    if values is None or other is tensor:
        raise _Decline(where, R_ADD if node.op in ("Add", "Sub") else R_OP)
    if node.op == "Div" and index == 1:
        raise _Decline(where, R_OP)
    expanded = _channel_const(values, path)
    if expanded is None:
        raise _Decline(where, R_LAYOUT)
    vector, axis = expanded
    if node.op in ("Add", "Sub"):
        w.params.append((w.st.param(node, 1 - index, vector, axis), path.chan))
        return path
    flat = np.moveaxis(vector, axis, 0).reshape(len(path.chan)).astype(np.float64)
    with np.errstate(divide="ignore"):
        factor = flat if node.op == "Mul" else 1.0 / flat
    if not np.isfinite(factor).all():
        raise _Decline(where, R_LAYOUT)
    return path.with_gain(factor, w.producer.channels)


#: Op type -> scaling rule. An op here must also be followed by the pruning op table.
_RULES: dict[str, _Rule] = {
    **dict.fromkeys(("Relu", "LeakyRelu", "PRelu", "Identity"), _commutes),
    **dict.fromkeys(("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"), _commutes),
    "Dropout": _dropout, "Clip": _clip, "Pad": _pad,
    **dict.fromkeys(("Flatten", "Concat", "Split"), _regroup),
    "BatchNormalization": _batchnorm,
    **dict.fromkeys(("Add", "Sub", "Mul", "Div"), _affine),
}


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
        the folded weights (that gain is not carried past a Flatten, Concat or Split). A grouped/depthwise Conv is a layer on both sides: as consumer
        its input channel ``c`` is scaled inside its group; as producer its output channels are
        divided. Sweeps over all groups repeat (at most ``iterations``) until every
        ``|log s_c| < tolerance`` (a group whose scales are all within it is left as is), so
        chains ``conv -> dw -> conv`` converge. Ranges ~0 (dead channels) keep ``s_c = 1``.
        All arithmetic is float64, cast back to the weights' dtype once at the end.

    Fires when:
        A Conv (any group), Gemm or MatMul with constant weight (and constant bias; a Gemm
        bias ``[N]``, ``[1, N]`` or scalar) feeds, through commuting ops only, Conv/Gemm/MatMul
        layers with constant weights at their data input. Several consumers (branches) are fine
        when all of them absorb the scale. Which channels each op passes on is read from the
        pruning op table, which needs the static channel dim of each tensor on the way (and the
        spatial dims for Flatten); a dynamic batch is fine.

    Declines:
        One code per producer left alone, from :data:`DECLINE_REASONS`: ``graph_output`` (a
        tensor on the way is one); ``residual_add`` (both inputs would need the same scale);
        ``clip_not_equivariant`` (Clip/Relu6; ``relu6_as_relu=true`` replaces ``Clip(0, m)`` by
        Relu in the groups it equalizes, which makes the pass APPROX); ``op_does_not_commute``
        (Sigmoid, HardSwish, Resize, Transpose, ConvTranspose, ... are not followed);
        ``weight_not_constant``, ``bias_not_constant``; ``unsupported_layout`` (Gemm ``transA``,
        odd bias shapes, non-float weights, channel-count mismatch); ``no_consumer_layer``;
        ``feeds_weight_input`` (a tensor read as a weight); ``read_in_subgraph``;
        ``channels_rejoin`` (branches that rejoin); ``pad_not_spatial_zero``; ``excluded``
        nodes; and any code of the pruning op table where it cannot follow the channels
        (``no_handler``, ``unknown_channel_dim``, a channel pad, a non-constant PRelu slope,
        ``channels_not_on_axis_1`` for an op outside the last-axis set after a MatMul, ...).

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
        check_names(graph, self.opts["exclude"], owner=self.name)
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
        spread_a = [s for s in (spread(la) for la in layers) if s is not None]
        (result.stats["spread_median_before"], result.stats["spread_max_before"]) = summary(spread_b)
        (result.stats["spread_median_after"], result.stats["spread_max_after"]) = summary(spread_a)
        if changed:
            _write_back(graph, layers, changed)
            result.modified = True
        return result

    def _groups(self, st: _State, result: PassResult, ctx: PassContext) -> list[Group]:
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

    def _sweep(self, groups: list[Group]) -> int:
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


def _spreads(groups: list[Group]) -> dict[int, float | None]:
    """Range spread of every layer of ``groups`` (keyed by node id), before any rescaling."""
    out: dict[int, float | None] = {}
    for g in groups:
        for layer in [g.producer, *(la for la, _ in g.consumers)]:
            out.setdefault(id(layer.node), spread(layer))
    return out


def _changed_layers(groups: list[Group]) -> list[Layer]:
    seen, out = set(), []
    for g in groups:
        for layer in [g.producer, *(la for la, _ in g.consumers)]:
            if layer.changed and id(layer) not in seen:
                seen.add(id(layer))
                out.append(layer)
    return out


def _write_back(graph: gs.Graph, layers: list[Layer], groups: list[Group]) -> None:
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
