"""onnxruntime sessions, created the same way everywhere (CPU, optimizations off by default)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError

__all__ = ["make_session"]

log = logging.getLogger(__name__)


def make_session(model: onnx.ModelProto, *, optimize: bool = False, threads: int = 0,
                 providers: list[str] | None = None, log_severity: int = 3,
                 optimized_model_path: str | Path | None = None, arena: bool = True,
                 spin: bool = False) -> ort.InferenceSession:
    """Create an inference session for ``model``.

    Args:
        model: The model; above ~1.8 GB of weights it is written to a temporary folder with
            external data and loaded from there.
        optimize: Enable ORT's graph optimizations. Validation leaves them off for the reference
            and for a float candidate, so ORT's own fusions cannot hide (or cause) a difference.
        threads: Intra-op threads (0: ORT's default).
        providers: Execution providers (default CPU).
        log_severity: ORT's own log level (3: errors, 4: fatal only).
        optimized_model_path: Where ORT writes the graph it will run (after its optimizations).
        arena: Use ORT's CPU memory arena (faster allocations; it keeps its peak until the
            session goes): off for sessions that run a few times on large batches.
        spin: Let onnxruntime's intra-op threads busy-wait for work between and after runs (its
            default). Off here: the tool's runs alternate with numpy work on the outputs, which the
            spinning threads would compete with for the cores (capture on opennsfw: ~1/3 of the
            process's CPU time); on where a run's latency is what is measured.

    Raises:
        InputError: onnxruntime refuses the model.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = threads
    opts.log_severity_level = log_severity
    opts.enable_cpu_mem_arena = arena
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    providers = providers or ["CPUExecutionProvider"]
    try:
        if serde.weights_nbytes(model) <= serde.EXTERNAL_THRESHOLD:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        with tempfile.TemporaryDirectory(prefix="onnxcompress-ort-") as tmp:
            path = serde.save_model(model, Path(tmp) / "model.onnx", external=True)
            return ort.InferenceSession(str(path), opts, providers=providers)
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.InvalidArgument) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"onnxruntime cannot load the model: {first}") from None
