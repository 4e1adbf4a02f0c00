"""QDQ placement and rewriting: which tensors get QuantizeLinear/DequantizeLinear, and where.

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

ConvTranspose has no integer kernel on the CPU provider, so it keeps float compute with an int8
weight (a ``weights`` group) and its activations are not quantized on its account.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import serde
from ..graphutil import Names, const_values
from ..manager import PassResult
from .params import (
    QParams,
    activation_params,
    bias_safe_weight_scale,
    quantize_bias,
    quantize_values,
    quantize_weight,
)

__all__ = [
    "DECLINE_REASONS",
    "KINDS",
    "QUANTIZED_OPS",
    "R_OUTPUT_CONCAT",
    "R_QUANTIZED",
    "Group",
    "Plan",
    "QuantConfig",
    "apply_plan",
    "fanout_uint8",
    "plan_placement",
    "weight_axis",
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
_SHAPE_READERS = frozenset({"Shape", "Size"})
_HOSTS = frozenset({"compute", "binary", "variadic", "unary"})
_CONDITIONAL = frozenset({"passthrough", "lut"})  # quantized only when their input already is
_OPTIONAL_OUTPUT = frozenset({"Gemm", "MatMul"})

R_EXCLUDED = "excluded by option"
R_WEIGHT = "weight not constant"
R_BIAS = "bias not constant or not per-channel"
R_DTYPE = "unsupported dtype"
R_LAYOUT = "unsupported layout"
R_ALL_CONSTANT = "all inputs constant"
R_DEGENERATE = "degenerate range (min == max): safe scale 1 used"
R_QUANTIZED = "model already quantized"
R_OUTPUT_CONCAT = "Concat feeding only a graph output: kept float"

#: Every reason the placement (or the pass, for ranges) gives when it leaves something alone.
DECLINE_REASONS = (R_EXCLUDED, R_WEIGHT, R_BIAS, R_DTYPE, R_LAYOUT, R_ALL_CONSTANT, R_DEGENERATE, R_QUANTIZED,
                   R_OUTPUT_CONCAT)

_FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class QuantConfig:
    """Quantization settings shared by placement and rewriting."""

    per_channel: bool = True
    symmetric_activations: bool = False
    reduce_range: bool = False
    exclude: tuple[str, ...] = ()
    weights_only: bool = False

    @property
    def weight_qmax(self) -> int:
        """127, or 64 (7-bit weights) with ``reduce_range``."""
        return 64 if self.reduce_range else 127


@dataclass
class Group:
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
class Plan:
    """Where Q/DQ nodes go.

    Attributes:
        groups: Quantized nodes in graph order.
        tensors: Activation tensors that get a Q/DQ pair, in graph order.
        shared: ``{passthrough output: tensor whose parameters it reuses}``.
        one_sided: Outputs of folded Relu/Clip with lower bound >= 0.
        bounds: ``{tensor: (lo, hi)}`` clamps from folded Clip/Relu bounds.
        consumers: ``{tensor: [(group, input index)]}`` quantized slots reading each tensor.
    """

    groups: list[Group] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)
    one_sided: set[str] = field(default_factory=set)
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    consumers: dict[str, list[tuple[Group, int]]] = field(default_factory=dict)

    def calibrated(self) -> list[str]:
        """Tensors whose range must be measured (shared ones reuse another's)."""
        return [t for t in self.tensors if t not in self.shared]

    def root(self, name: str) -> str:
        """The tensor whose parameters ``name`` uses."""
        while name in self.shared:
            name = self.shared[name]
        return name


# ------------------------------------------------------------------------------------- helpers


def _where(node: gs.Node) -> str:
    if node.name:
        return node.name
    return node.outputs[0].name if node.outputs and node.outputs[0].name else node.op


def _opt_input(node: gs.Node, index: int) -> gs.Tensor | None:
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def weight_axis(node: gs.Node) -> int:
    """The output-channel axis of ``node``'s weight (input 1)."""
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 1  # ConvTranspose [Cin, Cout/g, k...]; MatMul [K, N]


def tensor_dtypes(graph: gs.Graph) -> dict[str, int]:
    """ONNX element types of every typed tensor (one shape inference over the exported graph)."""
    model = serde.infer_shapes(serde.to_model(graph))
    out = {i.name: i.data_type for i in model.graph.initializer}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


def _is_float(tensor: gs.Tensor, dtypes: dict[str, int]) -> bool:
    if isinstance(tensor, gs.Constant):
        return isinstance(tensor.values, np.ndarray) and tensor.values.dtype == np.float32
    return dtypes.get(tensor.name) == _FLOAT


# ---------------------------------------------------------------------------------- eligibility


def _check_compute(node: gs.Node, dtypes: dict[str, int], weights_only: bool) -> str | None:
    w = const_values(_opt_input(node, 1))
    if w is None:
        return R_WEIGHT
    if w.dtype != np.float32 or not _is_float(node.inputs[0], dtypes):
        return R_DTYPE
    if (node.op in ("Conv", "ConvTranspose") and w.ndim < 3) or (node.op in ("Gemm", "MatMul") and w.ndim != 2):
        return R_LAYOUT
    if isinstance(node.inputs[0], gs.Constant):
        return R_ALL_CONSTANT
    if weights_only or node.op in ("MatMul", "ConvTranspose"):
        return None
    bias_t = _opt_input(node, 2)
    if bias_t is None:
        return None
    bias = const_values(bias_t)
    if bias is None or bias.dtype != np.float32:
        return R_BIAS
    channels = w.shape[0] if node.op == "Conv" else w.shape[weight_axis(node)]
    return None if _bias_vector(bias, channels) is not None else R_BIAS


def _bias_vector(bias: np.ndarray, channels: int) -> np.ndarray | None:
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


def _clip_bounds(act: gs.Node) -> tuple[float, float] | None:
    """``(min, max)`` of a Relu (``(0, inf)``) or of a Clip with constant bounds."""
    if act.op == "Relu":
        return 0.0, np.inf
    lo_t, hi_t = _opt_input(act, 1), _opt_input(act, 2)
    lo, hi = const_values(lo_t), const_values(hi_t)
    if (lo_t is not None and lo is None) or (hi_t is not None and hi is None):
        return None
    return (float(lo) if lo is not None else -np.inf), (float(hi) if hi is not None else np.inf)


def _attach_activation(group: Group, excluded: set[str], graph_outputs: set[str]) -> None:
    """Fold a Relu/Clip that alone consumes ``group``'s output into the group (rule 2)."""
    out = group.node.outputs[0]
    if out.name in graph_outputs or len(out.outputs) != 1:
        return
    act = out.outputs[0]
    if act.op not in ("Relu", "Clip") or act.name in excluded or act.op in excluded:
        return
    if act.inputs[0] is not out or any(t is out for t in act.inputs[1:]) or len(act.outputs) != 1:
        return
    bounds = _clip_bounds(act)
    if bounds is None or bounds[0] > 0 or bounds[1] <= 0:
        return
    group.act, group.bounds = act, bounds


# ------------------------------------------------------------------------------------- planning


def _candidates(graph: gs.Graph, cfg: QuantConfig, result: PassResult,
                logger: logging.Logger) -> tuple[list[Group], list[Group]]:
    """Eligible groups (passthrough ones separately) with declines recorded."""
    dtypes = tensor_dtypes(graph)
    excluded = set(cfg.exclude)
    groups, passthrough = [], []
    for node in graph.nodes:
        kind = _kind(node)
        if kind is None or (cfg.weights_only and kind not in ("compute", "weights")):
            continue
        if node.name in excluded or node.op in excluded:
            result.decline(_where(node), R_EXCLUDED, logger)
            result.count("excluded")
            continue
        if kind == "activation":  # folded (or not) by _attach_activation
            continue
        kind = "weights" if cfg.weights_only else kind
        reason = _check(node, kind, dtypes, cfg.weights_only)
        if reason is not None:
            if kind not in _CONDITIONAL:
                result.decline(_where(node), reason, logger)
            continue
        if kind == "variadic" and _only_graph_output(node, graph):
            result.decline(_where(node), R_OUTPUT_CONCAT, logger)
            continue
        (passthrough if kind in _CONDITIONAL else groups).append(Group(node, kind))
    return groups, passthrough


def _only_graph_output(node: gs.Node, graph: gs.Graph) -> bool:
    """``node``'s output is a graph output and nothing else reads it (rule 10)."""
    out = node.outputs[0]
    return not out.outputs and any(t is out for t in graph.outputs)


def _needs_output_q(group: Group) -> bool:
    return group.kind not in ("weights",) and group.node.op not in _OPTIONAL_OUTPUT


def _add_passthrough(groups: list[Group], passthrough: list[Group], in_q: set[str], out_q: set[str]) -> None:
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


def _settle_optional(groups: list[Group], in_q: set[str], out_q: set[str]) -> None:
    """Gemm/MatMul quantize their output only for quantized consumers (rule 1)."""
    for g in groups:
        if g.kind != "compute" or g.node.op not in _OPTIONAL_OUTPUT:
            continue
        if g.output.name in in_q:
            out_q.add(g.output.name)
        elif g.act is not None:
            g.act, g.bounds = None, None


def plan_placement(graph: gs.Graph, cfg: QuantConfig, result: PassResult,
                   logger: logging.Logger | None = None) -> Plan:
    """Decide which nodes are quantized and which tensors get Q/DQ (see the module rules)."""
    logger = logger or log
    plan = Plan()
    found = sorted({n.op for n in graph.nodes if n.op in QUANTIZED_OPS})
    if found:  # requantizing the dequantization arithmetic of a quantized model only adds error
        result.decline(f"graph ({', '.join(found)})", R_QUANTIZED, logger)
        return plan
    groups, passthrough = _candidates(graph, cfg, result, logger)
    if cfg.weights_only:
        plan.groups = groups
        return plan
    excluded, graph_outputs = set(cfg.exclude), {t.name for t in graph.outputs}
    for g in groups:
        if g.kind in _HOSTS:
            _attach_activation(g, excluded, graph_outputs)
    in_q = {g.node.inputs[i].name for g in groups for i in g.data_slots()
            if not isinstance(g.node.inputs[i], gs.Constant)}
    out_q = {t.name for g in groups if _needs_output_q(g) for t in g.outputs}
    _add_passthrough(groups, passthrough, in_q, out_q)
    _settle_optional(groups, in_q, out_q)
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    plan.groups = sorted(groups, key=lambda g: order[id(g.node)])
    _fill_tensors(graph, plan, in_q | out_q)
    return plan


def _fill_tensors(graph: gs.Graph, plan: Plan, wanted: set[str]) -> None:
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


# ------------------------------------------------------------------------------------ rewriting


class _Rewriter:
    """Inserts Q/DQ nodes and quantized constants into a graph, with fresh unique names."""

    def __init__(self, graph: gs.Graph, plan: Plan, params: dict[str, QParams], cfg: QuantConfig,
                 result: PassResult):
        self.graph, self.plan, self.params, self.cfg, self.result = graph, plan, params, cfg, result
        self.names = Names(graph)
        self.qconsts: dict[str, tuple[gs.Constant, gs.Constant]] = {}
        self.weight_dqs: dict[tuple, tuple[gs.Variable, QParams]] = {}

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    def _constants(self, base: str, p: QParams) -> tuple[gs.Constant, gs.Constant]:
        scale = gs.Constant(self.fresh(f"{base}_scale"), np.array(p.scale, order="C"))
        zp = gs.Constant(self.fresh(f"{base}_zero_point"), np.array(p.zero_point, order="C"))
        return scale, zp

    def _dq(self, base: str, src: gs.Tensor, scale: gs.Constant, zp: gs.Constant, out: gs.Variable,
            axis: int | None = None) -> None:
        attrs = {"axis": axis} if axis is not None else {}
        self.graph.nodes.append(gs.Node("DequantizeLinear", self.fresh(f"{base}_DequantizeLinear"), attrs,
                                        [src, scale, zp], [out]))
        self.result.count("dq_inserted")

    def _const_dq(self, base: str, values: np.ndarray, p: QParams) -> gs.Variable:
        """``DequantizeLinear(constant values, p)`` as a new float tensor."""
        data = gs.Constant(self.fresh(f"{base}_quantized"), np.array(values, order="C"))
        scale, zp = self._constants(base, p)
        out = gs.Variable(self.fresh(f"{base}_dequantized"), dtype=np.float32, shape=list(values.shape))
        self._dq(base, data, scale, zp, out, p.axis)
        return out

    # -- activations

    def wrap(self, tensor: gs.Variable) -> None:
        """Insert ``Q -> DQ`` on ``tensor`` (rule 4)."""
        root = self.plan.root(tensor.name)
        p = self.params[root]
        if root not in self.qconsts:
            self.qconsts[root] = self._constants(root, p)
        scale, zp = self.qconsts[root]
        shape_readers = []
        if tensor.inputs:
            producer = tensor.inputs[0]
            index = next(i for i, t in enumerate(producer.outputs) if t is tensor)
            src = gs.Variable(self.fresh(f"{tensor.name}_float"), dtype=np.float32, shape=tensor.shape)
            producer.outputs[index] = src
            out = tensor
            shape_readers = [n for n in list(tensor.outputs) if n.op in _SHAPE_READERS]
        else:
            src = tensor
            out = gs.Variable(self.fresh(f"{tensor.name}_dequantized"), dtype=np.float32, shape=tensor.shape)
            for group, slot in self.plan.consumers.get(tensor.name, []):
                group.node.inputs[slot] = out
        q = gs.Variable(self.fresh(f"{tensor.name}_quantized"), dtype=p.zero_point.dtype, shape=tensor.shape)
        self.graph.nodes.append(gs.Node("QuantizeLinear", self.fresh(f"{tensor.name}_QuantizeLinear"), {},
                                        [src, scale, zp], [q]))
        self.result.count("q_inserted")
        self._dq(tensor.name, q, scale, zp, out)
        for node in shape_readers:  # rule 7: no dequantization just to read a shape
            for i, t in enumerate(list(node.inputs)):
                if t is tensor:
                    node.inputs[i] = q
            self.result.count("shape_reads_quantized")

    # -- weights

    def weight(self, w_t: gs.Constant, axis: int | None, min_scale: np.ndarray | None) -> tuple[gs.Variable, QParams]:
        """The DQ output of ``w_t`` quantized to int8 (shared between nodes with equal params)."""
        q, p = quantize_weight(w_t.values, axis, qmax=self.cfg.weight_qmax, min_scale=min_scale)
        key = (w_t.name, id(w_t), p.axis, p.scale.tobytes())
        if key not in self.weight_dqs:
            self.weight_dqs[key] = (self._const_dq(w_t.name, q, p), p)
            self.result.count("weights_int8")
        else:
            self.result.count("weights_shared")
        return self.weight_dqs[key]

    def weights(self, group: Group) -> None:
        """Quantize the weight (and, for full quantization, the int32 bias) of ``group``."""
        node = group.node
        axis = weight_axis(node) if self.cfg.per_channel else None
        if group.kind == "weights":
            node.inputs[1] = self.weight(node.inputs[1], axis, None)[0]
            return
        s_in = float(self.params[self.plan.root(node.inputs[0].name)].scale)
        bias_t = _opt_input(node, 2)
        bias = None
        if bias_t is not None:
            w = node.inputs[1].values
            channels = w.shape[0] if node.op == "Conv" else w.shape[weight_axis(node)]
            bias = _bias_vector(bias_t.values, channels).astype(np.float64)
            if node.op == "Gemm":
                bias = bias * float(node.attrs.get("beta", 1.0))
                node.attrs["beta"] = 1.0
        min_scale = None
        if bias is not None:
            safe = bias_safe_weight_scale(bias, s_in)
            min_scale = safe if axis is not None else np.asarray(safe.max())
        w_dq, w_params = self.weight(node.inputs[1], axis, min_scale)
        node.inputs[1] = w_dq
        if bias is not None:
            q, p = quantize_bias(bias, s_in, w_params)
            node.inputs[2] = self._const_dq(bias_t.name, q, p)
            self.result.count("bias_int32")

    def constant_operands(self, group: Group) -> None:
        """Quantize constant inputs of Add/Mul/Concat per tensor, like activations."""
        for i, t in enumerate(list(group.node.inputs)):
            values = const_values(t)
            if values is None:
                continue
            p = activation_params(float(values.min(initial=0.0)), float(values.max(initial=0.0)),
                                  symmetric=self.cfg.symmetric_activations)
            group.node.inputs[i] = self._const_dq(t.name, quantize_values(values, p), p)
            self.result.count("constants_quantized")


def apply_plan(graph: gs.Graph, plan: Plan, params: dict[str, QParams], cfg: QuantConfig,
               result: PassResult) -> None:
    """Rewrite ``graph`` in place following ``plan``.

    Args:
        graph: The graph ``plan`` was made for.
        plan: From :func:`plan_placement`.
        params: Quantization parameters of every tensor of ``plan.calibrated()`` (shared tensors
            use their root's).
        cfg: Settings.
        result: Receives the counters (``quantized_<Op>``, ``relu_folded``, ``clip_folded``,
            ``q_inserted``, ``dq_inserted``, ``weights_int8``, ``weights_shared``, ``bias_int32``,
            ``constants_quantized``, ``shape_reads_quantized``, ``uint8_fanout``).
    """
    params = fanout_uint8(graph, plan, params, result)
    rw = _Rewriter(graph, plan, params, cfg, result)
    for g in plan.groups:
        result.count(f"quantized_{g.node.op}")
        if g.act is not None:
            result.count(f"{g.act.op.lower()}_folded")
        if g.kind in ("compute", "weights"):
            rw.weights(g)
        elif g.kind in ("binary", "variadic"):
            rw.constant_operands(g)
    tensors = graph.tensors()
    for name in plan.tensors:
        rw.wrap(tensors[name])


def _fanout(tensor: gs.Tensor, plan: Plan, graph_outputs: set[str]) -> bool:
    """Whether ``tensor``'s Q will have several readers in onnxruntime (after its DQ duplication)."""
    if not tensor.inputs:  # graph input: only the quantized slots read the DQ
        return len(plan.consumers.get(tensor.name, [])) > 1
    readers = list(tensor.outputs)
    shape = sum(1 for n in readers if n.op in _SHAPE_READERS)
    others = len(readers) - shape + (tensor.name in graph_outputs)
    return shape > 0 or others > 1


def fanout_uint8(graph: gs.Graph, plan: Plan, params: dict[str, QParams],
                 result: PassResult | None = None) -> dict[str, QParams]:
    """``params`` with int8 tensors read by several nodes re-encoded as uint8 (rule 8).

    onnxruntime's CPU provider fuses only uint8 activations on x86; it turns an int8
    ``Q -> DQ`` pair into uint8 (zero point + 128) only when the Q has exactly one reader, which
    a tensor read by several nodes never has once onnxruntime gives each reader its own DQ. The
    uint8 encoding ``(scale, zero_point + 128)`` represents the same values bit for bit
    (``q_u8 = q_s8 + 128``), so switching those tensors (and every tensor sharing their
    parameters) changes nothing numerically. Returns a new dict; ``params`` is not modified.
    """
    tensors = graph.tensors()
    outputs = {t.name for t in graph.outputs}
    roots = {plan.root(name) for name in plan.tensors
             if params.get(plan.root(name)) is not None and params[plan.root(name)].zero_point.dtype == np.int8
             and _fanout(tensors[name], plan, outputs)}
    if not roots:
        return params
    new = dict(params)
    for root in sorted(roots):
        p = params[root]
        zp = (p.zero_point.astype(np.int16) + 128).astype(np.uint8)
        new[root] = QParams(p.scale, zp, p.axis, p.degenerate)
        if result is not None:
            result.count("uint8_fanout")
    return new
