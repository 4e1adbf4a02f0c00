"""QDQ placement: which tensors get QuantizeLinear/DequantizeLinear, and where (the rewrite that
inserts them is :mod:`onnxcompress.quant.rewrite`).

Placement follows what onnxruntime's CPU provider fuses into integer kernels (its QDQ
selector/action transformer), so the Q/DQ nodes we insert disappear into those kernels:

==========================  =====================================  ==============================
kind                        ops                                    onnxruntime CPU result
==========================  =====================================  ==============================
``compute``                 Conv, Gemm, MatMul (constant weight)   QLinearConv, QGemm,
                                                                   QLinearMatMul /
                                                                   MatMulIntegerToFloat
``binary``                  Add, Mul                               QLinearAdd, QLinearMul
``variadic``                Concat                                 QLinearConcat
``unary``                   AveragePool, GlobalAveragePool         QLinearAveragePool,
                                                                   QLinearGlobalAveragePool
``passthrough``             MaxPool, Resize (``nearest`` only),    the op runs on uint8; its
                            Reshape, Flatten, Transpose, Squeeze,  DQ/Q pairs are dropped
                            Unsqueeze, Split
``lut``                     LeakyRelu, Sigmoid, Softmax            QLinearLeakyRelu,
                                                                   QLinearSigmoid, QLinearSoftmax
``weights``                 ConvTranspose                          float op, int8 weight + DQ
==========================  =====================================  ==============================

Checked on onnxruntime 1.32 (CPU, x86) by counting the Q/DQ left in its optimized graph: a linear
or cubic Resize, HardSigmoid, Tanh, HardSwish and Gelu keep their Q/DQ pair (float compute), so
they are not in the table and stay float.

Rules:

1. A quantized node gets a DequantizeLinear on each data input and a QuantizeLinear on its output.
   Conv and the ``binary``/``variadic``/``unary`` kinds always quantize their output (the fused
   kernels produce integers). Gemm/MatMul quantize their output only when a consumer is
   quantized; otherwise they keep a float output (QGemm with float output, MatMulIntegerToFloat).
2. A Relu, or a Clip with constant bounds and ``min <= 0``, that is the only consumer of a
   ``compute``/``binary``/``variadic``/``unary`` node's output is folded into it: no Q/DQ between
   them; the Q goes after the Relu and uses the Relu's output range (lower end 0, clipped to the
   Clip's bounds). onnxruntime then removes the Relu/Clip because the Q's zero point is the
   type's minimum (Relu) or the Clip's bounds cover the quantized range.
3. ``passthrough`` ops are quantized only when their input is already quantized for another
   reason (so they never create an orphan Q/DQ pair) and their output reuses the *same* scale
   and zero point constants as the input (every output of a Split), the condition for
   onnxruntime to drop the pair.
4. Every quantized tensor gets exactly one Q and one DQ; the DQ output keeps the original tensor
   name (and float dtype), so graph outputs keep their names and every consumer, quantized or
   not, reads the dequantized value: the producer's output must feed only the Q for
   onnxruntime to fuse it. Graph inputs keep their raw value for float consumers.
5. Weights: int8 symmetric, per channel on the output-channel axis (Conv 0, ConvTranspose 1,
   Gemm 0 with ``transB=1`` else 1, MatMul 1 of the ``[K, N]`` weight); Conv/Gemm biases int32
   with ``scale = s_in * s_w`` and zero point 0 (Gemm ``beta`` is folded into the bias).
   A weight shared by several nodes is quantized once (per axis and scale) and never edited in
   place; constant operands of Add/Mul/Concat are quantized per tensor like activations.
6. ``lut`` ops (onnxruntime runs them as 256-entry lookup tables) are quantized, like
   passthrough ops, only when their input is quantized anyway; their output gets its own
   calibrated parameters. Between two quantized ops onnxruntime would fuse them anyway; the
   rule also lets a following MaxPool/Reshape run on integers.
7. A Shape/Size that reads a quantized tensor reads its QuantizeLinear output (same shape), not
   the DequantizeLinear, which would otherwise be kept just to be measured.
8. Symmetric (int8) activations: a tensor read by several nodes is stored as uint8 with zero
   point ``z + 128`` (the same values bit for bit, see :func:`fanout_uint8`): onnxruntime's x86
   CPU provider fuses only uint8 activations and converts an int8 ``Q -> DQ`` pair only when the
   Q has a single reader, which a shared tensor no longer has once each reader gets its own DQ.
9. A model that already holds quantization ops (QuantizeLinear, ConvInteger,
   DynamicQuantizeLinear, ...) is left alone (``model already quantized``).
10. A Concat whose output is only a graph output stays float: nothing integer reads it, and one
    scale for all its inputs would erase the small ones (a detector's class scores in [0, 1]
    next to box coordinates in pixels).
11. A node whose data input is *static* -- computed only from constants and tensor shapes
    (``Shape``/``Size`` -> ``Gather``/``Cast``/``Range``/``ConstantOfShape`` -> ``Add``...; see
    :func:`static_tensors`) -- stays float (``R_STATIC``). Such tensors are a detector's anchor
    grid and stride table, the same for every input of a given size: 256 levels over a whole
    grid shift every decoded box, and the ops that read them are small elementwise ones where
    integer kernels save nothing.
12. A ``binary``/``variadic``/``unary`` node not linked through quantized tensors to any
    quantized Conv/Gemm/MatMul stays float (``R_ISOLATED``): alone, it would cost a Q per input
    and a DQ on its output around an elementwise integer kernel, more work than the float op,
    and only add error (a decode tail ``Sub -> Add -> Concat -> Mul`` after float ops, an
    elementwise-only model). Links: producer -> reader, or two readers of a computed tensor
    (not of a graph input, which float readers read raw). Decided as if nothing were excluded,
    so ``exclude`` never turns a neighbour float (quantizing one layer alone still does).
13. The output of a SiLU (``Mul(t, Sigmoid(t))``) is never clipped by the calibration method:
    its range is the calibrated min/max (``QdqPlan.unclipped``). Its large values are the
    activations that matter downstream; on nudenet's YOLOv8n, MSE-clipping them cost 1.8 dB
    of output SQNR (23.3 dB vs 25.1 dB, 32 calibration / 16 held-out synthetic images).

14. A tensor read only by saturating activations -- ``Sigmoid(t)``, or a SiLU's ``Sigmoid(t)`` and
    ``Mul(t, Sigmoid(t))`` -- is clamped to ``[-SATURATION, SATURATION]`` (Sigmoid only) or
    ``[-SATURATION, ...)`` (SiLU) before its scale is chosen (``QdqPlan.bounds``): beyond 8 the
    Sigmoid is within 3.4e-4 of 0 or 1 and the SiLU within 2.7e-3 of 0, below one step of their
    outputs' grids, so those values need no levels of their own. A YOLOv8 conv output before its
    SiLU spans about [-120, 110]; clamped to [-8, 110] its step halves. The class logits before a
    detector's score Sigmoid get the same treatment.
15. ``share_concat_scales``: Concat inputs on the Concat's grid (:mod:`onnxcompress.quant.concat_scales`).

ConvTranspose has no integer kernel on the CPU provider, so it keeps float compute with an int8
weight (a ``weights`` group) and its activations are not quantized on its account.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import graph as core_graph
from onnxcompress.core.graph import clip_bounds, const_values, constant_info, node_label, opt_input, weight_layout
from onnxcompress.core.pass_api import PassResult
from onnxcompress.core.shapes import infer_graph
from onnxcompress.quant.concat_scales import concat_inputs
from onnxcompress.quant.options import QuantConfig

__all__ = [
    "DECLINE_REASONS",
    "SATURATION",
    "decline_unsupported",
    "KINDS",
    "QUANTIZED_OPS",
    "R_ISOLATED",
    "R_OP",
    "R_OUTPUT_CONCAT",
    "R_QUANTIZED",
    "R_STATIC",
    "SHAPE_READERS",
    "QdqGroup",
    "QdqPlan",
    "bias_vector",
    "plan_placement",
    "static_tensors",
]

log = logging.getLogger(__name__)

#: op type -> placement kind.
KINDS: dict[str, str] = {
    **dict.fromkeys(("Conv", "Gemm", "MatMul"), "compute"),
    "ConvTranspose": "weights",
    **dict.fromkeys(("Add", "Mul"), "binary"),
    "Concat": "variadic",
    **dict.fromkeys(("AveragePool", "GlobalAveragePool"), "unary"),
    **dict.fromkeys(("MaxPool", "Resize", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Split"),
                    "passthrough"),
    **dict.fromkeys(("LeakyRelu", "Sigmoid", "Softmax"), "lut"),
}
#: Ops (besides Q/DQ) that mark a graph as already quantized: the pass leaves such graphs alone.
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
                           "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM",
                           "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention"})
#: Consumers that only read a tensor's shape: they read the quantized tensor, not its DequantizeLinear.
SHAPE_READERS = frozenset({"Shape", "Size"})
_HOSTS = frozenset({"compute", "binary", "variadic", "unary"})
_CONDITIONAL = frozenset({"passthrough", "lut"})  # quantized only when their input already is
_OPTIONAL_OUTPUT = frozenset({"Gemm", "MatMul"})
#: Ops whose output depends on their input's shape only, never on its values.
_SHAPE_OPS = frozenset({"Shape", "Size"})
#: Ops without inputs whose output is not a constant.
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                               "Multinomial", "Bernoulli"})

R_EXCLUDED = "excluded_by_option"
R_WEIGHT = "weight_not_constant"
R_BIAS = "bias_not_per_channel"  # not constant, or not per output channel
R_DTYPE = "unsupported_dtype"
R_LAYOUT = "unsupported_layout"
R_ALL_CONSTANT = "all_inputs_constant"
R_DEGENERATE = "degenerate_range"  # min == max: quantized with scale 1
R_QUANTIZED = "already_quantized"  # detail: the quantized op types found
R_OUTPUT_CONCAT = "concat_only_feeds_output"  # kept float
R_STATIC = "static_input"  # computed from shapes and constants only: kept float
R_ISOLATED = "no_quantized_neighbour"  # no path to a quantized Conv/Gemm/MatMul: kept float
R_OP = "op_not_supported"  # a node with float weights this quantizer has no form for (detail: op)
#: Standard ops whose float constant inputs are weights (custom-domain ops: any such input).
_WEIGHT_READERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Einsum", "LSTM", "GRU", "RNN",
                             "Attention"})

#: Every decline code the placement (or the pass, for ranges) gives when it leaves something alone.
DECLINE_REASONS = (R_EXCLUDED, R_WEIGHT, R_BIAS, R_DTYPE, R_LAYOUT, R_ALL_CONSTANT, R_DEGENERATE, R_QUANTIZED,
                   R_OUTPUT_CONCAT, R_STATIC, R_ISOLATED, R_OP)

_FLOAT = onnx.TensorProto.FLOAT


@dataclass
class QdqGroup:
    """One quantized node, with the Relu/Clip folded into it if any."""

    node: gs.Node
    kind: str
    act: gs.Node | None = None
    bounds: tuple[float, float] | None = None

    @property
    def output(self) -> gs.Tensor:
        """The tensor that carries the group's Q (the folded activation's output if any)."""
        return (self.act or self.node).outputs[0]

    @property
    def outputs(self) -> list[gs.Tensor]:
        """Every tensor that carries a Q of this group (all outputs of a Split)."""
        return [t for t in (self.act or self.node).outputs if t.name]

    def data_slots(self) -> list[int]:
        """Indices of the inputs that take a DequantizeLinear."""
        if self.kind in ("binary", "variadic"):
            return list(range(len(self.node.inputs)))
        return [] if self.kind == "weights" else [0]


@dataclass
class QdqPlan:
    """Where Q/DQ nodes go.

    Attributes:
        groups: Quantized nodes in graph order.
        tensors: Activation tensors that get a Q/DQ pair, in graph order.
        shared: ``{passthrough output: tensor whose parameters it reuses}``.
        one_sided: Outputs of folded Relu/Clip with lower bound >= 0.
        bounds: ``{tensor: (lo, hi)}`` clamps from folded Clip/Relu bounds and saturating readers
            (rule 14).
        consumers: ``{tensor: [(group, input index)]}`` quantized slots reading each tensor.
        unclipped: Tensors whose range is their calibrated min/max whatever the method (rule 13).
        concat_inputs: ``{tensor: Concat output}``: Concat inputs only it reads, no graph output (rule 15).
    """

    groups: list[QdqGroup] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)
    one_sided: set[str] = field(default_factory=set)
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    consumers: dict[str, list[tuple[QdqGroup, int]]] = field(default_factory=dict)
    unclipped: set[str] = field(default_factory=set)
    concat_inputs: dict[str, str] = field(default_factory=dict)

    def calibrated(self) -> list[str]:
        """Tensors whose range must be measured (shared ones reuse another's)."""
        return [t for t in self.tensors if t not in self.shared]

    def root(self, name: str) -> str:
        """The tensor whose parameters ``name`` uses."""
        while name in self.shared:
            name = self.shared[name]
        return name


# ------------------------------------------------------------------------------------- helpers


def tensor_dtypes(graph: gs.Graph) -> dict[str, int]:
    """ONNX element types of every typed tensor (one weight-less shape inference)."""
    model = infer_graph(graph, types_only=True)
    out = {i.name: i.data_type for i in model.graph.initializer}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


def _is_float(tensor: gs.Tensor, dtypes: dict[str, int]) -> bool:
    if isinstance(tensor, gs.Constant):
        return isinstance(tensor.values, np.ndarray) and tensor.values.dtype == np.float32
    return dtypes.get(tensor.name) == _FLOAT


def static_tensors(graph: gs.Graph) -> set[str]:
    """Names of tensors computed only from constants and tensor shapes (rule 11).

    Such a tensor has the same value for every input of a given shape: an anchor grid built
    with ``Shape -> Range -> Add``, a stride table from ``ConstantOfShape``, a constant the
    exporter did not fold. ``Shape``/``Size`` outputs are static whatever they read; any other
    node's outputs are static when all its inputs are (a node without inputs only if it is a
    ``Constant``). Graph inputs are not static. Works on any node order (fixed point).
    """
    static: set[str] = set()
    pending = [n for n in graph.nodes if n.op not in _NONDETERMINISTIC]
    changed = True
    while changed:
        changed, rest = False, []
        for node in pending:
            ins = [t for t in node.inputs if t.name]
            if node.op in _SHAPE_OPS or (ins or node.op == "Constant") and all(
                    isinstance(t, gs.Constant) or t.name in static for t in ins):
                static.update(t.name for t in node.outputs if t.name)
                changed = True
            else:
                rest.append(node)
        pending = rest
    return static


# ---------------------------------------------------------------------------------- eligibility


def _check_compute(node: gs.Node, dtypes: dict[str, int], weights_only: bool) -> str | None:
    w = constant_info(opt_input(node, 1))
    if w is None:
        return R_WEIGHT
    w_dtype, w_shape = w
    if w_dtype != np.float32 or not _is_float(node.inputs[0], dtypes):
        return R_DTYPE
    if (node.op in ("Conv", "ConvTranspose") and len(w_shape) < 3) or (node.op in ("Gemm", "MatMul") and len(w_shape) != 2):
        return R_LAYOUT
    if isinstance(node.inputs[0], gs.Constant):
        return R_ALL_CONSTANT
    if weights_only or node.op in ("MatMul", "ConvTranspose"):
        return None
    bias_t = opt_input(node, 2)
    if bias_t is None:
        return None
    bias = const_values(bias_t)
    if bias is None or bias.dtype != np.float32:
        return R_BIAS
    channels = w_shape[weight_layout(node).out_axis]
    return None if bias_vector(bias, channels) is not None else R_BIAS


def bias_vector(bias: np.ndarray, channels: int) -> np.ndarray | None:
    """``bias`` as a ``[channels]`` vector if it broadcasts only along the channel axis."""
    if bias.size == 1:
        return np.full(channels, bias.reshape(-1)[0], bias.dtype)
    if bias.size == channels and all(d == 1 for d in bias.shape[:-1]) and bias.shape[-1] == channels:
        return bias.reshape(channels)
    return None


def _kind(node: gs.Node) -> str | None:
    """Placement kind of ``node``; ``activation`` for a foldable Relu/Clip; ``None``: never quantized.

    A Resize passes integers through only in ``nearest`` mode: onnxruntime keeps the Q/DQ pair
    around a linear or cubic Resize (it interpolates in float), so such a Resize is left alone.
    """
    if node.op == "Resize" and str(node.attrs.get("mode", "nearest")) != "nearest":
        return None
    return KINDS.get(node.op) or ("activation" if node.op in ("Relu", "Clip") else None)


def _check(node: gs.Node, kind: str, dtypes: dict[str, int], weights_only: bool) -> str | None:
    """Why ``node`` cannot be quantized as ``kind``, or ``None``."""
    if kind in ("compute", "weights"):
        return _check_compute(node, dtypes, weights_only)
    data = [node.inputs[i] for i in range(len(node.inputs))] if kind in ("binary", "variadic") else node.inputs[:1]
    if not data or not all(_is_float(t, dtypes) for t in data):
        return R_DTYPE
    if not node.outputs or not _is_float(node.outputs[0], dtypes):
        return R_DTYPE
    if kind in ("binary", "variadic") and all(isinstance(t, gs.Constant) for t in data):
        return R_ALL_CONSTANT
    if kind in ("unary", "passthrough", "lut") and isinstance(data[0], gs.Constant):
        return R_ALL_CONSTANT
    if len([o for o in node.outputs if o.name]) != 1 and node.op != "Split":
        return R_LAYOUT
    if not all(_is_float(o, dtypes) for o in node.outputs if o.name):
        return R_DTYPE
    return None


def decline_unsupported(node: gs.Node, result: PassResult, logger: logging.Logger) -> None:
    """Record ``op_not_supported`` for a node with float weights that the quantizer leaves float
    (e.g. onnxruntime's fused ``com.microsoft.Attention``, an embedding ``Gather``)."""
    if ((node.domain or "") not in ("", "ai.onnx") or node.op in _WEIGHT_READERS) and core_graph.has_float_weight(node):
        result.decline(node_label(node), R_OP, f"{node.domain + '.' if node.domain else ''}{node.op}", logger=logger)


def _attach_activation(group: QdqGroup, excluded: set[str], graph_outputs: set[str]) -> None:
    """Fold a Relu/Clip that alone consumes ``group``'s output into the group (rule 2)."""
    out = group.node.outputs[0]
    if out.name in graph_outputs or len(out.outputs) != 1:
        return
    act = out.outputs[0]
    if act.op not in ("Relu", "Clip") or act.name in excluded or act.op in excluded:
        return
    if act.inputs[0] is not out or any(t is out for t in act.inputs[1:]) or len(act.outputs) != 1:
        return
    bounds = clip_bounds(act)
    if bounds is None or bounds[0] > 0 or bounds[1] <= 0:
        return
    group.act, group.bounds = act, bounds


# ------------------------------------------------------------------------------------- planning


def _candidates(graph: gs.Graph, cfg: QuantConfig, result: PassResult,
                logger: logging.Logger) -> tuple[list[QdqGroup], list[QdqGroup], set[int]]:
    """Eligible groups (passthrough ones separately), the ids of the excluded ones; declines recorded.

    Excluded nodes that are otherwise eligible are returned too (flagged), so that rule 12 can
    be decided on the graph as if nothing were excluded.
    """
    dtypes = tensor_dtypes(graph)
    static = static_tensors(graph)
    excluded = set(cfg.exclude)
    groups, passthrough, off = [], [], set()
    for node in graph.nodes:
        kind = _kind(node)
        if kind is None:
            decline_unsupported(node, result, logger)
        if kind is None or (cfg.weights_only and kind not in ("compute", "weights")):
            continue
        is_excluded = node.name in excluded or node.op in excluded
        if is_excluded:
            result.decline(node_label(node), R_EXCLUDED, logger=logger)
            result.count("excluded")
        if kind == "activation":  # folded (or not) by _attach_activation
            continue
        kind = "weights" if cfg.weights_only else kind
        reason = _check(node, kind, dtypes, cfg.weights_only)
        if reason is None and not cfg.weights_only and _reads_static(node, kind, static):
            reason = R_STATIC
        if reason is None and kind == "variadic" and _only_graph_output(node, graph):
            reason = R_OUTPUT_CONCAT
        if reason is not None:
            if kind not in _CONDITIONAL and not is_excluded:
                result.decline(node_label(node), reason, logger=logger)
            continue
        group = QdqGroup(node, kind)
        (passthrough if kind in _CONDITIONAL else groups).append(group)
        if is_excluded:
            off.add(id(group))
    return groups, passthrough, off


def _reads_static(node: gs.Node, kind: str, static: set[str]) -> bool:
    """A data input of ``node`` is a static, non-constant tensor (rule 11)."""
    slots = range(len(node.inputs)) if kind in ("binary", "variadic") else range(min(1, len(node.inputs)))
    return any(not isinstance(node.inputs[i], gs.Constant) and node.inputs[i].name in static for i in slots)


def _only_graph_output(node: gs.Node, graph: gs.Graph) -> bool:
    """``node``'s output is a graph output and nothing else reads it (rule 10)."""
    out = node.outputs[0]
    return not out.outputs and any(t is out for t in graph.outputs)


def _needs_output_q(group: QdqGroup) -> bool:
    return group.kind not in ("weights",) and group.node.op not in _OPTIONAL_OUTPUT


def _add_passthrough(groups: list[QdqGroup], passthrough: list[QdqGroup], in_q: set[str], out_q: set[str]) -> None:
    """Quantize passthrough and lut ops whose input is already quantized (rules 3, 6), to a fixed point."""
    pending = list(passthrough)
    changed = True
    while changed:
        changed = False
        for g in list(pending):
            src = g.node.inputs[0].name
            if src in in_q or src in out_q:
                pending.remove(g)
                groups.append(g)
                in_q.add(src)
                out_q.update(t.name for t in g.outputs)
                changed = True


def _settle_optional(groups: list[QdqGroup], in_q: set[str], out_q: set[str]) -> None:
    """Gemm/MatMul quantize their output only for quantized consumers (rule 1)."""
    for g in groups:
        if g.kind != "compute" or g.node.op not in _OPTIONAL_OUTPUT:
            continue
        if g.output.name in in_q:
            out_q.add(g.output.name)
        elif g.act is not None:
            g.act, g.bounds = None, None


def plan_placement(graph: gs.Graph, cfg: QuantConfig, result: PassResult,
                   logger: logging.Logger | None = None) -> QdqPlan:
    """Decide which nodes are quantized and which tensors get Q/DQ (see the module rules)."""
    logger = logger or log
    plan = QdqPlan()
    found = sorted({n.op for n in graph.nodes if n.op in QUANTIZED_OPS})
    if found:  # requantizing the dequantization arithmetic of a quantized model only adds error
        result.decline("graph", R_QUANTIZED, ", ".join(found), logger=logger)
        return plan
    groups, passthrough, off = _candidates(graph, cfg, result, logger)
    if cfg.weights_only:
        plan.groups = [g for g in groups if id(g) not in off]
        return plan
    for g in _drop_isolated(graph, groups, passthrough):
        off.add(id(g))
        result.decline(node_label(g.node), R_ISOLATED, logger=logger)
    return _place(graph, set(cfg.exclude), [g for g in groups if id(g) not in off],
                  [g for g in passthrough if id(g) not in off])


def _drop_isolated(graph: gs.Graph, groups: list[QdqGroup], passthrough: list[QdqGroup]) -> list[QdqGroup]:
    """Host groups rule 12 keeps float, decided with nothing excluded (to a fixed point).

    Deciding on the unexcluded graph keeps an ``exclude`` from turning its neighbours float, so
    quantizing one layer alone (sensitivity) still quantizes that layer.
    """
    dropped: list[QdqGroup] = []
    while True:
        ids = {id(g) for g in dropped}
        isolated = _isolated(graph, _place(graph, set(), [g for g in groups if id(g) not in ids], passthrough))
        if not isolated:
            return dropped
        dropped += isolated


def _place(graph: gs.Graph, excluded: set[str], groups: list[QdqGroup], passthrough: list[QdqGroup]) -> QdqPlan:
    """One placement of ``groups`` (plus the passthrough/lut ops that join them)."""
    graph_outputs = {t.name for t in graph.outputs}
    for g in groups:
        g.act, g.bounds = None, None
        if g.kind in _HOSTS:
            _attach_activation(g, excluded, graph_outputs)
    in_q = {g.node.inputs[i].name for g in groups for i in g.data_slots()
            if not isinstance(g.node.inputs[i], gs.Constant)}
    out_q = {t.name for g in groups if _needs_output_q(g) for t in g.outputs}
    _add_passthrough(groups, passthrough, in_q, out_q)
    _settle_optional(groups, in_q, out_q)
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    plan = QdqPlan(groups=sorted(groups, key=lambda g: order[id(g.node)]))
    _fill_tensors(graph, plan, in_q | out_q)
    plan.concat_inputs = concat_inputs(plan, graph_outputs)
    return plan



def _isolated(graph: gs.Graph, plan: QdqPlan) -> list[QdqGroup]:
    """Host groups whose Q/DQ-connected component holds no ``compute`` group (rule 12).

    Two groups are connected when one quantized tensor links them: one produces it and the other
    reads it, or both read a tensor computed in the graph (whose float readers would read its
    DequantizeLinear anyway). Two readers of a graph input are not linked: a float reader reads
    the raw input.
    """
    parent = list(range(len(plan.groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index = {id(g): i for i, g in enumerate(plan.groups)}
    members: dict[str, list[int]] = {}
    for i, g in enumerate(plan.groups):
        for t in g.outputs:
            members.setdefault(t.name, []).append(i)
    for name, slots in plan.consumers.items():
        members.setdefault(name, []).extend(index[id(g)] for g, _ in slots)
    inputs = {t.name for t in graph.inputs}
    for name, ids in members.items():
        if name in inputs:
            continue
        for j in ids[1:]:
            parent[find(j)] = find(ids[0])
    anchored = {find(i) for i, g in enumerate(plan.groups) if g.kind == "compute"}
    return [g for i, g in enumerate(plan.groups) if g.kind in _HOSTS and g.kind != "compute"
            and find(i) not in anchored]


def _fill_tensors(graph: gs.Graph, plan: QdqPlan, wanted: set[str]) -> None:
    """Order the wrapped tensors, record sharing, one-sidedness, bounds and consumer slots."""
    names = [t.name for t in graph.inputs] + [o.name for n in graph.nodes for o in n.outputs]
    plan.tensors = [n for n in dict.fromkeys(names) if n in wanted]
    for g in plan.groups:
        if g.kind == "passthrough":
            plan.shared.update((t.name, g.node.inputs[0].name) for t in g.outputs)
        if g.act is not None and g.bounds is not None:
            plan.bounds[g.output.name] = g.bounds
            if g.bounds[0] >= 0:
                plan.one_sided.add(g.output.name)
        for i in g.data_slots():
            t = g.node.inputs[i]
            if not isinstance(t, gs.Constant):
                plan.consumers.setdefault(t.name, []).append((g, i))
        if _is_silu(g.node) and g.output.name in wanted:
            plan.unclipped.add(g.output.name)
    _saturation_bounds(graph, plan, wanted)


#: Rule 14: inputs of Sigmoid/SiLU are clamped to this magnitude (sigmoid(-8) = 3.4e-4).
SATURATION = 8.0


def _saturation_bounds(graph: gs.Graph, plan: QdqPlan, wanted: set[str]) -> None:
    """Rule 14: clamp tensors read only by Sigmoid (both ends) or a SiLU (lower end)."""
    outputs = {t.name for t in graph.outputs}
    for name, t in graph.tensors().items():
        if name not in wanted or name in outputs or not t.outputs:
            continue
        readers = list(t.outputs)
        if not all(n.op == "Sigmoid" or _is_silu(n) for n in readers):
            continue
        hi = SATURATION if all(n.op == "Sigmoid" for n in readers) else np.inf
        lo0, hi0 = plan.bounds.get(name, (-np.inf, np.inf))
        plan.bounds[name] = (max(lo0, -SATURATION), min(hi0, hi))


def _is_silu(node: gs.Node) -> bool:
    """``node`` is the ``Mul(t, Sigmoid(t))`` of a SiLU/Swish activation."""
    if node.op != "Mul" or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    return any(s.inputs and s.inputs[0].op == "Sigmoid" and s.inputs[0].inputs[0] is t
               for t, s in ((a, b), (b, a)))
