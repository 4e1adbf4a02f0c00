"""Validation: run the original and the optimized model in onnxruntime and compare.

Both run on CPU with graph optimizations disabled. Metrics per output, accumulated batch by
batch (nothing but running sums is kept): max and mean absolute error, relative max error,
cosine similarity, SQNR in dB, and for classifier-shaped outputs ``[N, C]`` top-1 agreement and,
with labels, the task accuracy of both models. The :class:`Gate` turns metrics into a verdict;
its defaults follow the pipeline's declared :class:`~onnxcompress.core.pass_api.Numerics`.

Channel slices. One output can mix quantities of very different scale along its feature axis
(axis 1): a YOLO head ``[N, 4+nc, A]`` holds box coordinates (0-320) and class scores (0-1), so
its whole-output cosine and SQNR only see the boxes. For outputs of rank >= 3 with at most
:data:`MAX_SLICE_CHANNELS` channels on axis 1, running sums are also kept per channel (never per
sample), and the same metrics are computed for *slices* ``[start:stop]`` of that axis:

* user slices (``--slices output0:0:4,output0:4:``, :func:`parse_slices`) always, for any output
  of rank >= 2;
* automatic slices when the channels fall into a few groups of clearly different scale: the
  channels' reference RMS values, sorted, are cut wherever one is more than
  :data:`AUTO_SLICE_RATIO` (10x) above the previous one (all-zero channels join the smallest
  group); each group's contiguous runs of channels become slices. A jump is needed, not a mere
  spread, so a smooth range of scales is never cut at an arbitrary point; more than
  :data:`MAX_AUTO_SLICES` runs means the scales are interleaved without a block layout, and no
  automatic slices are made (give ``--slices``).

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
from onnxcompress.runtime.data import CalibSource
from onnxcompress.runtime.progress import track
from onnxcompress.runtime.session import make_session
from onnxcompress.runtime.tasks import TaskAccumulator, TaskMetrics, TaskSpec, start_task, task_note

__all__ = ["GATE_RANGES", "TASK_GATES", "AUTO_SLICE_RATIO", "MAX_AUTO_SLICES", "MAX_SLICE_CHANNELS", "SliceMetrics", "OutputMetrics",
           "ValidationReport", "Gate", "compare_models", "gate_problem", "parse_slices", "auto_slices"]

log = logging.getLogger(__name__)

#: Automatic slicing cuts the sorted per-channel reference RMS where it jumps by more than this.
AUTO_SLICE_RATIO = 10.0
#: More contiguous runs than this: scales are interleaved, no automatic slices.
MAX_AUTO_SLICES = 8
#: Per-channel sums only for outputs with at most this many channels on axis 1 (user slices: any).
MAX_SLICE_CHANNELS = 4096

#: ``{output name: [(start, stop or None), ...]}`` as parsed by :func:`parse_slices`.
SliceSpec = dict[str, list[tuple[int, int | None]]]


@dataclass
class SliceMetrics:
    """Agreement of the channels ``[start:stop]`` (axis 1) of one output."""

    start: int
    stop: int
    source: str  # "user" or "auto"
    max_abs: float = 0.0
    mean_abs: float = 0.0
    rel_max: float = 0.0
    cosine: float = 1.0
    sqnr_db: float = math.inf
    max_ref: float = 0.0
    rms_ref: float = 0.0

    def label(self, output: str) -> str:
        """``output[start:stop]``."""
        return f"{output}[{self.start}:{self.stop}]"


@dataclass
class OutputMetrics:
    """Agreement of one output between the reference and the candidate."""

    name: str
    samples: int = 0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    rel_max: float = 0.0
    cosine: float = 1.0
    sqnr_db: float = math.inf
    top1_agreement: float | None = None
    ref_accuracy: float | None = None
    cand_accuracy: float | None = None
    max_ref: float = 0.0
    slices: list[SliceMetrics] = field(default_factory=list)
    task: TaskMetrics | None = None

    def worst_slices(self, n: int | None = None) -> list[SliceMetrics]:
        """The slices, lowest SQNR (then cosine) first; at most ``n``."""
        ranked = sorted(self.slices, key=lambda s: (s.sqnr_db, s.cosine, s.start))
        return ranked if n is None else ranked[:n]

    @property
    def top1_drop(self) -> float | None:
        """Accuracy drop in percentage points (labels needed)."""
        if self.ref_accuracy is None or self.cand_accuracy is None:
            return None
        return 100.0 * (self.ref_accuracy - self.cand_accuracy)


@dataclass
class ValidationReport:
    """What :func:`compare_models` measured, and the gate's verdict once checked."""

    data: str
    samples: int
    outputs: list[OutputMetrics]
    gate: Gate | None = None
    failures: list[str] = field(default_factory=list)
    task_note: str | None = None

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
                "failures": self.failures, **({"task_note": self.task_note} if self.task_note else {})}


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


