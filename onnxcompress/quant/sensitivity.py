"""Per-layer quantization sensitivity, and the machinery mixed precision shares with it.

A *layer* is one quantized group of :func:`onnxcompress.quant.placement.plan_placement` (a Conv, Gemm,
MatMul, Add, Mul, Concat, pooling or ConvTranspose node, with the Relu/Clip folded into it),
named by its node name (with ``dynamic``: one MatMul/Gemm of
:func:`onnxcompress.quant.dynamic.plan_dynamic`, and nothing to calibrate). Keeping a layer float means excluding its node, exactly as the pass
option ``exclude`` does, so any mixed-precision decision is reproduced by an ``exclude=`` spec.

* :class:`Quantizer` — a float model prepared for quantization: calibrated **once** (histograms
  of every tensor any variant may need), then builds QDQ variants with any set of layers kept float.
* :class:`Evaluator` — runs variants on fixed data against the float model's outputs (kept in
  memory up to a budget, else recomputed) and reports SQNR, cosine, top-1 agreement and accuracy.
* :func:`rank_layers` — quantize one layer at a time (everything else float) and sort the layers
  from most to least sensitive (lowest output SQNR first).
* :func:`layer_sensitivity` — the whole analysis behind ``onnxcompress sensitivity``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import PassResult
from onnxcompress.quant.calibrate import Calibration, collect_statistics
from onnxcompress.quant.concat_scales import share_concat_params
from onnxcompress.quant.dynamic import plan_dynamic, quantize_dynamic_graph
from onnxcompress.quant.float_pools import with_float_pools
from onnxcompress.quant.histogram import DEFAULT_BINS
from onnxcompress.quant.observers import compute_range
from onnxcompress.quant.options import QuantConfig
from onnxcompress.quant.params import QParams, activation_params
from onnxcompress.quant.placement import KINDS, R_DEGENERATE, QdqPlan, plan_placement, tensor_dtypes
from onnxcompress.quant.rewrite import apply_plan
from onnxcompress.runtime.batching import Batch
from onnxcompress.runtime.data import CalibSource
from onnxcompress.runtime.fidelity import OutputAccumulator, OutputMetrics, ReferenceScales, SliceSpec, worst
from onnxcompress.runtime.progress import track
from onnxcompress.runtime.session import make_session

__all__ = [
    "REFERENCE_BUDGET",
    "Evaluator",
    "Fidelity",
    "Quantizer",
    "derived_tensors",
    "measured_tensors",
    "plan_params",
    "rank_layers",
]

log = logging.getLogger(__name__)

#: Bytes of float-model outputs the :class:`Evaluator` keeps in memory (above: recomputed per run).
REFERENCE_BUDGET = 256 * 2**20
_LAYER_KINDS = frozenset({"compute", "weights", "binary", "variadic", "unary"})
_ACTIVATIONS = ("Relu", "Clip")


# --------------------------------------------------------------------------------- parameters


def derived_tensors(plan: QdqPlan) -> list[str]:
    """Calibrated Concat outputs (no folded activation) whose range :func:`plan_params` takes as the
    union of their calibrated inputs' ranges (a Concat only copies its inputs' values)."""
    calibrated = set(plan.calibrated())
    return [g.output.name for g in plan.groups
            if g.kind == "variadic" and g.act is None and g.output.name in calibrated
            and any(t.name in calibrated for t in g.node.inputs)]


def measured_tensors(plan: QdqPlan) -> list[str]:
    """The tensors of ``plan.calibrated()`` whose statistics :func:`plan_params` reads: all but the
    :func:`derived_tensors`."""
    derived = set(derived_tensors(plan))
    return [t for t in plan.calibrated() if t not in derived]


def plan_params(plan: QdqPlan, calib: Calibration, cfg: QuantConfig, method: str, percentile: float,
                result: PassResult, logger: logging.Logger | None = None,
                ranges_cache: dict | None = None) -> dict[str, QParams]:
    """Scale and zero point of every tensor of ``plan.calibrated()`` from its calibrated range.

    A Concat's output range is the union of its inputs' ranges (it only copies their values: its
    own statistics are not needed, see :func:`derived_tensors`); a
    folded Clip/Relu clamps the range to its bounds. Degenerate ranges are declined (reported)
    and counted in ``result``. With ``cfg.share_concat_scales`` a Concat input that only the
    Concat reads takes the Concat output's parameters (:func:`share_concat_params`).

    Args:
        plan: From :func:`plan_placement`.
        calib: Statistics of (at least) every tensor of ``measured_tensors(plan)``.
        cfg: Settings (``symmetric_activations``).
        method: Range rule (see :func:`onnxcompress.quant.observers.compute_range`).
        percentile: For ``method="percentile"``.
        result: Receives ``degenerate_ranges`` and the declines.
        logger: Where declines are logged.
        ranges_cache: Optional dict reused across calls to skip recomputing ranges.
    """
    cache = ranges_cache if ranges_cache is not None else {}

    def key(name: str) -> tuple[str, str, float, bool]:
        symmetric = cfg.symmetric_activations and name not in plan.one_sided
        how = "minmax" if name in plan.unclipped else method  # qdq rule 13
        return name, how, percentile, symmetric

    keys = {name: key(name) for name in measured_tensors(plan)}
    missing = [k for k in dict.fromkeys(keys.values()) if k not in cache]
    cache.update(zip(missing, _in_threads(
        lambda k: compute_range(calib.collectors[k[0]], k[1], percentile=k[2], symmetric=k[3]), missing)))

    def rng(name: str) -> tuple[float, float]:
        lo, hi = cache[keys[name]]
        if name in plan.bounds:
            lo, hi = max(lo, plan.bounds[name][0]), min(hi, plan.bounds[name][1])
        return lo, hi

    ranges = {name: rng(name) for name in keys}
    derived = set(derived_tensors(plan))
    for group in plan.groups:  # in graph order: a Concat of Concats sees its inputs' unions
        if group.output.name in derived:
            inputs = [ranges[t.name] for t in group.node.inputs if t.name in ranges]
            ranges[group.output.name] = (min(r[0] for r in inputs), max(r[1] for r in inputs))
    params = {}
    for name, (lo, hi) in ranges.items():
        p = activation_params(lo, hi, symmetric=cfg.symmetric_activations, one_sided=name in plan.one_sided)
        if p.degenerate:
            result.decline(name, R_DEGENERATE, f"min = max = {lo:g}", logger=logger)
            result.count("degenerate_ranges")
        params[name] = p
    if cfg.share_concat_scales:
        share_concat_params(plan, params)
    return params


#: Threads computing ranges (each tensor's search is numpy work on its own histogram, which releases
#: the GIL; a tensor's range does not depend on the thread it is computed in).
RANGE_THREADS = min(4, os.cpu_count() or 1)


def _in_threads(work: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``[work(i) for i in items]``, in :data:`RANGE_THREADS` threads."""
    if RANGE_THREADS < 2 or len(items) < 2:
        return [work(i) for i in items]
    with ThreadPoolExecutor(min(RANGE_THREADS, len(items)), thread_name_prefix="onnxcompress-ranges") as pool:
        return list(pool.map(work, items))


