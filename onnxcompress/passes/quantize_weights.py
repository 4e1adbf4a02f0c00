"""Weight-only low-bit quantization of MatMul/Gemm weights and embedding tables (float compute)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.graph import Names, const_values, has_float_weight, node_label, opt_input
from onnxcompress.core.pass_api import Numerics, Option, Pass, PassContext, PassResult, Slot, register
from onnxcompress.core.shapes import concrete_shapes
from onnxcompress.quant import gptq as gq
from onnxcompress.quant.codebook import kmeans_codebook
from onnxcompress.quant.latency import LayerPair, measure_ratio
from onnxcompress.quant.weight_rewrite import codebook_weight, dq_conv_weight, dq_weight, gather_rows, matmulnbits_node
from onnxcompress.quant.weightonly import BlockQuant, ConvLayout, conv_layout, rtn
from onnxcompress.runtime.bench import bench_inputs

__all__ = ["LATENCY_TIMER", "R_SLOWER", "SLOWER", "QuantizeWeights"]

log = logging.getLogger(__name__)

#: Context slot (given by the caller): ``timer(layer pair) -> t_quantized / t_float`` replacing the
#: onnxruntime measurement (tests).
LATENCY_TIMER = Slot("quantize_weights_latency_timer", Callable, "the weight-only latency timer",
                     "replaces quantize_weights' per-shape timings")
_OPS = ("matmul", "gather", "conv")
_CONV_OPS = frozenset({"Conv", "ConvTranspose"})
#: Ops a dequantization chain passes through: data input only / every input.
_THROUGH_DATA = frozenset({"Cast", "DequantizeLinear", "Reshape", "Transpose", "Identity", "Unsqueeze", "Squeeze"})
_THROUGH_ALL = frozenset({"Mul", "Sub", "Add"})
#: Rows (product of the leading dims of a MatMul input) the latency check uses when shapes are unknown.
DEFAULT_ROWS = 128
#: Quantized/float time ratio above which ``prefer=speed`` keeps a weight float (5 %: timing noise).
SLOWER = 1.05
#: Decline code of a weight kept float because its quantized form ran slower here.
R_SLOWER = "slower_than_float"


@dataclass
class _Target:
    node: gs.Node
    kind: str  # "MatMul", "Gemm", "Gather", "Conv" or "ConvTranspose"
    weight: gs.Constant
    w: np.ndarray  # [K, N]: the weight as y = x·W (a Gather table transposed: [D, V]; a conv: its layout's matrix)
    transposed: bool = False
    layout: ConvLayout | None = None  # convs


@dataclass
class _Edit:
    """One rewritten weight: what to undo when its layer is measured slower than float."""

    target: _Target
    inputs: list[gs.Tensor]  # the node's inputs and outputs before the rewrite
    outputs: list[gs.Tensor]
    nodes: list[gs.Node]  # the nodes the rewrite added
    nbytes: int  # bytes of their constants
    quant: BlockQuant | None = None


def _quantized_source(tensor: gs.Tensor, depth: int = 4) -> bool:
    """Whether ``tensor`` is computed from a low-bit integer constant (int8/uint8/int16/int4 ...)
    through dequantization-like ops (``Cast``, ``Mul`` by a scale, ``DequantizeLinear``, ...)."""
    if isinstance(tensor, gs.Constant):
        values = const_values(tensor)
        return values is not None and values.size > 1 and (
            values.dtype in (np.int8, np.uint8, np.int16, np.uint16) or values.dtype.kind == "V")
    if depth == 0 or not tensor.inputs:
        return False
    node = tensor.inputs[0]
    if node.op in _THROUGH_DATA:
        return bool(node.inputs) and _quantized_source(node.inputs[0], depth - 1)
    return node.op in _THROUGH_ALL and any(_quantized_source(t, depth - 1) for t in node.inputs)


def _pow2_at_least(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


@register
class QuantizeWeights(Pass):
    """Weight-only low-bit quantization (4/8-bit or a per-layer mix, blocks; rtn, GPTQ or k-means); float compute.

    Before: ``y = MatMul(x, W)`` (``W`` a float constant ``[K, N]``; Gemm: ``B``, ``transB``),
    ``e = Gather(T, ids)`` (an embedding table ``T [V, D]``, with ``ops=matmul|gather``).
    After (``format=dq``): ``y = MatMul(x, DequantizeLinear(W_q, s, z, axis=0, block_size=B))``
    (opset 21, int4/uint4/int8/uint8 codes; the model is converted to opset 21 first, with onnx's
    version converter, or the pass stops with the converter's reason). onnxruntime (1.32)
    fuses that pair into its ``MatMulNBits`` at its default optimization level (4-bit and 8-bit).
    After (``format=matmulnbits``): ``y = com.microsoft.MatMulNBits(x, B_packed, s, z)`` (bits
    2, 4 or 8; Gemm's bias becomes its ``bias`` input).
    After (``method=kmeans``): ``y = MatMul(x, Gather(codebook, Cast(idx)))``: ``2^bits``
    shared values per layer, indices as uint4 (bits <= 4) or uint8; onnxruntime folds the
    expansion when the session starts, so it runs at float speed: a format for the file size.
    Embedding tables (``gather``): only the gathered rows are dequantized: ``Gather`` of the
    codes (4-bit: packed pairs unpacked by ``BitwiseAnd``/``BitShift``) and of the row's block
    scales, then a blocked ``DequantizeLinear`` (``format=matmulnbits``:
    ``com.microsoft.GatherBlockQuantized``); bits 4 or 8, blocks along ``D``.

    Convolutions (``ops=conv``, ``format=dq``, ``method=rtn|gptq``): ``y = Conv(x, DequantizeLinear(W_q,
    s, axis=0), b)`` per output channel (``block_size`` 0 or -1, and depthwise or any conv with
    fewer input channels per group than ``block_size``), else blocked along the input channels
    (``axis=1``, ``block_size``: one scale per block, output channel and kernel position);
    ``ConvTranspose``: axes swapped. Biases stay float. onnxruntime (1.32) does not fold that
    ``DequantizeLinear`` into a float weight: it runs each inference (``prefer=speed`` times the
    whole model; convs have no one-layer timing, so a slower model reverts them all).

    Math (see :mod:`onnxcompress.quant.weightonly`): blocks of ``block_size`` rows of ``W``
    along ``K`` per output column (0 or -1: one block per column), symmetric signed codes
    (``s = max|w| / (2^(b−1) − 1)``) or asymmetric with integer zero points; ``search`` picks
    each block's range shrink with the least squared rounding error. ``rtn`` rounds to nearest;
    ``gptq`` (:mod:`onnxcompress.quant.gptq`) rounds row by row with error feedback over the
    Hessian ``H = XᵀX`` of the layer's calibration inputs (``damp``, ``act_order``; static
    block scales); ``kmeans`` (:mod:`onnxcompress.quant.codebook`) fits a per-layer codebook,
    weighted by ``diag H`` when calibration data is given, else data-free. Embedding tables are
    always rounded to nearest (k-means with ``method=kmeans``); they have no input Hessian;
    ``gather_block_size`` gives them their own block size (the table often dominates the file).

    Fires when: a MatMul's input 1 / a Gemm's ``B`` is a float32 2-D constant (``ops`` has
    ``matmul``), or a ``Gather`` (axis 0) reads a float32 2-D constant table with computed
    indices (``ops`` has ``gather``), or a Conv/ConvTranspose weight is a float32 constant of
    rank ≥ 3 (``ops`` has ``conv``; kmeans refuses it; gptq: ``group=1`` Convs on their im2col
    Hessian, :func:`~onnxcompress.quant.gptq.gptq_conv`; grouped convs, ConvTranspose: rtn).
    ``fallback_bits``: a layer whose relative error at ``bits`` (output error on the Hessian where
    GPTQ ran, else weight error) exceeds ``max_error`` takes ``fallback_bits`` (``fallback_layers``).

    Declines (codes): ``weight_not_constant``; ``already_quantized`` (the weight is computed
    from an integer constant, e.g. ``INT8 → Cast → Mul → MatMul``: left alone);
    ``weight_shared`` (read by several nodes: the constant is never edited in place);
    ``weight_is_graph_output``; ``unsupported_dtype``; ``unsupported_shape`` (not 2-D);
    ``all_inputs_constant``; ``gemm_attributes`` (MatMulNBits: ``transA``, ``alpha``, ``beta`` or
    a non-vector ``C``); ``block_not_dividing`` (a table width the block does not divide, for
    ``GatherBlockQuantized`` and packed 4-bit rows); ``unknown_rank`` (gather indices);
    ``small_table`` (an embedding table with fewer than ``gather_min_rows`` rows: position and
    token-type tables hold little of the file, and each quantized table adds a few nodes to every
    run); ``op_not_supported`` (a custom-domain node holding float weights, e.g. onnxruntime's fused
    ``Attention`` or ``EmbedLayerNormalization``: left float);
    ``format_not_supported`` (a conv with ``format=matmulnbits``: no conv form; left float);
    ``slower_than_float`` (``prefer=speed``: measured slower than float here, see Latency).
    A ``K`` the block does not divide is fine: ``DequantizeLinear`` takes a short last block and
    ``MatMulNBits`` pads it with the zero point.

    Latency (``prefer=speed``, the default): a format slower than float on this CPU is not kept.
    The float and the quantized model are timed on this machine (onnxruntime optimizations on,
    one thread, interleaved rounds, median of paired ratios; one sample of the calibration data,
    else seeded random inputs; stats ``latency_ratio``, ``latency_scope=model``). Within 5 % of
    float (timing noise) everything stays. Slower: each distinct quantized layer shape is timed
    alone, the layers slower than float are reverted to their float weights (declined
    ``slower_than_float``, detail ``layer 1.31× float``), the model is timed again
    (``latency_ratio_kept``) and, if still slower, every remaining weight is reverted (detail
    ``model 1.08× float``; embedding tables are only reverted this way). When the models cannot
    run on the timing inputs (random token ids), only the layer timings decide
    (``latency_scope=layers``; this overstates the cost: an isolated float weight stays in cache).
    Stats ``latency_slower``, ``latency_reverted``. ``prefer=size`` skips the timing and keeps
    every quantized weight. On paraphrase-MiniLM-L3 (1 thread, 64 tokens): 4-bit
    ``MatMulNBits`` 0.98× float, 4-bit ``dq`` 1.06× (onnxruntime fuses it into MatMulNBits with
    int8 activations), 8-bit ``MatMulNBits`` 2.5× (slow kernel: reverted unless ``prefer=size``),
    8-bit ``dq`` 1.05×. **With prefer=speed the output depends on timings, hence on the machine
    and its load**; ``prefer=size`` does not.

    Stats: ``quantized_MatMul``/``_Gemm``/``_Gather``, ``weight_bytes_before``/``_after`` (the
    quantized weights' float and quantized sizes), ``weight_error`` (mean relative error of the
    quantized weights), with gptq ``output_error_rtn``/``output_error`` (mean relative layer
    output error on the calibration Hessian), ``calib_samples``.
    """

    name = "quantize_weights"
    numerics = Numerics.LOSSY
    reads = (LATENCY_TIMER,)
    options = {
        "bits": Option(int, 4, "code width: 4 or 8 (format=matmulnbits also 2; method=kmeans 2-8)",
                       interval="[2, 8]"),
        "block_size": Option(int, 32, "rows of K per scale (0 or -1: per output channel)", interval="[-1, inf)"),
        "symmetric": Option(bool, True, "signed codes, zero point 0 (false: unsigned codes with zero points)"),
        "method": Option(str, "rtn", "rtn (round to nearest), gptq (needs calibration) or kmeans (codebook)",
                         choices=("rtn", "gptq", "kmeans")),
        "format": Option(str, "dq", "dq (standard DequantizeLinear, opset 21) or matmulnbits (onnxruntime)",
                         choices=("dq", "matmulnbits")),
        "ops": Option(list, ["matmul"], "which constant weights: matmul (MatMul/Gemm), gather (embeddings) "
                                        "and/or conv (Conv/ConvTranspose; rtn, format=dq)"),
        "gather_block_size": Option(int, None, "block_size of embedding tables (default: block_size)",
                                    interval="[-1, inf)"),
        "gather_min_rows": Option(int, 1024, "ops=gather: tables with fewer rows (position, token-type "
                                             "embeddings) stay float", interval="[0, inf)"),
        "search": Option(bool, True, "search each block's range shrink for the least rounding error"),
        "damp": Option(float, gq.DEFAULT_DAMP, "gptq: relative Hessian damping", interval="(0, inf)"),
        "act_order": Option(bool, False, "gptq: round the most excited input rows first"),
        "accuracy_level": Option(int, 0, "matmulnbits: onnxruntime's accuracy_level (4: int8 activations)",
                                 interval="[0, 4]"),
        "prefer": Option(str, "speed", "speed: time the result here and keep float what runs slower; "
                                            "size: keep every quantized weight",
                         choices=("speed", "size")),
        "batch_size": Option(int, 8, "gptq/kmeans calibration batch size", interval="[1, inf)"),
        "fallback_bits": Option(int, 0, "bits of the layers whose error at bits exceeds max_error (0: none; "
                                        "more than bits)", interval="[0, 8]"),
        "max_error": Option(float, 0.05, "fallback_bits: a layer's largest relative error at bits (gptq: output "
                                         "error on the calibration Hessian; else weight error)", interval="(0, inf)"),
    }

    def check_options(self) -> None:
        o = self.opts
        bad = sorted(set(o["ops"]) - set(_OPS))
        if bad or not o["ops"]:
            raise InputError(f"pass {self.name}: ops={'|'.join(o['ops'])}: expected matmul, gather and/or conv")
        if "conv" in o["ops"] and o["method"] == "kmeans":
            raise InputError(f"pass {self.name}: ops=conv: method=rtn or gptq (kmeans: matmul and gather)")
        fb = o["fallback_bits"]
        if fb and (o["method"] == "kmeans" or fb <= o["bits"]
                   or fb not in ((4, 8) if o["format"] == "dq" else (2, 4, 8))):
            raise InputError(f"pass {self.name}: fallback_bits={fb}: must be more than bits={o['bits']} and a width of "
                             f"format={o['format']} (dq: 4 or 8; matmulnbits: 2, 4 or 8); not with method=kmeans")
        if o["method"] == "kmeans":
            if o["format"] != "dq":
                raise InputError(f"pass {self.name}: method=kmeans has its own form (codebook Gather); drop format=")
        elif o["format"] == "dq" and o["bits"] not in (4, 8):
            raise InputError(f"pass {self.name}: format=dq: bits must be 4 or 8 (DequantizeLinear's int4/int8 in "
                             "onnxruntime); 2 with format=matmulnbits, 2-8 with method=kmeans")
        elif o["format"] == "matmulnbits" and o["bits"] not in (2, 4, 8):
            raise InputError(f"pass {self.name}: format=matmulnbits: bits must be 2, 4 or 8")
        if "gather" in o["ops"] and o["method"] != "kmeans" and o["bits"] not in (4, 8):
            raise InputError(f"pass {self.name}: ops=gather: bits must be 4 or 8")
        for key in ("block_size", "gather_block_size"):
            b = o[key]
            if o["format"] == "matmulnbits" and o["method"] != "kmeans" and b is not None and b > 0 \
                    and (b < 16 or b & (b - 1)):
                raise InputError(f"pass {self.name}: format=matmulnbits: {key} must be a power of 2 >= 16 (or 0)")
        if o["format"] == "dq" or o["method"] == "kmeans":
            self.min_opset = 21  # type: ignore[misc]  # DequantizeLinear's block_size, int4/uint4 types

    def needs_calibration(self) -> bool:
        return self.opts["method"] == "gptq"

    # ------------------------------------------------------------------------------ candidates

    def _targets(self, graph: gs.Graph, result: PassResult) -> list[_Target]:
        outputs = {t.name for t in graph.outputs}
        ops = {"MatMul", "Gemm"} if "matmul" in self.opts["ops"] else set()
        if "gather" in self.opts["ops"]:
            ops.add("Gather")
        if "conv" in self.opts["ops"]:
            ops |= _CONV_OPS
        targets = []
        for node in graph.nodes:
            if node.op in ops and (node.domain or "") in ("", "ai.onnx"):
                t = self._candidate(node, outputs, result)
                if t is not None:
                    targets.append(t)
            elif (node.domain or "") not in ("", "ai.onnx") and has_float_weight(node):
                result.decline(node_label(node), "op_not_supported", f"{node.domain}.{node.op}")
        return targets

    def _candidate(self, node: gs.Node, outputs: set[str], result: PassResult) -> _Target | None:
        label = node_label(node)
        gather = node.op == "Gather"
        tensor = node.inputs[0] if gather else opt_input(node, 1)
        if gather and (node.attrs.get("axis", 0) != 0 or not isinstance(tensor, gs.Constant)
                       or isinstance(node.inputs[1], gs.Constant)):
            return None  # shape arithmetic, not an embedding lookup
        why = self._weight_problem(node, tensor, outputs)
        if why is not None:
            result.decline(label, *why)
            return None
        values = const_values(tensor)
        if node.op in _CONV_OPS:
            layout = conv_layout(node.op, values.shape, self.opts["block_size"])
            return _Target(node, node.op, tensor, layout.matrix(values), layout=layout)
        transposed = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
        w = values.T if gather or transposed else values
        return _Target(node, node.op, tensor, w, transposed)

    def _weight_problem(self, node: gs.Node, tensor: gs.Tensor | None, outputs: set[str]) -> tuple[str, str] | None:
        if tensor is None:
            return "weight_not_constant", "no weight input"
        if not isinstance(tensor, gs.Constant):
            if _quantized_source(tensor):
                return "already_quantized", f"{tensor.name} is computed from an integer constant"
            return "weight_not_constant", tensor.name
        if node.op != "Gather" and isinstance(node.inputs[0], gs.Constant):
            return "all_inputs_constant", ""
        values = const_values(tensor)
        if values is None or values.dtype != np.float32:
            return "unsupported_dtype", str(None if values is None else values.dtype)
        if values.ndim != 2 and not (node.op in _CONV_OPS and values.ndim >= 3):
            return "unsupported_shape", f"{tuple(values.shape)}"
        if len({id(n) for n in tensor.outputs}) > 1:
            return "weight_shared", f"{tensor.name} is read by {len(tensor.outputs)} nodes"
        if tensor.name in outputs:
            return "weight_is_graph_output", tensor.name
        return self._format_problem(node, values)

    def _format_problem(self, node: gs.Node, values: np.ndarray) -> tuple[str, str] | None:
        o = self.opts
        if node.op in _CONV_OPS and o["format"] != "dq":
            return "format_not_supported", f"{node.op}: format={o['format']} has no conv form (format=dq has)"
        if node.op == "Gather" and values.shape[0] < o["gather_min_rows"]:
            return "small_table", f"{values.shape[0]} rows < gather_min_rows={o['gather_min_rows']}"
        if node.op == "Gather" and o["method"] != "kmeans":
            d, block = values.shape[1], self._block(values.shape[1], gather=True)
            if (o["format"] == "matmulnbits" or o["bits"] == 4) and d % block:
                return "block_not_dividing", f"table width {d}, block {block}"
            if o["bits"] == 4 and d % 2:
                return "block_not_dividing", f"odd table width {d}"
            if o["format"] == "dq" and node.inputs[1].shape is None:
                return "unknown_rank", node.inputs[1].name
        if node.op == "Gemm" and o["format"] == "matmulnbits" and o["method"] != "kmeans":
            a = node.attrs
            c = opt_input(node, 2)
            cv = const_values(c) if c is not None else None
            n = values.shape[0] if a.get("transB", 0) else values.shape[1]
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or (c is not None and (
                    a.get("beta", 1.0) != 1.0 or cv is None or cv.size != n or cv.dtype != np.float32)):
                return "gemm_attributes", "MatMulNBits needs transA=0, alpha=beta=1 and a constant [N] bias"
        return None

    def _block(self, k: int, gather: bool = False) -> int:
        b = self.opts["block_size"]
        if gather and self.opts["gather_block_size"] is not None:
            b = self.opts["gather_block_size"]
        if self.opts["format"] == "matmulnbits":
            return _pow2_at_least(k) if b <= 0 else b
        return k if b <= 0 else b

    # ------------------------------------------------------------------------------ run

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Find the weights, quantize each (rtn, gptq or kmeans), emit the chosen form, time it."""
        result = PassResult()
        graph.toposort()
        targets = self._targets(graph, result)
        if not targets:
            return result
        hessians = self._hessians(graph, targets, ctx, result)
        snapshot = graph.copy() if self.opts["prefer"] == "speed" else None  # shares the arrays: no copy
        names = Names(graph)
        errors: list[float] = []
        edits: list[_Edit] = []
        for t in targets:
            h = hessians.get(_hessian_key(t)) if t.kind != "Gather" else None
            q, book, err = self._quantize(t, h, ctx, result)
            errors.append(err)
            edits.append(self._emit(graph, names, t, q, book))
            result.count(f"quantized_{t.kind}")
        result.stats.update(weight_error=round(float(np.mean(errors)), 6))
        for key in ("output_error_rtn", "output_error"):
            if key in result.stats:
                result.stats[key] = round(result.stats[key] / max(1, result.stats["gptq_layers"]), 6)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if snapshot is not None:
            edits = self._keep_fast(snapshot, graph, edits, ctx, result)
        result.stats.update(weight_bytes_before=int(sum(e.target.w.nbytes for e in edits)),
                            weight_bytes_after=int(sum(e.nbytes for e in edits)))
        result.modified = bool(edits)
        return result

    def _hessians(self, graph: gs.Graph, targets: list[_Target], ctx: PassContext,
                  result: PassResult) -> dict[str, np.ndarray]:
        method = self.opts["method"]
        if method == "rtn" or (method == "kmeans" and ctx.calib is None):
            return {}
        if ctx.calib is None:
            raise InputError(f"pass {self.name}: method={method} needs calibration data (--calib)")
        inputs = {_hessian_key(t): gq.HessianInput(_hessian_key(t), t.node.inputs[0].name, t.w.shape[0])
                  for t in targets if t.kind in ("MatMul", "Gemm")}
        for t in (t for t in targets if t.kind == "Conv" and method == "gptq" and t.node.attrs.get("group", 1) == 1):
            shape = t.weight.shape
            inputs[_hessian_key(t)] = gq.HessianInput(_hessian_key(t), t.node.inputs[0].name, int(np.prod(shape[1:])),
                                                      gq.conv_rows(t.node.attrs, tuple(shape[2:])))
        if not inputs:
            return {}
        hs, samples = gq.collect_hessians(serde.to_model(graph), [inputs[k] for k in sorted(inputs)], ctx.calib,
                                       batch_size=self.opts["batch_size"], progress=ctx.progress)
        if samples == 0:
            raise InputError(f"pass {self.name}: no calibration samples")
        result.stats["calib_samples"] = samples
        return hs

    def _quantize(self, t: _Target, h: np.ndarray | None, ctx: PassContext,
                  result: PassResult) -> tuple[BlockQuant | None, tuple[np.ndarray, np.ndarray] | None, float]:
        """``(block quantization or None, (codebook, indices) or None, relative weight error)``."""
        o = self.opts
        w = t.w
        norm = float(np.linalg.norm(w)) or 1.0
        if o["method"] == "kmeans":
            weights = None if h is None else np.diag(h)[:, None]
            book, idx = kmeans_codebook(w, o["bits"], weights=weights, seed=ctx.seed)
            return None, (book, idx), float(np.linalg.norm(book[idx] - w)) / norm
        q, err = self._round(t, h, o["bits"], result)
        if o["fallback_bits"] and err > o["max_error"]:
            q, err_fb = self._round(t, h, o["fallback_bits"], None)
            result.count("fallback_layers")
            result.stats.setdefault("fallback", []).append(f"{node_label(t.node)}: {err:.4f} -> {err_fb:.4f}")
        return q, None, float(np.linalg.norm(q.dequantize() - w)) / norm

    def _round(self, t: _Target, h: np.ndarray | None, bits: int,
               result: PassResult | None) -> tuple[BlockQuant, float]:
        """``t`` at ``bits`` (GPTQ given a Hessian, else rtn) and its relative output (else weight) error."""
        o = self.opts
        w = t.w
        block = (t.layout.block or w.shape[0]) if t.layout else self._block(w.shape[0], gather=t.kind == "Gather")
        base = rtn(w, bits, block, o["symmetric"], o["search"])
        if o["method"] != "gptq" or h is None:
            return base, float(np.linalg.norm(base.dequantize() - w)) / (float(np.linalg.norm(w)) or 1.0)
        if t.layout is not None:
            q = gq.gptq_conv(const_values(t.weight), h, t.layout, bits, o["symmetric"], damp=o["damp"],
                          act_order=o["act_order"], search=o["search"])
            w_im = gq.im2col_matrix(const_values(t.weight))
            err_rtn, err = (gq.output_error(h, w_im, gq.im2col_matrix(t.layout.tensor(x.dequantize())))
                            for x in (base, q))
        else:
            q = gq.gptq(w, h, bits, block, o["symmetric"], damp=o["damp"], act_order=o["act_order"], search=o["search"])
            err_rtn, err = gq.output_error(h, w, base.dequantize()), gq.output_error(h, w, q.dequantize())
        for key, value in (("gptq_layers", 1), ("output_error_rtn", err_rtn), ("output_error", err)):
            if result is not None:
                result.count(key, value)
        return q, err

    def _emit(self, graph: gs.Graph, names: Names, t: _Target, q: BlockQuant | None,
              book: tuple[np.ndarray, np.ndarray] | None) -> _Edit:
        """Rewrite ``t``'s node; returns the edit (with the bytes of the new constants)."""
        node, base = t.node, t.weight.name
        edit = _Edit(t, list(node.inputs), list(node.outputs), [], 0, q)
        index = 0 if t.kind == "Gather" else 1
        if book is not None:
            nodes, out = codebook_weight(names, book[0], book[1], self.opts["bits"], base,
                                         transposed=t.transposed or t.kind == "Gather")
            node.inputs[index] = out
        elif t.layout is not None:
            dq, out = dq_conv_weight(names, q, t.layout, base)
            nodes = [dq]
            node.inputs[1] = out
        elif t.kind == "Gather":
            ids, out = node.inputs[1], node.outputs[0]
            rank = len(ids.shape) if ids.shape is not None else 0
            nodes = gather_rows(names, q, base, ids, out, rank, contrib=self.opts["format"] == "matmulnbits")
            node.inputs.clear()
            node.outputs.clear()
        elif self.opts["format"] == "matmulnbits":
            bias = opt_input(node, 2) if t.kind == "Gemm" else None
            if bias is not None:
                bias = gs.Constant(names.fresh(f"{bias.name}_bias"), np.ascontiguousarray(const_values(bias).reshape(-1)))
            nodes = [matmulnbits_node(names, q, base, node.inputs[0], node.outputs[0], bias, self.opts["accuracy_level"])]
            node.inputs.clear()
            node.outputs.clear()
        else:
            dq, out = dq_weight(names, q, base, transposed=t.transposed)
            nodes = [dq]
            node.inputs[index] = out
        graph.nodes.extend(nodes)
        edit.nodes, edit.nbytes = nodes, _new_bytes(nodes)
        return edit

    @staticmethod
    def _revert(graph: gs.Graph, edit: _Edit) -> None:
        """Put ``edit``'s node back as it was (its new nodes disconnected; cleanup drops them)."""
        for n in edit.nodes:
            n.inputs.clear()
            n.outputs.clear()
        node = edit.target.node
        node.inputs.clear()
        node.outputs.clear()
        node.inputs.extend(edit.inputs)
        node.outputs.extend(edit.outputs)
        if all(n is not node for n in graph.nodes):
            graph.nodes.append(node)

    # ------------------------------------------------------------------------------ latency

    def _keep_fast(self, snapshot: gs.Graph, graph: gs.Graph, edits: list[_Edit], ctx: PassContext,
                   result: PassResult) -> list[_Edit]:
        """``prefer=speed``: undo what runs slower than float on this machine; returns the edits kept.

        The whole model is timed first (quantized vs ``snapshot``, the float graph). Within
        :data:`SLOWER` of float: everything stays. Slower, or not runnable on the timing inputs:
        each distinct layer shape is timed alone and the layers slower than float are reverted
        (``slower_than_float``, detail ``layer 1.31× float``); if the model was timed, it is timed
        again and, still slower, every remaining layer is reverted (detail ``model 1.08× float``).
        """
        timer = ctx.get(LATENCY_TIMER)
        ratio = self._model_ratio(snapshot, graph, ctx, timer)
        if ratio is not None:
            result.stats.update(latency_ratio=round(ratio, 3), latency_scope="model", latency_slower=int(ratio > SLOWER))
            if ratio <= SLOWER:
                return edits
        layers = self._layer_ratios(graph, edits, ctx, timer)
        if ratio is None:
            values = list(layers.values())
            result.stats.update(latency_scope="layers", latency_slower=sum(r > SLOWER for r in values))
            if values:
                result.stats["latency_ratio"] = round(float(np.median(values)), 3)
        slow = [e for e in edits if layers.get(id(e), 0.0) > SLOWER]
        kept = self._undo(graph, edits, slow, lambda e: f"layer {layers[id(e)]:.2f}× float", ctx, result)
        if ratio is None or not kept:
            return kept
        after = self._model_ratio(snapshot, graph, ctx, timer) if slow else ratio
        if after is not None and after <= SLOWER:
            result.stats["latency_ratio_kept"] = round(after, 3)
            return kept
        detail = f"model {after if after is not None else ratio:.2f}× float"
        return self._undo(graph, kept, kept, lambda e: detail, ctx, result)

    def _undo(self, graph: gs.Graph, edits: list[_Edit], slow: list[_Edit], detail: Callable[[_Edit], str],
              ctx: PassContext, result: PassResult) -> list[_Edit]:
        """Revert ``slow`` (declined ``slower_than_float``); returns the other edits."""
        if not slow:
            return edits
        gone = {id(e) for e in slow}
        for e in slow:
            self._revert(graph, e)
            result.decline(node_label(e.target.node), R_SLOWER, detail(e))
            result.count(f"quantized_{e.target.kind}", -1)
            result.count("latency_reverted")
        for key in [k for k, v in result.stats.items() if k.startswith("quantized_") and v == 0]:
            del result.stats[key]
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        ctx.logger.warning("quantize_weights: %d of %d quantized weights run slower than float here (format=%s, "
                           "bits=%d, e.g. %s): kept float; prefer=size keeps them quantized", len(slow), len(edits),
                           self.opts["format"], self.opts["bits"], detail(slow[0]))
        return [e for e in edits if id(e) not in gone]

    def _model_ratio(self, snapshot: gs.Graph, graph: gs.Graph, ctx: PassContext, timer) -> float | None:
        """Quantized / float time of the whole model (one sample of the calibration data, else seeded
        random inputs); None when the models cannot run on those inputs (e.g. random token ids)."""
        timer = timer or (lambda pair: measure_ratio(pair, rounds=60))
        snapshot.producer_name, snapshot.producer_version = graph.producer_name, graph.producer_version
        float_model = serde.to_model(snapshot)
        try:
            dims = {n: v for n, v in ctx.dims.values.items() if n not in ctx.dims.batch} if ctx.dims else None
            feeds = bench_inputs(float_model, data=ctx.calib, dims=dims, seed=ctx.seed)
            return float(timer(LayerPair(float_model, serde.to_model(graph), feeds, feeds)))
        except Exception as exc:  # e.g. random token ids out of an embedding's range
            log.info("quantize_weights: whole-model timing failed (%s); timing the layers alone", exc)
            return None

    def _layer_ratios(self, graph: gs.Graph, edits: list[_Edit], ctx: PassContext, timer) -> dict[int, float]:
        """``{id(edit): quantized / float time}`` of each MatMul/Gemm edit, one timing per distinct
        shape, the layer alone (an isolated float weight stays in cache: this overstates the cost)."""
        timer = timer or (lambda pair: measure_ratio(pair, rounds=20))
        shapes = concrete_shapes(serde.to_model(graph), ctx.dims)
        by_shape: dict[tuple, float | None] = {}
        out = {}
        for e in edits:
            t = e.target
            if t.kind not in ("MatMul", "Gemm") or e.quant is None:
                continue
            a = shapes.get(e.inputs[0].name)
            rows = int(np.prod(a[:-1])) if a is not None and len(a) >= 2 else DEFAULT_ROWS
            key = (t.kind, t.w.shape, t.transposed, rows)
            if key not in by_shape:
                try:
                    by_shape[key] = float(timer(self._layer_pair(t, e.quant, rows, ctx.seed)))
                except Exception as exc:  # a timing failure must not fail the pass
                    log.debug("latency of %s not measured: %s", t.kind, exc)
                    by_shape[key] = None
            if by_shape[key] is not None:
                out[id(e)] = by_shape[key]
        return out

    def _layer_pair(self, t: _Target, q: BlockQuant, rows: int, seed: int) -> LayerPair:
        """One-layer float and quantized models of ``t`` (``[rows, K]`` input)."""
        k = t.w.shape[0]
        opset = 21 if self.min_opset == 21 else 17
        models = []
        for quantized in (False, True):
            x = gs.Variable("x", np.float32, [rows, k])
            y = gs.Variable("y", np.float32, [rows, t.w.shape[1]])
            w = gs.Constant("w", np.ascontiguousarray(t.w))
            node = gs.Node("MatMul", "mm", {}, [x, w], [y])
            g = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=opset)
            if quantized:
                self._emit(g, Names(g), _Target(node, "MatMul", w, t.w), q, None)
                g.cleanup().toposort()
            models.append(serde.to_model(g))
        feeds = {"x": np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)}
        return LayerPair(models[0], models[1], feeds, feeds)


def _hessian_key(t: _Target) -> str:
    """``t``'s Hessian key: a MatMul/Gemm's input (shared by its readers), else the conv's own weight."""
    return f"{t.weight.name}@conv" if t.layout is not None else t.node.inputs[0].name


def _new_bytes(nodes: list[gs.Node]) -> int:
    """Bytes of the constants ``nodes`` read (sub-byte codes counted packed)."""
    total = 0
    for node in nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                v = const_values(t)
                n = 0 if v is None else v.nbytes
                if v is not None and v.dtype.itemsize == 1 and v.dtype.kind not in "iub":
                    n = math.ceil(v.size / 2)  # int4/uint4 (ml_dtypes): two per byte in the file
                total += n
    return total
