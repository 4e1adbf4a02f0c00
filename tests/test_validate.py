import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcompress.core.errors import InputError, PassFailed
from onnxcompress.core.pass_api import Numerics
from onnxcompress.pipeline.validate import Gate, compare_models, parse_slices
from onnxcompress.quant.cpu import cpu_flags, has_vnni
from onnxcompress.runtime.data import IterableSource, RandomSource, input_specs
from onnxcompress.runtime.fidelity import auto_slices
from tests.helpers.builders import make_model, node, parse, yolo_like
from tests.helpers.tensors import rand

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


def test_candidate_fixed_at_batch_one_is_fed_single_samples():
    """A candidate whose batch dim was fixed to 1 (onnxruntime's quantize_static leaves some so)
    is compared sample by sample, not refused because the reference accepts batches."""
    ref = _cls(W)
    cand = _cls(W)
    cand.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    cand.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    rep = compare_models(ref, cand, RandomSource(input_specs(ref), 5))
    assert rep.samples == 5 and rep.outputs[0].max_abs == 0


def test_output_shape_change_detected():
    ref = _cls(W)
    cand = _cls(np.concatenate([W, W[:, :1]], 1))
    cand.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 4
    with pytest.raises(PassFailed, match="changed shape"):
        compare_models(ref, cand, RandomSource(input_specs(ref), 2))


# --- channel slices ------------------------------------------------------------------------------

def _ort(model, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0].astype(np.float64)


def _yolo_pair(noise: float = 1.0):
    ref, cand = yolo_like(), yolo_like(noise)
    x = rand(np.random.default_rng(3), 12, 3, 64, scale=1.0)
    return ref, cand, x, IterableSource([{"x": x[:5]}, {"x": x[5:]}], input_specs(ref))


def test_auto_slices_catch_noisy_score_rows_behind_good_whole_output_metrics():
    ref, cand, x, source = _yolo_pair()
    rep = compare_models(ref, cand, source, batch_size=5)
    (o,) = rep.outputs
    assert o.cosine >= 0.999 and o.sqnr_db > 30  # the whole output looks fine
    assert [(s.start, s.stop, s.source) for s in o.slices] == [(0, 4, "auto"), (4, 10, "auto")]
    r, c = _ort(ref, x)[:, 4:], _ort(cand, x)[:, 4:]
    worst = o.worst_slices(1)[0]
    assert (worst.start, worst.stop) == (4, 10)
    assert worst.cosine == pytest.approx((r * c).sum() / np.sqrt((r * r).sum() * (c * c).sum()), rel=1e-6)
    assert worst.sqnr_db == pytest.approx(10 * np.log10((r * r).sum() / ((r - c) ** 2).sum()), rel=1e-5)
    assert worst.max_abs == pytest.approx(np.abs(r - c).max(), rel=1e-5)
    assert worst.mean_abs == pytest.approx(np.abs(r - c).mean(), rel=1e-5)
    assert worst.sqnr_db < 15 and worst.cosine < 0.99
    fails = Gate(min_cosine=0.99, min_sqnr=20).check(rep)
    assert fails == [f"y[4:10]: cosine {worst.cosine:.6f} < 0.99", f"y[4:10]: SQNR {worst.sqnr_db:.2f} dB < 20 dB"]
    assert Gate(min_cosine=0.5).check(rep) == []


def test_user_slices_and_json():
    ref, cand, x, source = _yolo_pair()
    spec = parse_slices("y:0:4,0:6:", ["y"])
    assert spec == {"y": [(0, 4), (6, None)]}
    rep = compare_models(ref, cand, source, slices=spec)
    (o,) = rep.outputs
    assert [(s.start, s.stop, s.source) for s in o.slices] == [(0, 4, "user"), (6, 10, "user")]
    r, c = _ort(ref, x)[:, 6:], _ort(cand, x)[:, 6:]
    assert o.slices[1].sqnr_db == pytest.approx(10 * np.log10((r * r).sum() / ((r - c) ** 2).sum()), rel=1e-5)
    d = rep.as_dict()["outputs"][0]
    assert d["cosine"] == o.cosine and [s["name"] for s in d["slices"]] == ["y[0:4]", "y[6:10]"]
    assert d["slices"][0]["sqnr_db"] == "inf" and d["slices"][1]["source"] == "user"
    assert compare_models(ref, cand, source, auto_slice=False).outputs[0].slices == []


def test_uniform_scale_and_classifier_outputs_get_no_slices():
    rng = np.random.default_rng(0)
    m = make_model([node("Conv", ["x", "w"], "y")], {"x": ["N", 3, 16]}, ["y"], {"w": rand(rng, 8, 3, 1, scale=1.0)})
    noisy = make_model([node("Conv", ["x", "w"], "y")], {"x": ["N", 3, 16]}, ["y"], {"w": rand(rng, 8, 3, 1, scale=1.0)})
    assert compare_models(m, noisy, RandomSource(input_specs(m), 8)).outputs[0].slices == []
    cls = _cls(W)
    rep = compare_models(cls, _cls(W * 1.01), RandomSource(input_specs(cls), 8))
    assert rep.outputs[0].slices == [] and "slices" not in rep.as_dict()["outputs"][0]


