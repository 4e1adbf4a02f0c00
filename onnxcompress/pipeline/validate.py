"""Validation: run the original and the optimized model in onnxruntime and compare.

Both run on CPU. The reference runs with graph optimizations disabled. The candidate does too,
unless it holds quantization ops (Q/DQ, MatMulInteger, ...): then it runs as a user's default
session would (optimizations on), because that is when onnxruntime swaps fake-quant for its
integer kernels, whose numbers can differ (on CPUs without VNNI its u8s8 kernels saturate 16-bit
sums: a gate judging the fake-quant graph passed an int8 model 5.6 points worse as deployed).
The report records ``candidate_optimized``. Metrics per output, accumulated batch by
batch (nothing but running sums is kept): max and mean absolute error, relative max error,
cosine similarity, SQNR in dB, and for classifier-shaped outputs ``[N, C]`` top-1 agreement and,
with labels, the task accuracy of both models. The :class:`Gate` turns metrics into a verdict;
its defaults follow the pipeline's declared :class:`~onnxcompress.core.pass_api.Numerics`.

Channel slices (see :mod:`onnxcompress.runtime.fidelity`): an output whose channels (axis 1) have
very different scales, like a YOLO head ``[N, 4+nc, A]`` of boxes and class scores, also gets
metrics per slice of that axis, automatic or given with ``--slices`` (:func:`parse_slices`).

The gate checks each slice with every metric it checks on whole outputs (the worst slice
decides) and names it, e.g. ``output0[4:84]: cosine 0.912000 < 0.99``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import onnx

from onnxcompress.core.errors import InputError, PassFailed
from onnxcompress.core.pass_api import Numerics
from onnxcompress.quant.placement import QUANTIZED_OPS
from onnxcompress.runtime.data import CalibSource, input_specs
from onnxcompress.runtime.fidelity import OutputAccumulator, OutputMetrics, SliceMetrics, SliceSpec
from onnxcompress.runtime.progress import track
from onnxcompress.runtime.session import make_session
from onnxcompress.runtime.tasks import TaskAccumulator, TaskMetrics, TaskSpec, start_task, task_note

__all__ = ["GATE_RANGES", "TASK_GATES", "ValidationReport", "Gate", "compare_models", "gate_problem", "parse_slices",
           "runs_integer_kernels"]

log = logging.getLogger(__name__)


@dataclass
class ValidationReport:
    """What :func:`compare_models` measured, and the gate's verdict once checked."""

    data: str
    samples: int
    outputs: list[OutputMetrics]
    gate: Gate | None = None
    failures: list[str] = field(default_factory=list)
    task_note: str | None = None
    candidate_optimized: bool = False

    @property
    def passed(self) -> bool:
        """True when a gate was checked and nothing failed."""
        return not self.failures

    def as_dict(self) -> dict:
        """JSON-ready form (infinities as strings)."""
        outs = []
        for o in self.outputs:
            d = {k: _jsonable(v) for k, v in asdict(o).items() if k not in ("slices", "task")}
            d["top1_drop"] = _jsonable(o.top1_drop)
            if o.slices:  # only sliced outputs carry the key
                d["slices"] = [{"name": s.label(o.name), **{k: _jsonable(v) for k, v in asdict(s).items()}}
                               for s in o.slices]
            if o.task is not None:  # only outputs with a task carry the key
                d["task"] = o.task.as_dict()
            outs.append(d)
        return {"data": self.data, "samples": self.samples, "outputs": outs,
                "gate": self.gate.as_dict() if self.gate else None, "passed": self.passed,
                "failures": self.failures, "candidate_optimized": self.candidate_optimized,
                **({"task_note": self.task_note} if self.task_note else {})}


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    return v


