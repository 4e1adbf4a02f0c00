import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcompress.core.errors import InputError, PassFailed
from onnxcompress.core.pass_api import Numerics
from onnxcompress.pipeline.validate import Gate, compare_models
from onnxcompress.runtime.data import IterableSource, RandomSource, input_specs
from tests.helpers.builders import parse

CLS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,3] y) { y = MatMul(x, w) }"""


def _cls(w: np.ndarray) -> onnx.ModelProto:
    m = onnx.parser.parse_model(CLS)
    m.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), "w"))
    return m


W = np.random.default_rng(0).standard_normal((4, 3))


def test_identical_models_are_exact():
    m = _cls(W)
    rep = compare_models(m, _cls(W), RandomSource(input_specs(m), 16))
    (o,) = rep.outputs
    assert rep.samples == 16 and o.max_abs == 0 and o.cosine == pytest.approx(1.0) and math.isinf(o.sqnr_db)
    assert o.top1_agreement == 1.0
    assert Gate.for_numerics(Numerics.EXACT).check(rep) == []


def test_metrics_match_numpy_and_labels():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 4)).astype(np.float32)
    labels = (x.astype(np.float64) @ W).argmax(1)
    w2 = W + 0.3 * rng.standard_normal(W.shape)
    ref, cand = _cls(W), _cls(w2)
    rep = compare_models(ref, cand, IterableSource([{"x": x[:7], "labels": labels[:7]}, {"x": x[7:], "labels": labels[7:]}],
                                                   input_specs(ref)), batch_size=5)
    r = x @ W.astype(np.float32)
    c = x @ w2.astype(np.float32)
    (o,) = rep.outputs
    assert o.max_abs == pytest.approx(np.abs(r - c).max(), rel=1e-5)
    assert o.mean_abs == pytest.approx(np.abs(r - c).mean(), rel=1e-5)
    cos = (r * c).sum() / np.sqrt((r * r).sum() * (c * c).sum())
    assert o.cosine == pytest.approx(cos, rel=1e-6)
    assert o.sqnr_db == pytest.approx(10 * np.log10((r * r).sum() / ((r - c) ** 2).sum()), rel=1e-5)
    assert o.top1_agreement == pytest.approx((r.argmax(1) == c.argmax(1)).mean())
    assert o.ref_accuracy == pytest.approx(1.0)
    assert o.cand_accuracy == pytest.approx((c.argmax(1) == labels).mean())
    assert o.top1_drop == pytest.approx(100 * (1 - o.cand_accuracy))


def test_gates_by_numerics_and_overrides():
    ref, cand = _cls(W), _cls(W * 1.001)
    rep = compare_models(ref, cand, RandomSource(input_specs(ref), 8))
    assert Gate.for_numerics(Numerics.EXACT).check(rep)  # 1e-3 relative error fails the exact gate
    assert Gate.for_numerics(Numerics.LOSSY).check(rep) == []
    assert Gate.for_numerics(Numerics.LOSSY, min_sqnr=100.0).check(rep)
    with pytest.raises(InputError, match="unknown gate threshold"):
        Gate.for_numerics(Numerics.EXACT, min_cosinus=0.5)


def test_candidate_that_lost_an_output_or_fails():
    ref = _cls(W)
    broken = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] z) { z = Identity(x) }""")
    with pytest.raises(PassFailed, match="lost output"):
        compare_models(ref, broken, RandomSource(input_specs(ref), 2))


def test_output_shape_change_detected():
    ref = _cls(W)
    cand = _cls(np.concatenate([W, W[:, :1]], 1))
    cand.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 4
    with pytest.raises(PassFailed, match="changed shape"):
        compare_models(ref, cand, RandomSource(input_specs(ref), 2))
