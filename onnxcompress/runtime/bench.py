"""Latency benchmarks on onnxruntime: several models, interleaved rounds, paired ratios.

Measuring a model against another on a shared machine is dominated by drift (frequency scaling,
other jobs, thermal throttling). :func:`bench` therefore never times model A for a while and then
model B: it runs **rounds**, and every round runs each model once. Within each block of ``n``
rounds (``n`` models) the order is a cyclic rotation of a base order shuffled with the seed, so
every model runs in every position equally often (for two models: ``A B, B A`` or ``B A, A B``).
The speed of a model relative to the first is the **median of the per-round ratios**
``t_model[r] / t_first[r]`` (see :func:`paired_ratio`), which cancels drift that affects a whole
round, instead of a ratio of two medians taken at different times.

Memory is the growth of the process's resident set (Linux ``/proc/self/status``) across session
creation plus the first run: ``rss_delta_bytes`` is ``VmRSS`` after minus before (what the session
keeps), ``peak_rss_delta_bytes`` is ``VmHWM`` after (reset just before through
``/proc/self/clear_refs``) minus ``VmRSS`` before (the transient peak, which includes the serialized
copy of the model handed to onnxruntime). Freed heap memory is handed back to the OS
(glibc ``malloc_trim``) before each reading, so a session cannot hide in memory freed earlier;
the numbers remain approximate (allocator arenas, shared libraries loaded on first use, earlier
sessions kept alive). One trivial session is created first, so onnxruntime's one-time setup is
charged to no model. Without ``/proc`` only the peak is estimated, from ``resource.getrusage``
(it can only grow, so it is 0 for a model smaller than an earlier peak).
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from onnxcompress.core import proto, serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.index_inputs import integer_domains
from onnxcompress.core.metrics import model_metrics
from onnxcompress.core.shapes import Dims
from onnxcompress.runtime.data import CalibSource, InputSpec, RandomSource, data_dims, input_specs, open_source
from onnxcompress.runtime.progress import track
from onnxcompress.runtime.session import make_session

__all__ = [
    "MachineInfo",
    "ModelBench",
    "BenchReport",
    "bench",
    "bench_inputs",
    "paired_ratios",
    "paired_ratio",
    "round_order",
    "latency_stats",
    "resolve_provider",
    "machine_info",
]

log = logging.getLogger(__name__)

_MIB = 2**20
_ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(_ort_state, n) for n in ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NotImplemented",
                                     "RuntimeException", "EPFail", "NoSuchFile", "EngineError")
    if hasattr(_ort_state, n)) + (RuntimeError,)

_RUN_OPTIONS = ort.RunOptions()
_RUN_OPTIONS.log_severity_level = 4  # a failing run is reported as one InputError line, not ORT's log


@dataclass
class MachineInfo:
    """Where the benchmark ran."""

    cpu: str
    cores: int
    usable_cores: int
    onnxruntime: str
    provider: str
    threads: int
    ort_optimization: bool
    load_average: float | None = None
    python: str = field(default_factory=platform.python_version)
    platform: str = field(default_factory=platform.platform)

    def line(self) -> str:
        """One line for the terminal: CPU, cores, onnxruntime version, provider, threads."""
        threads = "ORT default" if self.threads == 0 else str(self.threads)
        usable = f" ({self.usable_cores} usable)" if self.usable_cores != self.cores else ""
        opt = "on" if self.ort_optimization else "off"
        load = "" if self.load_average is None else f" · load {self.load_average:.2f}"
        return (f"{self.cpu} · {self.cores} cores{usable}{load} · onnxruntime {self.onnxruntime} · {self.provider}"
                f" · intra-op threads: {threads} · ORT graph optimizations {opt}")


@dataclass
class ModelBench:
    """Measurements of one model. Times are in milliseconds, sizes in bytes.

    ``times_ms[r]`` is the latency in round ``r``; ``ratio_vs_first`` is the median over rounds of
    ``times_ms[r] / first.times_ms[r]`` (``ratio_p10``/``ratio_p90``: the spread of those ratios).
    """

    name: str
    file_bytes: int
    params: int
    macs: int
    session_ms: float
    first_run_ms: float
    rss_delta_bytes: int | None
    peak_rss_delta_bytes: int | None
    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    std_ms: float
    ratio_vs_first: float
    ratio_p10: float
    ratio_p90: float
    providers: list[str] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class BenchReport:
    """What :func:`bench` measured; ``order[r]`` lists the model indices in the order round ``r`` ran them."""

    machine: MachineInfo
    settings: dict[str, Any]
    inputs: dict[str, dict[str, Any]]
    models: list[ModelBench]
    order: list[list[int]]
    #: The first model's symbolic input dims and where their values came from (``Dims.as_dict()``).
    dims: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "machine": asdict(self.machine),
            "settings": dict(self.settings),
            "inputs": {k: dict(v) for k, v in self.inputs.items()},
            "dims": {k: dict(v) for k, v in self.dims.items()},
            "models": [m.as_dict() for m in self.models],
            "order": [list(r) for r in self.order],
        }


@dataclass
class _Entry:
    """A loaded model: its session and what was measured while creating it."""

    name: str
    session: ort.InferenceSession
    metrics: Any
    session_ms: float
    first_run_ms: float
    rss_delta: int | None
    peak_delta: int | None


# --- pure helpers -------------------------------------------------------------------------------


def paired_ratios(times: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per-round ratios ``times[r] / reference[r]`` (rounds where the reference is 0 are skipped).

    Raises:
        ValueError: The sequences differ in length.
    """
    if len(times) != len(reference):
        raise ValueError(f"paired times differ in length: {len(times)} vs {len(reference)}")
    return [t / r for t, r in zip(times, reference) if r > 0]


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median of the per-round ratios :func:`paired_ratios` (1.0 exactly for a model vs itself).

    Pairing times from the same round cancels drift that slows a whole round; a ratio of two
    medians would not. Returns NaN when no round can be paired.
    """
    ratios = paired_ratios(times, reference)
    return float(np.median(ratios)) if ratios else float("nan")


def round_order(n_models: int, rounds: int, seed: int = 0) -> list[list[int]]:
    """Order in which each round runs the models.

    Rounds come in blocks of ``n_models``; a block rotates a base order shuffled with ``seed``, so
    each model runs in each position equally often per block.
    """
    rng = np.random.default_rng(seed)
    order: list[list[int]] = []
    base: list[int] = []
    for r in range(rounds):
        k = r % n_models
        if k == 0:
            base = [int(i) for i in rng.permutation(n_models)]
        order.append(base[k:] + base[:k])
    return order


def latency_stats(times_ms: Sequence[float]) -> dict[str, float]:
    """``median_ms``, ``p90_ms``, ``min_ms``, ``mean_ms`` and ``std_ms`` (sample std) of ``times_ms``."""
    arr = np.asarray(times_ms, dtype=np.float64)
    return {
        "median_ms": float(np.median(arr)),
        "p90_ms": float(np.percentile(arr, 90)),
        "min_ms": float(arr.min()),
        "mean_ms": float(arr.mean()),
        "std_ms": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
    }


def resolve_provider(name: str) -> str:
    """The installed execution provider called ``name`` (case-insensitive; ``cpu`` for ``CPUExecutionProvider``).

    Raises:
        InputError: No such provider is available; the message lists the available ones.
    """
    available = ort.get_available_providers()
    wanted = name.strip().lower()
    for p in available:
        if wanted in (p.lower(), p.lower().removesuffix("executionprovider")):
            return p
    raise InputError(f"execution provider {name!r} is not available; available: {', '.join(available)}")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(provider: str, threads: int, optimize: bool) -> MachineInfo:
    """Describe this machine and the session settings (load average: 1 minute, taken now)."""
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return MachineInfo(_cpu_model(), cores, usable, ort.__version__, provider, threads, optimize, load)


# --- memory -------------------------------------------------------------------------------------


def _proc_status() -> dict[str, int] | None:
    """``VmRSS`` and ``VmHWM`` in bytes, or None without ``/proc``."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    values = {k: re.search(rf"^{k}:\s+(\d+)\s*kB", text, re.MULTILINE) for k in ("VmRSS", "VmHWM")}
    if not all(values.values()):
        return None
    return {k: int(m.group(1)) * 1024 for k, m in values.items()}


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so a new session cannot hide in it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _maxrss() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class _MemoryProbe:
    """RSS growth between :meth:`start` and :meth:`stop` (see the module docstring)."""

    def start(self) -> None:
        gc.collect()
        _trim_heap()
        self.status = _proc_status()
        self.peak_ok = self.status is not None and _reset_peak()
        self.maxrss = _maxrss()

    def stop(self) -> tuple[int | None, int | None]:
        """``(rss_delta, peak_delta)`` in bytes; None where unknown."""
        _trim_heap()
        after = _proc_status()
        if self.status is not None and after is not None:
            peak = after["VmHWM"] - self.status["VmRSS"] if self.peak_ok else None
            return after["VmRSS"] - self.status["VmRSS"], peak
        now = _maxrss()
        return None, (now - self.maxrss if now is not None and self.maxrss is not None else None)


