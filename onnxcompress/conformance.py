"""Conformance over ONNX's own backend node tests: does a pipeline keep every test model's outputs?

Each case of :func:`onnx.backend.test.case.node.collect_testcases` is first run unchanged in
onnxruntime (CPU, graph optimizations off) and compared with its reference outputs; a case that
onnxruntime cannot run or gets wrong is skipped, with the reason. Otherwise the model goes
through :func:`onnxcompress.serde.load_model`, the pass pipeline, :func:`~onnxcompress.serde.save_model`
and a reload, is run again and compared with the same references and tolerances.

Outcomes: ``PASS``; ``SKIP`` (a reason category such as ``ort cannot run original``); ``FAIL``
(the optimized model's outputs differ, or onnxruntime cannot run it); ``CRASH`` (onnxcompress
raised: loading the output, a pass, or saving).
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx

from . import serde
from .errors import InputError
from .manager import PassManager, parse_spec, registry

__all__ = [
    "PASS",
    "SKIP",
    "FAIL",
    "CRASH",
    "CaseResult",
    "collect_cases",
    "select_cases",
    "default_spec",
    "run_case",
    "run_cases",
    "summarize",
]

log = logging.getLogger(__name__)

PASS, SKIP, FAIL, CRASH = "PASS", "SKIP", "FAIL", "CRASH"
#: onnx's runner uses these when a case does not say.
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7


@dataclass
class CaseResult:
    """The outcome of one case.

    Attributes:
        name: Test case name (``test_abs``…).
        outcome: ``PASS``, ``SKIP``, ``FAIL`` or ``CRASH``.
        reason: Category: the skip reason, ``mismatch``, or the exception type of a crash.
        detail: Free text (first line of the error, the mismatching output…).
        seconds: Wall time of the case.
    """

    name: str
    outcome: str
    reason: str = ""
    detail: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class _Outcome(Exception):
    """Raised inside :func:`run_case` to end a case early with an outcome."""

    def __init__(self, outcome: str, reason: str, detail: str = ""):
        super().__init__(reason)
        self.outcome, self.reason, self.detail = outcome, reason, detail


def collect_cases() -> list[Any]:
    """All of onnx's node test cases, sorted by name (takes ~20 s: onnx computes the references)."""
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    return sorted(cases, key=lambda c: c.name)


def select_cases(cases: Sequence[Any], *, sample: int | None = None, seed: int = 0, filter: str | None = None,
                 include: Iterable[str] = ()) -> list[Any]:
    """A deterministic subset of ``cases`` (in name order).

    Args:
        cases: Cases sorted by name.
        sample: Keep this many, drawn with ``seed`` (``None``: all).
        seed: Seed of the draw.
        filter: Keep only names containing this substring (applied before sampling).
        include: Substrings of names always kept (in addition to the sample).
    """
    pool = [c for c in cases if not filter or filter in c.name]
    chosen = {c.name for c in pool}
    if sample is not None and sample < len(pool):
        chosen = {c.name for c in random.Random(seed).sample(pool, sample)}
    extra = tuple(include)
    chosen |= {c.name for c in pool if any(s in c.name for s in extra)}
    return [c for c in pool if c.name in chosen]


def default_spec() -> str:
    """``fold_bn,simplify``, or ``simplify`` while ``fold_bn`` is not registered."""
    return "fold_bn,simplify" if "fold_bn" in registry() else "simplify"


def run_case(case: Any, spec: str, workdir: str | Path) -> CaseResult:
    """Run one case through the pipeline ``spec`` and classify the outcome (never raises)."""
    start = time.perf_counter()
    try:
        _run_case(case, spec, Path(workdir))
        result = CaseResult(case.name, PASS)
    except _Outcome as out:
        result = CaseResult(case.name, out.outcome, out.reason, out.detail)
    except Exception as exc:  # noqa: BLE001 - anything unexpected is a crash of ours
        result = CaseResult(case.name, CRASH, type(exc).__name__, _first_line(exc))
    result.seconds = round(time.perf_counter() - start, 4)
    return result


