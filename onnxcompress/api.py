"""The library API: :func:`optimize`, :func:`inspect`, :func:`compare`. The CLI is a thin layer on it."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxcompress.core import serde
from onnxcompress.core.attention import Linear, TransformerBlocks, find_blocks
from onnxcompress.core.errors import GateFailed, InputError, OnnxCompressError
from onnxcompress.core.fileio import atomic_write
from onnxcompress.core.graph import node_label
from onnxcompress.core.metrics import ModelMetrics, NodeInfo, model_metrics, node_list
from onnxcompress.core.normalize import normalize_graph
from onnxcompress.core.pass_api import Numerics, Pass, PassContext, PassRecord
from onnxcompress.core.shapes import Dims
from onnxcompress.pipeline.auto import AutoResult, AutoSettings, search
from onnxcompress.pipeline.auto_eval import EvalCache, Job, fingerprint, make_executor
from onnxcompress.pipeline.auto_space import Space, parse_targets
from onnxcompress.pipeline.manager import PassManager, check_pipeline, parse_spec
from onnxcompress.pipeline.provenance import data_record, load_reference, load_with_record
from onnxcompress.pipeline.recipes import Recipe, check_requirements, load_recipe
from onnxcompress.pipeline.validate import Gate, SliceSpec, ValidationReport, compare_models, gate_problem, parse_slices
from onnxcompress.quant.channels import LayerOutliers, layer_input_outliers
from onnxcompress.reporting.pareto import pareto_front
from onnxcompress.runtime.data import CalibSource, data_dims, open_source
from onnxcompress.runtime.progress import steps
from onnxcompress.runtime.tasks import TaskSpec, check_output_ranks

__all__ = ["Report", "optimize", "inspect", "list_nodes", "activation_outliers", "transformer_blocks", "compare",
           "sensitivity", "auto", "auto_gate", "AUTO_COSINE_FLOOR", "DEFAULT_VALIDATION_SAMPLES",
           "OUTLIER_SAMPLES"]

log = logging.getLogger(__name__)

#: Random samples used for validation when no data is given.
DEFAULT_VALIDATION_SAMPLES = 8


@dataclass
class Report:
    """Everything ``optimize`` measured: the same numbers the CLI prints."""

    before: ModelMetrics
    after: ModelMetrics
    passes: list[PassRecord]
    numerics: Numerics
    validation: ValidationReport | None = None
    seconds: float = 0.0
    recipe: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True unless validation ran and failed its gate."""
        return self.validation is None or self.validation.passed

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "recipe": self.recipe,
            "numerics": self.numerics.name.lower(),
            "before": self.before.as_dict(),
            "after": self.after.as_dict(),
            "passes": [r.as_dict() for r in self.passes],
            "validation": self.validation.as_dict() if self.validation else None,
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


def _pipeline(passes: str | Sequence[Pass] | None, recipe: str | Recipe | None,
              calib: Any = None, gate: dict | None = None) -> tuple[list[Pass], dict, str | None]:
    """The passes, the gate overrides (the recipe's, then ``gate``) and the recipe's name; refuses at
    once what cannot run (order, calibration)."""
    if passes is not None and recipe is not None:
        raise InputError("give either passes or a recipe, not both")
    if passes is not None:
        pipeline, rgate, name = (parse_spec(passes) if isinstance(passes, str) else list(passes)), {}, None
    else:
        rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe or "default")
        check_requirements(rec, calib=calib)
        if not rec.passes:
            raise InputError(f"recipe {rec.name} has no passes, only an [auto] table: use onnxcompress auto --recipe")
        pipeline, rgate, name = rec.passes, rec.gate, rec.name
    check_pipeline(pipeline, calib=calib is not None)
    return pipeline, {**rgate, **{k: v for k, v in (gate or {}).items() if v is not None}}, name  # unset: recipe's


