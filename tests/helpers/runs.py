"""Running models and passes: onnxruntime with every graph optimization off, the pass manager
with the checker, comparisons, and the repository's scripts as modules."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort

from onnxcompress.core import serde
from onnxcompress.core.pass_api import PassContext, PassResult
from onnxcompress.pipeline.manager import PassManager, parse_spec, registry

__all__ = [
    "ROOT",
    "builtin_passes",
    "cosine",
    "load_script",
    "max_err",
    "ort_run",
    "python_env",
    "rel_err",
    "run_checked",
    "run_passes",
]

#: The repository checkout the tests run from.
ROOT = Path(__file__).resolve().parents[2]


def ort_run(model: onnx.ModelProto | str | os.PathLike, feeds: dict[str, np.ndarray],
            outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run ``model`` (a proto or a path) on CPU, one thread, every ORT graph optimization disabled."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def rel_err(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """‖b(x) − a(x)‖ / ‖a(x)‖ of the first output, in ORT with optimizations off."""
    ref, got = ort_run(a, feeds)[0], ort_run(b, feeds)[0]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def max_err(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[float, float]:
    """Largest absolute difference of the outputs and the largest |output| of ``a``."""
    outs_a, outs_b = ort_run(a, feeds), ort_run(b, feeds)
    err = max(float(np.max(np.abs(x - y))) for x, y in zip(outs_a, outs_b, strict=True))
    return err, max(float(np.max(np.abs(x))) for x in outs_a)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays (flattened, in float64)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_passes(model: onnx.ModelProto, spec: str, ctx: PassContext | None = None):
    """Run the pipeline ``spec`` on ``model`` and return ``(new_model, records)``."""
    return PassManager(parse_spec(spec), ctx).run(serde.load_model(model))


def run_checked(model: onnx.ModelProto, spec: str, reasons: Iterable[str],
                ctx: PassContext | None = None) -> tuple[onnx.ModelProto, PassResult]:
    """Run ``spec`` (full checker on the result, graph output names kept) and return the first
    pass's result, checking that every decline code is in ``reasons``."""
    new, records = run_passes(model, spec, ctx)
    onnx.checker.check_model(new, full_check=True)
    assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]
    result = records[0].result
    allowed = set(reasons)
    assert all(d.code in allowed for d in result.declined), result.declined
    return new, result


def builtin_passes() -> dict:
    """The registry without passes that tests (or the README's example) register on the fly."""
    return {n: c for n, c in registry().items() if c.__module__.startswith("onnxcompress.passes.")}


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as the module ``name`` (tests reuse the scripts' code)."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def python_env(**extra: str) -> dict[str, str]:
    """Environment for a child ``python`` that imports the same ``onnxcompress`` as the tests: the
    checkout first on ``PYTHONPATH`` (pytest's ``pythonpath`` setting puts it first here too)."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), **extra}