def _fidelity(ref_sq: float, cand_sq: float, err_sq: float, dot: float, max_abs: float,
              max_ref: float) -> tuple[float, float, float]:
    """``(cosine, SQNR dB, relative max error)`` from running sums."""
    norm = math.sqrt(ref_sq * cand_sq)
    cosine = dot / norm if norm > 0 else (1.0 if ref_sq == cand_sq else 0.0)
    sqnr = 10 * math.log10(ref_sq / err_sq) if err_sq > 0 else math.inf
    rel = max_abs / max_ref if max_ref > 0 else (0.0 if max_abs == 0 else math.inf)
    return cosine, sqnr, rel


class _ChannelSums:
    """Running sums per channel of axis 1 (the feature axis)."""

    def __init__(self, channels: int):
        self.channels = channels
        self.per_channel = 0  # elements per channel so far
        z = np.zeros(channels)
        self.ref_sq, self.cand_sq, self.err_sq, self.dot = z.copy(), z.copy(), z.copy(), z.copy()
        self.sum_abs, self.max_abs, self.max_ref = z.copy(), z.copy(), z.copy()

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r = np.moveaxis(ref, 1, 0).reshape(self.channels, -1).astype(np.float64)
        c = np.moveaxis(cand, 1, 0).reshape(self.channels, -1).astype(np.float64)
        e = r - c
        self.per_channel += r.shape[1]
        self.ref_sq += np.einsum("ij,ij->i", r, r)
        self.cand_sq += np.einsum("ij,ij->i", c, c)
        self.err_sq += np.einsum("ij,ij->i", e, e)
        self.dot += np.einsum("ij,ij->i", r, c)
        if r.shape[1]:
            np.abs(e, out=e)
            self.sum_abs += e.sum(1)
            np.maximum(self.max_abs, e.max(1), out=self.max_abs)
            np.maximum(self.max_ref, np.abs(r).max(1), out=self.max_ref)

    def rms(self) -> np.ndarray:
        """Reference RMS per channel."""
        return np.sqrt(self.ref_sq / max(self.per_channel, 1))

    def metrics(self, start: int, stop: int, source: str) -> SliceMetrics:
        """Metrics of the channels ``[start:stop]``."""
        k = slice(start, stop)
        max_abs, max_ref = float(self.max_abs[k].max()), float(self.max_ref[k].max())
        ref_sq = float(self.ref_sq[k].sum())
        cosine, sqnr, rel = _fidelity(ref_sq, float(self.cand_sq[k].sum()), float(self.err_sq[k].sum()),
                                      float(self.dot[k].sum()), max_abs, max_ref)
        count = max(self.per_channel * (stop - start), 1)
        return SliceMetrics(start, stop, source, max_abs, float(self.sum_abs[k].sum()) / count, rel, cosine, sqnr,
                            max_ref, math.sqrt(ref_sq / count))


def auto_slices(rms: np.ndarray, ratio: float = AUTO_SLICE_RATIO,
                max_runs: int = MAX_AUTO_SLICES) -> list[tuple[int, int]]:
    """Contiguous channel ranges of similar scale, or ``[]`` when the scales do not fall into groups
    (see the module docstring): sorted RMS cut at jumps above ``ratio``, each group's runs."""
    nonzero = np.flatnonzero(rms > 0)
    if len(nonzero) < 2:
        return []
    order = nonzero[np.argsort(rms[nonzero], kind="stable")]
    logs = np.log10(rms[order])
    group = np.zeros(len(rms), dtype=np.int64)  # all-zero channels stay in group 0, the smallest
    group[order] = np.concatenate([[0], np.cumsum(np.diff(logs) > math.log10(ratio))])
    if group.max() == 0:
        return []
    cuts = np.flatnonzero(np.diff(group)) + 1
    bounds = [0, *cuts.tolist(), len(rms)]
    if len(bounds) - 1 > max_runs:
        log.info("channel scales differ but are interleaved (%d runs); no automatic slices", len(bounds) - 1)
        return []
    return list(zip(bounds[:-1], bounds[1:]))