def optimize(model: serde.ModelSource, passes: str | Sequence[Pass] | None = None, *,
             recipe: str | Recipe | None = None, calib: Any = None, data: Any = None, validate: bool = True,
             gate: dict[str, float | None] | None = None, force: bool = False, seed: int = 0,
             batch_size: int = 32, samples: int | None = None, dims: dict[str, int] | None = None,
             preprocess: Any = None, progress: bool = False, on_pass: Callable[[PassRecord], None] | None = None,
             slices: str | None = None, reference: serde.ModelSource | None = None,
             task: str | TaskSpec | None = None) -> tuple[onnx.ModelProto, Report]:
    """Optimize a model and validate the result against the original.

    Args:
        model: Path, bytes or ``ModelProto`` (never modified).
        passes: ``"fold_bn,prune_channels:ratio=0.3"`` or a list of :class:`Pass` objects.
        recipe: A built-in recipe name or a TOML path (default: ``default`` when ``passes`` is None).
        calib: Calibration data for data-driven passes (see :func:`onnxcompress.runtime.data.open_source`).
        data: Validation data; defaults to ``calib``, else seeded random inputs.
        validate: Compare the result with the original in onnxruntime and apply the gate (without it, the
            manager frees the input once its graph is built: see :meth:`PassManager.run`'s ``owned``).
        gate: Gate threshold overrides (``min_cosine``, ``max_top1_drop``, ...).
        force: Return the model even if the gate fails (the report says it failed).
        seed: Seed for every random choice.
        batch_size: Batch size for calibration and validation runs.
        samples: Use at most this many validation samples.
        dims: Values for symbolic input dims (by name); the others take ``calib``'s (else ``data``'s) shapes.
        preprocess: Image preprocessing spec for image-folder data.
        progress: Show progress bars.
        on_pass: Called after each pass with its record.
        slices: Channel slices to validate, ``"OUTPUT:START[:STOP],..."`` (automatic ones either way).
        reference: Validate against this model (same inputs and outputs), not ``model``: the true original of a chain.
        task: Task metrics: ``auto`` (default), ``none``, a task name or a :class:`TaskSpec` (see ``compare``).

    Returns:
        ``(model, report)``; ``report.extra``: files and data used, ``report.before.dims``: the dims' sources.

    Raises:
        InputError: Bad model, reference, data or pipeline (options, order, missing ``calib``: before loading).
        PassFailed: A pass failed.
        GateFailed: Validation failed and ``force`` is False (carries ``.report`` and ``.model``).
    """
    start, (pipeline, overrides, recipe_name) = time.perf_counter(), _pipeline(passes, recipe, calib, gate)
    inp = _load(model, reference, validate, slices, task, pipeline)  # a bad task or slice fails before any pass runs
    validate = validate and not inp.extra.get("dry_run")
    calib_src, data_src, run_dims = _sources(inp.box[0], calib, data if validate else None, preprocess, samples, seed, dims)
    ctx = PassContext(calib=calib_src, seed=seed, progress=progress, slices=inp.slices, dims=run_dims)
    with steps([p.name for p in pipeline] + (["validate"] if validate else []), "optimize", enabled=progress) as bar:
        manager = PassManager(pipeline, ctx, on_pass=_chain(bar.done, on_pass))
        before = model_metrics(inp.box[0], run_dims)
        original = (inp.box[0] if inp.ref is None else inp.ref) if validate else None  # else the input may be freed
        result, records = manager.run(inp.box.pop(), owned=original is None or inp.ref is not None, metrics=before)
        assert manager.metrics is not None  # run measured the model it returned
        report = Report(before, manager.metrics, records, manager.numerics, recipe=recipe_name, extra=inp.extra)
        source = None if original is None else \
            data_src or _validation_source(None, calib, original, seed, samples, run_dims, preprocess)
        if original is not None and source is not None:
            report.validation = _validate(original, result, source, Gate.for_numerics(manager.numerics, **overrides),
                                          batch_size, progress, inp.slices, inp.task)
    inp.extra.update(data_record(calib_src, source))
    report.seconds = time.perf_counter() - start
    if report.validation is not None and not report.passed and not force:
        raise GateFailed("validation gate failed: " + "; ".join(report.validation.failures), report, result)
    return result, report


