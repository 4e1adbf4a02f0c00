"""Shape arithmetic evaluated at concrete dims (``core.shape_values``) in place of onnxruntime's
symbolic inference for the MAC count."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress.core import shapes
from onnxcompress.core.metrics import model_metrics


def _int(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.int64), name)


def _reshaped_matmul(*, where: bool = False, declared: list | None = None) -> onnx.ModelProto:
    """``x [4, 3, 8]`` reshaped to ``[x.shape[0] * x.shape[1], -1]`` then a MatMul with ``w [8, 5]``;
    at opset 13 onnx's inference does not follow the ``Mul`` of shape values. ``where``: the target
    goes through a ``Where`` (not evaluated here). ``declared``: the output's declared dims."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
             helper.make_node("Mul", ["d0", "d1"], ["rows"]),
             helper.make_node("Unsqueeze", ["rows", "axes"], ["u"]),
             helper.make_node("Concat", ["u", "m1"], ["target"], axis=0)]
    if where:
        nodes.append(helper.make_node("Where", ["yes", "target", "target"], ["picked"]))
    nodes += [helper.make_node("Reshape", ["x", "picked" if where else "target"], ["r"]),
              helper.make_node("MatMul", ["r", "w"], ["y"])]
    inits = [_int("i0", 0), _int("i1", 1), _int("axes", [0]), _int("m1", [-1]),
             numpy_helper.from_array(np.ones((8, 5), np.float32), "w"),
             numpy_helper.from_array(np.array([True, True]), "yes")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [4, 3, 8])],
                          [helper.make_tensor_value_info("y", 1, declared)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture
def symbolic_calls(monkeypatch):
    calls = []
    real = shapes._symbolic
    monkeypatch.setattr(shapes, "_symbolic", lambda m: calls.append(1) or real(m))
    return calls


def test_computed_reshape_counted_without_symbolic_inference(symbolic_calls):
    model = _reshaped_matmul()
    before = copy.deepcopy(model)
    assert "r" not in shapes.full_shapes(onnx.shape_inference.infer_shapes(model, data_prop=True))  # onnx alone
    m = model_metrics(model)
    assert not symbolic_calls
    assert m.macs == 12 * 8 * 5 and m.outputs == {"y": [12, 5]}
    assert model == before


def test_same_count_as_symbolic_inference(symbolic_calls, monkeypatch):
    ours = model_metrics(_reshaped_matmul())
    monkeypatch.setattr("onnxcompress.core.shapes.fill_shapes", lambda *a: None)
    theirs = model_metrics(_reshaped_matmul())
    assert symbolic_calls and (ours.macs, ours.outputs) == (theirs.macs, theirs.outputs)


def test_wrong_declared_output_dims_are_replaced(symbolic_calls):
    m = model_metrics(_reshaped_matmul(declared=[1, "seqlen"]))  # as ddddocr's CTC head declares its output
    assert not symbolic_calls and m.outputs == {"y": [12, 5]}


def test_ops_it_does_not_evaluate_fall_back_to_symbolic_inference(symbolic_calls):
    m = model_metrics(_reshaped_matmul(where=True))
    assert symbolic_calls == [1]
    assert m.macs == 12 * 8 * 5


def test_an_initializer_whose_data_does_not_match_its_dims_is_not_read(symbolic_calls):
    model = _reshaped_matmul()
    bad = numpy_helper.from_array(np.zeros(3, np.int64), "odd")
    bad.dims[:] = [2, 2]  # 24 bytes for 4 values, as a fuzzed file can hold
    model.graph.initializer.append(bad)
    assert model_metrics(model).macs == 12 * 8 * 5
