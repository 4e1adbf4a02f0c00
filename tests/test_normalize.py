import numpy as np
import onnx

from helpers import op_types, ort_run, parse, random_feeds
from onnxcompress.normalize import normalize, upgrade_opset


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
    assert normalize(m) is m


def test_upgrade_opset():
    m = parse("""<ir_version: 7, opset_import: ["" : 11]>
g (float[2,3] x) => (float[2,3] y) { y = Relu(x) }""")
    up = upgrade_opset(m, 13)
    assert up.opset_import[0].version == 13 and m.opset_import[0].version == 11
    assert upgrade_opset(up, 13) is up