@dataclass
class _Inputs:
    """What :func:`optimize` loaded and parsed before any pass runs."""

    box: list[onnx.ModelProto]  # the input model (the manager may free it)
    ref: onnx.ModelProto | None  # --reference, else None
    extra: dict  # records for the JSON report
    slices: SliceSpec | None
    task: TaskSpec


def _load(model: serde.ModelSource, reference: serde.ModelSource | None, validate: bool, slices: str | None,
          task: str | TaskSpec | None, pipeline: Sequence[Pass] = ()) -> _Inputs:
    """Load the input (and reference) with their records (``input_model``, ``reference``: the input's
    record unless a reference is given; None without validation); parse ``slices`` and ``task``,
    refusing a task that no output's declared type can fit. A pass with ``dry_run=true``
    (``prune_channels``: its plan only, the model unchanged) means no validation: ``extra["dry_run"]``."""
    task_spec = TaskSpec.of(task)
    dry_run = any(p.opts.get("dry_run") for p in pipeline)
    validate = validate and not dry_run
    if reference is not None and not validate:
        raise InputError("--reference needs validation (drop --no-validate)")
    loaded, record = load_with_record(model)
    ref, ref_record = load_reference(reference, loaded) if reference is not None else (None, None)
    if ref_record is None and validate:
        ref_record = {**(record or {"path": None, "sha256": None}), "given": False}
    spec = _output_options(loaded, slices, task_spec)
    extra = {"input_model": record, "reference": ref_record, **({"dry_run": True} if dry_run else {})}
    return _Inputs([loaded], ref, extra, spec, task_spec)


def _output_options(model: onnx.ModelProto, slices: str | None, task: TaskSpec) -> SliceSpec | None:
    """The parsed ``slices``; refuses a task that no output's declared type can fit (before any pass runs)."""
    check_output_ranks(task, {o.name: _float_rank(o.type.tensor_type) for o in model.graph.output})
    return parse_slices(slices, [o.name for o in model.graph.output]) if slices else None


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _float_rank(tensor_type: onnx.TypeProto.Tensor) -> int | None:
    """The declared rank of a float output, ``None`` when unknown, 0 for other element types."""
    if tensor_type.elem_type not in _FLOATS:
        return 0 if tensor_type.elem_type else None
    return len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None


def _sources(model: onnx.ModelProto, calib: Any, data: Any, preprocess: Any, samples: int | None, seed: int,
             dims: dict[str, int] | None) -> tuple[CalibSource | None, CalibSource | None, Dims]:
    """The calibration and validation sources (of those given) and the run's symbolic dims."""
    calib_src = open_source(calib, model, preprocess=preprocess, seed=seed, dims=dims) if calib is not None else None
    data_src = open_source(data, model, preprocess=preprocess, limit=samples, seed=seed, dims=dims) \
        if data is not None else None
    return calib_src, data_src, data_dims(model, dims, ("--calib", calib, calib_src), ("--data", data, data_src))


def _validate(original: onnx.ModelProto, result: onnx.ModelProto, source: CalibSource, gate: Gate,
              batch_size: int, progress: bool, slices: SliceSpec | None = None,
              task: TaskSpec | None = None) -> ValidationReport:
    """Compare ``result`` with ``original`` on ``source`` and check ``gate``."""
    validation = compare_models(original, result, source, batch_size=batch_size, progress=progress, slices=slices,
                                task=task)
    validation.gate = gate
    validation.failures = gate.check(validation)
    return validation


def _chain(*callbacks: Callable[[PassRecord], None] | None) -> Callable[[PassRecord], None]:
    """One ``on_pass`` callback calling each given one in order."""
    def call(record: PassRecord) -> None:
        for callback in callbacks:
            if callback is not None:
                callback(record)
    return call


