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


def _old_opset_model() -> onnx.ModelProto:
    """Opset 9, with ops the converter adapts on the way to 21 (Clip, Unsqueeze, Squeeze: attributes
    that become inputs; BatchNormalization), a big raw weight with a doc_string (the converter drops
    it), a big float_data tensor and a big 1-D int64 one (kept whole)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    w.doc_string = "a weight"
    bn = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          (("g", rng.random(8) + 0.5), ("b", rng.standard_normal(8)), ("m", rng.standard_normal(8)), ("v", rng.random(8) + 0.5))]
    scale = helper.make_tensor("s", onnx.TensorProto.FLOAT, [8, 6, 6], rng.random(288).astype(np.float32).tolist())
    ints = numpy_helper.from_array(np.arange(256, dtype=np.int64), "ints")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
             helper.make_node("Clip", ["n"], ["k"], min=-1.0, max=1.0),
             helper.make_node("Mul", ["k", "s"], ["p"]),
             helper.make_node("Unsqueeze", ["p"], ["u"], axes=[0]),
             helper.make_node("Squeeze", ["u"], ["y"], axes=[0]),
             helper.make_node("Identity", ["ints"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, [1, 8, 6, 6]),
                               helper.make_tensor_value_info("z", onnx.TensorProto.INT64, [256])],
                              [w, *bn, scale, ints])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=7)


def test_upgrade_opset_gives_what_converting_the_whole_model_gives():
    m = _old_opset_model()
    before = m.SerializeToString()
    for target in (10, 13, 17, 21):
        whole = onnx.version_converter.convert_version(m, target)
        up = upgrade_opset(m, target)
        assert up.SerializeToString() == whole.SerializeToString(), target
        assert m.SerializeToString() == before
    w = next(i for i in up.graph.initializer if i.name == "w")
    assert w.raw_data == m.graph.initializer[0].raw_data and not w.doc_string  # dropped as the converter does
    assert {n.op_type for n in up.graph.node} >= {"Clip", "Unsqueeze", "Squeeze"} and len(up.graph.node) > 7
    feeds = random_feeds(m)
    for a, b in zip(ort_run(m, feeds), ort_run(up, feeds)):
        np.testing.assert_array_equal(a, b)
