"""Dynamic int8 quantization of MatMul/Gemm: activations quantized at run time, int8 weights.

Each MatMul/Gemm with a constant 2-D weight becomes::

    x_q, x_s, x_z = DynamicQuantizeLinear(x)          # one per activation tensor, shared by its readers
    y = Cast(MatMulInteger(x_q, W_q, x_z, W_z), float) * Mul(x_s, W_s)  [+ bias]

the form onnxruntime's CPU provider fuses into ``MatMulIntegerToFloat`` and then, with the
``DynamicQuantizeLinear`` in front, into ``DynamicQuantizeMatMul`` (``onnxruntime.quantization
.quantize_dynamic`` writes the same pattern). ``DynamicQuantizeLinear`` picks, for every run,
``s = (max(x, 0) - min(x, 0)) / 255`` and ``z = round(-min(x, 0) / s)`` (uint8), so no calibration
is needed and every input gets the range it actually has. Weights: int8 symmetric
(:func:`onnxcompress.quant.params.quantize_weight`), per output column when ``per_channel`` (zero
points 0, one per column), 7-bit with ``reduce_range``. A Gemm's ``alpha`` is folded into the
weight, ``transB`` into a transposed copy (the original constant is never edited), ``beta * C``
into a float ``Add`` after the ``Mul``.

Everything else (LayerNorm, Softmax, GELU, the attention-score MatMuls whose both operands are
activations, elementwise ops) stays float.

Declines (codes of :mod:`onnxcompress.quant.placement`): ``excluded_by_option``,
``weight_not_constant`` (the attention ``Q K^T`` and ``P V`` MatMuls, weights computed at run time),
``unsupported_dtype``, ``unsupported_layout`` (weight not 2-D, Gemm ``transA``),
``all_inputs_constant``, ``bias_not_per_channel`` (a Gemm ``C`` that is not a constant),
``already_quantized`` (the graph holds quantization ops: left alone).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import Names, const_values, constant_info, node_label, opt_input, uncached_values
from onnxcompress.core.pass_api import PassResult
from onnxcompress.quant.options import QuantConfig
from onnxcompress.quant.params import QParams, quantize_weight
from onnxcompress.quant.placement import (
    QUANTIZED_OPS,
    R_ALL_CONSTANT,
    R_BIAS,
    R_DTYPE,
    R_EXCLUDED,
    R_LAYOUT,
    R_QUANTIZED,
    R_WEIGHT,
    decline_unsupported,
    tensor_dtypes,
)

__all__ = ["DYNAMIC_OPS", "apply_dynamic", "plan_dynamic", "quantize_dynamic_graph"]

log = logging.getLogger(__name__)

#: Ops quantized dynamically.
DYNAMIC_OPS = frozenset({"MatMul", "Gemm"})
_FLOAT = onnx.TensorProto.FLOAT


def _reason(node: gs.Node, dtypes: dict[str, int]) -> str | None:
    """Why ``node`` cannot be quantized dynamically, or ``None``."""
    w = constant_info(opt_input(node, 1))
    if w is None:
        return R_WEIGHT
    x, y = node.inputs[0], node.outputs[0]
    if isinstance(x, gs.Constant):
        return R_ALL_CONSTANT
    if w[0] != np.float32 or dtypes.get(x.name) != _FLOAT or dtypes.get(y.name) != _FLOAT:
        return R_DTYPE
    if len(w[1]) != 2 or (node.op == "Gemm" and int(node.attrs.get("transA", 0))):
        return R_LAYOUT
    if node.op == "Gemm" and opt_input(node, 2) is not None and const_values(opt_input(node, 2)) is None:
        return R_BIAS
    return None


def plan_dynamic(graph: gs.Graph, cfg: QuantConfig, result: PassResult,
                 logger: logging.Logger | None = None) -> list[gs.Node]:
    """The MatMul/Gemm nodes to quantize dynamically, in graph order; the others are declined."""
    logger = logger or log
    found = sorted({n.op for n in graph.nodes if n.op in QUANTIZED_OPS})
    if found:
        result.decline("graph", R_QUANTIZED, ", ".join(found), logger=logger)
        return []
    dtypes = tensor_dtypes(graph)
    excluded = set(cfg.exclude)
    chosen = []
    for node in graph.nodes:
        if node.op not in DYNAMIC_OPS:
            decline_unsupported(node, result, logger)
            continue
        if node.name in excluded or node.op in excluded:
            result.decline(node_label(node), R_EXCLUDED, logger=logger)
            result.count("excluded")
            continue
        reason = _reason(node, dtypes)
        if reason is not None:
            result.decline(node_label(node), reason, logger=logger)
            continue
        chosen.append(node)
    return chosen


class _DynamicRewriter:
    def __init__(self, graph: gs.Graph, cfg: QuantConfig, result: PassResult):
        self.graph, self.cfg, self.result = graph, cfg, result
        self.names = Names(graph)
        self.inputs: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
        self.weights: dict[tuple, tuple[gs.Constant, gs.Constant, gs.Constant]] = {}

    def add(self, op: str, base: str, inputs: list[gs.Tensor], dtype: type, attrs: dict | None = None,
            out: gs.Variable | None = None) -> gs.Variable:
        out = out if out is not None else gs.Variable(self.names.fresh(f"{base}_{op}_output"), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, self.names.fresh(f"{base}_{op}"), attrs or {}, inputs, [out]))
        return out

    def quantized_input(self, x: gs.Variable) -> tuple[gs.Variable, gs.Variable, gs.Variable]:
        """``DynamicQuantizeLinear(x)``'s outputs, one node per tensor."""
        if x.name not in self.inputs:
            outs = [gs.Variable(self.names.fresh(f"{x.name}_{suffix}"), dtype=dtype, shape=shape)
                    for suffix, dtype, shape in (("quantized", np.uint8, x.shape), ("scale", np.float32, []),
                                                 ("zero_point", np.uint8, []))]
            self.graph.nodes.append(gs.Node("DynamicQuantizeLinear", self.names.fresh(f"{x.name}_DynamicQuantizeLinear"),
                                            {}, [x], outs))
            self.inputs[x.name] = (outs[0], outs[1], outs[2])
            self.result.count("dynamic_quantize_inserted")
        return self.inputs[x.name]

    def weight(self, node: gs.Node) -> tuple[gs.Constant, gs.Constant, gs.Constant]:
        """``(W_q [K, N] int8, W_s, W_z)`` of ``node`` (shared between nodes with the same weight)."""
        w_t = node.inputs[1]
        trans = node.op == "Gemm" and bool(int(node.attrs.get("transB", 0)))
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        key = (w_t.name, id(w_t), trans, alpha)
        if key in self.weights:
            self.result.count("weights_shared")
            return self.weights[key]
        w = uncached_values(w_t)
        w = (w.T if trans else w).astype(np.float64) * alpha if (trans or alpha != 1.0) else w
        q, p = quantize_weight(w, 1 if self.cfg.per_channel else None, qmax=self.cfg.weight_qmax)
        self.weights[key] = self._weight_constants(w_t.name, q, p)
        self.result.count("weights_int8")
        return self.weights[key]

    def _weight_constants(self, base: str, q: np.ndarray, p: QParams) -> tuple[gs.Constant, gs.Constant, gs.Constant]:
        return (gs.Constant(self.names.fresh(f"{base}_quantized"), np.ascontiguousarray(q)),
                gs.Constant(self.names.fresh(f"{base}_scale"), np.array(p.scale, np.float32, order="C")),
                gs.Constant(self.names.fresh(f"{base}_zero_point"), np.array(p.zero_point, np.int8, order="C")))

    def rewrite(self, node: gs.Node) -> None:
        """Replace ``node`` by the dynamic int8 pattern writing its output tensor."""
        base, y = node.name or node.outputs[0].name, node.outputs[0]
        x_q, x_s, x_z = self.quantized_input(node.inputs[0])
        w_q, w_s, w_z = self.weight(node)
        bias = self._bias(node)
        scale = self.add("Mul", f"{base}_scales", [x_s, w_s], np.float32)
        acc = self.add("MatMulInteger", base, [x_q, w_q, x_z, w_z], np.int32)
        cast = self.add("Cast", base, [acc], np.float32, {"to": _FLOAT})
        node.inputs.clear()
        node.outputs.clear()
        self.graph.nodes.remove(node)
        if bias is None:
            self.add("Mul", base, [cast, scale], np.float32, out=y)
            return
        self.add("Add", f"{base}_bias", [self.add("Mul", base, [cast, scale], np.float32), bias], np.float32, out=y)
        self.result.count("bias_float")

    def _bias(self, node: gs.Node) -> gs.Constant | None:
        c = opt_input(node, 2) if node.op == "Gemm" else None
        if c is None:
            return None
        beta = float(node.attrs.get("beta", 1.0))
        if beta == 1.0:
            return c
        values = (const_values(c).astype(np.float64) * beta).astype(np.float32)
        return gs.Constant(self.names.fresh(f"{c.name}_beta"), values)


def apply_dynamic(graph: gs.Graph, nodes: list[gs.Node], cfg: QuantConfig, result: PassResult) -> None:
    """Rewrite ``nodes`` (from :func:`plan_dynamic`) in place; counters ``quantized_<Op>``,
    ``dynamic_quantize_inserted``, ``weights_int8``, ``weights_shared``, ``bias_float``."""
    rw = _DynamicRewriter(graph, cfg, result)
    for node in nodes:
        result.count(f"quantized_{node.op}")
        rw.rewrite(node)


def quantize_dynamic_graph(graph: gs.Graph, cfg: QuantConfig, result: PassResult,
                           logger: logging.Logger | None = None) -> bool:
    """Plan and apply dynamic quantization on ``graph``; whether anything changed."""
    nodes = plan_dynamic(graph, cfg, result, logger)
    if nodes:
        apply_dynamic(graph, nodes, cfg, result)
    return bool(nodes)
