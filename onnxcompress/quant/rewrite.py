"""QDQ rewrite: insert the QuantizeLinear/DequantizeLinear nodes and quantized constants a
:class:`~onnxcompress.quant.placement.QdqPlan` asks for (rules in :mod:`onnxcompress.quant.placement`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import Names, const_values, opt_input, uncached_values, weight_layout
from onnxcompress.core.pass_api import PassResult
from onnxcompress.quant.options import QuantConfig
from onnxcompress.quant.params import (
    QParams,
    activation_params,
    bias_safe_weight_scale,
    quantize_bias,
    quantize_values,
    quantize_weight,
)
from onnxcompress.quant.placement import SHAPE_READERS, QdqGroup, QdqPlan, bias_vector

__all__ = ["apply_plan", "fanout_uint8"]


class _Rewriter:
    """Inserts Q/DQ nodes and quantized constants into a graph, with fresh unique names."""

    def __init__(self, graph: gs.Graph, plan: QdqPlan, params: dict[str, QParams], cfg: QuantConfig,
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
            shape_readers = [n for n in list(tensor.outputs) if n.op in SHAPE_READERS]
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
        q, p = quantize_weight(uncached_values(w_t), axis, qmax=self.cfg.weight_qmax, min_scale=min_scale)
        key = (w_t.name, id(w_t), p.axis, p.scale.tobytes())
        if key not in self.weight_dqs:
            self.weight_dqs[key] = (self._const_dq(w_t.name, q, p), p)
            self.result.count("weights_int8")
        else:
            self.result.count("weights_shared")
        return self.weight_dqs[key]

    def weights(self, group: QdqGroup) -> None:
        """Quantize the weight (and, for full quantization, the int32 bias) of ``group``."""
        node = group.node
        axis = weight_layout(node).out_axis if self.cfg.per_channel else None
        if group.kind == "weights":
            node.inputs[1] = self.weight(node.inputs[1], axis, None)[0]
            return
        s_in = float(self.params[self.plan.root(node.inputs[0].name)].scale)
        bias_t = opt_input(node, 2)
        bias = None
        if bias_t is not None:
            w = node.inputs[1].values
            channels = w.shape[weight_layout(node).out_axis]
            bias = bias_vector(bias_t.values, channels).astype(np.float64)
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

    def constant_operands(self, group: QdqGroup) -> None:
        """Quantize constant inputs of Add/Mul/Concat per tensor, like activations."""
        for i, t in enumerate(list(group.node.inputs)):
            values = const_values(t)
            if values is None:
                continue
            p = activation_params(float(values.min(initial=0.0)), float(values.max(initial=0.0)),
                                  symmetric=self.cfg.symmetric_activations)
            group.node.inputs[i] = self._const_dq(t.name, quantize_values(values, p), p)
            self.result.count("constants_quantized")


def apply_plan(graph: gs.Graph, plan: QdqPlan, params: dict[str, QParams], cfg: QuantConfig,
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


def _fanout(tensor: gs.Tensor, plan: QdqPlan, graph_outputs: set[str]) -> bool:
    """Whether ``tensor``'s Q will have several readers in onnxruntime (after its DQ duplication)."""
    if not tensor.inputs:  # graph input: only the quantized slots read the DQ
        return len(plan.consumers.get(tensor.name, [])) > 1
    readers = list(tensor.outputs)
    shape = sum(1 for n in readers if n.op in SHAPE_READERS)
    others = len(readers) - shape + (tensor.name in graph_outputs)
    return shape > 0 or others > 1


def fanout_uint8(graph: gs.Graph, plan: QdqPlan, params: dict[str, QParams],
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
