import numpy as np
import pytest

from onnxcompress.core.errors import InputError
from onnxcompress.core.proto import with_outputs
from onnxcompress.runtime.capture import capture
from onnxcompress.runtime.data import RandomSource, input_specs
from tests.helpers.builders import parse

MODEL = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x) => (float[N,3] y) {
  h = Relu(x)
  n = Neg(h)
  y = Add(n, n)
}""")


def test_capture_streams_intermediates_and_inputs():
    src = RandomSource(input_specs(MODEL), 10, seed=3)
    seen = []
    n = capture(MODEL, ["h", "x", "y"], src, lambda batch, t: seen.append((batch, t)), batch_size=4)
    assert n == 10 and [len(b) for b, _ in seen] == [4, 4, 2]
    for batch, t in seen:
        x = batch.feeds["x"]
        np.testing.assert_array_equal(t["x"], x)
        np.testing.assert_array_equal(t["h"], np.maximum(x, 0))
        np.testing.assert_array_equal(t["y"], -2 * np.maximum(x, 0))


def test_capture_initializer_and_unknown_name():
    m = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x) => (float[N,3] y) <float[3] b = {1.0, 1.0, 1.0}> { y = Add(x, b) }""")
    got = {}
    capture(m, ["b"], RandomSource(input_specs(m), 1), lambda b, t: got.update(t))
    np.testing.assert_array_equal(got["b"], np.ones(3, np.float32))
    with pytest.raises(InputError, match="not produced"):
        with_outputs(m, ["nope"])
    assert [o.name for o in with_outputs(MODEL, ["h"]).graph.output] == ["y", "h"]
