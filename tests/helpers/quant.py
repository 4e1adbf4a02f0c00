"""Quantization test helpers: a tiny classifier, the pass run with pinned CPU flags, Q/DQ readers."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxcompress.core.pass_api import PassContext, PassResult
from onnxcompress.passes.quantize_int8 import CPU_FLAGS
from tests.helpers.builders import make_model
from tests.helpers.graphs import initializers, producers
from tests.helpers.runs import cosine, ort_run, run_passes
from tests.helpers.tensors import calib_for, feeds_for, rand

__all__ = ["NO_VNNI", "VNNI", "calibration_runs", "compare", "conv_classifier", "qdq_params", "quantize"]

#: CPU flags without VNNI, so tests do not depend on the machine.
#: Flags of a CPU without VNNI: ``reduce_range=auto`` gives 7-bit weights, which onnxruntime's
#: integer kernels run exactly on every CPU. Tests that judge a model as deployed (``compare_models``
#: runs quantized candidates with ORT optimizations on) pin these.
NO_VNNI = {"avx2"}
#: CPU flags :func:`quantize` pins by default: 8-bit weights on any machine (structure tests; judged
#: as fake-quant, with ORT optimizations off, the numbers are the same on every CPU).
VNNI = {"avx2", "avx512_vnni"}


def conv_classifier(rng: np.random.Generator, mid: int = 4) -> onnx.ModelProto:
    """x [N,3,8,8] → conv_a (4 ch) → Relu → conv_b (``mid`` ch) → Relu → GlobalAveragePool → Flatten → fc
    (Gemm): output [N, 5], four weight layers (weights of scale 0.5)."""
    init = {"Wa": rand(rng, 4, 3, 3, 3, scale=0.5), "Ba": rand(rng, 4, scale=0.5),
            "Wb": rand(rng, mid, 4, 3, 3, scale=0.5), "Bb": rand(rng, mid, scale=0.5),
            "F": rand(rng, 5, mid, scale=0.5), "Fb": rand(rng, 5, scale=0.5)}
    nodes = [helper.make_node("Conv", ["x", "Wa", "Ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             helper.make_node("Conv", ["ra", "Wb", "Bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
             helper.make_node("GlobalAveragePool", ["rb"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "F", "Fb"], ["y"], name="fc", transB=1)]
    return make_model(nodes, {"x": ["N", 3, 8, 8]}, ["y"], init)


def quantize(model: onnx.ModelProto, spec: str = "quantize_int8", *, calib: Any = "auto",
             values: dict | None = None) -> tuple[onnx.ModelProto, PassResult]:
    """Run ``spec`` through the PassManager (CPU flags pinned to :data:`VNNI` unless given); returns the
    checked model and the last pass's result. ``calib="auto"``: :func:`calib_for` the model."""
    source = calib_for(model) if isinstance(calib, str) and calib == "auto" else calib
    ctx = PassContext(calib=source, values={CPU_FLAGS: VNNI, **(values or {})})
    new, records = run_passes(model, spec, ctx)
    onnx.checker.check_model(new, full_check=True)
    return new, records[-1].result


def qdq_params(model: onnx.ModelProto, dq_output: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """``(quantized values or None, scale, zero point, axis)`` of the DQ producing ``dq_output``."""
    node = producers(model)[dq_output]
    assert node.op_type == "DequantizeLinear", node.op_type
    values = initializers(model)
    axis = next((a.i for a in node.attribute if a.name == "axis"), None)
    return values.get(node.input[0]), values[node.input[1]], values[node.input[2]], axis


def compare(ref: onnx.ModelProto, cand: onnx.ModelProto, n: int = 16) -> float:
    """Smallest cosine similarity over the outputs, on seeded random inputs (ORT, optimizations off)."""
    feeds = feeds_for(ref, n)
    outs = [cosine(r, c) for r, c in zip(ort_run(ref, feeds), ort_run(cand, feeds), strict=True)]
    return min(outs)


def calibration_runs(records: list[logging.LogRecord]) -> int:
    """How many calibration runs over the data ``records`` (``caplog.records`` at INFO) show:
    :func:`~onnxcompress.quant.calibrate.collect_statistics` logs one line per run."""
    return sum(r.name == "onnxcompress.quant.calibrate" and r.msg.startswith("calibrated ") for r in records)