#: The sane range of every :class:`Gate` threshold (inclusive bounds).
GATE_RANGES: dict[str, tuple[float, float]] = {
    "max_rel_err": (0.0, math.inf),
    "atol": (0.0, math.inf),
    "min_cosine": (-1.0, 1.0),
    "min_sqnr": (-math.inf, math.inf),
    "min_top1_agreement": (0.0, 1.0),
    "max_top1_drop": (0.0, 100.0),
    "min_det_f1": (0.0, 1.0),
    "min_seg_miou": (0.0, 1.0),
    "min_emb_cosine": (-1.0, 1.0),
}

#: Task thresholds of the :class:`Gate`: ``key: (task, metric in TaskMetrics.values, label)``.
TASK_GATES: dict[str, tuple[str, str, str]] = {
    "min_det_f1": ("detection", "f1", "detection F1"),
    "min_seg_miou": ("segmentation", "miou", "segmentation mIoU"),
    "min_emb_cosine": ("embedding", "cosine_min", "min per-sample embedding cosine"),
}


def gate_problem(key: str, value: object) -> str | None:
    """What is wrong with the gate threshold ``key = value`` (unknown key, not a number, out of
    :data:`GATE_RANGES`), or ``None``."""
    if key not in GATE_RANGES:
        return f"unknown gate threshold; valid: {', '.join(sorted(GATE_RANGES))}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "expected a finite number"
    lo, hi = GATE_RANGES[key]
    if not lo <= value <= hi:
        return f"must be in [{lo:g}, {hi:g}]" if math.isfinite(hi) else f"must be >= {lo:g}"
    return None


@dataclass
class Gate:
    """Thresholds a candidate must meet. ``None`` disables a check.

    Attributes:
        max_rel_err: max|ref - cand| <= atol + max_rel_err * max|ref| (per output).
        atol: Absolute slack of the check above.
        min_cosine: Cosine similarity floor (per output).
        min_sqnr: SQNR floor in dB.
        min_top1_agreement: Fraction of samples whose argmax agrees (classifier outputs).
        max_top1_drop: Task accuracy drop in points (needs labels).
        min_det_f1: Detection F1 vs the reference's detections (outputs evaluated as detection).
        min_seg_miou: Mean IoU of the argmax maps (outputs evaluated as segmentation).
        min_emb_cosine: Lowest per-sample cosine (outputs evaluated as embeddings).

    A task threshold fails when no output was evaluated for its task (set the task).
    """

    max_rel_err: float | None = None
    atol: float = 1e-5
    min_cosine: float | None = None
    min_sqnr: float | None = None
    min_top1_agreement: float | None = None
    max_top1_drop: float | None = None
    min_det_f1: float | None = None
    min_seg_miou: float | None = None
    min_emb_cosine: float | None = None

    @classmethod
    def for_numerics(cls, numerics: Numerics, **overrides: float | None) -> Gate:
        """Default gate for ``numerics``, with user overrides (``None`` values are ignored)."""
        if numerics == Numerics.EXACT:
            gate = cls(max_rel_err=1e-4)
        elif numerics == Numerics.APPROX:
            gate = cls(min_cosine=0.999, min_top1_agreement=0.99)
        else:
            gate = cls(min_cosine=0.99, max_top1_drop=1.0)
        names = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in names:
                raise InputError(f"unknown gate threshold {key!r}; valid: {', '.join(sorted(names))}")
            if value is not None:
                setattr(gate, key, float(value))
        return gate

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    def check(self, report: ValidationReport) -> list[str]:
        """Human-readable failures (empty when the candidate passes): whole outputs, then each slice,
        then the task metrics."""
        fails = []
        for o in report.outputs:
            fails += self._check_output(o)
            for s in o.slices:
                fails += self._check_fidelity(s.label(o.name), s)
        return fails + self._check_tasks(report.outputs)

    def _check_tasks(self, outputs: list[OutputMetrics]) -> list[str]:
        out = []
        for key, (task, metric, label) in TASK_GATES.items():
            floor = getattr(self, key)
            if floor is None:
                continue
            evaluated = [(o.name, o.task.values.get(metric)) for o in outputs
                         if o.task is not None and o.task.task == task]
            if not evaluated:
                out.append(f"{key} {floor:g}: no output was evaluated as {task} (set the task: --task {task})")
            for name, value in evaluated:
                v = math.nan if value is None else float(value)
                if not v >= floor:
                    out.append(f"{name}: {label} {v:.4f} < {floor:g}")
        return out

    def _check_fidelity(self, name: str, o: OutputMetrics | SliceMetrics) -> list[str]:
        out = []
        if self.max_rel_err is not None and o.max_abs > self.atol + self.max_rel_err * o.max_ref:
            out.append(f"{name}: max abs error {o.max_abs:.3g} > {self.atol:g} + {self.max_rel_err:g}·{o.max_ref:.3g}")
        if self.min_cosine is not None and not o.cosine >= self.min_cosine:
            out.append(f"{name}: cosine {o.cosine:.6f} < {self.min_cosine}")
        if self.min_sqnr is not None and not o.sqnr_db >= self.min_sqnr:
            out.append(f"{name}: SQNR {o.sqnr_db:.2f} dB < {self.min_sqnr} dB")
        return out

    def _check_output(self, o: OutputMetrics) -> list[str]:
        out = self._check_fidelity(o.name, o)
        if self.min_top1_agreement is not None and o.top1_agreement is not None \
                and o.top1_agreement < self.min_top1_agreement:
            out.append(f"{o.name}: top-1 agreement {o.top1_agreement:.4f} < {self.min_top1_agreement}")
        drop = o.top1_drop
        if self.max_top1_drop is not None and drop is not None and drop > self.max_top1_drop:
            out.append(f"{o.name}: accuracy drop {drop:.2f} points > {self.max_top1_drop}")
        return out