# --- inputs -------------------------------------------------------------------------------------


def _check_batch_dims(specs: list[InputSpec], batch: int, dims: dict[str, int]) -> None:
    for spec in specs:
        name = spec.dim_names[0] if spec.dim_names else None
        if spec.shape and spec.shape[0] is None and name in dims and dims[name] != batch:
            raise InputError(f"--dim {name}={dims[name]} names the batch dim of input {spec.name!r}; use --batch")


def bench_inputs(model: onnx.ModelProto, *, batch: int = 1, dims: dict[str, int] | None = None, data: Any = None,
                 seed: int = 0, preprocess: Any = None) -> dict[str, np.ndarray]:
    """The inputs :func:`bench` feeds every run: the first batch of ``data``, else seeded random arrays.

    Args:
        model: The (first) model; the arrays fit its inputs.
        batch: Value of the leading dim where it is dynamic (a fixed batch dim wins, with a warning).
        dims: Values of other symbolic dims (random inputs; see :func:`onnxcompress.core.shapes.resolve_dims`).
        data: Anything :func:`onnxcompress.runtime.data.open_source` accepts, or None for random inputs.
        seed: Seed of the random inputs (same seed, same arrays).
        preprocess: Image preprocessing spec when ``data`` is an image folder.

    Raises:
        InputError: Unusable data, or ``dims`` giving the batch dim a value other than ``batch``.
    """
    return _bench_feeds(model, batch, dims or {}, data, seed, preprocess)[0]