def _validation_source(data, calib, model, seed, samples, dims: Dims, preprocess) -> CalibSource:
    chosen = data if data is not None else calib
    if chosen is None:
        chosen = f"random:{samples or DEFAULT_VALIDATION_SAMPLES}"
    return open_source(chosen, model, preprocess=preprocess, limit=samples, seed=seed, dims=dims.values)


def inspect(model: serde.ModelSource, dims: dict[str, int] | None = None, *, calib: Any = None, data: Any = None,
            preprocess: Any = None) -> ModelMetrics:
    """Size, parameters, MACs per node and in total, op counts of a model.

    Symbolic input dims take the values in ``dims``, then the shapes of the first batch of ``calib``
    (else ``data``), else the defaults (with a warning); :attr:`ModelMetrics.dims` says which.
    """
    loaded = serde.load_model(model)
    return model_metrics(loaded, _inspect_dims(loaded, dims, calib, data, preprocess))


def list_nodes(model: serde.ModelSource, dims: dict[str, int] | None = None, *, calib: Any = None,
               data: Any = None, preprocess: Any = None) -> list[NodeInfo]:
    """Every node (name, op type, output shapes): the names options such as ``exclude=`` take.
    Symbolic dims as in :func:`inspect`."""
    loaded = serde.load_model(model)
    return node_list(loaded, _inspect_dims(loaded, dims, calib, data, preprocess))


#: Calibration samples :func:`activation_outliers` reads at most.
OUTLIER_SAMPLES = 256


def activation_outliers(model: serde.ModelSource, calib: Any, dims: dict[str, int] | None = None, *,
                        preprocess: Any = None, samples: int = OUTLIER_SAMPLES, batch_size: int = 32,
                        progress: bool = False) -> list[LayerOutliers]:
    """Per-channel outlier statistics of every MatMul/Gemm input (constant weight) over the first
    ``samples`` of ``calib`` (``max / median`` of the per-channel ``max|x|``), and whether ``smooth``
    can migrate them (see :func:`onnxcompress.quant.channels.layer_input_outliers`)."""
    loaded = serde.load_model(model)
    source = open_source(calib, loaded, preprocess=preprocess, limit=samples, dims=dims)
    return layer_input_outliers(loaded, source, batch_size=batch_size, progress=progress)


def transformer_blocks(model: serde.ModelSource) -> dict[str, list[dict[str, object]]]:
    """Attention blocks, FFNs and unrecognised attention-like nodes of a model
    (:func:`onnxcompress.core.attention.find_blocks` on the graph normalised as the passes see it).

    The graph is normalised in place (:func:`~onnxcompress.core.normalize.normalize_graph`), not
    exported and imported again: an export copies every weight while the loaded model holds them
    (twice the weights' memory above 2 GB, where ``inspect`` should stay near one copy)."""
    graph = serde.to_graph(serde.load_model(model))
    if any(normalize_graph(graph).values()):
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return _summarize(find_blocks(graph))


def _summarize(found: TransformerBlocks) -> dict[str, list[dict[str, object]]]:
    """A JSON-ready summary (what ``inspect`` shows): per block its style, heads, head size and
    projection node names; per FFN its width, activation and projections; the unrecognised ones."""
    def names(*lins: Linear | None) -> list[str | None]:
        return [None if lin is None else node_label(lin.node) for lin in lins]

    return {
        "attention": [{"name": b.name, "style": b.style, "heads": b.heads, "head_dim": b.head_dim,
                       "qkvo": names(b.q, b.k, b.v, b.o) if b.qkv is None else names(b.qkv, b.qkv, b.qkv, b.o),
                       "head_literals": len(b.shapes), "problem": b.problem} for b in found.attention],
        "ffn": [{"name": f.name, "width": f.width, "activation": f.act_kind, "up": node_label(f.up.node),
                 "down": node_label(f.down.node)} for f in found.ffn],
        "unrecognised": [{"node": u.node, "reason": u.reason} for u in found.unrecognised],
    }