def parse_slices(spec: str | None, outputs: list[str]) -> SliceSpec:
    """Parse ``OUTPUT:START:STOP,...`` (OUTPUT a name or an index into ``outputs``, STOP optional).

    Raises:
        InputError: Bad syntax, an unknown output, or an empty slice (bounds are checked against the
            output's shape when it is first seen).
    """
    result: SliceSpec = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            raise InputError(f"--slices {spec!r}: empty item; expected OUTPUT:START[:STOP],...")
        name, start, stop = _parse_slice(item, outputs)
        result.setdefault(name, []).append((start, stop))
    return result


def _parse_slice(item: str, outputs: list[str]) -> tuple[str, int, int | None]:
    """One ``OUTPUT:START[:STOP]``; output names may contain ':' (the longest known name wins)."""
    for fields_ in (item.rsplit(":", 1), item.rsplit(":", 2)):
        if len(fields_) < 2 or not all(f.isdigit() for f in fields_[1:2]) \
                or not all(f.isdigit() or f == "" for f in fields_[2:]):
            continue
        name = fields_[0]
        if name not in outputs and name.isdigit():
            if int(name) >= len(outputs):
                raise InputError(f"--slices {item!r}: output index {name} out of range (the model has "
                                 f"{len(outputs)} output(s))")
            name = outputs[int(name)]
        if name not in outputs:
            continue
        start, stop = int(fields_[1]), (int(fields_[2]) if len(fields_) > 2 and fields_[2] else None)
        if stop is not None and stop <= start:
            raise InputError(f"--slices {item!r}: empty slice (STOP must be greater than START)")
        return name, start, stop
    raise InputError(f"--slices {item!r}: expected OUTPUT:START[:STOP] with OUTPUT one of "
                     f"{', '.join(outputs)} or an index, START/STOP non-negative integers")