class _Accumulator:
    """Running sums for one output (and per channel of axis 1 when slices may be needed)."""

    def __init__(self, name: str, slices: list[tuple[int, int | None]] | None = None, auto: bool = True):
        self.name = name
        self.n = self.count = 0
        self.max_abs = self.sum_abs = self.max_ref = 0.0
        self.ref_sq = self.cand_sq = self.err_sq = self.dot = 0.0
        self.agree = self.ref_correct = self.cand_correct = self.labelled = 0
        self.classifier = True
        self.user_slices = slices or []
        self.auto = auto
        self.channels: _ChannelSums | None = None
        self.sliced: bool | None = None  # decided on the first batch

    def add(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None) -> None:
        if ref.shape != cand.shape:
            raise PassFailed(f"output {self.name!r} changed shape: {list(ref.shape)} -> {list(cand.shape)}")
        r = ref.astype(np.float64).ravel()
        c = cand.astype(np.float64).ravel()
        err = np.abs(r - c)
        self.n += len(ref)
        self.count += r.size
        if r.size:
            self.max_abs = max(self.max_abs, float(err.max()))
            self.max_ref = max(self.max_ref, float(np.abs(r).max()))
        self.sum_abs += float(err.sum())
        self.ref_sq += float(r @ r)
        self.cand_sq += float(c @ c)
        self.err_sq += float(err @ err)
        self.dot += float(r @ c)
        self._add_top1(ref, cand, labels)
        self._add_channels(ref, cand)

    def _add_channels(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if self.sliced is None:
            self.sliced = self._start_channels(ref)
        if not self.sliced or self.channels is None:
            return
        if ref.shape[1] != self.channels.channels:
            if self.user_slices:
                raise InputError(f"output {self.name!r}: axis 1 changed between batches "
                                 f"({self.channels.channels} -> {ref.shape[1]}); slices need a fixed size")
            self.sliced, self.channels = False, None
            return
        self.channels.add(ref, cand)

    def _start_channels(self, ref: np.ndarray) -> bool:
        """Whether to keep per-channel sums; checks the user slices against the output's shape."""
        if ref.dtype.kind != "f":
            if self.user_slices:
                raise InputError(f"--slices: output {self.name!r} is not a float tensor")
            return False
        if self.user_slices:
            if ref.ndim < 2:
                raise InputError(f"--slices: output {self.name!r} has rank {ref.ndim}; slices need an axis 1")
            size = ref.shape[1]
            for start, stop in self.user_slices:
                end = size if stop is None else stop
                if start >= size or end > size or start >= end:
                    raise InputError(f"--slices: {self.name}:{start}:{'' if stop is None else stop} is empty or "
                                     f"outside axis 1 of size {size}")
        elif not (self.auto and ref.ndim >= 3 and 2 <= ref.shape[1] <= MAX_SLICE_CHANNELS):
            return False
        self.channels = _ChannelSums(ref.shape[1])
        return True

    def _add_top1(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None) -> None:
        self.classifier &= ref.ndim == 2 and ref.shape[1] > 1 and ref.dtype.kind == "f"
        if not self.classifier:
            return
        r1, c1 = ref.argmax(1), cand.argmax(1)
        self.agree += int((r1 == c1).sum())
        if labels is not None and len(labels) == len(r1):
            self.labelled += len(labels)
            self.ref_correct += int((r1 == labels).sum())
            self.cand_correct += int((c1 == labels).sum())

    def _slices(self) -> list[SliceMetrics]:
        ch = self.channels
        if ch is None or not self.sliced:
            return []
        if self.user_slices:
            return [ch.metrics(start, ch.channels if stop is None else stop, "user")
                    for start, stop in self.user_slices]
        return [ch.metrics(start, stop, "auto") for start, stop in auto_slices(ch.rms())]

    def result(self) -> OutputMetrics:
        cosine, sqnr, rel = _fidelity(self.ref_sq, self.cand_sq, self.err_sq, self.dot, self.max_abs, self.max_ref)
        m = OutputMetrics(self.name, self.n, self.max_abs, self.sum_abs / max(self.count, 1), rel,
                          cosine, sqnr, max_ref=self.max_ref, slices=self._slices())
        if self.classifier and self.n:
            m.top1_agreement = self.agree / self.n
            if self.labelled:
                m.ref_accuracy = self.ref_correct / self.labelled
                m.cand_accuracy = self.cand_correct / self.labelled
        return m


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
    try:
        cand_sess = make_session(cand, threads=threads)
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
    accs = {n: _Accumulator(n, slices.get(n), auto_slice) for n in names}
    tasks: _Tasks | None = None
    samples = 0
    for batch in track(data.batches(batch_size), "validating", enabled=progress):
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
    return ValidationReport(data.description, samples, outputs, task_note=tasks.note)


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