# --------------------------------------------------------------------------------- quantizer


class Quantizer:
    """A float model ready to be quantized with any set of layers kept float.

    Args:
        model: The float model (normalised, opset >= 13; not modified).
        cfg: Base settings; its ``exclude`` stays excluded in every variant.
        method: Range rule.
        percentile: For ``method="percentile"``.
        logger: Where placement declines are logged.

    Attributes:
        layers: Node names of every quantizable layer of the full plan, in graph order.
        ops: ``{layer: op type}``.
        base: The :class:`PassResult` of planning the full quantization (its declines and
            counters: what the plain pass would report).
    """

    def __init__(self, model: onnx.ModelProto, cfg: QuantConfig, *, method: str = "mse", percentile: float = 99.99,
                 logger: logging.Logger | None = None):
        self.model, self.cfg, self.method, self.percentile = model, cfg, method, percentile
        self.logger = logger or log
        self.calib: Calibration | None = None
        self._ranges: dict = {}
        graph = serde.to_graph(model)
        graph.toposort()
        self.base = PassResult()
        if cfg.dynamic:
            nodes = plan_dynamic(graph, cfg, self.base, self.logger)
        else:
            nodes = [g.node for g in plan_placement(graph, cfg, self.base, self.logger).groups if g.kind in _LAYER_KINDS]
        self.layers = [n.name for n in nodes]
        self.ops = {n.name: n.op for n in nodes}
        unnamed = [n.op for n in nodes if not n.name]
        if unnamed:
            raise InputError(f"quantize_int8: a {unnamed[0]} node has no name (normalize names them); cannot select it")
        self._needed = [] if cfg.dynamic else _tensors_any_variant(graph)

    def calibrate(self, source: CalibSource, *, batch_size: int = 32, cache: str | None = None,
                  progress: bool = False, sample: int = 0) -> Calibration:
        """Collect histograms of every tensor any variant may quantize, in one pass over ``source``
        (``sample``: see :func:`~onnxcompress.quant.calibrate.collect_statistics`)."""
        self._source, self._batch_size, self._sample = source, batch_size, sample
        if self.cfg.dynamic:  # ranges are taken at run time
            self.calib = Calibration({})
            return self.calib
        self.calib = collect_statistics(self.model, self._needed, source, batch_size=batch_size, bins=DEFAULT_BINS,
                                        cache=cache, progress=progress, sample=sample)
        return self.calib

    def ensure_calibrated(self, names: list[str]) -> None:
        """Calibrate tensors a variant needs that the first run did not cover (not expected to happen)."""
        missing = [n for n in names if n not in self.calib.collectors]
        if missing:
            log.info("calibrating %d more tensors: %s", len(missing), ", ".join(missing[:3]))
            extra = collect_statistics(self.model, missing, self._source, batch_size=self._batch_size,
                                       bins=DEFAULT_BINS, sample=self._sample)
            self.calib.collectors.update(extra.collectors)

    def build(self, float_layers: Iterable[str] = (), result: PassResult | None = None) -> gs.Graph:
        """A new graph quantized like the pass would, with ``float_layers`` excluded (kept float).

        Args:
            float_layers: Layer (node) names to keep float, on top of ``cfg.exclude``.
            result: Receives the placement and rewrite counters and declines (a scratch one if None).
        """
        if self.calib is None:
            raise RuntimeError("Quantizer.calibrate must run before build")
        result = result if result is not None else PassResult()
        cfg = replace(self.cfg, exclude=tuple(self.cfg.exclude) + tuple(sorted(set(float_layers))))
        graph = serde.to_graph(self.model)
        graph.toposort()
        if cfg.dynamic:
            result.modified |= quantize_dynamic_graph(graph, cfg, result, self.logger)
            return graph
        cfg = with_float_pools(graph, cfg)
        plan = plan_placement(graph, cfg, result, self.logger)
        self.ensure_calibrated(measured_tensors(plan))
        params = plan_params(plan, self.calib, cfg, self.method, self.percentile, result, self.logger, self._ranges)
        if plan.groups:
            apply_plan(graph, plan, params, cfg, result)
            result.modified = True
        return graph

    def export(self, float_layers: Iterable[str] = ()) -> onnx.ModelProto:
        """:meth:`build` as a cleaned-up, sorted ``ModelProto``."""
        graph = self.build(float_layers)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return serde.to_model(graph, self.model)

    def only(self, layer: str) -> list[str]:
        """The float-layer set that quantizes ``layer`` alone."""
        return [name for name in self.layers if name != layer]