def _bench_feeds(model: onnx.ModelProto, batch: int, dims: dict[str, int], data: Any, seed: int,
                 preprocess: Any) -> tuple[dict[str, np.ndarray], Dims]:
    """:func:`bench_inputs` and the symbolic dims they are at (:func:`~onnxcompress.runtime.data.data_dims`)."""
    specs = input_specs(model)
    _check_batch_dims(specs, batch, dims)
    if data is None:
        source: CalibSource = RandomSource(specs, count=batch, seed=seed, dims=dims, domains=integer_domains(model))
    else:
        source = open_source(data, model, preprocess=preprocess, seed=seed, dims=dims, limit=batch)
    resolved = data_dims(model, dims, ("--data", data, source), hint="--data")
    first = next(iter(source.batches(batch)), None)
    if first is None or (specs and not first.feeds):
        raise InputError(f"{getattr(source, 'description', 'data')}: no samples")
    got = len(first)
    if specs and got != batch:
        why = "the model has a fixed batch dim" if any(s.batch_dim_static() for s in specs) else "the data has fewer samples"
        log.warning("benchmarking with batch %d instead of %d (%s)", got, batch, why)
    return {k: np.ascontiguousarray(v) for k, v in first.feeds.items()}, resolved


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _check_inputs(model: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray], ref: str) -> None:
    """Raise InputError unless ``model`` accepts ``feeds`` (made for model ``ref``)."""
    specs = {s.name: s for s in input_specs(model)}
    if set(specs) != set(feeds):
        raise InputError(f"{name}: inputs {sorted(specs)} differ from {ref}'s {sorted(feeds)}; "
                         "compared models must take the same inputs")
    for key, arr in feeds.items():
        spec = specs[key]
        if spec.dtype != arr.dtype:
            raise InputError(f"{name}: input {key!r} is {spec.dtype} but {ref}'s is {arr.dtype}")
        fixed_ok = all(want is None or want == got for want, got in zip(spec.shape, arr.shape))
        if len(spec.shape) != arr.ndim or not fixed_ok:
            raise InputError(f"{name}: input {key!r} expects shape {_fmt_shape(spec.shape)}, "
                             f"but {ref} is benchmarked with {list(arr.shape)}")


