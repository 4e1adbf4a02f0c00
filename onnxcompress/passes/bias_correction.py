"""Empirical bias correction of int8-quantized layers from calibration data."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import proto, serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.graph import Names
from onnxcompress.core.pass_api import (
    FLOAT_REFERENCE,
    Numerics,
    Option,
    Pass,
    PassContext,
    PassResult,
    Slot,
    register,
)
from onnxcompress.quant.bias_correction import (
    FLOAT_STATISTICS,
    BiasSite,
    ChannelMoments,
    FloatStatistics,
    KeptValues,
    apply_correction,
    assign_levels,
    dequantized_reference,
    find_sites,
    reference_name,
    sort_appended,
)
from onnxcompress.quant.linear_mean import LinearSums, linear_sums
from onnxcompress.quant.sensitivity import Evaluator
from onnxcompress.quant.staged import StagedBatches, frontier, stored_name, tensor_depths
from onnxcompress.runtime.batching import Batch
from onnxcompress.runtime.capture import CAPTURE_BUDGET, capture

__all__ = ["BiasCorrection", "CHECK_TOLERANCE_DB", "R_NO_REFERENCE", "R_NO_COUNTERPART", "R_MISMATCH", "R_DOES_NOT_PAY"]

log = logging.getLogger(__name__)

R_NO_REFERENCE = "no_float_reference"
R_NO_COUNTERPART = "no_counterpart_in_reference"
R_MISMATCH = "reference_channel_mismatch"
R_DOES_NOT_PAY = "does_not_pay"
#: ``check``: the correction is undone when the worst SQNR drops by more than this (dB); it aims at
#: channel means, so a worst-slice SQNR within noise of the uncorrected one is accepted.
CHECK_TOLERANCE_DB = 0.25


@register
class BiasCorrection(Pass):
    """Empirical bias correction: shifts quantized layers' biases so channel means match float.

    Before: ``y_q = Conv(DQ(x_q), DQ(W_q), DQ(b_q))`` whose per-channel mean drifts from the float
    layer's ``y = Conv(x, W, b)`` (weight rounding, clipped activations, earlier layers' errors).
    After:  the same layer with ``b_q' = round((b + delta) / (s_in * s_w,c))`` (int32, zero point 0,
    saturated to int32), where ``delta_c = E[y_c] - E[y_q,c]`` over calibration samples and every
    position but the channel axis (Nagel et al. 2019, "Data-Free Quantization", empirical variant;
    Banner et al. 2019). A layer without a bias gets one (int32 behind a DequantizeLinear with
    scale ``s_in * s_w``, so onnxruntime still fuses it into QLinearConv/QGemm); a float bias
    (``weights_only``, ConvTranspose) gets ``b + delta``; a MatMul's bias is the constant operand
    of the Add reading it (8-bit per tensor: re-fitted scale and zero point). Gemm: ``delta / beta``.

    Reference (``reference``): ``float`` (default) — ``quantize_int8`` leaves the model it
    quantized in the context slot :data:`~onnxcompress.core.pass_api.FLOAT_REFERENCE`; the
    measured tensor (the raw output of the node that adds the bias, before its QuantizeLinear)
    is found there by name. A pipeline where ``quantize_int8`` does not run before this pass is
    refused when it is built (a model quantized elsewhere, or loaded from disk, has no float
    reference); a stored reference with other graph inputs is ignored and every layer declined
    (``no_float_reference``). ``dequantized`` (opt-in, logged, reported as ``reference=dequantized``) uses
    the QDQ model itself with its activation Q→DQ pairs removed: weights stay rounded there, so
    only the bias from activation quantization is corrected; on the fixture models it moves SQNR
    by -1 to +0.2 dB, which is why it is not a silent fallback.

    Order (``sequential``, default): layers are corrected level by level in topological order,
    each level measured on the model with the earlier levels already corrected (layers that do
    not depend on each other share a run), so corrections do not double count. One float run
    plus one run per level (no float run when ``quantize_int8`` gathered the float channel means and
    outputs in its calibration run: :data:`~onnxcompress.quant.bias_correction.FLOAT_STATISTICS`,
    stat ``float_statistics``; the same numbers); ``sequential=false`` measures every layer in one run (one-shot).
    Means are streamed (three float64 vectors per layer), so memory does not grow with samples.
    ``optimize`` (default on): the sequential runs and the check run the QDQ model with onnxruntime's
    graph optimizations, so the quantized layers run onnxruntime's int8 kernels, as the saved model
    will, and much faster (opennsfw's ResNet-50, 64 images: this pass 6.3 -> 3.2 s with the int8
    frontier of :mod:`~onnxcompress.quant.staged`; the fixtures' SQNRs unchanged).
    ``measure=sums`` (default): a Conv / Gemm / MatMul+Add layer's output means are computed from
    sums of its input (:mod:`~onnxcompress.quant.linear_mean`: the mean is linear in the input), so
    the layer is not run in float and its level's run is int8 throughout (this pass on opennsfw
    5.1 -> 2.4 s; fixture SQNRs within 0.03 dB); ConvTranspose and inputs without a per-tensor
    scale are run and averaged, as ``measure=run`` does for every layer. With ``measure=run`` and
    ``optimize=false`` every measured value is bit for bit that of a full run without optimizations.

    Fires on:
        Conv / ConvTranspose / Gemm / MatMul whose weight is a DequantizeLinear of an integer
        constant, with a constant per-channel bias (or none; MatMul: one Add with a constant).
    Needs calibration data.

    Declines:
        ``weight_not_quantized`` (no DequantizeLinear of an integer constant);
        ``weight_not_constant``; ``unsupported_weight_layout``; ``no_bias_path`` (MatMul not
        followed by one Add with a constant); ``bias_not_constant``; ``bias_not_per_channel``;
        ``no_int32_bias`` (input or weight scale not per tensor / per output channel);
        ``no_float_reference``; ``no_counterpart_in_reference`` (the layer's output is not in the
        reference model); ``reference_channel_mismatch``; ``does_not_pay`` (on ``graph``, with
        ``check``: the corrected model is further from the float one than the uncorrected model,
        worst SQNR over outputs and channel slices on the calibration data down by more than
        :data:`CHECK_TOLERANCE_DB`; nothing is changed.
        On nudenet's YOLOv8n the per-channel mean shifts of the class logits, dominated by
        background anchors, lowered the few positive scores: score rows 12.6 -> 8.8 dB). Shared biases are copied
        (``bias_copied``), never edited in place; a layer whose output is a graph output is
        corrected like any other (names and shapes do not change).

    Numerics:
        APPROX: outputs move by the measured mean shifts (towards the float model's). Rounding
        to the int32 grid (``s_in * s_w``) is far below the shifts.

    Stats:
        ``layers`` (candidates), ``layers_corrected``, ``bias_added``, ``bias_copied``,
        ``bias_clipped``, ``levels``, ``runs`` (model runs over the calibration data),
        ``calib_samples``, ``mean_abs_delta_rel`` / ``max_abs_delta_rel`` (mean over channels of
        ``|delta|``, relative to the float output's per-channel standard deviation, averaged /
        max over layers), ``reference`` (``float`` or ``dequantized``), ``float_statistics``
        (``reused``: the float means came from ``quantize_int8``'s run), ``check_sqnr_before`` /
        ``check_sqnr_after`` (with ``check``).
    """

    name = "bias_correction"
    numerics = Numerics.APPROX
    options = {
        "reference": Option(str, "float", "float: the model quantize_int8 quantized; dequantized: the QDQ model "
                                          "without activation Q/DQ", choices=("float", "dequantized")),
        "sequential": Option(bool, True, "correct level by level on the already-corrected model (else one shot)"),
        "batch_size": Option(int, 32, "calibration batch size", interval="[1, inf)"),
        "samples": Option(int, 0, "calibration samples used (0: all)", interval="[0, inf)"),
        "optimize": Option(bool, True, "measure (sequential) and check with onnxruntime's graph optimizations on: "
                                       "int8 kernels, as deployed, and faster; false: values of the QDQ model run "
                                       "without optimizations"),
        "measure": Option(str, "sums", "sums: a Conv/Gemm/MatMul+Add layer's output means follow from sums of its "
                                       "input (the layer is not run in float; same means up to float64 rounding); "
                                       "run: its output is computed and averaged (sequential only)",
                          choices=("sums", "run")),
        "check": Option(bool, True, "keep the correction only if it brings the outputs closer to the float model's "
                                    "on the calibration data (worst output or channel slice)"),
    }
    reads = (FLOAT_REFERENCE, FLOAT_STATISTICS)

    def required_reads(self) -> tuple[Slot, ...]:
        """The float reference, unless ``reference=dequantized``."""
        return () if self.opts["reference"] == "dequantized" else (FLOAT_REFERENCE,)

    def needs_calibration(self) -> bool:
        """Channel means are measured on calibration data."""
        return True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Find quantized layers, measure channel means against the reference, shift the biases."""
        result = PassResult()
        graph.toposort()
        sites = find_sites(graph, result, ctx.logger)
        result.stats["layers"] = len(sites)
        if not sites:
            return result
        reference, label = self._reference(graph, ctx)
        if reference is None:
            for site in sites:
                result.decline(site.label, R_NO_REFERENCE, logger=ctx.logger)
            return result
        result.stats["reference"] = label
        # the check compares on every calibration sample: the float outputs then come with the moments
        checked = self.opts["check"] and not self.opts["samples"]
        outputs = [o.name for o in reference.graph.output] if checked else []
        moments, float_outputs = self._reference_moments(reference, sites, ctx, result, outputs)
        kept = [(s, moments[i]) for i, s in enumerate(sites) if i in moments]
        before = graph.copy() if self.opts["check"] and kept else None
        tail = self._correct(graph, kept, ctx, result, outputs if float_outputs.parts else [])
        result.modified = result.stats.get("layers_corrected", 0) > 0
        if (before is not None and result.modified
                and not self._pays(before, graph, reference, ctx, result, float_outputs, tail)):
            result.graph, result.modified = before, False
        return result

    def _pays(self, before: gs.Graph, after: gs.Graph, reference: onnx.ModelProto, ctx: PassContext,
              result: PassResult, float_outputs: KeptValues,
              tail: list[list[np.ndarray]] | None = None) -> bool:
        """Whether the corrected graph is closer to ``reference`` than the uncorrected one on the
        calibration data: worst SQNR over outputs and channel slices (a detector's score rows count
        on their own), compared after every correction is in place. ``float_outputs`` (the reference's
        outputs, captured with its moments) and ``tail`` (the corrected model's outputs per batch, from
        the last staged run) are the same numbers a run would give, so they are not recomputed."""
        # threads=0 (every core), like the measuring runs: this pass already relies on onnxruntime's
        # results not depending on the thread count
        by_sample = float_outputs.arrays()
        evaluate = Evaluator(reference, ctx.calib, batch_size=self.opts["batch_size"], threads=0,
                             slices=dict(ctx.slices) if ctx.slices else None, outputs=by_sample,
                             runs=float_outputs.runs() if by_sample is None else None,
                             optimize=self.opts["optimize"])
        old = evaluate(_exported(before))
        new = evaluate.score(lambda i, _batch: tail[i]) if tail is not None else evaluate(_exported(after))
        result.stats.update(check_sqnr_before=_db(old.sqnr_db), check_sqnr_after=_db(new.sqnr_db))
        if new.sqnr_db >= old.sqnr_db - CHECK_TOLERANCE_DB:
            return True
        result.decline("graph", R_DOES_NOT_PAY, f"{old.worst or 'output'}: SQNR {old.sqnr_db:.2f} -> "
                       f"{new.sqnr_db:.2f} dB on the calibration data; kept the uncorrected model", logger=ctx.logger)
        for key in ("layers_corrected", "bias_added", "bias_copied", "bias_clipped"):
            if key in result.stats:
                result.stats[key] = 0
        return False

    # -- reference

    def _reference(self, graph: gs.Graph, ctx: PassContext) -> tuple[onnx.ModelProto | None, str]:
        """The reference model and its label, or ``(None, "")`` when there is none."""
        if self.opts["reference"] == "dequantized":
            ctx.logger.warning("bias_correction: reference=dequantized corrects the bias from activation "
                               "quantization only (weights stay rounded in the reference)")
            return serde.to_model(dequantized_reference(graph)), "dequantized"
        make = ctx.get(FLOAT_REFERENCE)
        stored = make() if make is not None else None  # exported on first use
        if stored is not None and not _same_inputs(stored, graph):
            ctx.logger.warning("bias_correction: the stored float model has other inputs; ignoring it")
            stored = None
        if stored is None:
            ctx.logger.warning("bias_correction: no float reference (quantize_int8 did not run earlier in this "
                               "pipeline; reference=dequantized corrects activation quantization only)")
            return None, ""
        return stored, "float"

    def _reference_moments(self, reference: onnx.ModelProto, sites: list[BiasSite], ctx: PassContext,
                           result: PassResult, outputs: list[str]
                           ) -> tuple[dict[int, ChannelMoments], KeptValues]:
        """One run of the reference: per-channel moments of each site's counterpart, by site index,
        and the values of ``outputs`` in the same run (none kept when there are none or they exceed
        :data:`~onnxcompress.quant.sensitivity.REFERENCE_BUDGET`)."""
        produced = proto.produced_names(reference)
        wanted: dict[int, tuple[str, int]] = {}
        for i, site in enumerate(sites):
            name = reference_name(site.measured, produced)
            if name is None:
                result.decline(site.label, R_NO_COUNTERPART, logger=ctx.logger)
            else:
                wanted[i] = (name, site.axis)
        stored = self._stored(ctx, wanted, outputs)
        if stored is not None:  # quantize_int8's calibration run measured them: no float run here
            moments = {i: stored.moments[name] for i, (name, _) in wanted.items()}
            kept = stored.kept if outputs else KeptValues([])
            result.stats.update(calib_samples=stored.samples, float_statistics="reused")
        else:
            kept = KeptValues(outputs)
            moments = self._measure(reference, wanted, ctx, result, kept)
        for i, site in enumerate(sites):
            m = moments.get(i)
            if m is not None and m.channels != site.channels:
                result.decline(site.label, R_MISMATCH, f"{m.channels} vs {site.channels}", logger=ctx.logger)
                del moments[i]
        return moments, kept

    def _stored(self, ctx: PassContext, wanted: dict[int, tuple[str, int]], outputs: list[str]
                ) -> FloatStatistics | None:
        """The :data:`FLOAT_STATISTICS` left by ``quantize_int8`` when they hold what this run needs
        (every wanted tensor on its axis, ``outputs``) over the same data and batch size, else ``None``."""
        stats = ctx.get(FLOAT_STATISTICS)
        if stats is None or self.opts["reference"] != "float" or self.opts["samples"]:
            return None
        if stats.source is not ctx.calib or stats.batch_size != self.opts["batch_size"] or not stats.samples:
            return None
        if any(name not in stats.moments or stats.moments[name].axis != axis for name, axis in wanted.values()):
            return None
        return stats if not outputs or list(outputs) == stats.kept.names else None

    # -- correction

    def _correct(self, graph: gs.Graph, kept: list[tuple[BiasSite, ChannelMoments]], ctx: PassContext,
                 result: PassResult, outputs: list[str]) -> list[list[np.ndarray]] | None:
        """Measure and correct ``kept`` (site, reference moments) level by level; the corrected
        model's ``outputs`` per batch when the sequential runs give them (see :meth:`_sequential`)."""
        sites = [s for s, _ in kept]
        if self.opts["sequential"]:
            assign_levels(graph, sites)
        else:
            for site in sites:
                site.level = 1
        names = Names(graph)
        levels = sorted({s.level for s in sites})
        result.stats["levels"] = len(levels)
        rel: list[float] = []
        tail = None
        if not self.opts["sequential"]:
            graph.toposort()
            wanted = {i: (s.measured.name, s.axis) for i, (s, _) in enumerate(kept)}
            self._apply(graph, names, kept, self._measure(_truncated(graph, [n for n, _ in wanted.values()]), wanted,
                                                          ctx, result), ctx, result, rel)
        else:
            tail = self._sequential(graph, names, kept, levels, ctx, result, rel, outputs)
        if rel:
            result.stats["mean_abs_delta_rel"] = round(float(np.mean(rel)), 6)
            result.stats["max_abs_delta_rel"] = round(float(np.max(rel)), 6)
        return tail

    def _sequential(self, graph: gs.Graph, names: Names, kept: list[tuple[BiasSite, ChannelMoments]],
                    levels: list[int], ctx: PassContext, result: PassResult, rel: list[float],
                    outputs: list[str]) -> list[list[np.ndarray]] | None:
        """Level by level from stored frontier tensors (see :mod:`onnxcompress.quant.staged`); then,
        with ``outputs``, the rest of the corrected model from the last level's frontier: its
        ``outputs`` per batch (``None`` when they need tensors that are no longer stored)."""
        data = _Limited(ctx.calib, self.opts["samples"]) if self.opts["samples"] else ctx.calib
        by_node = {id(s.target): s.level for s, _ in kept}
        with StagedBatches(data.batches(self.opts["batch_size"]), progress=ctx.progress,
                           optimize=self.opts["optimize"]) as store:
            if store.samples == 0:
                raise InputError("bias_correction: the calibration data has no samples")
            # level L is measured in the run that moves the frontier past level L - 1 (one run per level)
            sums = self.opts["measure"] == "sums"
            step = _LevelRun(kept, levels[0])
            self._advance(graph, store, by_node, 0, step, sums)
            for k, level in enumerate(levels):
                result.count("runs")
                start = len(graph.nodes)
                self._apply(graph, names, [(s, ref) for _, s, ref in step.batch],
                            [step.moments[i] for i, _, _ in step.batch], ctx, result, rel)
                sort_appended(graph, start)  # the order graph.toposort() gives, without its cost
                if k + 1 < len(levels):
                    step = _LevelRun(kept, levels[k + 1])
                    self._advance(graph, store, by_node, level, step, sums)
            result.stats["calib_samples"] = store.samples
            inputs = frontier(graph, tensor_depths(graph, by_node), levels[-1])
            return _tail(graph, store, inputs, outputs) if outputs else None

    @staticmethod
    def _advance(graph: gs.Graph, store: StagedBatches, by_node: dict[int, int], level: int,
                 step: _LevelRun, sums: bool) -> None:
        """Move the stored frontier past ``level`` (compute its depth-``level`` tensors the next levels
        read) and, in the same run, measure ``step``'s layers (level ``level + 1``; ``graph`` sorted;
        from sums of their inputs with ``sums``, where they allow it)."""
        depth = tensor_depths(graph, by_node)
        fed = [t.name for t in graph.inputs]
        now, later = frontier(graph, depth, level) if level else fed, frontier(graph, depth, level + 1)
        new = [n for n in later if depth[n] == level and n not in fed]
        step.plan(depth, {*now, *new}, sums)
        store.run(graph, now, [*new, *step.names], step.consume, keep=new, read=[n for n in step.sources if n in now],
                  label=f"bias_correction level {step.level}")
        store.keep_only(later)

    def _apply(self, graph: gs.Graph, names: Names, pairs, quant, ctx: PassContext, result: PassResult,
               rel: list[float]) -> None:
        """Shift each site's bias by ``reference mean - measured mean``."""
        quant = list(quant.values()) if isinstance(quant, dict) else list(quant)
        for (site, ref), measured in zip(pairs, quant):
            delta = ref.mean() - measured.mean()
            apply_correction(graph, names, site, delta, result)
            result.count("layers_corrected")
            rel.append(_relative(delta, ref))
            ctx.logger.debug("bias_correction %s: mean |delta| %.4g (%.3g of the channel std)", site.label,
                             float(np.abs(delta).mean()), rel[-1])

    def _measure(self, model: onnx.ModelProto, wanted: dict[int, tuple[str, int]], ctx: PassContext,
                 result: PassResult, kept: KeptValues | None = None) -> dict[int, ChannelMoments]:
        """Stream ``{key: (tensor, axis)}`` of ``model`` over the calibration data into moments
        (and hand the tensors ``kept`` asks for to it in the same run)."""
        moments = {key: ChannelMoments(axis) for key, (_, axis) in wanted.items()}
        if not wanted:
            return moments
        kept = kept or KeptValues([])

        def consume(batch: Batch, values: dict[str, np.ndarray]) -> None:
            for key, (name, _) in wanted.items():
                moments[key].update(values[name])
            kept.add(values, len(batch))

        data = _Limited(ctx.calib, self.opts["samples"]) if self.opts["samples"] else ctx.calib
        seen = capture(model, sorted({n for n, _ in wanted.values()} | set(kept.names)), data, consume,
                       batch_size=self.opts["batch_size"], progress=ctx.progress, max_bytes=CAPTURE_BUDGET)
        if seen == 0:
            raise InputError("bias_correction: the calibration data has no samples")
        result.count("runs")
        result.stats["calib_samples"] = seen
        return moments


class _LevelRun:
    """The layers of one level and their output means, filled by :meth:`consume` (one run): from
    sums of their inputs (:mod:`onnxcompress.quant.linear_mean`) where :meth:`plan` finds them
    available, else from their outputs (``names``: the run computes them)."""

    def __init__(self, kept: list[tuple[BiasSite, ChannelMoments]], level: int):
        self.level = level
        self.batch = [(i, s, ref) for i, (s, ref) in enumerate(kept) if s.level == level]
        self.moments: dict[int, ChannelMoments | LinearSums] = {}
        self.names: list[str] = []
        self.sources: list[str] = []

    def plan(self, depth: dict[str, int], available: set[str], sums: bool) -> None:
        """Choose each layer's measure: sums of an ``available`` input (with ``sums``), else its output."""
        for i, s, _ in self.batch:
            found = linear_sums(s, lambda t: stored_name(t, depth) if t.name in depth else "") if sums else None
            self.moments[i] = found if found is not None and found.source in available else \
                ChannelMoments(s.axis, variance=False)  # only means
        self.names = sorted({s.measured.name for i, s, _ in self.batch if isinstance(self.moments[i], ChannelMoments)})
        self.sources = sorted({m.source for m in self.moments.values() if isinstance(m, LinearSums)})

    def consume(self, _batch: Batch, values: dict[str, np.ndarray]) -> None:
        for i, s, _ in self.batch:
            m = self.moments[i]
            m.update(values[m.source if isinstance(m, LinearSums) else s.measured.name])


class _Limited:
    """The first ``limit`` samples of a calibration source (what :func:`capture` reads)."""

    def __init__(self, source, limit: int):
        self.source, self.limit = source, limit

    def batches(self, batch_size: int = 32):
        left = self.limit
        for batch in self.source.batches(batch_size):
            if left <= 0:
                return
            if len(batch) > left:
                batch = Batch({k: v[:left] for k, v in batch.feeds.items()},
                              None if batch.labels is None else batch.labels[:left])
            left -= len(batch)
            yield batch


def _tail(graph: gs.Graph, store: StagedBatches, inputs: list[str], outputs: list[str]) -> list[list[np.ndarray]] | None:
    """``outputs`` of ``graph`` per stored batch, run from the stored tensors ``inputs``; ``None``
    when they need a tensor that is not stored, or are not all float outputs of ``graph`` (sorted)."""
    if sorted(outputs) != sorted(t.name for t in graph.outputs):
        return None
    got: list[list[np.ndarray]] = []
    try:
        store.run(graph, inputs, outputs, lambda _batch, values: got.append([values[n] for n in outputs]),
                  label="bias_correction outputs")
    except (RuntimeError, KeyError) as exc:  # an output needs tensors no longer stored, or is one
        # of the stored inputs itself (no node of the segment makes it): the check runs the model
        log.debug("bias_correction: outputs not from the stored frontier (%s)", exc)
        return None
    return got


def _exported(graph: gs.Graph) -> onnx.ModelProto:
    """A cleaned-up, sorted copy of ``graph`` as a model (``graph`` is not changed)."""
    copy = graph.copy()
    copy.cleanup(remove_unused_graph_inputs=False).toposort()
    return serde.to_model(copy)


def _db(value: float) -> float | str:
    return round(value, 2) if np.isfinite(value) else "inf"


def _truncated(graph: gs.Graph, outputs: list[str]) -> onnx.ModelProto:
    """The part of ``graph`` that computes ``outputs`` (float tensors), as a model with those outputs."""
    sub = graph.copy()
    tensors = sub.tensors()
    sub.outputs = [tensors[name] for name in dict.fromkeys(outputs)]
    for tensor in sub.outputs:
        tensor.dtype = tensor.dtype or np.float32
    sub.cleanup(remove_unused_graph_inputs=False).toposort()
    return serde.to_model(sub)


def _same_inputs(model: onnx.ModelProto, graph: gs.Graph) -> bool:
    return sorted(proto.feed_names(model)) == sorted(t.name for t in graph.inputs)


def _relative(delta: np.ndarray, ref: ChannelMoments) -> float:
    """Mean ``|delta|`` over channels relative to the reference's mean per-channel std."""
    std = float(np.sqrt(ref.var()).mean())
    return float(np.abs(delta).mean() / std) if std > 0 else 0.0
