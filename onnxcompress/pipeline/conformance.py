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

import contextlib
import logging
import random
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.pipeline.manager import PassManager, parse_spec, registry

__all__ = [
    "DATA_FOLDERS",
    "SUITES",
    "CaseResult",
    "FolderCase",
    "collect",
    "collect_cases",
    "collect_data_cases",
    "default_spec",
    "run_case",
    "run_cases",
    "select_cases",
    "summarize",
]

log = logging.getLogger(__name__)

PASS, SKIP, FAIL, CRASH = "PASS", "SKIP", "FAIL", "CRASH"
#: onnx's runner uses these when a case does not say.
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7
#: Suites :func:`collect` knows.
SUITES = ("node", "data", "all")
#: The model folders of ``onnx/backend/test/data`` in the ``data`` suite.
DATA_FOLDERS = ("light", "simple", "pytorch-converted", "pytorch-operator")


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


def data_dir() -> Path:
    """``onnx/backend/test/data`` of the installed onnx."""
    return Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"


@dataclass
class FolderCase:
    """A model test stored on disk; the model and data are read when first used.

    Attributes:
        name: ``<folder>/<test name>`` (e.g. ``simple/test_sign_model``, ``light/light_resnet50``).
        model_path: The ``.onnx`` file.
        data_dirs: ``test_data_set_*`` folders (``input_*.pb``, ``output_*.pb``); empty for ``light``.
        light_outputs: ``light``: the reference output files, in output order.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
    """

    name: str
    model_path: Path
    data_dirs: list[Path]
    light_outputs: list[Path]
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    _model: onnx.ModelProto | None = None

    @property
    def model(self) -> onnx.ModelProto:
        """The test model (loaded once)."""
        if self._model is None:
            self._model = onnx.load(str(self.model_path))
        return self._model

    @property
    def data_sets(self) -> list[tuple[list[Any], list[Any]]]:
        """``[(inputs, reference outputs)]``, inputs in the order of the non-initializer graph inputs."""
        graph = self.model.graph
        inits = {i.name for i in graph.initializer}
        in_types = [i.type for i in graph.input if i.name not in inits]
        out_types = [o.type for o in graph.output]
        if self.light_outputs:
            inputs = [_light_input(t) for t in in_types]
            return [(inputs, [_read_proto(p, t) for p, t in zip(self.light_outputs, out_types)])]
        sets = []
        for folder in self.data_dirs:
            ins = sorted(folder.glob("input_*.pb"), key=_pb_index)
            outs = sorted(folder.glob("output_*.pb"), key=_pb_index)
            sets.append(([_read_proto(p, t) for p, t in zip(ins, in_types)],
                         [_read_proto(p, t) for p, t in zip(outs, out_types)]))
        return sets


