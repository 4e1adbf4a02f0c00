"""Validation: run the original and the optimized model in onnxruntime and compare.

Both run on CPU with graph optimizations disabled. Metrics per output, accumulated batch by
batch (nothing but running sums is kept): max and mean absolute error, relative max error,
cosine similarity, SQNR in dB, and for classifier-shaped outputs ``[N, C]`` top-1 agreement and,
with labels, the task accuracy of both models. The :class:`Gate` turns metrics into a verdict;
its defaults follow the pipeline's declared :class:`~onnxcompress.core.pass_api.Numerics`.
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

__all__ = ["GATE_RANGES", "OutputMetrics", "ValidationReport", "Gate", "compare_models", "gate_problem"]

log = logging.getLogger(__name__)


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

    @property
    def passed(self) -> bool:
        """True when a gate was checked and nothing failed."""
        return not self.failures

    def as_dict(self) -> dict:
        """JSON-ready form (infinities as strings)."""
        outs = []
        for o in self.outputs:
            d = {k: _jsonable(v) for k, v in asdict(o).items()}
            d["top1_drop"] = _jsonable(o.top1_drop)
            outs.append(d)
        return {"data": self.data, "samples": self.samples, "outputs": outs,
                "gate": self.gate.as_dict() if self.gate else None, "passed": self.passed,
                "failures": self.failures}


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
    """

    max_rel_err: float | None = None
    atol: float = 1e-5
    min_cosine: float | None = None
    min_sqnr: float | None = None
    min_top1_agreement: float | None = None
    max_top1_drop: float | None = None

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
        """Human-readable failures (empty when the candidate passes)."""
        fails = []
        for o in report.outputs:
            fails += self._check_output(o)
        return fails

    def _check_output(self, o: OutputMetrics) -> list[str]:
        out = []
        if self.max_rel_err is not None and o.max_abs > self.atol + self.max_rel_err * o.max_ref:
            out.append(f"{o.name}: max abs error {o.max_abs:.3g} > {self.atol:g} + {self.max_rel_err:g}·{o.max_ref:.3g}")
        if self.min_cosine is not None and not o.cosine >= self.min_cosine:
            out.append(f"{o.name}: cosine {o.cosine:.6f} < {self.min_cosine}")
        if self.min_sqnr is not None and not o.sqnr_db >= self.min_sqnr:
            out.append(f"{o.name}: SQNR {o.sqnr_db:.2f} dB < {self.min_sqnr} dB")
        if self.min_top1_agreement is not None and o.top1_agreement is not None \
                and o.top1_agreement < self.min_top1_agreement:
            out.append(f"{o.name}: top-1 agreement {o.top1_agreement:.4f} < {self.min_top1_agreement}")
        drop = o.top1_drop
        if self.max_top1_drop is not None and drop is not None and drop > self.max_top1_drop:
            out.append(f"{o.name}: accuracy drop {drop:.2f} points > {self.max_top1_drop}")
        return out


class _Accumulator:
    """Running sums for one output."""

    def __init__(self, name: str):
        self.name = name
        self.n = self.count = 0
        self.max_abs = self.sum_abs = self.max_ref = 0.0
        self.ref_sq = self.cand_sq = self.err_sq = self.dot = 0.0
        self.agree = self.ref_correct = self.cand_correct = self.labelled = 0
        self.classifier = True

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

    def result(self) -> OutputMetrics:
        norm = math.sqrt(self.ref_sq * self.cand_sq)
        cosine = self.dot / norm if norm > 0 else (1.0 if self.ref_sq == self.cand_sq else 0.0)
        sqnr = 10 * math.log10(self.ref_sq / self.err_sq) if self.err_sq > 0 else math.inf
        m = OutputMetrics(self.name, self.n, self.max_abs, self.sum_abs / max(self.count, 1),
                          self.max_abs / self.max_ref if self.max_ref > 0 else (0.0 if self.max_abs == 0 else math.inf),
                          cosine, sqnr, max_ref=self.max_ref)
        if self.classifier and self.n:
            m.top1_agreement = self.agree / self.n
            if self.labelled:
                m.ref_accuracy = self.ref_correct / self.labelled
                m.cand_accuracy = self.cand_correct / self.labelled
        return m


def compare_models(ref: onnx.ModelProto, cand: onnx.ModelProto, data: CalibSource, *,
                   batch_size: int = 32, threads: int = 0, progress: bool = False) -> ValidationReport:
    """Run both models on ``data`` and measure how far the candidate's outputs are.

    Outputs are matched by name; the candidate must have every output of the reference.

    Raises:
        InputError: The reference does not run on this data.
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
    accs = {n: _Accumulator(n) for n in names}
    samples = 0
    for batch in track(data.batches(batch_size), "validating", enabled=progress):
        ref_out = _run(ref_sess, names, batch.feeds, InputError, "the original model")
        cand_out = _run(cand_sess, names, batch.feeds, PassFailed, "the optimized model")
        for name, r, c in zip(names, ref_out, cand_out):
            accs[name].add(np.asarray(r), np.asarray(c), batch.labels)
        samples += len(batch)
    if not samples:
        raise InputError(f"{data.description}: no samples")
    return ValidationReport(data.description, samples, [a.result() for a in accs.values()])


def _run(sess, names, feeds, error, what):
    try:
        return sess.run(names, feeds)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{what} failed to run in onnxruntime: {first}") from None
