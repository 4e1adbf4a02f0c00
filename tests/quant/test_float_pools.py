"""``quantize_int8:float_pools``: a layer kept float whose Relu output goes through a MaxPool pools
before the Relu (exact), so the Q follows a Relu (which onnxruntime does not move a Q over) and the
MaxPool stays float; a sibling MaxPool reading the same tensor stays float too."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxcompress.core import serde
from onnxcompress.quant.float_pools import commute_float_pools
from tests.helpers.builders import make_model
from tests.helpers.graphs import consumers, producers
from tests.helpers.quant import compare, quantize
from tests.helpers.runs import ort_run
from tests.helpers.tensors import feeds_for, rand

X = {"x": ["N", 3, 8, 8]}


def _model(act: str = "Relu") -> onnx.ModelProto:
    """stem conv -> act -> MaxPool 2x2 ``m`` -> conv_b, and ``m`` -> MaxPool 3x3 (sibling) -> conv_c; Add."""
    rng = np.random.default_rng(3)
    init = {"Wa": rand(rng, 4, 3, 3, 3, scale=0.5), "Ba": rand(rng, 4, scale=0.5),
            "Wb": rand(rng, 4, 4, 3, 3, scale=0.5), "Wc": rand(rng, 4, 4, 3, 3, scale=0.5)}
    extra = []
    if act == "Clip":
        init.update(lo=np.float32(0.0), hi=np.float32(6.0))
        extra = ["lo", "hi"]
    nodes = [helper.make_node("Conv", ["x", "Wa", "Ba"], ["a"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node(act, ["a", *extra], ["r"], name="act"),
             helper.make_node("MaxPool", ["r"], ["m"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["m", "Wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["m"], ["p"], name="sibling", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p", "Wc"], ["c"], name="conv_c", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["b", "c"], ["y"], name="add")]
    return make_model(nodes, X, ["y"], init)


def test_commute_is_exact_and_only_for_excluded_layers():
    for act in ("Relu", "Clip"):
        model = _model(act)
        graph = serde.to_graph(model)
        assert commute_float_pools(graph, set()) == [] and [n.op for n in graph.nodes][1:3] == [act, "MaxPool"]
        assert commute_float_pools(graph, {"stem"}) == ["sibling"]
        assert [n.op for n in graph.nodes][1:3] == ["MaxPool", act]
        moved = serde.to_model(graph, model)
        onnx.checker.check_model(moved, full_check=True)
        feeds = feeds_for(model, 8)
        for want, got in zip(ort_run(model, feeds), ort_run(moved, feeds), strict=True):
            np.testing.assert_array_equal(want, got)  # max over a window commutes with Relu/Clip exactly


def test_float_pools_keeps_the_pools_of_a_float_layer_float():
    model = _model()
    plain, _ = quantize(model, "quantize_int8:exclude=stem")
    q, _ = quantize(model, "quantize_int8:exclude=stem:float_pools=true")
    prod, cons = producers(q), consumers(q)
    pool = next(n for n in q.graph.node if n.name == "pool")
    assert prod[pool.input[0]].name == "stem"  # pools the float conv output directly
    q_m = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and prod[n.input[0]].op_type == "Relu")
    assert prod[q_m.input[0]].input[0] == pool.output[0]  # Relu after the pool, then the Q
    sibling = next(n for n in q.graph.node if n.name == "sibling")
    assert prod[sibling.input[0]].op_type == "DequantizeLinear"  # float pooling between DQ and its own Q
    assert [c.op_type for c in cons[sibling.output[0]]] == ["QuantizeLinear"]
    # without the option the layout is as before: Relu -> MaxPool, both pools on the quantized tensor
    plain_prod = producers(plain)
    plain_pool = next(n for n in plain.graph.node if n.name == "pool")
    assert plain_prod[plain_pool.input[0]].op_type in ("Relu", "DequantizeLinear")
    assert compare(model, q) >= 0.99


def test_float_pools_without_excluded_layers_changes_nothing():
    model = _model()
    a, _ = quantize(model)
    b, _ = quantize(model, "quantize_int8:float_pools=true")
    assert a.SerializeToString() == b.SerializeToString()