def _pb_index(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def _light_input(type_proto: onnx.TypeProto) -> np.ndarray:
    """The input onnx's backend runner feeds a ``light`` model: ``arange(n) / n`` in float32."""
    tt = type_proto.tensor_type
    if tt.elem_type != onnx.TensorProto.FLOAT:
        raise _Outcome(SKIP, "no input generator for this type", f"element type {tt.elem_type}")
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def _read_proto(path: Path, type_proto: onnx.TypeProto) -> Any:
    """A stored input or output: a tensor, a sequence or an optional, as onnx's runner reads it."""
    from onnx import numpy_helper

    data = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    if type_proto.HasField("tensor_type"):
        tensor = onnx.TensorProto()
        tensor.ParseFromString(data)
        return tensor if tensor.data_type in _RAW_TYPES else numpy_helper.to_array(tensor)
    raise _Outcome(SKIP, "unsupported value type", f"{path.name}: {type_proto.WhichOneof('value')}")


def collect_data_cases(folders: Sequence[str] = DATA_FOLDERS, root: Path | None = None) -> list[FolderCase]:
    """The model tests of ``folders`` under ``root`` (default: the onnx wheel's data), sorted by name."""
    root = root or data_dir()
    cases: list[FolderCase] = []
    for folder in folders:
        base = root / folder
        if folder == "light":
            cases += [_light_case(root, path) for path in sorted(base.glob("light_*.onnx"))]
            continue
        for case_dir in sorted(p for p in base.iterdir() if (p / "model.onnx").is_file()):
            rtol, atol = _tolerances(case_dir / "data.json")
            cases.append(FolderCase(f"{folder}/{case_dir.name}", case_dir / "model.onnx",
                                    sorted(case_dir.glob("test_data_set_*")), [], rtol, atol))
    return sorted(cases, key=lambda c: c.name)


def _light_case(root: Path, path: Path) -> FolderCase:
    stem = path.stem  # light_<model>
    outputs = sorted(path.parent.glob(f"{stem}_output_*.pb"), key=_pb_index)
    rtol, atol = _tolerances(root / "real" / f"test_{stem[len('light_'):]}" / "data.json")
    return FolderCase(f"light/{stem}", path, [], outputs, rtol, atol)


def _tolerances(path: Path) -> tuple[float, float]:
    """``rtol``/``atol`` of a case's ``data.json`` (onnx's defaults without one)."""
    if not path.is_file():
        return DEFAULT_RTOL, DEFAULT_ATOL
    import json

    data = json.loads(path.read_text())
    return float(data.get("rtol", DEFAULT_RTOL)), float(data.get("atol", DEFAULT_ATOL))


def collect(suite: str = "node") -> list[Any]:
    """The cases of ``suite`` (``node``, ``data`` or ``all``), sorted by name within each suite.

    Raises:
        ValueError: Unknown suite.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
    cases: list[Any] = []
    if suite in ("node", "all"):
        cases += collect_cases()
    if suite in ("data", "all"):
        cases += collect_data_cases()
    return cases


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
    except _Outcome as out:
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
        raise _Outcome(SKIP, "no data")
    _check_original(case.model, data_sets, rtol, atol)
    try:
        model = serde.load_model(case.model)
    except InputError as exc:
        raise _Outcome(SKIP, f"loader refuses: {_category(str(exc))}", str(exc)) from None
    try:
        optimized, _ = PassManager(parse_spec(spec)).run(model)
        path = serde.save_model(optimized, workdir / f"{case.name.replace('/', '__')}.onnx")
        reloaded = serde.load_model(path)
    except Exception as exc:
        raise _Outcome(CRASH, type(exc).__name__, _first_line(exc)) from None
    for i, (inputs, refs) in enumerate(data_sets):
        try:
            outputs = _ort_run(reloaded, inputs)
        except Exception as exc:
            raise _Outcome(FAIL, "ort cannot run optimized", _first_line(exc)) from None
        problem = _compare(refs, outputs, rtol, atol)
        if problem:
            raise _Outcome(FAIL, "mismatch", f"data set {i}: {problem}")


def _check_original(model: onnx.ModelProto, data_sets: list, rtol: float, atol: float) -> None:
    """Skip the case unless onnxruntime runs the original and matches the reference."""
    for inputs, refs in data_sets:
        try:
            outputs = _ort_run(model, inputs)
        except Exception as exc:
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
    feeds = {name: _feed(value) for name, value in zip(names, inputs)}
    out_types = [o.type.tensor_type.elem_type for o in model.graph.output]
    exotic = any(t in _RAW_TYPES for t in out_types) or any(isinstance(v, onnx.TensorProto) for v in feeds.values())
    if not exotic:
        return sess.run(None, feeds)
    values = sess.run_with_ort_values(None, {k: _ort_value(v) for k, v in feeds.items()})
    return [_from_ort_value(v, t) for v, t in zip(values, out_types)]


#: Element types onnxruntime's numpy API neither takes nor returns (numpy holds them only through
#: ml_dtypes, and the 4/2-bit ones are packed): they cross as raw bytes in OrtValues.
_RAW_TYPES = frozenset({
    onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ, onnx.TensorProto.FLOAT8E8M0,
    onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1,
    *(getattr(onnx.TensorProto, n) for n in ("INT2", "UINT2") if hasattr(onnx.TensorProto, n)),
})


def _feed(value: Any) -> Any:
    """onnx's data sets hold numpy scalars for 0-d inputs and TensorProtos for exotic dtypes."""
    if isinstance(value, np.generic):
        return np.asarray(value)
    if isinstance(value, onnx.TensorProto):
        return value if value.data_type in _RAW_TYPES else onnx.numpy_helper.to_array(value)
    if _raw_type(value) in _RAW_TYPES:
        return onnx.numpy_helper.from_array(value)
    if isinstance(value, list):
        return [_feed(v) for v in value]
    return value


def _raw_type(value: Any) -> int | None:
    """The ONNX element type of an array whose dtype comes from ml_dtypes (bfloat16, float8…)."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "V":
        return None
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    except (KeyError, ValueError, TypeError):
        return None


def _ort_value(value: Any) -> Any:
    """An OrtValue of an array, or of a TensorProto's raw bytes (exotic element types)."""
    import ctypes

    import onnxruntime as ort

    if not isinstance(value, onnx.TensorProto):
        return ort.OrtValue.ortvalue_from_numpy(value)
    raw = value.raw_data or onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(value)).raw_data
    ort_value = ort.OrtValue.ortvalue_from_shape_and_type(list(value.dims), value.data_type)
    if raw:
        ctypes.memmove(ort_value.data_ptr(), raw, min(len(raw), ort_value.tensor_size_in_bytes()))
    return ort_value