def _run_case(case: Any, spec: str, workdir: Path) -> None:
    rtol = DEFAULT_RTOL if case.rtol is None else case.rtol
    atol = DEFAULT_ATOL if case.atol is None else case.atol
    if not case.data_sets:
        raise _Outcome(SKIP, "no data")
    _check_original(case.model, case.data_sets, rtol, atol)
    try:
        model = serde.load_model(case.model)
    except InputError as exc:
        raise _Outcome(SKIP, "loader refuses", str(exc)) from None
    try:
        optimized, _ = PassManager(parse_spec(spec)).run(model)
        path = serde.save_model(optimized, workdir / f"{case.name}.onnx")
        reloaded = serde.load_model(path)
    except Exception as exc:  # noqa: BLE001
        raise _Outcome(CRASH, type(exc).__name__, _first_line(exc)) from None
    for i, (inputs, refs) in enumerate(case.data_sets):
        try:
            outputs = _ort_run(reloaded, inputs)
        except Exception as exc:  # noqa: BLE001 - ORT raises assorted types
            raise _Outcome(FAIL, "ort cannot run optimized", _first_line(exc)) from None
        problem = _compare(refs, outputs, rtol, atol)
        if problem:
            raise _Outcome(FAIL, "mismatch", f"data set {i}: {problem}")


def _check_original(model: onnx.ModelProto, data_sets: list, rtol: float, atol: float) -> None:
    """Skip the case unless onnxruntime runs the original and matches the reference."""
    for inputs, refs in data_sets:
        try:
            outputs = _ort_run(model, inputs)
        except Exception as exc:  # noqa: BLE001
            raise _Outcome(SKIP, "ort cannot run original", _first_line(exc)) from None
        problem = _compare(refs, outputs, rtol, atol)
        if problem:
            raise _Outcome(SKIP, "ort mismatches reference", problem)


def _ort_run(model: onnx.ModelProto, inputs: Sequence[Any]) -> list[Any]:
    """Run ``model`` in onnxruntime (CPU, optimizations off) with positional ``inputs``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    return sess.run(None, dict(zip(names, inputs)))


def _compare(refs: Sequence[Any], outputs: Sequence[Any], rtol: float, atol: float) -> str | None:
    """Why ``outputs`` do not match ``refs`` (onnx's runner rules), or ``None``."""
    if len(refs) != len(outputs):
        return f"{len(outputs)} outputs, expected {len(refs)}"
    for i, (ref, out) in enumerate(zip(refs, outputs)):
        problem = _compare_one(ref, out, rtol, atol)
        if problem:
            return f"output {i}: {problem}"
    return None


def _compare_one(ref: Any, out: Any, rtol: float, atol: float) -> str | None:
    if ref is None or out is None:
        return None if ref is None and out is None else f"got {type(out).__name__}, expected {type(ref).__name__}"
    if isinstance(ref, (list, tuple)) or isinstance(out, (list, tuple)):
        if not isinstance(ref, (list, tuple)) or not isinstance(out, (list, tuple)):
            return f"got {type(out).__name__}, expected {type(ref).__name__}"
        if len(ref) != len(out):
            return f"sequence of {len(out)}, expected {len(ref)}"
        return next((p for r, o in zip(ref, out) if (p := _compare_one(r, o, rtol, atol))), None)
    ref, out = np.asarray(ref), np.asarray(out)
    if ref.shape != out.shape:
        return f"shape {out.shape}, expected {ref.shape}"
    if ref.dtype == object:
        return None if np.array_equal(ref, out) else "strings differ"
    if ref.dtype != out.dtype:
        return f"dtype {out.dtype}, expected {ref.dtype}"
    if ref.dtype.name == "bfloat16":
        ref, out, rtol = ref.astype(np.float32), out.astype(np.float32), max(rtol, 2**-6)
    try:
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol)
    except AssertionError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return "; ".join(lines[1:4])
    except TypeError as exc:
        return f"cannot compare: {exc}"
    return None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cases(cases: Sequence[Any], spec: str, *, progress_every: int = 100) -> list[CaseResult]:
    """Run every case (in order) and return the results; progress is logged at INFO."""
    results = []
    with tempfile.TemporaryDirectory(prefix="onnxcompress-conformance-") as tmp:
        for i, case in enumerate(cases, 1):
            result = run_case(case, spec, tmp)
            results.append(result)
            log.debug("%s: %s %s %s", case.name, result.outcome, result.reason, result.detail)
            if progress_every and i % progress_every == 0:
                log.info("conformance: %d/%d cases done", i, len(cases))
            for leftover in Path(tmp).iterdir():
                leftover.unlink()
    return results


def summarize(results: Sequence[CaseResult]) -> dict[str, Any]:
    """Counts per outcome, skips per reason, and the names of failures and crashes."""
    counts = {k: sum(r.outcome == k for r in results) for k in (PASS, SKIP, FAIL, CRASH)}
    skips: dict[str, int] = {}
    for r in results:
        if r.outcome == SKIP:
            skips[r.reason] = skips.get(r.reason, 0) + 1
    return {
        "total": len(results),
        "counts": counts,
        "skipped_by_reason": dict(sorted(skips.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failed": [r.name for r in results if r.outcome == FAIL],
        "crashed": [r.name for r in results if r.outcome == CRASH],
    }