def _shape_dims(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Symbolic dim values implied by ``feeds`` (for MAC counts at the benchmarked shapes)."""
    dims: dict[str, int] = {}
    for spec in input_specs(model):
        for dim_name, size in zip(spec.dim_names, feeds[spec.name].shape):
            if dim_name:
                dims[dim_name] = int(size)
    return dims


# --- sessions and runs --------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _run_ms(session: ort.InferenceSession, feeds: dict[str, np.ndarray], name: str) -> float:
    """Time one ``session.run`` in milliseconds.

    Raises:
        InputError: onnxruntime fails to run the model.
    """
    try:
        start = time.perf_counter_ns()
        session.run(None, feeds, _RUN_OPTIONS)
        return (time.perf_counter_ns() - start) / 1e6
    except _ORT_ERRORS as exc:
        raise InputError(f"{name}: onnxruntime failed to run the model: {_first_line(exc)}") from None


def _session(model: onnx.ModelProto, name: str, provider: str, threads: int, optimize: bool) -> ort.InferenceSession:
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        session = make_session(model, optimize=optimize, threads=threads, providers=providers, spin=True)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None
    except _ORT_ERRORS as exc:
        raise InputError(f"{name}: onnxruntime cannot load the model: {_first_line(exc)}") from None
    if provider not in session.get_providers():
        raise InputError(f"{name}: {provider} could not be used (session runs on {', '.join(session.get_providers())})")
    return session


def _prime_runtime(provider: str, threads: int, optimize: bool) -> None:
    """Create and run a trivial session, so one-time onnxruntime setup is charged to no model."""
    model = proto.identity_model()
    try:
        _session(model, "prime", provider, threads, optimize).run(None, {"x": np.zeros(1, np.float32)})
    except (InputError, *_ORT_ERRORS) as exc:
        log.debug("priming onnxruntime failed: %s", exc)


def _model_name(source: serde.ModelSource, index: int) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"model[{index}]"


def _load(source: serde.ModelSource, name: str) -> onnx.ModelProto:
    """:func:`serde.load_model`, with the model's name in the error message."""
    try:
        return serde.load_model(source)
    except InputError as exc:
        text = str(exc)
        raise InputError(text if text.startswith(name) else f"{name}: {text}") from None


def _open_all(models: Sequence[serde.ModelSource],
              settings: dict[str, Any]) -> tuple[list[_Entry], dict[str, np.ndarray], Dims]:
    """Load every model, make the inputs from the first, measure session creation and first run."""
    entries: list[_Entry] = []
    feeds: dict[str, np.ndarray] | None = None
    dims = Dims()
    for index, source in enumerate(models):
        name = _model_name(source, index)
        model = _load(source, name)
        if feeds is None:
            feeds, dims = _bench_feeds(model, settings["batch"], settings["dims"], settings["data"], settings["seed"],
                                       settings["preprocess"])
        else:
            _check_inputs(model, name, feeds, entries[0].name)
        entries.append(_open_one(model, name, feeds, settings))
        del model
    assert feeds is not None
    return entries, feeds, dims


def _open_one(model: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray], settings: dict[str, Any]) -> _Entry:
    metrics = model_metrics(model, _shape_dims(model, feeds))
    probe = _MemoryProbe()
    probe.start()
    start = time.perf_counter()
    session = _session(model, name, settings["provider"], settings["threads"], settings["optimize"])
    session_ms = (time.perf_counter() - start) * 1e3
    first_ms = _run_ms(session, feeds, name)
    rss, peak = probe.stop()
    log.info("%s: session %.1f ms, first run %.2f ms", name, session_ms, first_ms)
    return _Entry(name, session, metrics, session_ms, first_ms, rss, peak)


def _run_rounds(entries: list[_Entry], feeds: dict[str, np.ndarray], order: list[list[int]],
                description: str, progress: bool) -> list[list[float]]:
    """Run ``order``'s rounds; ``times[i][r]`` is model ``i``'s time in round ``r`` (ms)."""
    times: list[list[float]] = [[0.0] * len(order) for _ in entries]
    gc_was_on = gc.isenabled()
    gc.disable()  # a collection in the middle of a run would be charged to that model
    try:
        for r, round_ in enumerate(track(order, description, total=len(order), enabled=progress)):
            for i in round_:
                times[i][r] = _run_ms(entries[i].session, feeds, entries[i].name)
    finally:
        if gc_was_on:
            gc.enable()
    return times


def _result(entry: _Entry, times: list[float], reference: list[float]) -> ModelBench:
    ratios = paired_ratios(times, reference)
    spread = np.percentile(ratios, [10, 90]) if ratios else (float("nan"), float("nan"))
    m = entry.metrics
    return ModelBench(
        name=entry.name, file_bytes=m.file_bytes, params=m.params, macs=m.macs,
        session_ms=entry.session_ms, first_run_ms=entry.first_run_ms,
        rss_delta_bytes=entry.rss_delta, peak_rss_delta_bytes=entry.peak_delta,
        **latency_stats(times), ratio_vs_first=paired_ratio(times, reference),
        ratio_p10=float(spread[0]), ratio_p90=float(spread[1]),
        providers=list(entry.session.get_providers()), times_ms=list(times))