def _tensors_any_variant(graph: gs.Graph) -> list[str]:
    """Float tensors read or written by any node the placement may quantize (and folded activations)."""
    dtypes = tensor_dtypes(graph)
    names: list[str] = []
    for node in graph.nodes:
        if node.op not in KINDS and node.op not in _ACTIVATIONS:
            continue
        data = node.inputs[:1] if node.op in _ACTIVATIONS else node.inputs
        for t in [*data, *node.outputs]:
            if isinstance(t, gs.Variable) and t.name and dtypes.get(t.name) == onnx.TensorProto.FLOAT:
                names.append(t.name)
    produced = {t.name for n in graph.nodes for t in n.outputs} | {t.name for t in graph.inputs}
    return [n for n in dict.fromkeys(names) if n in produced]


# --------------------------------------------------------------------------------- evaluation


@dataclass
class Fidelity:
    """How close a candidate's outputs are to the float model's (worst output or channel slice).

    Attributes:
        sqnr_db: Lowest SQNR over the outputs and their slices (dB; ``inf`` when identical).
        cosine: Lowest cosine similarity over the outputs and their slices.
        top1_agreement: Argmax agreement of the first classifier-shaped ``[N, C]`` output.
        ref_accuracy: Float model accuracy on labelled data (else ``None``).
        cand_accuracy: Candidate accuracy on labelled data (else ``None``).
        worst: The output or slice (``output0[4:18]``) with the lowest SQNR.
    """

    sqnr_db: float
    cosine: float
    top1_agreement: float | None = None
    ref_accuracy: float | None = None
    cand_accuracy: float | None = None
    worst: str = ""

    @property
    def top1_drop(self) -> float | None:
        """Accuracy drop in points (labels needed)."""
        if self.ref_accuracy is None or self.cand_accuracy is None:
            return None
        return 100.0 * (self.ref_accuracy - self.cand_accuracy)

    @property
    def disagreement(self) -> float | None:
        """Top-1 disagreement with the float model in points."""
        return None if self.top1_agreement is None else 100.0 * (1.0 - self.top1_agreement)

    @classmethod
    def of(cls, outputs: list[OutputMetrics]) -> Fidelity:
        """The worst case over ``outputs`` and their slices; top-1 from the first classifier output."""
        sqnr, cosine, name = worst(outputs)
        fid = cls(sqnr, cosine, worst=name)
        cls_out = next((o for o in outputs if o.top1_agreement is not None), None)
        if cls_out is not None:
            fid.top1_agreement = cls_out.top1_agreement
            fid.ref_accuracy, fid.cand_accuracy = cls_out.ref_accuracy, cls_out.cand_accuracy
        return fid