def test_auto_slices_grouping():
    assert auto_slices(np.array([100.0, 150, 0.5, 0.06, 0.2, 0.02])) == [(0, 2), (2, 6)]  # a smooth spread is one group
    assert auto_slices(np.array([1.0, 2, 3, 0.5])) == []
    assert auto_slices(np.array([100.0, 0, 0.5])) == [(0, 1), (1, 3)]  # an all-zero channel joins the smallest
    assert auto_slices(np.array([100.0, 1] * 10)) == []  # interleaved: no block layout
    assert auto_slices(np.array([0.0, 0.0])) == [] and auto_slices(np.array([3.0])) == []


@pytest.mark.parametrize("spec, match", [
    ("y", "expected OUTPUT:START"), ("y:a:b", "expected OUTPUT:START"), ("z:0:4", "expected OUTPUT:START"),
    ("y:4:4", "empty slice"), ("y:5:2", "empty slice"), ("3:0:1", "index 3 out of range"), ("y:0:4,", "empty item"),
    ("y:-1:4", "expected OUTPUT:START"),
])
def test_parse_slices_errors(spec, match):
    with pytest.raises(InputError, match=match):
        parse_slices(spec, ["y"])


def test_parse_slices_names_with_colons():
    assert parse_slices("out:0:2:5", ["out:0", "out"]) == {"out:0": [(2, 5)]}
    assert parse_slices("out:0:2", ["out:0", "out"]) == {"out:0": [(2, None)]}
    assert parse_slices("1:3", ["out:0", "out"]) == {"out": [(3, None)]}


def test_slices_out_of_range_for_the_output_shape():
    ref, cand, _, source = _yolo_pair()
    for spec in ({"y": [(0, 11)]}, {"y": [(10, None)]}):
        with pytest.raises(InputError, match="outside axis 1 of size 10"):
            compare_models(ref, cand, source, slices=spec)
    with pytest.raises(InputError, match="unknown output"):
        compare_models(ref, cand, source, slices={"z": [(0, 1)]})
    rank1 = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N] y) { ax = Constant <value = int64[1] {1}> () y = ReduceSum <keepdims = 0> (x, ax) }""")
    with pytest.raises(InputError, match="rank 1"):
        compare_models(rank1, rank1, RandomSource(input_specs(rank1), 2), slices={"y": [(0, 1)]})


def _qdq_conv(w_q: np.ndarray) -> onnx.ModelProto:
    """x -> Q/DQ (uint8, scale 1/255) -> Conv with DQ(int8 weights w_q, scale 0.01) -> Q/DQ."""
    c = w_q.shape[1]
    m = make_model([node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                    node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
                    node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
                    node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]), node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])],
                   {"x": ["N", c, 6, 6]}, ["y"],
                   {"xs": np.float32(1 / 255), "xz": np.uint8(0), "w": w_q, "ws": np.full(len(w_q), 0.01, np.float32),
                    "wz": np.zeros(len(w_q), np.int8), "ys": np.float32(1.0), "yz": np.uint8(128)}, opset=19)
    return m


def test_quantized_candidates_run_as_deployed(monkeypatch):
    """The reference and a float candidate run with optimizations off; a Q/DQ candidate runs with them
    on (onnxruntime's integer kernels, what a user's default session runs)."""
    import onnxcompress.pipeline.validate as validate
    seen: list[bool] = []
    real = validate.make_session
    monkeypatch.setattr(validate, "make_session", lambda m, **kw: seen.append(kw.get("optimize", False)) or real(m, **kw))
    q = _qdq_conv(np.random.default_rng(0).integers(-20, 20, (4, 8, 3, 3)).astype(np.int8))
    rep = compare_models(q, q, RandomSource(input_specs(q), 4))
    assert seen == [False, True] and rep.candidate_optimized and rep.as_dict()["candidate_optimized"] is True
    seen.clear()
    m = _cls(W)
    rep = compare_models(m, _cls(W), RandomSource(input_specs(m), 4))
    assert seen == [False, False] and not rep.candidate_optimized


@pytest.mark.skipif(has_vnni(cpu_flags()) is not False, reason="u8s8 saturation happens only on x86 CPUs without VNNI")
def test_gate_sees_u8s8_saturation_on_cpus_without_vnni():
    """8-bit weights at +-127 against full-range uint8 inputs: pairs of products overflow 16 bits in
    onnxruntime's AVX2 kernel. The fake-quant graph does not show it; the gate must."""
    w = np.where(np.random.default_rng(1).random((4, 16, 3, 3)) < 0.5, -127, 127).astype(np.int8)
    q = _qdq_conv(w)
    feeds = [{"x": np.ones((1, 16, 6, 6), np.float32)}]
    rep = compare_models(q, q, IterableSource(feeds, input_specs(q)))
    assert rep.outputs[0].max_abs > 1.0  # the same model, run as deployed, disagrees with its fake-quant
