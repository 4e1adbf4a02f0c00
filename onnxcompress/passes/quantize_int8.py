"""Static int8 quantization in QDQ format, calibrated on data, placed for onnxruntime's CPU fusions."""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from .. import serde
from ..errors import InputError
from ..manager import Numerics, Option, Pass, PassContext, PassResult, register
from ..quant.calibrate import Calibration, collect_statistics
from ..quant.cpu import cpu_flags, has_vnni
from ..quant.observers import DEFAULT_BINS, METHODS, compute_range
from ..quant.params import QParams, activation_params
from ..quant.qdq import DECLINE_REASONS, R_DEGENERATE, Plan, QuantConfig, apply_plan, plan_placement

__all__ = ["QuantizeInt8", "CPU_FLAGS_KEY", "DECLINE_REASONS", "NO_CALIB_MESSAGE"]

log = logging.getLogger(__name__)

#: ``ctx.extra`` key: a set of CPU flags to use instead of reading ``/proc/cpuinfo``.
CPU_FLAGS_KEY = "quantize_int8.cpu_flags"
NO_CALIB_MESSAGE = "quantize_int8 needs --calib (or weights_only=true)"


@register
class QuantizeInt8(Pass):
    """Static int8 quantization (QDQ): int8 per-channel weights, calibrated uint8 activations.

    Before: ``y = Relu(Conv(x, W, b))``
    After:  ``y = DQ(Q(Relu(Conv(DQ(Q(x)), DQ(W_q), DQ(b_q)))))``, which onnxruntime's CPU
    provider turns into one ``QLinearConv`` (the Relu disappears into the output zero point).

    Math:
        Activations (asymmetric, default): ``s = (hi - lo) / 255``, ``z = round(-lo / s)`` over
        the calibrated range widened to contain 0; ``symmetric_activations``: int8,
        ``s = max(|lo|, |hi|) / 127``, ``z = 0`` (one-sided Relu outputs: ``s = hi / 255``,
        ``z = -128``). Weights: int8, ``s_c = max|W_c| / 127`` per output channel (``reduce_range``:
        ``/ 64``), ``z = 0``. Bias: int32, ``b_q = round(b / (s_in * s_w,c))``, zero point 0.
        The range ``[lo, hi]`` comes from ``method`` (see :mod:`onnxcompress.quant.observers`):
        ``minmax``, ``percentile`` (``percentile`` option), ``entropy`` (KL, TensorRT's rule) or
        ``mse`` (the default: the best or near-best SQNR on the fixture models, see
        ``scripts/bench_quant.py``; ``entropy`` clips Relu/Relu6 outputs hard and loses 10-25 dB
        there); all read the same streamed histograms, so the ``cache`` file serves them all. A
        Concat's output range is the union of its inputs' ranges (it only copies their values);
        a folded Clip clamps the range to its bounds.

    Placement (see :mod:`onnxcompress.quant.qdq`): Q/DQ around Conv, Gemm, MatMul (constant
    weights), Add, Mul, Concat, AveragePool, GlobalAveragePool; a Relu/Clip that alone follows
    one of them is folded (its output range, no Q/DQ in between); MaxPool, Resize, Reshape,
    Flatten, Transpose, Squeeze, Unsqueeze, Split reuse their input's Q parameters when their
    input is quantized anyway; ConvTranspose gets an int8 weight only (no integer kernel on the CPU
    provider). :func:`onnxcompress.quant.fusion.count_unfused_qdq` checks the result against
    onnxruntime's optimized graph.

    ``symmetric_activations`` targets execution providers that need zero point 0. On the x86 CPU
    provider (onnxruntime 1.32) int8 activations fuse in simple chains but a quantized tensor read
    by several nodes keeps its Q/DQ and the nodes around it run in float: uint8 (the default) is
    the format to use there.

    ``weights_only``: every Conv/ConvTranspose/Gemm/MatMul weight becomes int8 (per channel)
    behind a DequantizeLinear; computation and activations stay float, biases stay float. No
    calibration data needed; the file shrinks about 4x with the smallest error. onnxruntime does
    not constant-fold those DequantizeLinear nodes, so they run on every inference (1.3-2.4x the
    float latency on the fixture models): a format for size, not speed.

    Fires when:
        The node's op is in the table above, its data inputs and output are float32, it is not
        in ``exclude`` (node names or op types), and (Conv/Gemm/MatMul/ConvTranspose) its weight
        is a constant of the expected rank (Conv/Gemm bias: a constant broadcasting only along
        the output channels).

    Declines:
        ``excluded by option``; ``weight not constant``; ``bias not constant or not
        per-channel``; ``unsupported dtype`` (non-float32 data, unknown types); ``unsupported
        layout``; ``all inputs constant``. Tensors whose calibrated range is empty
        (``min == max``) are still quantized, with scale 1, and listed as ``degenerate range``.

    CPU note:
        On x86 CPUs without VNNI (``avx512_vnni``/``avx_vnni`` absent from ``/proc/cpuinfo``),
        onnxruntime's u8s8 kernels sum pairs of products in 16 bits, which can saturate with
        8-bit weights; onnxruntime then converts weights outside ``[-64, 64]`` to uint8 and uses
        the slower u8u8 path. Without ``reduce_range`` the pass logs a warning and records
        ``vnni: false`` in its stats, but keeps the 8-bit default (better accuracy, and
        onnxruntime stays correct): switching silently would make results depend on the
        machine the model was converted on. ``reduce_range=true`` gives 7-bit weights that
        never saturate. The pass reads ``/proc/cpuinfo`` for this (the one thing it reads from
        the machine); ``ctx.extra["quantize_int8.cpu_flags"]`` overrides it.

    Stats:
        ``quantized_<Op>`` per op type, ``relu_folded``, ``clip_folded``, ``tensors_calibrated``,
        ``calib_samples``, ``cache_tensors`` (tensors read from the cache), ``q_inserted``,
        ``dq_inserted``, ``weights_int8``, ``weights_shared``, ``bias_int32``,
        ``constants_quantized``, ``excluded``, ``degenerate_ranges``, ``vnni``.
    """

    name = "quantize_int8"
    numerics = Numerics.LOSSY
    min_opset = 13
    options = {
        "method": Option(str, "mse", "calibration method", choices=METHODS),
        "percentile": Option(float, 99.99, "kept percentile for method=percentile"),
        "per_channel": Option(bool, True, "per-output-channel weight scales"),
        "symmetric_activations": Option(bool, False, "int8 activations with zero point 0 (default uint8 asymmetric)"),
        "reduce_range": Option(bool, False, "7-bit weights (no u8s8 saturation on CPUs without VNNI)"),
        "exclude": Option(list, [], "node names or op types kept float"),
        "weights_only": Option(bool, False, "int8 weights only, float compute; no calibration"),
        "cache": Option(str, "", "calibration cache file (.npz): reused across methods"),
        "batch_size": Option(int, 32, "calibration batch size"),
    }

    def _config(self) -> QuantConfig:
        o = self.opts
        return QuantConfig(per_channel=o["per_channel"], symmetric_activations=o["symmetric_activations"],
                           reduce_range=o["reduce_range"], exclude=tuple(o["exclude"]),
                           weights_only=o["weights_only"])

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Plan the placement, calibrate the activations it needs, insert Q/DQ nodes."""
        cfg = self._config()
        if not cfg.weights_only and ctx.calib is None:
            raise InputError(NO_CALIB_MESSAGE)
        if not 0 < self.opts["percentile"] <= 100:
            raise InputError(f"quantize_int8: percentile must be in (0, 100], got {self.opts['percentile']}")
        if self.opts["batch_size"] < 1:
            raise InputError("quantize_int8: batch_size must be >= 1")
        result = PassResult()
        if not cfg.weights_only:
            self._cpu_note(ctx, cfg, result)
        graph.toposort()
        plan = plan_placement(graph, cfg, result, ctx.logger)
        if not plan.groups:
            return result
        params: dict[str, QParams] = {}
        if not cfg.weights_only:
            calib = self._calibrate(graph, plan, ctx, result)
            params = self._params(plan, calib, cfg, result, ctx)
        apply_plan(graph, plan, params, cfg, result)
        result.modified = True
        return result

    def _cpu_note(self, ctx: PassContext, cfg: QuantConfig, result: PassResult) -> None:
        flags = ctx.extra.get(CPU_FLAGS_KEY)
        vnni = has_vnni(set(flags) if flags is not None else cpu_flags())
        if vnni is None:
            return
        result.stats["vnni"] = vnni
        if not vnni and not cfg.reduce_range:
            ctx.logger.warning(
                "quantize_int8: this CPU has no VNNI (avx512_vnni/avx_vnni): onnxruntime's u8s8 int8 kernels can "
                "saturate 16-bit sums, so it runs 8-bit weights on its slower u8u8 path; reduce_range=true "
                "(7-bit weights) avoids both")

    def _calibrate(self, graph: gs.Graph, plan: Plan, ctx: PassContext, result: PassResult) -> Calibration:
        model = serde.to_model(graph)
        names = plan.calibrated()
        calib = collect_statistics(model, names, ctx.calib, batch_size=self.opts["batch_size"], bins=DEFAULT_BINS,
                                   cache=self.opts["cache"] or None, progress=ctx.progress)
        result.stats["tensors_calibrated"] = len(names)
        result.stats["calib_samples"] = calib.samples
        result.stats["cache_tensors"] = len(calib.cached)
        return calib

    def _params(self, plan: Plan, calib: Calibration, cfg: QuantConfig, result: PassResult,
                ctx: PassContext) -> dict[str, QParams]:
        """Scale and zero point of every calibrated tensor from its range."""
        ranges = {name: self._range(plan, calib, cfg, name) for name in plan.calibrated()}
        for group in plan.groups:  # a Concat output holds its inputs' values: cover them all
            out = group.output.name
            inputs = [ranges[t.name] for t in group.node.inputs if t.name in ranges]
            if group.kind == "variadic" and group.act is None and out in ranges and inputs:
                ranges[out] = (min(r[0] for r in inputs), max(r[1] for r in inputs))
        params = {}
        for name, (lo, hi) in ranges.items():
            p = activation_params(lo, hi, symmetric=cfg.symmetric_activations, one_sided=name in plan.one_sided)
            if p.degenerate:
                result.decline(name, R_DEGENERATE, ctx.logger)
                result.count("degenerate_ranges")
            params[name] = p
        return params

    def _range(self, plan: Plan, calib: Calibration, cfg: QuantConfig, name: str) -> tuple[float, float]:
        one_sided = name in plan.one_sided
        lo, hi = compute_range(calib.collectors[name], self.opts["method"], percentile=self.opts["percentile"],
                               symmetric=cfg.symmetric_activations and not one_sided)
        if name in plan.bounds:
            b_lo, b_hi = plan.bounds[name]
            lo, hi = max(lo, b_lo), min(hi, b_hi)
        return lo, hi