class Evaluator:
    """Compares candidates with a float model on fixed data (onnxruntime, optimizations off).

    The float model's outputs are computed once and kept when they fit in ``budget`` bytes;
    otherwise the float model is rerun next to every candidate. Channel slices (see
    :mod:`onnxcompress.runtime.fidelity`) are fixed once from the float outputs, so every candidate
    is judged on the same slices: a YOLO head's class-score rows count on their own, not drowned
    by the box rows.

    Args:
        reference: The float model.
        data: The samples (labels, if present, give accuracies).
        batch_size: Batch size of the runs.
        threads: Intra-op threads (1: results do not depend on the machine's core count).
        budget: Bytes of reference outputs kept in memory.
        slices: Given channel slices per output (``--slices``); other outputs get automatic ones.
        optimize: Run the candidates with onnxruntime's graph optimizations (the reference stays
            without: ``outputs`` or a run with optimizations off).
        outputs: The float model's outputs on ``data`` when the caller already ran it (``{output:
            values of every sample, in order}``, every output of ``reference``): not run again.
        runs: The same, run by run (``[(samples, outputs in order)]``, the runs in the data's
            order): used for each batch of ``data`` that is a run (the same first sample and sample
            count), the float model run for the others.
    """

    def __init__(self, reference: onnx.ModelProto, data: CalibSource, *, batch_size: int = 32, threads: int = 1,
                 budget: int = REFERENCE_BUDGET, slices: SliceSpec | None = None, optimize: bool = False,
                 outputs: dict[str, np.ndarray] | None = None, runs: list[tuple[int, list[np.ndarray]]] | None = None):
        self.data, self.batch_size, self.threads, self.optimize = data, batch_size, threads, optimize
        self._reference = reference
        self._session: Any = None
        self.names = [o.name for o in reference.graph.output]
        scales = ReferenceScales()
        self._cached = self._cache_reference(budget, scales, outputs, runs)
        if not self.samples:
            raise InputError(f"{data.description}: no samples")
        self.slices = scales.slices(slices)
        for name, (cuts, source) in self.slices.items():
            log.debug("evaluator: %s slices of %s: %s", source, name, cuts)

    @property
    def _ref_session(self) -> Any:
        """The float model's session (made on first use: not at all when its outputs were given)."""
        if self._session is None:
            self._session = make_session(self._reference, threads=self.threads)
        return self._session

    def _cache_reference(self, budget: int, scales: ReferenceScales, given: dict[str, np.ndarray] | None = None,
                         runs: list[tuple[int, list[np.ndarray]]] | None = None) -> list[list[np.ndarray]] | None:
        """The float outputs per batch (``None`` past ``budget``: rerun with every candidate), from a
        run of the float model, cut from ``given`` or taken from ``runs`` (already in memory: kept)."""
        kept: list[list[np.ndarray]] | None = []
        used, self.samples, self.has_labels = 0, 0, False
        starts = np.cumsum([0] + [n for n, _ in runs or []]).tolist()
        by_start = {start: run for start, run in zip(starts, runs or [])}  # a run is a batch if it starts and ends there
        for batch in self.data.batches(self.batch_size):
            run = by_start.get(self.samples)
            if given is not None:
                outs = [given[name][self.samples:self.samples + len(batch)] for name in self.names]
            elif run is not None and run[0] == len(batch):
                outs = run[1]
            else:
                outs = self._ref_session.run(self.names, batch.feeds)
            for name, out in zip(self.names, outs):
                scales.add(name, np.asarray(out))
            used += sum(o.nbytes for o in outs)
            self.samples += len(batch)
            self.has_labels |= batch.labels is not None
            if kept is not None and given is None and runs is None and used > budget:
                log.info("float outputs exceed %d MiB: the float model reruns with every candidate", budget >> 20)
                kept = None
            if kept is not None:
                kept.append(outs)
        return kept

    def __call__(self, candidate: onnx.ModelProto) -> Fidelity:
        """Fidelity of ``candidate`` (same inputs and outputs as the reference)."""
        session = make_session(candidate, threads=self.threads, optimize=self.optimize)
        return self.score(lambda _i, batch: session.run(self.names, batch.feeds))

    def score(self, run: Callable[[int, Batch], list[np.ndarray]]) -> Fidelity:
        """Fidelity of a candidate given as ``run(batch index, batch) -> its outputs`` (in
        :attr:`names` order) on each batch of the data: a caller that already has them need not rerun."""
        accs = {}
        for n in self.names:
            cuts, source = self.slices.get(n, ([], "user"))
            accs[n] = OutputAccumulator(n, cuts, auto=False, source=source)
        for i, batch in enumerate(self.data.batches(self.batch_size)):
            ref = self._cached[i] if self._cached is not None else self._ref_session.run(self.names, batch.feeds)
            cand = run(i, batch)
            for name, r, c in zip(self.names, ref, cand):
                accs[name].add(np.asarray(r), np.asarray(c), batch.labels)
        return Fidelity.of([a.result() for a in accs.values()])