def _from_ort_value(value: Any, elem_type: int) -> Any:
    """The numpy array of an output; exotic element types are decoded from the raw buffer."""
    if elem_type not in _RAW_TYPES:
        return value.numpy()
    import ctypes

    nbytes = value.tensor_size_in_bytes()
    raw = bytes((ctypes.c_uint8 * nbytes).from_address(value.data_ptr())) if nbytes else b""
    proto = onnx.TensorProto(data_type=elem_type, dims=value.shape(), raw_data=raw)
    return onnx.numpy_helper.to_array(proto)


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
    if isinstance(ref, onnx.TensorProto):
        ref = onnx.numpy_helper.to_array(ref)
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
        if isolate:
            _preload(spec)
            results = _run_isolated(cases, spec, tmp, max(jobs, 1), timeout, progress_every)
        else:
            results = []
            for case in cases:
                results.append(_log_result(run_case(case, spec, tmp), len(results) + 1, len(cases), progress_every))
    return results


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


class _Worker:
    """A forked child that runs the cases it is sent (by index) until told to stop."""

    def __init__(self, ctx: Any, cases: Sequence[Any], spec: str, tmp: str):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_loop, args=(child, cases, spec, tmp), daemon=True)
        self.proc.start()
        child.close()
        self.index: int | None = None
        self.started = 0.0

    def send(self, index: int) -> None:
        self.index, self.started = index, time.perf_counter()
        self.conn.send(index)

    def receive(self) -> CaseResult | None:
        """The running case's result, or ``None`` if the child died."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def death(self, name: str, timed_out: bool) -> CaseResult:
        """Kill the child and describe how the case it was running ended."""
        import signal

        self.proc.kill()
        self.proc.join()
        code = self.proc.exitcode
        elapsed = round(time.perf_counter() - self.started, 4)
        if timed_out:
            return CaseResult(name, CRASH, "timeout", f"no result after {elapsed:.0f} s", elapsed)
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return CaseResult(name, CRASH, "native crash", f"process {how}", elapsed)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
        self.conn.close()


def _worker_loop(conn: Any, cases: Sequence[Any], spec: str, tmp: str) -> None:
    while (index := conn.recv()) is not None:
        conn.send(run_case(cases[index], spec, tmp))


def _run_isolated(cases: Sequence[Any], spec: str, tmp: str, jobs: int, timeout: float,
                  progress_every: int) -> list[CaseResult]:
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("fork")
    results: dict[int, CaseResult] = {}
    todo = list(range(len(cases)))[::-1]
    workers = [_Worker(ctx, cases, spec, tmp) for _ in range(min(jobs, len(cases)))]
    try:
        for worker in workers:
            if todo:
                worker.send(todo.pop())
        while len(results) < len(cases):
            busy = [w for w in workers if w.index is not None]
            ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=1.0))
            for i, worker in enumerate(workers):
                index = worker.index
                if index is None:
                    continue
                late = time.perf_counter() - worker.started > timeout
                if not ({worker.conn, worker.proc.sentinel} & ready or late):
                    continue
                result = worker.receive() if worker.conn.poll() else None
                if result is None:
                    result = worker.death(cases[index].name, late)
                    worker = workers[i] = _Worker(ctx, cases, spec, tmp)
                worker.index = None
                results[index] = _log_result(result, len(results) + 1, len(cases), progress_every)
                if todo:
                    worker.send(todo.pop())
    finally:
        for worker in workers:
            worker.stop()
    return [results[i] for i in range(len(cases))]


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
