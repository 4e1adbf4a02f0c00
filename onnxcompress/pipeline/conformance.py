"""Conformance over ONNX's own backend tests: does a pipeline keep every test model's outputs?

Two suites:

* ``node``: every case of :func:`onnx.backend.test.case.node.collect_testcases` (one operator each,
  references computed by onnx);
* ``data``: the model folders that ship in the onnx wheel under ``onnx/backend/test/data``:
  ``simple``, ``pytorch-converted`` and ``pytorch-operator`` (``model.onnx`` plus
  ``test_data_set_*/input_*.pb`` / ``output_*.pb``), and ``light`` (``light_<name>.onnx`` plus
  ``light_<name>_output_0.pb``: classic CNNs whose weights are ``ConstantOfShape`` fills; the
  input is made the way onnx's own backend runner makes it -- ``arange(n).reshape(shape) / n`` in
  float32, symbolic dims as 1 -- and the tolerances come from the matching ``real/test_<name>/data.json``).

Each case is first run unchanged in onnxruntime (CPU, graph optimizations off) and compared with
its reference outputs; a case that onnxruntime cannot run or gets wrong is skipped, with the reason.
Otherwise the model goes through :func:`onnxcompress.core.serde.load_model`, the pass pipeline,
:func:`~onnxcompress.core.serde.save_model` and a reload, is run again and compared with the same
references and tolerances.

Outcomes: ``PASS``; ``SKIP`` (a reason category such as ``ort cannot run original``); ``FAIL``
(the optimized model's outputs differ, or onnxruntime cannot run it); ``CRASH`` (onnxcompress
raised: loading the output, a pass, or saving).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.pipeline.conformance_cases import (
    CRASH,
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    FAIL,
    PASS,
    SKIP,
    CaseResult,
    Outcome,
)
from onnxcompress.pipeline.conformance_ort import compare_outputs, ort_outputs
from onnxcompress.pipeline.conformance_workers import run_isolated
from onnxcompress.pipeline.manager import PassManager, parse_spec, registry

__all__ = ["default_spec", "run_case", "run_cases", "summarize"]

log = logging.getLogger(__name__)


def default_spec() -> str:
    """The registered lossless passes: ``fold_bn,equalize,simplify`` (``fold_bn`` and
    ``equalize`` only when registered)."""
    names = registry()
    return ",".join([p for p in ("fold_bn", "equalize") if p in names] + ["simplify"])


def run_case(case: Any, spec: str, workdir: str | Path) -> CaseResult:
    """Run one case through the pipeline ``spec`` and classify the outcome (never raises)."""
    start = time.perf_counter()
    try:
        _run_case(case, spec, Path(workdir))
        result = CaseResult(case.name, PASS)
    except Outcome as out:
        result = CaseResult(case.name, out.outcome, out.reason, out.detail)
    except Exception as exc:
        result = CaseResult(case.name, CRASH, type(exc).__name__, _first_line(exc))
    result.seconds = round(time.perf_counter() - start, 4)
    return result


def _run_case(case: Any, spec: str, workdir: Path) -> None:
    rtol = DEFAULT_RTOL if case.rtol is None else case.rtol
    atol = DEFAULT_ATOL if case.atol is None else case.atol
    data_sets = case.data_sets
    if not data_sets:
        raise Outcome(SKIP, "no data")
    # the original must run and match the reference, else the case says nothing about the pipeline
    _check_outputs(case.model, data_sets, rtol, atol, SKIP, ("ort cannot run original", "ort mismatches reference"))
    try:
        model = serde.load_model(case.model)
    except InputError as exc:
        raise Outcome(SKIP, f"loader refuses: {_category(str(exc))}", str(exc)) from None
    try:
        optimized, _ = PassManager(parse_spec(spec)).run(model)
        path = serde.save_model(optimized, workdir / f"{case.name.replace('/', '__')}.onnx")
        reloaded = serde.load_model(path)
    except Exception as exc:
        raise Outcome(CRASH, type(exc).__name__, _first_line(exc)) from None
    _check_outputs(reloaded, data_sets, rtol, atol, FAIL, ("ort cannot run optimized", "mismatch"))


def _check_outputs(model: onnx.ModelProto, data_sets: list, rtol: float, atol: float, outcome: str,
                   reasons: tuple[str, str]) -> None:
    """Raise ``Outcome(outcome, reason)`` unless onnxruntime runs ``model`` on every data set and
    matches its reference outputs (``reasons``: cannot run, mismatch)."""
    for i, (inputs, refs) in enumerate(data_sets):
        try:
            outputs = ort_outputs(model, inputs)
        except Exception as exc:
            raise Outcome(outcome, reasons[0], _first_line(exc)) from None
        problem = compare_outputs(refs, outputs, rtol, atol)
        if problem:
            raise Outcome(outcome, reasons[1], f"data set {i}: {problem}")


def _category(message: str) -> str:
    """A message with the names in it (quoted) blanked, so equal causes count together."""
    return re.sub(r"'[^']*'", "'…'", message.strip().splitlines()[0] if message.strip() else message)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cases(cases: Sequence[Any], spec: str, *, isolate: bool = True, jobs: int = 1, timeout: float = 600.0,
              progress_every: int = 100) -> list[CaseResult]:
    """Run every case and return the results in case order; progress is logged at INFO.

    Args:
        cases: The cases.
        spec: Pass pipeline.
        isolate: Run each case in a forked child process, so a native crash (segfault, abort) in a
            dependency is reported as that case's ``CRASH`` instead of ending the run.
        jobs: Cases run at once (only with ``isolate``).
        timeout: Seconds before an isolated case is killed and reported as a ``CRASH``.
        progress_every: Log progress every this many cases (0: never).
    """
    with tempfile.TemporaryDirectory(prefix="onnxcompress-conformance-") as tmp:
        def run(case: Any) -> CaseResult:
            return run_case(case, spec, tmp)

        def done(result: CaseResult, count: int) -> CaseResult:
            return _log_result(result, count, len(cases), progress_every)

        if isolate:
            _preload(spec)
            return run_isolated(cases, run, max(jobs, 1), timeout, done)
        return [done(run(case), i + 1) for i, case in enumerate(cases)]


def _log_result(result: CaseResult, done: int, total: int, progress_every: int) -> CaseResult:
    log.debug("%s: %s %s %s", result.name, result.outcome, result.reason, result.detail)
    if progress_every and done % progress_every == 0:
        log.info("conformance: %d/%d cases done", done, total)
    return result


def _preload(spec: str) -> None:
    """Import what every child would otherwise import again (onnxsim alone takes seconds)."""
    parse_spec(spec)
    try:
        import onnxruntime  # noqa: F401
        import onnxsim  # noqa: F401
    except ImportError:
        pass


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