def _inspect_dims(model: onnx.ModelProto, dims: dict[str, int] | None, calib: Any, data: Any, preprocess: Any) -> Dims:
    """:func:`onnxcompress.runtime.data.data_dims` with ``calib`` and ``data`` opened here (only
    their first sample is read)."""
    opened = [(option, value, open_source(value, model, preprocess=preprocess, limit=1, dims=dims))
              for option, value in (("--calib", calib), ("--data", data)) if value is not None]
    return data_dims(model, dims, *opened)


def compare(reference: serde.ModelSource, candidate: serde.ModelSource, data: Any = None, *,
            samples: int | None = None, seed: int = 0, batch_size: int = 32, dims: dict[str, int] | None = None,
            preprocess: Any = None, gate: Gate | None = None, progress: bool = False,
            slices: str | None = None, task: str | TaskSpec | None = None) -> ValidationReport:
    """Compare a candidate's outputs with a reference model's on the same inputs.

    Without ``data``, seeded random inputs are used. With a ``gate`` its verdict is filled in
    (every slice checked too). ``slices``: channel slices to measure, ``"OUTPUT:START[:STOP],..."``.
    ``task``: task metrics, ``auto`` (default: inferred from the output layout where unambiguous),
    ``none``, ``classification``, ``detection``, ``embedding``, ``segmentation``, or a :class:`TaskSpec`
    with the detection settings; their thresholds (``min_det_f1``, ...) are :class:`Gate` fields.
    """
    task_spec = TaskSpec.of(task)
    ref, cand = serde.load_model(reference), serde.load_model(candidate)
    slice_spec = _output_options(ref, slices, task_spec)
    source = open_source(data if data is not None else f"random:{samples or DEFAULT_VALIDATION_SAMPLES}", ref,
                         preprocess=preprocess, limit=samples, seed=seed, dims=dims)
    data_dims(ref, dims, ("--data", data if data is not None else "random", source))
    report = compare_models(ref, cand, source, batch_size=batch_size, progress=progress, slices=slice_spec,
                            task=task_spec)
    if gate is not None:
        report.gate, report.failures = gate, gate.check(report)
    return report


def sensitivity(model: serde.ModelSource, calib: Any, data: Any = None, **kwargs: Any):
    """Rank layers by the output SQNR they cost when quantized alone (int8, everything else float).

    A thin wrapper of :func:`onnxcompress.pipeline.sensitivity.layer_sensitivity` (same keyword
    arguments: ``method``, ``options``, ``prepare``, ``batch_size``, ``samples``, ``seed``,
    ``dims``, ``preprocess``, ``progress``, ``name``, ``slices``, ``jobs``); returns its ``SensitivityReport``.
    """
    from onnxcompress.pipeline.sensitivity import layer_sensitivity

    return layer_sensitivity(model, calib, data, **kwargs)


#: Cosine floor of the gate when ``auto`` judges by accuracy (``max_drop``): it only catches broken models.
AUTO_COSINE_FLOOR = 0.95


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxcompress" / "auto"


def auto_gate(max_drop: float | None, min_cosine: float | None) -> tuple[dict[str, float], str]:
    """The gate thresholds ``auto`` gives ``optimize`` and the quality that ranks candidates:
    ``max_drop`` → accuracy drop ≤ it (and cosine ≥ :data:`AUTO_COSINE_FLOOR` unless ``min_cosine``);
    ``min_cosine`` alone → cosine ≥ it (the lossy gate's other defaults stay, as in ``optimize``)."""
    if max_drop is None and min_cosine is None:
        raise InputError("auto needs a quality bound: --max-drop POINTS (with labels in --data) or --min-cosine C")
    gate: dict[str, float] = {}
    for key, value in (("max_top1_drop", max_drop), ("min_cosine", min_cosine)):
        problem = None if value is None else gate_problem(key, value)
        if problem:
            raise InputError(f"--{'max-drop' if key == 'max_top1_drop' else 'min-cosine'} {value:g}: {problem}")
    if max_drop is not None:
        gate["max_top1_drop"] = float(max_drop)
        gate["min_cosine"] = AUTO_COSINE_FLOOR if min_cosine is None else float(min_cosine)
        return gate, "accuracy"
    gate["min_cosine"] = float(min_cosine)  # type: ignore[arg-type]
    return gate, "cosine"


