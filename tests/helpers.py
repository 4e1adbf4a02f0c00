"""Shared helpers for tests: build tiny models, run them in ORT with optimizations off, run passes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.core import serde
from onnxcompress.core.pass_api import PassContext, PassResult
from onnxcompress.pipeline.manager import PassManager, parse_spec

__all__ = [
    "conv_model",
    "make_model",
    "op_types",
    "ort_run",
    "parse",
    "random_feeds",
    "rel_err",
    "run_checked",
    "run_passes",
    "weight_shapes",
]


def parse(text: str) -> onnx.ModelProto:
    """Parse ONNX text syntax and check the model."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def make_model(nodes: list[onnx.NodeProto], inputs: dict, outputs: Sequence[str],
               inits: dict[str, np.ndarray], opset: int = 17, types: dict[str, int] | None = None) -> onnx.ModelProto:
    """A model with float32 inputs/outputs; ``inputs`` maps names to shapes (symbolic dims allowed).

    ``types`` gives other element types for some inputs (``TensorProto`` codes). Float initializers
    are stored as float32, others as given. Output shapes come from inference; intermediate shapes
    stay unknown, as in many exported models. The model passes the full checker.
    """
    def tensor(name: str, value) -> onnx.TensorProto:
        arr = np.asarray(value)
        return numpy_helper.from_array(arr.astype(np.float32) if arr.dtype.kind == "f" else arr, name=name)

    types = types or {}
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [tensor(k, v) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # types the graph outputs
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_model(w: np.ndarray, x_shape: Sequence[Any] | None, bias: np.ndarray | None = None,
               **attrs: Any) -> onnx.ModelProto:
    """One Conv ``y = Conv(x, W[, B])`` named ``conv``, with input ``x`` of shape ``x_shape``."""
    inits = {"W": w} | ({"B": bias} if bias is not None else {})
    node = helper.make_node("Conv", ["x", "W"] + (["B"] if bias is not None else []), ["y"], "conv", **attrs)
    return make_model([node], {"x": x_shape}, ["y"], inits)


def weight_shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    """Shape of each node's input 1 (its weight initializer), in node order."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node]


def rel_err(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """‖b(x) − a(x)‖ / ‖a(x)‖ of the first output, in ORT with optimizations off."""
    ref, got = ort_run(a, feeds)[0], ort_run(b, feeds)[0]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` on CPU with every ORT graph optimization disabled."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 0, dim: int = 2) -> dict[str, np.ndarray]:
    """Seeded float inputs for every graph input (symbolic dims become ``dim``)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dim for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.dtype(dtype).kind == "f":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 10, size=shape).astype(dtype)
    return feeds


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


def op_types(model: onnx.ModelProto) -> list[str]:
    """Op types of the main graph's nodes, in order."""
    return [n.op_type for n in model.graph.node]


def builtin_passes() -> dict:
    """The registry without passes that tests (or the README's example) register on the fly."""
    from onnxcompress.pipeline.manager import registry

    return {n: c for n, c in registry().items() if c.__module__.startswith("onnxcompress.passes.")}


def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (the real-model tests reuse the scripts' code)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module