def _validate_counts(warmup: int, runs: int, batch: int, threads: int) -> None:
    for label, value, least in (("warmup", warmup, 0), ("runs", runs, 1), ("batch", batch, 1), ("threads", threads, 0)):
        if value < least:
            raise InputError(f"--{label} must be ≥ {least}, got {value}")


def _warn_if_busy(machine: MachineInfo) -> None:
    if machine.load_average is not None and machine.load_average >= machine.usable_cores:
        log.warning("the machine is busy (load average %.2f on %d usable cores): latencies will be noisy; "
                    "compare models in one run, where the ratios are paired by round", machine.load_average,
                    machine.usable_cores)


def bench(models: Sequence[serde.ModelSource], *, provider: str = "CPUExecutionProvider", threads: int = 0,
          warmup: int = 10, runs: int = 100, batch: int = 1, dims: dict[str, int] | None = None, data: Any = None,
          seed: int = 0, optimize: bool = True, progress: bool = False, preprocess: Any = None) -> BenchReport:
    """Measure the latency of one or more models on onnxruntime, in interleaved rounds.

    Each model gets a session (ORT graph optimizations on unless ``optimize`` is False) and one
    first run, during which session creation time and RSS growth are measured. Then ``warmup``
    untimed rounds and ``runs`` timed rounds follow; every round runs each model once, in the
    order recorded in :attr:`BenchReport.order` (see :func:`round_order`). All models get the same
    inputs, made for the first model.

    ``ratio_vs_first`` is computed pair by pair: for each round ``r`` the ratio
    ``t_model[r] / t_first[r]`` of the two times measured in that round, then the median of those
    ratios. It is exactly 1.0 for the first model.

    Args:
        models: Paths, bytes or ``ModelProto`` objects; the first is the reference.
        provider: An installed execution provider (``onnxruntime.get_available_providers()``);
            case-insensitive, the ``ExecutionProvider`` suffix may be omitted.
        threads: Intra-op threads per session (0: onnxruntime's default).
        warmup: Untimed rounds before measuring.
        runs: Timed rounds.
        batch: Value of the leading (batch) dim where it is dynamic.
        dims: Values of other symbolic input dims, by name (without ``data``: else guessed, with a
            warning; the report's ``dims`` say which).
        data: Input data (see :func:`onnxcompress.runtime.data.open_source`); its first batch is used.
            Default: seeded random inputs.
        seed: Seed for random inputs and the round order.
        optimize: Enable onnxruntime's graph optimizations (what a deployment would use).
        progress: Show a progress bar on a terminal.
        preprocess: Image preprocessing spec when ``data`` is an image folder.

    Returns:
        A :class:`BenchReport`.

    Raises:
        InputError: No models, bad settings, unknown provider, a model that cannot be loaded or
            run, or models that do not take the same inputs.
    """
    if not models:
        raise InputError("give at least one model to benchmark")
    _validate_counts(warmup, runs, batch, threads)
    provider = resolve_provider(provider)
    settings = {"provider": provider, "threads": threads, "optimize": optimize, "batch": batch,
                "dims": dict(dims or {}), "data": data, "seed": seed, "preprocess": preprocess}
    _prime_runtime(provider, threads, optimize)
    entries, feeds, dims = _open_all(models, settings)
    machine = machine_info(provider, threads, optimize)
    _warn_if_busy(machine)
    if warmup:
        _run_rounds(entries, feeds, round_order(len(entries), warmup, seed + 1), "warm-up", progress)
    order = round_order(len(entries), runs, seed)
    times = _run_rounds(entries, feeds, order, "benchmarking", progress)
    results = [_result(e, t, times[0]) for e, t in zip(entries, times)]
    inputs = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()}
    public = {"warmup": warmup, "runs": runs, "batch": batch, "dims": settings["dims"], "seed": seed,
              "interleaving": "each round runs every model once; blocks of n rounds rotate a seeded shuffled order",
              "ratio": "median over rounds of t_model[r] / t_first[r]",
              "data": "random" if data is None else str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__}
    return BenchReport(machine, public, inputs, results, order, dims.as_dict())


# --- terminal -----------------------------------------------------------------------------------