def _has_labels(data: Any, model: onnx.ModelProto) -> bool:
    source = open_source(data, model, limit=1)
    return any(batch.labels is not None for batch in source.batches(1))


def auto(model: serde.ModelSource, calib: Any, data: Any = None, *, target: Any = None,
         max_drop: float | None = None, min_cosine: float | None = None, budget_minutes: float = 10.0,
         seed: int = 0, jobs: int = 0, ray: str | None = None, cache_dir: str | os.PathLike | None = None,
         samples: int | None = None, batch_size: int = 32, space: Space | None = None, recipe: Any = None,
         latency_runs: int = 200, progress: bool = False) -> AutoResult:
    """Search pruning, factorization, quantization and their combinations for the model that meets
    ``target`` within the quality bound (see :mod:`onnxcompress.pipeline.auto` for the strategy).

    Args:
        model: Path, bytes or ``ModelProto`` (never modified).
        calib: Calibration data (needed: every technique searched is data-aware).
        data: Validation data (default ``calib``); labels make ``max_drop`` an accuracy bound.
        target: ``"latency=0.5"``, ``["latency=0.5", "size=0.25"]`` or ``{"size": 0.1}``: upper bounds
            on candidate / original ratios; all must hold; the first is minimised.
        max_drop: Accuracy points the winner may lose on ``data`` (needs labels).
        min_cosine: Cosine floor of every output vs the original.
        budget_minutes: Stop launching evaluations after this long (the best found so far wins).
        seed: Seed of every pass and of the latency rounds: same inputs and seed, same winner and bytes.
        jobs: Evaluations in parallel in a local process pool (0: one per core; 1: in this process).
        ray: ``"auto"`` (local Ray, or the one initialised) or a cluster address; needs ``[distributed]``.
        cache_dir: Where evaluations are cached (default ``~/.cache/onnxcompress/auto``): a rerun resumes.
        samples, batch_size, latency_runs: Validation samples (at most), batch size, timed latency rounds.
        space: The settings tried per technique (:class:`~onnxcompress.pipeline.auto_space.Space`).
        recipe: A recipe whose ``[auto]`` table gives ``target``/``max_drop``/``min_cosine`` defaults.
        progress: Progress bars on stderr.

    Returns:
        An :class:`AutoResult`: ``winner`` (record with ``spec``), ``model`` (the winner, byte-identical to
        ``optimize(model, winner spec, ...)`` with the same data, seed and gate), every candidate's
        record (``candidates`` in :meth:`AutoResult.as_dict`, Pareto front marked), the signals used.
        ``winner`` is None when no candidate met the targets (``best`` is the closest one).

    Raises:
        InputError: Bad model, data, target, quality bound or options.
    """
    if recipe is not None:
        target, max_drop, min_cosine = _recipe_auto(recipe, target, max_drop, min_cosine)
    targets, (gate, quality) = parse_targets(target), auto_gate(max_drop, min_cosine)
    if calib is None:
        raise InputError("auto needs --calib (every technique it searches is data-aware)")
    if budget_minutes <= 0:
        raise InputError(f"--budget-minutes must be positive, got {budget_minutes:g}")
    loaded = serde.load_model(model)
    data = calib if data is None else data
    if quality == "accuracy" and not _has_labels(data, loaded):
        raise InputError("--max-drop needs labels in --data (a 'labels' array); use --min-cosine otherwise")
    cache = EvalCache(cache_dir if cache_dir is not None else _default_cache_dir())
    original, sha = _stage_original(cache, loaded)
    settings = AutoSettings(targets, gate, quality, calib, data, sha, fingerprint(calib), fingerprint(data), seed,
                            samples, batch_size, budget_minutes * 60.0, space or Space(), progress, latency_runs)
    executor = make_executor(jobs, ray)
    try:
        result = search(loaded, original, settings, _auto_evaluate, executor, cache)
    finally:
        executor.close()
    _mark_front(result)
    if result.winner is not None:
        result.model = serde.load_model(result.winner["model_path"])
    return result


