"""Tiny float models and helpers shared by the quantization tests (``from quant.builders import ...``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from helpers import make_model, ort_run, run_passes
from onnx import helper, numpy_helper

from onnxcompress.core.pass_api import PassContext, PassResult
from onnxcompress.passes.quantize_int8 import CPU_FLAGS
from onnxcompress.runtime.data import CalibSource, open_source

__all__ = ["make_model", "rand", "conv_classifier", "calib_for", "feeds_for", "quantize", "inits", "producers", "consumers", "qdq_params",
           "cosine", "compare", "NO_VNNI"]

#: CPU flags without VNNI, so tests do not depend on the machine.
NO_VNNI = {"avx2"}


def rand(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def conv_classifier(rng: np.random.Generator, mid: int = 4) -> onnx.ModelProto:
    """x [N,3,8,8] → conv_a (4 ch) → Relu → conv_b (``mid`` ch) → Relu → GlobalAveragePool → Flatten → fc
    (Gemm): output [N, 5], four weight layers."""
    init = {"Wa": rand(rng, 4, 3, 3, 3), "Ba": rand(rng, 4), "Wb": rand(rng, mid, 4, 3, 3), "Bb": rand(rng, mid),
            "F": rand(rng, 5, mid), "Fb": rand(rng, 5)}
    nodes = [helper.make_node("Conv", ["x", "Wa", "Ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             helper.make_node("Conv", ["ra", "Wb", "Bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
             helper.make_node("GlobalAveragePool", ["rb"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "F", "Fb"], ["y"], name="fc", transB=1)]
    return make_model(nodes, {"x": ["N", 3, 8, 8]}, ["y"], init)


def _shape(model: onnx.ModelProto, batch: int) -> dict[str, list[int]]:
    shapes = {}
    for inp in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
        shapes[inp.name] = dims
    return shapes


def calib_for(model: onnx.ModelProto, n: int = 64, seed: int = 1, batch: int | None = None) -> CalibSource:
    """In-memory calibration data: ``n`` seeded normal samples per input (dynamic dims: ``n``)."""
    rng = np.random.default_rng(seed)
    arrays = {k: rng.standard_normal([n, *s[1:]]).astype(np.float32) for k, s in _shape(model, n).items()}
    return open_source([arrays], model)


def feeds_for(model: onnx.ModelProto, n: int = 16, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal([n, *s[1:]]).astype(np.float32) for k, s in _shape(model, n).items()}


def quantize(model: onnx.ModelProto, spec: str = "quantize_int8", *, calib: Any = "auto",
             values: dict | None = None) -> tuple[onnx.ModelProto, PassResult]:
    """Run ``spec`` through the PassManager (context slot values: CPU flags pinned to no-VNNI unless given)."""
    source = calib_for(model) if isinstance(calib, str) and calib == "auto" else calib
    ctx = PassContext(calib=source, values={CPU_FLAGS: NO_VNNI, **(values or {})})
    new, records = run_passes(model, spec, ctx)
    onnx.checker.check_model(new, full_check=True)
    return new, records[-1].result


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def qdq_params(model: onnx.ModelProto, dq_output: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """``(quantized values or None, scale, zero point, axis)`` of the DQ producing ``dq_output``."""
    node = producers(model)[dq_output]
    assert node.op_type == "DequantizeLinear", node.op_type
    values = inits(model)
    axis = next((a.i for a in node.attribute if a.name == "axis"), None)
    return values.get(node.input[0]), values[node.input[1]], values[node.input[2]], axis


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare(ref: onnx.ModelProto, cand: onnx.ModelProto, n: int = 16) -> float:
    """Smallest cosine similarity over the outputs, on seeded random inputs (ORT, optimizations off)."""
    feeds = feeds_for(ref, n)
    outs = [cosine(r, c) for r, c in zip(ort_run(ref, feeds), ort_run(cand, feeds), strict=True)]
    return min(outs)