def compare_models(ref: onnx.ModelProto, cand: onnx.ModelProto, data: CalibSource, *,
                   batch_size: int = 32, threads: int = 0, progress: bool = False,
                   slices: SliceSpec | None = None, auto_slice: bool = True,
                   task: TaskSpec | None = None) -> ValidationReport:
    """Run both models on ``data`` and measure how far the candidate's outputs are.

    Outputs are matched by name; the candidate must have every output of the reference. ``slices``
    (from :func:`parse_slices`) adds metrics for channel slices of named outputs; other outputs get
    automatic slices when ``auto_slice`` is on (see the module docstring). ``task`` (default
    ``auto``) adds task metrics (:mod:`onnxcompress.runtime.tasks`) to the outputs it applies to;
    what ``auto`` inferred is logged in one line and kept as ``task_note``.

    Raises:
        InputError: The reference does not run on this data, a slice does not fit its output, or an
            explicit task fits no output.
        PassFailed: The candidate does not load or run, or lost/changed an output.
    """
    ref_sess = make_session(ref, threads=threads)
    deployed = runs_integer_kernels(cand)
    try:
        cand_sess = make_session(cand, threads=threads, optimize=deployed)
    except InputError as exc:
        raise PassFailed(f"the optimized model does not load in onnxruntime: {exc}") from None
    names = [o.name for o in ref_sess.get_outputs()]
    missing = sorted(set(names) - {o.name for o in cand_sess.get_outputs()})
    if missing:
        raise PassFailed(f"the optimized model lost output(s) {missing}")
    slices = slices or {}
    unknown = sorted(set(slices) - set(names))
    if unknown:
        raise InputError(f"--slices: unknown output(s) {unknown}; outputs: {', '.join(names)}")
    accs = {n: OutputAccumulator(n, slices.get(n), auto_slice) for n in names}
    tasks: _Tasks | None = None
    samples = 0
    fixed = {b for b in (spec.batch_dim_static() for spec in input_specs(cand)) if b is not None}
    if len(fixed) == 1:  # a candidate fixed at one batch size (as some quantizers leave it) is fed that
        batch_size = fixed.pop()
    for batch in track(data.batches(batch_size), "validating", enabled=progress, unit=len):
        ref_out = [np.asarray(r) for r in _run(ref_sess, names, batch.feeds, InputError, "the original model")]
        cand_out = [np.asarray(c) for c in _run(cand_sess, names, batch.feeds, PassFailed, "the optimized model")]
        for name, r, c in zip(names, ref_out, cand_out):
            accs[name].add(r, c, batch.labels)
        tasks = tasks or _Tasks(task or TaskSpec(), dict(zip(names, ref_out)))
        tasks.add(ref_out, cand_out)
        samples += len(batch)
    if not samples or tasks is None:
        raise InputError(f"{data.description}: no samples")
    outputs = [a.result() for a in accs.values()]
    for o in outputs:
        o.task = tasks.result(o.name)
    return ValidationReport(data.description, samples, outputs, task_note=tasks.note, candidate_optimized=deployed)


def runs_integer_kernels(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime runs ``model`` differently with its graph optimizations on: it holds
    quantization ops, which it fuses into integer kernels (QLinearConv, MatMulIntegerToFloat, ...)."""
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


class _Tasks:
    """The task accumulators of every output, started on the reference's first batch."""

    def __init__(self, spec: TaskSpec, first: dict[str, np.ndarray]):
        self.accs: dict[str, TaskAccumulator | None] = {n: start_task(r, spec) for n, r in first.items()}
        self.note = task_note(spec, self.accs, {n: str(["N", *r.shape[1:]]).replace("'", "") for n, r in first.items()})
        if self.note:
            log.info("%s", self.note)

    def add(self, ref_out: list[np.ndarray], cand_out: list[np.ndarray]) -> None:
        for acc, r, c in zip(self.accs.values(), ref_out, cand_out):
            if acc is not None:
                acc.add(r, c)

    def result(self, name: str) -> TaskMetrics | None:
        acc = self.accs[name]
        return acc.result() if acc is not None else None


def _run(sess, names, feeds, error, what):
    try:
        return sess.run(names, feeds)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{what} failed to run in onnxruntime: {first}") from None
