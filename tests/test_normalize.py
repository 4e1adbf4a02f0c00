import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.core.normalize import normalize, upgrade_opset
from tests.helpers.builders import parse
from tests.helpers.graphs import op_types
from tests.helpers.runs import ort_run
from tests.helpers.tensors import random_feeds


def test_constants_identity_sum():
    m = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y, float[3] c) {
  w = Constant<value = float[3] {1.0, 2.0, 3.0}>()
  s = Constant<value_float = 2.0>()
  c = Constant<value = float[3] {4.0, 5.0, 6.0}>()
  wi = Identity(w)
  a = Sum(x, wi)
  y = Mul(a, s)
}""")
    out = normalize(m)
    assert op_types(out) == ["Constant", "Add", "Mul"]  # the graph-output constant stays a node
    assert sorted(i.name for i in out.graph.initializer) == ["s", "w"]
    onnx.checker.check_model(out, full_check=True)
    feeds = random_feeds(m)
    for a, b in zip(ort_run(m, feeds), ort_run(out, feeds)):
        np.testing.assert_array_equal(a, b)


def test_three_input_sum_and_clean_model_untouched():
    m = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x, float[2] z) => (float[2] y) { y = Sum(x, z, x) }""")
    named = normalize(m)
    assert [(n.name, n.op_type) for n in named.graph.node] == [("y", "Sum")]
    assert normalize(named) is named


def test_unnamed_nodes_get_unique_names():
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="a"), helper.make_node("Neg", ["a"], ["b"]),
         helper.make_node("Relu", ["b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", 1, [2])], [helper.make_tensor_value_info("y", 1, [2])]),
        opset_imports=[helper.make_opsetid("", 17)])
    m.graph.node[1].output[0] = "a_"  # no clash yet; now make one
    m.graph.node[2].input[0] = "a_"
    m.graph.node[0].name = "a_"
    assert [n.name for n in normalize(m).graph.node] == ["a_", "a__1", "y"]


def test_initializer_inputs_become_constants():
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", 1, [2]), helper.make_tensor_value_info("w", 1, [2])],
        [helper.make_tensor_value_info("y", 1, [2])], [numpy_helper.from_array(np.ones(2, np.float32), "w")]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=6)
    out = normalize(m)
    assert [i.name for i in out.graph.input] == ["x"] and [i.name for i in out.graph.initializer] == ["w"]


def test_upgrade_opset():
    m = parse("""<ir_version: 7, opset_import: ["" : 11]>
g (float[2,3] x) => (float[2,3] y) { y = Relu(x) }""")
    up = upgrade_opset(m, 13)
    assert up.opset_import[0].version == 13 and m.opset_import[0].version == 11
    assert upgrade_opset(up, 13) is up
