"""Static int8 quantization in QDQ format, calibrated on data, placed for onnxruntime's CPU fusions."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.graph import check_names
from onnxcompress.core.pass_api import FLOAT_REFERENCE, Numerics, Option, Pass, PassContext, PassResult, Slot, register
from onnxcompress.quant.bias_correction import FLOAT_STATISTICS, FloatStatistics
from onnxcompress.quant.calibrate import Calibration, collect_statistics
from onnxcompress.quant.cpu import cpu_flags, has_vnni
from onnxcompress.quant.dynamic import quantize_dynamic_graph
from onnxcompress.quant.float_pools import with_float_pools
from onnxcompress.quant.histogram import DEFAULT_BINS, SAMPLE_BLOCK
from onnxcompress.quant.latency import island_layers, model_ratios, time_layers
from onnxcompress.quant.observers import METHODS
from onnxcompress.quant.options import REDUCE_RANGE_CHOICES, QuantConfig
from onnxcompress.quant.params import QParams
from onnxcompress.quant.placement import R_EXCLUDED, QdqPlan, plan_placement
from onnxcompress.quant.rewrite import apply_plan
from onnxcompress.quant.sensitivity import Evaluator, Fidelity, Quantizer, measured_tensors, plan_params, rank_layers
from onnxcompress.runtime.data import CalibSource, SplitSource

__all__ = [
    "CPU_FLAGS",
    "LATENCY_TIMER",
    "LATENCY_TIMINGS",
    "MODEL_TIMER",
    "R_ISLAND",
    "R_MODEL_SLOWER",
    "R_SENSITIVITY",
    "R_SLOWER",
    "AUTO_METHOD",
    "QuantizeInt8",
]

log = logging.getLogger(__name__)

#: Context slot (given by the caller): CPU flags to use instead of reading ``/proc/cpuinfo``.
CPU_FLAGS = Slot("quantize_int8_cpu_flags", (set, frozenset), "the CPU flags override",
                 "CPU flags used instead of /proc/cpuinfo's")
#: Context slot (given by the caller): ``timer(layer, float_model, int8_model, feeds) -> t_int8 / t_float``
#: replacing the onnxruntime measurement of ``latency_aware`` (see :mod:`onnxcompress.quant.latency`).
LATENCY_TIMER = Slot("quantize_int8_latency_timer", Callable, "the per-layer latency timer",
                     "replaces latency_aware's per-layer timings")
#: Context slot (given by the caller): ``model_timer(models) -> ratios vs models[0]`` replacing the
#: whole-model check.
MODEL_TIMER = Slot("quantize_int8_model_timer", Callable, "the whole-model latency timer",
                   "replaces latency_check's whole-model timings")
#: Context slot written with ``latency_aware``: the per-layer timings (:class:`~onnxcompress.quant.latency.LayerTiming`).
LATENCY_TIMINGS = Slot("quantize_int8_latency_timings", list, "the per-layer latency timings",
                       "latency_aware's measurements, for benchmarks")
R_SENSITIVITY = "kept_float_sensitivity"
R_ISLAND = "kept_float_int8_island"
R_SLOWER = "kept_float_int8_slower"
R_MODEL_SLOWER = "kept_float_int8_model_slower"
#: ``method`` value that picks the range rule on the calibration data (see the pass docstring).
AUTO_METHOD = "auto"
#: The rules ``auto`` tries, the default first (it wins ties).
_AUTO_ORDER = ("mse", *(m for m in METHODS if m != "mse"))


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
        there); all read the same streamed histograms, so the ``cache`` file serves them all. ``auto`` builds the model
        with each of them (one calibration) and keeps the one whose worst output or channel slice
        has the highest SQNR against the float model on the calibration data (ties: ``mse``,
        then ``minmax``, ``percentile``, ``entropy``); stats ``method_chosen`` and ``method_sqnr`` (dB per method; the
        ``exclude_spec`` of mixed precision then goes with ``method=<method_chosen>``). A
        detector needs it more than a classifier: clipping the largest activations lowers exactly
        the anchors that hold objects (nudenet's YOLOv8n: where the float score is above 0.1 the
        class logits come out 0.32 low on average with ``mse``, 0.15 with ``minmax``, which
        ``auto`` chose); see README "Detector-grade int8". A
        Concat's output range is the union of its inputs' ranges (it only copies their values;
        its own statistics are not gathered); a folded Clip clamps the range to its bounds.
        Tensors whose range is their min/max (every tensor with ``minmax``, a SiLU output with
        any method) are calibrated without histograms (min/max only: the same ranges, without
        binning, which is most of the calibration's cost), except with ``cache``, which keeps
        full histograms for runs with other methods.

    Placement (see :mod:`onnxcompress.quant.placement`): Q/DQ around Conv, Gemm, MatMul (constant
    weights), Add, Mul, Concat, AveragePool, GlobalAveragePool; a Relu/Clip that alone follows
    one of them is folded (its output range, no Q/DQ in between); MaxPool, Resize, Reshape,
    Flatten, Transpose, Squeeze, Unsqueeze, Split reuse their input's Q parameters when their
    input is quantized anyway; ConvTranspose gets an int8 weight only (no integer kernel on the CPU
    provider). :func:`onnxcompress.quant.fusion.count_unfused_qdq` checks the result against
    onnxruntime's optimized graph.

    ``symmetric_activations`` targets execution providers that need zero point 0. onnxruntime's
    x86 CPU provider (1.32) fuses int8 activations only where a Q has a single reader, so a
    quantized tensor read by several nodes is stored as uint8 with zero point ``z + 128`` (the
    same values, bit for bit): with this option such tensors do not have zero point 0.

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

    Declines (codes, from :data:`onnxcompress.quant.placement.DECLINE_REASONS`):
        ``excluded_by_option``; ``weight_not_constant``; ``bias_not_per_channel`` (not constant
        or not per-channel); ``unsupported_dtype`` (non-float32 data, unknown types);
        ``unsupported_layout``; ``all_inputs_constant``; ``already_quantized``;
        ``concat_only_feeds_output``, ``static_input`` (computed from shapes and constants only),
        ``no_quantized_neighbour`` (kept float); ``op_not_supported`` (a node with float weights
        this quantizer has no form for, e.g. ``com.microsoft.Attention``: detail the op). Tensors whose calibrated range is empty
        (``min == max``) are still quantized, with scale 1, and listed as ``degenerate_range``.

    CPU note:
        On x86 CPUs without VNNI (``avx512_vnni``/``avx_vnni``/``amx_int8`` absent from
        ``/proc/cpuinfo``), onnxruntime's u8s8 kernels (QLinearConv, MatMulInteger, with or
        without its graph optimizations) add pairs of uint8 x int8 products in 16 bits, which
        8-bit weights saturate: on an AMD EPYC (AVX2, no VNNI) the ResNet fixture's static int8
        model scores 98.9 % as fake-quant and 93.3 % as onnxruntime runs it; a dynamic-int8
        encoder's cosine falls from 0.9997 to 0.987. ``reduce_range=auto`` (the default) gives
        7-bit weights (``[-64, 64]``, which cannot saturate) on such a CPU and 8-bit ones on a
        VNNI CPU; ``true``/``false`` force either. The stats record ``vnni`` and the
        ``reduce_range`` used, and a model made with 8-bit weights on a VNNI machine logs that it
        should not be deployed on AVX2-only CPUs. The pass reads ``/proc/cpuinfo`` for this (the
        one thing it reads from the machine); the context slot :data:`CPU_FLAGS` overrides it,
        so the same input, options and flags give the same bytes on any machine.

    ``dynamic`` (see :mod:`onnxcompress.quant.dynamic`): for transformers. Every MatMul/Gemm with
    a constant 2-D weight becomes ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_s * W_s)``
    (``+ bias``), which onnxruntime fuses into ``DynamicQuantizeMatMul``: the activation's uint8
    scale and zero point are taken from each input at run time, so no calibration is needed;
    weights int8 per output column. LayerNorm, Softmax, GELU and the attention-score MatMuls (both
    operands activations) stay float. Combines with ``exclude`` and the mixed-precision targets
    (layers are the MatMul/Gemm nodes; calibration data is then needed to check the target) and
    ``latency_aware`` (each MatMul/Gemm timed float vs its dynamic int8 form, the activation's
    run-time quantization included; no calibration needed), not with ``weights_only``,
    ``symmetric_activations`` or ``cache``; ``method`` and ``percentile`` do not apply. On paraphrase-MiniLM-L3, run ``smooth`` first (recipe
    ``int8-dynamic``).

    Mixed precision (``max_drop`` / ``min_cosine`` / ``min_sqnr``):
        Quantize everything, compare with the float model on the calibration data (onnxruntime,
        optimizations off, one thread). While the target fails, the most sensitive remaining
        layer goes back to float — layers ranked once, as ``onnxcompress sensitivity`` does:
        each quantized alone, lowest output SQNR first — until the target holds (or every layer
        is float, which is logged as a warning). ``max_drop`` is the accuracy drop in points
        when the data has labels, else the top-1 disagreement with the float model in points
        (stat ``mixed_bound`` says which); it needs a classifier output ``[N, C]``.
        ``min_cosine`` is the lowest cosine and ``min_sqnr`` the lowest SQNR (dB) over the outputs
        *and their channel slices* (see :mod:`onnxcompress.runtime.fidelity`: automatic slices
        fixed once from the float outputs, or the ``--slices`` given to validation), so a
        detector's class-score rows are judged on their own, not drowned by its box rows; stat
        ``mixed_worst`` names the output or slice that was worst at the end. Calibration runs once (histograms of every
        tensor any variant needs); the choice is deterministic. The target is checked on the
        calibration data; validate on held-out data (``--data``). Each layer kept float is
        declined with ``kept_float_sensitivity``.

        ``holdout=F`` (also for ``method=auto``) splits the calibration samples without
        randomness: sample ``i`` is held out when ``floor((i+1)F) > floor(iF)`` (every ``1/F``-th,
        ``floor(nF)`` of ``n``); ranges are calibrated on the others, and the ranking, the target and
        ``auto``'s choice are judged on the held-out ones only (stat ``holdout_samples``).
        Judged on the samples it was calibrated on, a choice sees no clipping beyond the
        calibrated ranges and too little rounding noise, and stops too early: on nudenet's
        YOLOv8n a ``min_sqnr=20`` choice made on 32 calibration views held 20.1 dB there and
        14.35 dB on 140 other crops. The split also makes the ranking cheaper (it runs on the
        held-out part), but a share of a few dozen samples judges noisily when the metric rests on
        a few boxes (there: 18.3 dB held-out for 21.3 dB on 30 held-out calibration samples).
        See README "Detector-grade int8".

    ``latency_aware`` (see :mod:`onnxcompress.quant.latency`):
        Each compute layer is timed alone on this machine, int8 kernel vs float (onnxruntime
        optimizations on, one thread, interleaved rounds, median of paired ratios); a layer
        whose int8 form is more than ``latency_margin`` slower stays float (declined with
        ``kept_float_int8_slower``, detail ``1.23×``), and Add/Concat/pooling layers left without
        a quantized compute neighbour follow (``kept_float_int8_island``). With
        ``latency_check`` (default) float, all-int8 and that choice are then timed as whole
        models and the fastest is kept (stats ``latency_ratio_int8``, ``latency_ratio_mixed``,
        ``latency_choice``; if every int8 variant is slower than float, every layer stays float:
        ``kept_float_int8_model_slower``).
        **The output depends on timings, hence on the machine and its load**: the stat
        ``exclude_spec`` (also logged) is an ``exclude=`` option that reproduces the decision
        deterministically with ``latency_aware`` off. Runs before the mixed-precision step
        when both are on. The context slots :data:`LATENCY_TIMER` and :data:`MODEL_TIMER` replace
        the measurements (tests); the timings are left in :data:`LATENCY_TIMINGS`.

    Context:
        Needs calibration data unless ``weights_only`` or ``dynamic`` (without a mixed-precision
        target). Writes the float model it quantized to
        :data:`~onnxcompress.core.pass_api.FLOAT_REFERENCE` (``bias_correction``'s reference).

    Stats:
        ``quantized_<Op>`` per op type, ``relu_folded``, ``clip_folded``, ``tensors_calibrated``,
        ``calib_samples``, ``cache_tensors`` (tensors read from the cache), ``q_inserted``,
        ``dq_inserted``, ``weights_int8``, ``weights_shared``, ``bias_int32``,
        ``constants_quantized``, ``excluded``, ``degenerate_ranges``, ``vnni``; with ``dynamic``
        ``dynamic_quantize_inserted`` and ``bias_float`` instead of the Q/DQ and bias counters; with mixed
        precision ``fallback_layers``, ``mixed_cosine``, ``mixed_drop``, ``mixed_bound``; with
        ``latency_aware`` ``latency_measured``, ``latency_kept_float`` and the model-check
        stats above; with either, ``exclude_spec``.
    """

    name = "quantize_int8"
    numerics = Numerics.LOSSY
    min_opset = 13
    options = {
        "method": Option(str, "mse", "calibration method (auto: the one with the best worst-slice SQNR on the "
                                     "calibration data)", choices=(*METHODS, AUTO_METHOD)),
        "percentile": Option(float, 99.99, "kept percentile for method=percentile", interval="(0, 100]"),
        "per_channel": Option(bool, True, "per-output-channel weight scales"),
        "symmetric_activations": Option(bool, False, "int8 activations with zero point 0 (default uint8 asymmetric)"),
        "reduce_range": Option(str, "auto", "7-bit weights (no u8s8 saturation on CPUs without VNNI); auto: "
                                            "on this CPU exactly when it lacks VNNI", choices=REDUCE_RANGE_CHOICES),
        "exclude": Option(list, [], "node names or op types kept float"),
        "float_pools": Option(bool, False, "a layer kept float whose Relu/Clip output goes through a MaxPool: pool "
                                           "before the activation (exact), so onnxruntime keeps the pooling float "
                                           "instead of running it on uint8 in NCHW layout"),
        "share_concat_scales": Option(bool, False, "a Concat input read by nothing else is quantized with the "
                                                   "Concat output's scale and zero point (one rounding, not two; "
                                                   "onnxruntime's QLinearConcat then copies it)"),
        "weights_only": Option(bool, False, "int8 weights only, float compute; no calibration"),
        "dynamic": Option(bool, False, "MatMul/Gemm with activations quantized at run time "
                                       "(DynamicQuantizeLinear + MatMulInteger); no calibration"),
        "cache": Option(str, "", "calibration cache file (.npz): reused across methods"),
        "batch_size": Option(int, 32, "calibration batch size", interval="[1, inf)"),
        "hist_sample": Option(int, 0, "bin at most about this many values of each tensor per calibration run "
                              "(min/max stay exact; faster, approximate ranges); 0: every value", interval="[0, inf)"),
        "max_drop": Option(float, None, "mixed precision: max accuracy drop in points on the calibration data "
                                        "(top-1 disagreement without labels)", interval="[0, inf)"),
        "min_cosine": Option(float, None, "mixed precision: min cosine vs float over outputs and channel slices "
                                          "on the calibration data", interval="[-1, 1]"),
        "min_sqnr": Option(float, None, "mixed precision: min SQNR (dB) vs float over outputs and channel slices "
                                        "on the calibration data", interval="[0, inf)"),
        "holdout": Option(float, 0.0, "mixed precision / method=auto: share of the calibration samples (every "
                                      "1/F-th) that judge the choices but are not calibrated on", interval="[0, 1)"),
        "latency_aware": Option(bool, False, "time each layer int8 vs float here; keep float where int8 is slower"),
        "latency_margin": Option(float, 0.05, "latency_aware: tolerated int8 slowdown (0.05 = 5 %)",
                                 interval="[0, inf)"),
        "latency_batch": Option(int, 1, "latency_aware: batch size of the timings", interval="[1, inf)"),
        "latency_check": Option(bool, True, "latency_aware: time the whole model (per-layer choice, all int8, "
                                            "float) and keep the fastest"),
    }

    reads = (CPU_FLAGS, LATENCY_TIMER, MODEL_TIMER)
    writes = (FLOAT_REFERENCE, FLOAT_STATISTICS, LATENCY_TIMINGS)

    def _config(self, ctx: PassContext | None = None) -> QuantConfig:
        flags = ctx.get(CPU_FLAGS) if ctx is not None else None
        return QuantConfig.from_options(self.opts, set(flags) if flags is not None else None)

    def check_options(self) -> None:
        """Mixed precision, ``latency_aware`` and ``method=auto`` need full quantization; ``dynamic`` takes no
        static settings."""
        o = self.opts
        if o["method"] == AUTO_METHOD and (o["weights_only"] or o["dynamic"]):
            raise InputError("quantize_int8: method=auto chooses activation ranges; weights_only and dynamic "
                             "calibrate none")
        if o["holdout"] and not (self._mixed_target() or o["method"] == AUTO_METHOD):
            raise InputError("quantize_int8: holdout splits the calibration data for method=auto or a mixed-precision "
                             "target (max_drop, min_cosine, min_sqnr); neither is set")
        if o["weights_only"] and self._selective():
            raise InputError("quantize_int8: max_drop, min_cosine, min_sqnr and latency_aware need full quantization, "
                             "not weights_only")
        if 0 < o["hist_sample"] < SAMPLE_BLOCK:
            raise InputError(f"quantize_int8: hist_sample must be 0 (every value) or at least {SAMPLE_BLOCK}")
        if o["dynamic"]:
            clash = [k for k in ("weights_only", "symmetric_activations") if o[k]] + (
                ["cache"] if o["cache"] else [])
            if clash:
                raise InputError(f"quantize_int8: dynamic=true does not combine with {', '.join(clash)} "
                                 "(activations are quantized at run time, uint8 asymmetric)")

    def needs_calibration(self) -> bool:
        """Activation ranges come from calibration data (``weights_only`` needs none; ``dynamic`` none
        unless a mixed-precision target must be checked on data)."""
        if self.opts["dynamic"]:
            return self._mixed_target()
        return not self.opts["weights_only"]

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Plan the placement, calibrate the activations it needs, insert Q/DQ nodes."""
        cfg = self._config(ctx)
        check_names(graph, cfg.exclude, owner=self.name, op_types=True)
        result = PassResult()
        if not cfg.weights_only:
            self._cpu_note(ctx, cfg, result)
        graph.toposort()
        if self._selective():
            return self._run_selective(graph, ctx, cfg, result)
        reference = _deferred_export(graph)
        if cfg.dynamic:
            ctx.put(FLOAT_REFERENCE, reference)
            result.modified = quantize_dynamic_graph(graph, cfg, result, ctx.logger)
            return result  # before any weight is read: shares the input's protobuf weights
        cfg = with_float_pools(graph, cfg)
        plan = plan_placement(graph, cfg, result, ctx.logger)
        if not plan.groups:
            return result
        params: dict[str, QParams] = {}
        if not cfg.weights_only:
            calib = self._calibrate(graph, plan, ctx, result)
            params = self._params(plan, calib, cfg, result, ctx)
        ctx.put(FLOAT_REFERENCE, reference)
        apply_plan(graph, plan, params, cfg, result)
        result.modified = True
        return result

    def _cpu_note(self, ctx: PassContext, cfg: QuantConfig, result: PassResult) -> None:
        flags = ctx.get(CPU_FLAGS)
        vnni = has_vnni(set(flags) if flags is not None else cpu_flags())
        result.stats["reduce_range"] = cfg.reduce_range
        if vnni is None:
            return
        result.stats["vnni"] = vnni
        if not vnni and not cfg.reduce_range:
            ctx.logger.warning(
                "quantize_int8: this CPU has no VNNI (avx512_vnni/avx_vnni): onnxruntime's u8s8 int8 kernels "
                "saturate 16-bit sums with 8-bit weights (reduce_range=false was asked); reduce_range=auto or "
                "true (7-bit weights) avoids it")
        elif vnni and not cfg.reduce_range:
            ctx.logger.info("quantize_int8: 8-bit weights for this VNNI CPU; on CPUs without VNNI (AVX2 only) "
                            "onnxruntime saturates them: quantize there, or with reduce_range=true, for such targets")

    def _calibrate(self, graph: gs.Graph, plan: QdqPlan, ctx: PassContext, result: PassResult) -> Calibration:
        model = serde.to_model(graph)
        names = measured_tensors(plan)
        # a later bias_correction reads the float model's channel means and outputs: gathered in this
        # run (from the tensors it captures anyway), so that pass need not run the float model again
        stats = (FloatStatistics.for_graph(graph, ctx.calib, self.opts["batch_size"])
                 if ctx.wanted(FLOAT_STATISTICS) and not self.opts["cache"] else None)
        # ranges read from min/max alone need no histogram (binning is most of the calibration's cost);
        # a cache keeps every histogram, for runs with other methods
        minmax = [] if self.opts["cache"] else names if self.opts["method"] == "minmax" else \
            [n for n in names if n in plan.unclipped]
        calib = collect_statistics(model, names, ctx.calib, batch_size=self.opts["batch_size"], bins=DEFAULT_BINS,
                                   cache=self.opts["cache"] or None, sample=self.opts["hist_sample"], minmax=minmax,
                                   progress=ctx.progress, observe=stats.update if stats is not None else None,
                                   also=stats.names if stats is not None else [])
        if stats is not None and calib.samples:
            ctx.put(FLOAT_STATISTICS, stats)
        result.stats["tensors_calibrated"] = len(names)
        result.stats["calib_samples"] = calib.samples
        result.stats["cache_tensors"] = len(calib.cached)
        return calib

    def _params(self, plan: QdqPlan, calib: Calibration, cfg: QuantConfig, result: PassResult,
                ctx: PassContext) -> dict[str, QParams]:
        """Scale and zero point of every calibrated tensor from its range."""
        return plan_params(plan, calib, cfg, self.opts["method"], self.opts["percentile"], result, ctx.logger)

    # -- mixed precision (max_drop / min_cosine) and latency_aware

    def _selective(self) -> bool:
        o = self.opts
        return bool(o["latency_aware"]) or self._mixed_target() or o["method"] == AUTO_METHOD

    def _mixed_target(self) -> bool:
        return any(self.opts[k] is not None for k in ("max_drop", "min_cosine", "min_sqnr"))

    def _run_selective(self, graph: gs.Graph, ctx: PassContext, cfg: QuantConfig, result: PassResult) -> PassResult:
        """Calibrate once, choose layers to keep float (latency, then sensitivity), build the result."""
        model = serde.to_model(graph)
        auto = self.opts["method"] == AUTO_METHOD
        q = Quantizer(model, cfg, method=_AUTO_ORDER[0] if auto else self.opts["method"],
                      percentile=self.opts["percentile"], logger=ctx.logger)
        if not q.layers:
            self._merge(result, q.base, {})
            return result
        fit, judge = self._split(ctx, result)
        calib = q.calibrate(fit, batch_size=self.opts["batch_size"], cache=self.opts["cache"] or None,
                            progress=ctx.progress, sample=self.opts["hist_sample"])
        result.stats.update(tensors_calibrated=len(calib.collectors), calib_samples=calib.samples,
                            cache_tensors=len(calib.cached))
        kept: dict[str, tuple[str, str]] = {}  # layer kept float: (decline code, detail)
        if self.opts["latency_aware"]:
            kept.update(self._latency(q, ctx, result))
        evaluate = self._evaluator(q, ctx, judge) if auto or self._mixed_target() else None
        if auto:
            self._choose_method(q, evaluate, kept, result, ctx)
        if self._mixed_target():
            kept.update(self._mixed(q, evaluate, ctx, kept, result))
        ctx.put(FLOAT_REFERENCE, _FloatReference(lambda: model))
        final = PassResult()
        result.graph = q.build(kept, final)
        self._merge(result, final, kept)
        result.modified = final.modified
        self._exclude_spec(q, cfg, kept, result, ctx)
        return result

    @staticmethod
    def _merge(result: PassResult, final: PassResult, kept: dict[str, tuple[str, str]]) -> None:
        """Copy ``final``'s stats and declines; layers we kept float get our reason, not "excluded"."""
        auto = [d for d in final.declined if d.where in kept and d.code == R_EXCLUDED]
        result.declined += [d for d in final.declined if d not in auto]
        for key, value in final.stats.items():
            result.stats[key] = result.stats.get(key, 0) + value
        if auto:
            result.stats["excluded"] -= len(auto)
            if not result.stats["excluded"]:
                del result.stats["excluded"]
        for layer, (code, detail) in kept.items():
            result.decline(layer, code, detail)

    def _exclude_spec(self, q: Quantizer, cfg: QuantConfig, kept: dict[str, tuple[str, str]], result: PassResult,
                      ctx: PassContext) -> None:
        names = list(cfg.exclude) + [layer for layer in q.layers if layer in kept]
        spec = "exclude=" + "|".join(names)
        result.stats["exclude_spec"] = spec
        if self.opts["latency_aware"]:
            ctx.logger.info("quantize_int8: latency_aware decisions depend on this machine's timings; "
                            "quantize_int8:%s (latency_aware off) reproduces them", spec)

    def _latency(self, q: Quantizer, ctx: PassContext, result: PassResult) -> dict[str, tuple[str, str]]:
        """Compute layers where int8 is slower than float (plus the Add/Concat/pool islands they leave)."""
        timings = time_layers(q, batch=self.opts["latency_batch"], margin=self.opts["latency_margin"],
                              timer=ctx.get(LATENCY_TIMER), progress=ctx.progress, dims=ctx.dims)
        kept = {t.node: (R_SLOWER, f"{t.ratio:.2f}×") for t in timings if t.kept_float}
        kept.update((name, (R_ISLAND, "")) for name in island_layers(q, kept))
        if self.opts["latency_check"]:
            kept = self._model_check(q, ctx, kept, result)
        unmeasured = [t for t in timings if t.ratio is None]
        for t in unmeasured:
            ctx.logger.warning("quantize_int8: latency of %s not measured (%s); it stays int8", t.node, t.reason)
        result.stats["latency_measured"] = len(timings) - len(unmeasured)
        result.stats["latency_kept_float"] = len(kept)
        ctx.put(LATENCY_TIMINGS, list(timings))
        return kept

    def _model_check(self, q: Quantizer, ctx: PassContext, kept: dict[str, tuple[str, str]],
                     result: PassResult) -> dict[str, tuple[str, str]]:
        """Time float, the per-layer choice and all-int8 as whole models; keep the fastest.

        Per-layer timings miss the Q/DQ a float layer adds between int8 neighbours, so the
        per-layer choice can lose to plain int8; and if every int8 variant is slower than float,
        every layer stays float.
        """
        timer = ctx.get(MODEL_TIMER) or (
            lambda models: model_ratios(models, batch=self.opts["latency_batch"], seed=ctx.seed, dims=ctx.dims))
        variants = [q.model, q.export({})] + ([q.export(kept)] if kept else [])
        ratios = [float(r) for r in timer(variants)]
        full, mixed = ratios[1], ratios[2] if kept else ratios[1]
        result.stats["latency_ratio_int8"] = round(full, 3)
        if kept:
            result.stats["latency_ratio_mixed"] = round(mixed, 3)
        best = min(full, mixed)
        if best > 1.0:
            result.stats["latency_choice"] = "float"
            ctx.logger.info("quantize_int8: every int8 variant is slower than float (best %.3f×): all layers float",
                            best)
            return {**{name: (R_MODEL_SLOWER, f"{best:.2f}×") for name in q.layers}, **kept}
        if kept and full < mixed:
            result.stats["latency_choice"] = "all int8"
            ctx.logger.info("quantize_int8: all-int8 (%.3f× float) beats the per-layer choice (%.3f×): all int8",
                            full, mixed)
            return {}
        result.stats["latency_choice"] = "per-layer" if kept else "all int8"
        return kept

    def _split(self, ctx: PassContext, result: PassResult) -> tuple[CalibSource, CalibSource]:
        """(samples calibrated on, samples judged on): with ``holdout`` an even share of the samples
        (:class:`~onnxcompress.runtime.data.SplitSource`) is judged on only; without, both are every sample."""
        fraction = self.opts["holdout"]
        if not fraction:
            return ctx.calib, ctx.calib
        fit, judge = SplitSource(ctx.calib, fraction, held=False), SplitSource(ctx.calib, fraction, held=True)
        n, k = ctx.calib.count(), judge.count()
        if not 0 < k < n:
            raise InputError(f"quantize_int8: holdout={fraction:g} of {n} calibration samples leaves {n - k} to "
                             f"calibrate on and {k} to judge on; both need at least one")
        result.stats["holdout_samples"] = k
        ctx.logger.info("quantize_int8: ranges from %d calibration samples, choices judged on the other %d "
                        "(every %.3g-th)", n - k, k, 1 / fraction)
        return fit, judge

    def _evaluator(self, q: Quantizer, ctx: PassContext, data: CalibSource) -> Evaluator:
        return Evaluator(q.model, data, batch_size=self.opts["batch_size"],
                         slices=dict(ctx.slices) if ctx.slices else None)

    @staticmethod
    def _choose_method(q: Quantizer, evaluate: Evaluator, kept: dict[str, tuple[str, str]], result: PassResult,
                       ctx: PassContext) -> None:
        """``method=auto``: keep the range rule whose worst output/slice SQNR is highest (ties: the first)."""
        scores = {}
        for method in _AUTO_ORDER:
            q.method = method
            scores[method] = evaluate(q.export(kept)).sqnr_db
        q.method = max(scores, key=lambda m: scores[m])  # first of the best, in insertion order
        result.stats["method_chosen"] = q.method
        result.stats["method_sqnr"] = ", ".join(f"{m} {v:.2f}" for m, v in scores.items())
        ctx.logger.info("quantize_int8: method=auto chose %s (worst output/slice SQNR in dB on the calibration "
                        "data: %s)", q.method, result.stats["method_sqnr"])

    def _mixed(self, q: Quantizer, evaluate: Evaluator, ctx: PassContext, kept: dict[str, tuple[str, str]],
               result: PassResult) -> dict[str, tuple[str, str]]:
        """Move the most sensitive layers back to float until the target holds on the calibration data."""
        fid = evaluate(q.export(kept))
        labels = self._bound(fid, evaluate, ctx)
        fallback: list[str] = []
        if not self._holds(fid, labels):
            ranked = rank_layers(q, evaluate, layers=[n for n in q.layers if n not in kept], progress=ctx.progress)
            for layer, _ in ranked:
                fallback.append(layer)
                fid = evaluate(q.export([*kept, *fallback]))
                if self._holds(fid, labels):
                    break
        if len(kept) + len(fallback) == len(q.layers):
            ctx.logger.warning("quantize_int8: every layer had to stay float to meet the mixed-precision target")
        result.stats.update(fallback_layers=len(fallback), mixed_cosine=round(fid.cosine, 6),
                            mixed_sqnr=round(fid.sqnr_db, 2) if math.isfinite(fid.sqnr_db) else "inf")
        if fid.worst:
            result.stats["mixed_worst"] = fid.worst
        drop = fid.top1_drop if labels else fid.disagreement
        if self.opts["max_drop"] is not None and drop is not None:
            result.stats["mixed_bound"] = "accuracy drop" if labels else "top-1 disagreement (no labels)"
            result.stats["mixed_drop"] = round(drop, 3)
        return {layer: (R_SENSITIVITY, "") for layer in fallback}

    def _bound(self, fid: Fidelity, evaluate: Evaluator, ctx: PassContext) -> bool:
        """Whether max_drop is an accuracy drop (labels) or a top-1 disagreement; checks it can be measured."""
        if self.opts["max_drop"] is None:
            return evaluate.has_labels
        if fid.top1_agreement is None:
            raise InputError("quantize_int8: max_drop needs a classifier output [N, C]; use min_cosine")
        if fid.top1_drop is None:
            ctx.logger.info("quantize_int8: the calibration data has no labels: max_drop bounds the top-1 "
                            "disagreement with the float model (points)")
            return False
        return True

    def _holds(self, fid: Fidelity, labels: bool) -> bool:
        o = self.opts
        if o["min_cosine"] is not None and not fid.cosine >= o["min_cosine"]:
            return False
        if o["min_sqnr"] is not None and not fid.sqnr_db >= o["min_sqnr"]:
            return False
        if o["max_drop"] is not None:
            drop = fid.top1_drop if labels else fid.disagreement
            return drop is not None and drop <= o["max_drop"] + 1e-9
        return True


class _FloatReference:
    """The :data:`FLOAT_REFERENCE` value: calling it returns the float model, made by ``make`` on
    the first call and kept (``make`` and what it holds are dropped then)."""

    def __init__(self, make: Callable[[], onnx.ModelProto]):
        self._make: Callable[[], onnx.ModelProto] | None = make
        self._model: onnx.ModelProto | None = None

    def __call__(self) -> onnx.ModelProto:
        if self._model is None:
            assert self._make is not None
            self._model, self._make = self._make(), None
        return self._model


def _deferred_export(graph: gs.Graph) -> _FloatReference:
    """A :class:`_FloatReference` exporting ``graph`` as it is now.

    The copy shares the constants' arrays (passes never edit them in place), so nothing is
    exported, and no weight copied, unless a later pass asks for the model.
    """
    snapshot = graph.copy()
    snapshot.producer_name, snapshot.producer_version = graph.producer_name, graph.producer_version
    return _FloatReference(functools.partial(serde.to_model, snapshot))