def rank_layers(quantizer: Quantizer, evaluate: Evaluator, *, layers: Iterable[str] | None = None,
                progress: bool = False, jobs: int = 1) -> list[tuple[str, Fidelity]]:
    """Quantize each layer alone (everything else float) and sort, most sensitive first.

    Order: lowest SQNR, then lowest cosine, then graph order (deterministic for equal scores).
    With ``jobs > 1`` the layers are scored by that many forked worker processes, which share
    the one calibration and the float outputs of the parent; every layer is scored exactly as
    in one process (single-threaded sessions), so the ranking does not depend on ``jobs``.
    """
    chosen = list(quantizer.layers if layers is None else layers)
    jobs = max(1, min(jobs, len(chosen)))
    if jobs > 1 and "fork" not in mp.get_all_start_methods():
        log.info("sensitivity: no fork on this platform; scoring layers in one process")
        jobs = 1
    tasks = list(enumerate(chosen))
    _SHARED.update(quantizer=quantizer, evaluate=evaluate)
    try:
        if jobs == 1:
            scored = list(track(map(_score_layer, tasks), "sensitivity", total=len(tasks), enabled=progress))
        else:
            with mp.get_context("fork").Pool(jobs) as pool:
                scored = list(track(pool.imap(_score_layer, tasks), f"sensitivity ({jobs} jobs)", total=len(tasks),
                                    enabled=progress))
    finally:
        _SHARED.clear()
    scores = [(fid.sqnr_db, fid.cosine, index, layer, fid) for index, layer, fid in scored]
    scores.sort(key=lambda s: s[:3])
    return [(s[3], s[4]) for s in scores]


#: The quantizer and evaluator of the running :func:`rank_layers` (inherited by forked workers).
_SHARED: dict[str, Any] = {}


def _score_layer(task: tuple[int, str]) -> tuple[int, str, Fidelity]:
    index, layer = task
    quantizer, evaluate = _SHARED["quantizer"], _SHARED["evaluate"]
    fid = evaluate(quantizer.export(quantizer.only(layer)))
    log.debug("sensitivity %s: SQNR %.2f dB, cosine %.6f", layer, fid.sqnr_db, fid.cosine)
    return index, layer, fid


# --------------------------------------------------------------------------------- report


# --------------------------------------------------------------------------------- display