def _recipe_auto(recipe: Any, target: Any, max_drop: float | None,
                 min_cosine: float | None) -> tuple[Any, float | None, float | None]:
    """``target`` and the quality bound, the recipe's ``[auto]`` table filling what was not given."""
    defaults = load_recipe(recipe).auto
    target = target if target is not None else defaults.get("target")
    if max_drop is None and min_cosine is None:
        max_drop, min_cosine = defaults.get("max_drop"), defaults.get("min_cosine")
    return target, max_drop, min_cosine


def _stage_original(cache: EvalCache, model: onnx.ModelProto) -> tuple[Path, str]:
    """The model written once into the cache folder (what every job reads) and its sha256."""
    blob = model.SerializeToString(deterministic=True)
    sha = hashlib.sha256(blob).hexdigest()
    path = cache.folder / f"original-{sha[:32]}.onnx"
    if not path.is_file():
        atomic_write(path, lambda fh: fh.write(blob))
    return path, sha


def _mark_front(result: AutoResult) -> None:
    """``front`` on every record: passed, timed, and no other is both at least as fast and as good."""
    timed = [r for r in result.records if r.get("passed") and r.get("latency_ratio") is not None]
    key = "accuracy" if result.quality == "accuracy" else "cosine"
    flags = pareto_front([(r["latency_ratio"], r.get(key) or 0.0) for r in timed])
    for r in result.records:
        r["front"] = False
    for r, front in zip(timed, flags):
        r["front"] = front


def _auto_evaluate(job: Job) -> dict:
    """One ``auto`` candidate: :func:`optimize` with the job's spec, data, seed and gate (``force``: a
    failing candidate is a result); the model is written to ``job.output``."""
    start = time.perf_counter()
    try:
        result, report = optimize(job.model, job.spec, calib=job.calib, data=job.data, gate=job.gate, force=True,
                                  seed=job.seed, batch_size=job.batch_size, samples=job.samples)
    except OnnxCompressError as exc:
        return {"passed": False, "failures": [str(exc)], "error": type(exc).__name__,
                "seconds": round(time.perf_counter() - start, 2)}
    serde.save_model(result, job.output)
    outputs = report.validation.outputs if report.validation else []
    scored = [o for o in outputs if o.cand_accuracy is not None]
    acc = scored[0] if scored else None
    return {"passed": report.passed, "failures": report.validation.failures if report.validation else [],
            "error": None, "file_bytes": report.after.file_bytes, "macs": report.after.macs,
            "size_ratio": round(report.after.file_bytes / max(1, report.before.file_bytes), 4),
            "macs_ratio": round(report.after.macs / max(1, report.before.macs), 4),
            "accuracy": None if acc is None else round(100 * acc.cand_accuracy, 4),
            "ref_accuracy": None if acc is None or acc.ref_accuracy is None else round(100 * acc.ref_accuracy, 4),
            "accuracy_drop": None if acc is None or acc.top1_drop is None else round(acc.top1_drop, 4),
            "cosine": round(min((o.cosine for o in outputs), default=1.0), 6),
            "sqnr_db": round(min((o.sqnr_db for o in outputs), default=math.inf), 3) if outputs else None,
            "seconds": round(time.perf_counter() - start, 2)}
