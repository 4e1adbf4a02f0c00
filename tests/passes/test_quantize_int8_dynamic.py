"""quantize_int8:dynamic=true: DynamicQuantizeLinear + MatMulInteger for MatMul/Gemm, on encoders."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import PassContext
from onnxcompress.passes.quantize_int8 import R_SENSITIVITY
from onnxcompress.pipeline.manager import get_pass
from onnxcompress.quant.placement import DECLINE_REASONS, R_OP, R_QUANTIZED, R_WEIGHT
from onnxcompress.runtime.data import open_source
from tests.helpers.builders import make_model, node
from tests.helpers.runs import cosine, ort_run, run_checked
from tests.helpers.transformer import encoder, token_feeds
from tests.passes.test_smooth import with_outliers

DYN = "quantize_int8:dynamic=true"


def ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def emb_cosine(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> float:
    return cosine(ort_run(a, feeds)[0], ort_run(b, feeds)[0])


@pytest.mark.parametrize("style", ["literal", "computed"])
def test_encoder_projections_dynamic_rest_float(style):
    model = encoder(layers=2, heads_shape=style)
    new, result = run_checked(model, DYN, DECLINE_REASONS)  # no calibration data needed
    before, after = ops(model), ops(new)
    assert result.stats["quantized_MatMul"] == 12 and after["MatMulInteger"] == 12
    # Q, K, V share one DynamicQuantizeLinear per layer: norm out, context, norm out, GELU out
    assert after["DynamicQuantizeLinear"] == result.stats["dynamic_quantize_inserted"] == 8
    assert after["MatMul"] == 4  # QK^T and P V per layer, both operands activations
    assert [d.code for d in result.declined if d.code != R_OP] == [R_WEIGHT] * 4
    assert [d.detail for d in result.declined if d.code == R_OP] == ["Gather"]  # the word embeddings
    for op in ("LayerNormalization", "Softmax", "Erf"):
        assert after[op] == before[op]
    assert emb_cosine(model, new, token_feeds(4, 9, seed=3, pad_from=7)) > 0.995


def test_gemm_encoder():
    model = encoder(layers=1, gemm=True, seq=8, batch=1)
    new, result = run_checked(model, DYN, DECLINE_REASONS)
    assert result.stats["quantized_Gemm"] == 6 and ops(new)["Gemm"] == 0
    assert emb_cosine(model, new, token_feeds(1, 8, seed=2)) > 0.995


def _dynamic_reference(x: np.ndarray, w_kn: np.ndarray, qmax: int = 127) -> np.ndarray:
    """The ONNX DynamicQuantizeLinear + MatMulInteger math in numpy, per-column int8 weights
    (``qmax`` 64: 7-bit weights, ``reduce_range``)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = np.float32((hi - lo) / 255.0)
    z = np.clip(np.round(-lo / s), 0, 255)
    xq = np.clip(np.round(x / s) + z, 0, 255)
    ws = (np.abs(w_kn).max(axis=0) / qmax).astype(np.float32)
    wq = np.clip(np.round(w_kn / ws.astype(np.float64)), -qmax, qmax)
    return ((xq - z) @ wq).astype(np.float32) * (s * ws)


@pytest.mark.parametrize("gemm", [False, True])
def test_numerics_match_the_integer_math(gemm):
    """onnxruntime (optimizations off) on the rewritten graph == the integer math done by hand
    (Gemm: alpha folded into the weight, transB into a transposed copy, beta * C added in float)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    if gemm:
        nodes = [node("Gemm", ["x", "Wt", "C"], "y", transB=1, alpha=0.5, beta=2.0)]
        inits = {"Wt": w.T.copy(), "C": rng.standard_normal(3)}
    else:
        nodes = [node("MatMul", ["x", "W"], "y")]
        inits = {"W": w}
    model = make_model(nodes, {"x": [4, 5]}, ["y"], inits)
    new, result = run_checked(model, DYN, DECLINE_REASONS)  # reduce_range=auto: 7-bit weights without VNNI
    qmax = 64 if result.stats["reduce_range"] else 127
    x = rng.standard_normal((4, 5)).astype(np.float32)
    got = ort_run(new, {"x": x})[0]
    expect = _dynamic_reference(x, w * 0.5, qmax) + 2.0 * inits["C"].astype(np.float32) if gemm \
        else _dynamic_reference(x, w, qmax)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_onnxruntime_fuses_the_pattern(tmp_path):
    """With its optimizations on, onnxruntime turns the pattern into its fused dynamic kernels."""
    model = encoder(layers=1)
    new, _ = run_checked(model, DYN, DECLINE_REASONS)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(new.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    fused = ops(onnx.load(str(tmp_path / "opt.onnx")))
    assert fused["MatMulInteger"] == 0 and fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 6, fused


def test_options_and_calibration_requirement():
    cls = get_pass("quantize_int8")
    assert not cls(dynamic=True).needs_calibration()
    assert cls(dynamic=True, min_cosine=0.99).needs_calibration()
    assert cls().needs_calibration()
    assert not cls(dynamic=True, latency_aware=True).needs_calibration()  # timings need no calibration
    for bad in ({"weights_only": True}, {"symmetric_activations": True}, {"cache": "c.npz"}):
        with pytest.raises(InputError, match="dynamic"):
            cls(dynamic=True, **bad)


def test_exclude_and_already_quantized():
    model = encoder(layers=1)
    new, result = run_checked(model, DYN + ":exclude=layer0.ffn.output/MatMul", DECLINE_REASONS)
    assert result.stats["quantized_MatMul"] == 5 and result.stats["excluded"] == 1
    again, result2 = run_checked(new, DYN, DECLINE_REASONS)
    assert [d.code for d in result2.declined] == [R_QUANTIZED] and not result2.modified


def test_mixed_precision_keeps_sensitive_layers_float():
    model = with_outliers(encoder(layers=1), factor=100.0)
    source = open_source([token_feeds(8, 8, seed=1)], model)
    new, result = run_checked(model, DYN + ":min_cosine=0.99999", (*DECLINE_REASONS, R_SENSITIVITY),
                              PassContext(calib=source))
    kept = [d.where for d in result.declined if d.code == R_SENSITIVITY]
    assert kept and result.stats["fallback_layers"] == len(kept)
    assert result.stats["exclude_spec"].startswith("exclude=")
    assert ops(new)["MatMulInteger"] == 6 - len(kept)


def test_smoothing_then_dynamic_beats_dynamic_alone():
    model = with_outliers(encoder(layers=2), factor=40.0)
    source = open_source([token_feeds(16, 8, seed=1)], model)
    feeds = token_feeds(16, 8, seed=9)
    plain, _ = run_checked(model, DYN, DECLINE_REASONS)
    smoothed, _ = run_checked(model, "smooth," + DYN, DECLINE_REASONS,
                              PassContext(calib=source))
    err_plain = 1 - emb_cosine(model, plain, feeds)
    err_smooth = 1 - emb_cosine(model, smoothed, feeds)
    assert err_smooth < 0.7 * err_plain, (err_plain, err_smooth)


def test_smoothed_encoder_keeps_onnxruntime_fusions(tmp_path):
    """After smooth + dynamic, onnxruntime still fuses the GELUs (the scalar * 0.5 is kept) and every
    projection into its dynamic int8 kernels."""
    model = with_outliers(encoder(layers=2), factor=40.0)
    source = open_source([token_feeds(8, 8, seed=1)], model)
    new, _ = run_checked(model, "smooth," + DYN, DECLINE_REASONS, PassContext(calib=source))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(new.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    fused = ops(onnx.load(str(tmp_path / "opt.onnx")))
    assert fused["Gelu"] == 2 and fused["Erf"] == 0, fused
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 12, fused


# ---------------------------------------------------------------------------------- latency_aware


KEPT = [*DECLINE_REASONS, "kept_float_int8_slower", "kept_float_int8_model_slower"]


def _dyn_timers(slow: dict[str, float], models: tuple[float, ...], seen: list) -> dict:
    """Injected timings: per layer (checking the one-layer pair: float MatMul vs its dynamic int8 form,
    same float feeds) and per whole model (float, all int8, per-layer choice)."""
    from onnxcompress.passes.quantize_int8 import LATENCY_TIMER, MODEL_TIMER

    def layer(name, pair):
        assert [n.op_type for n in pair.float_model.graph.node] == ["MatMul"]
        assert "DynamicQuantizeLinear" in ops(pair.int8_model) and "MatMulInteger" in ops(pair.int8_model)
        assert pair.float_feeds is pair.int8_feeds
        ref, got = ort_run(pair.float_model, pair.float_feeds)[0], ort_run(pair.int8_model, pair.int8_feeds)[0]
        assert cosine(ref, got) > 0.99
        seen.append(name)
        return slow.get(name, 0.5)

    return {LATENCY_TIMER: layer, MODEL_TIMER: lambda ms: list(models[:len(ms)])}


def test_latency_aware_keeps_float_the_layers_slower_in_int8():
    model = encoder(layers=1)
    seen: list = []
    ctx = PassContext(values=_dyn_timers({"layer0.ffn.output/MatMul": 1.4}, (1.0, 0.6, 0.55), seen))
    new, result = run_checked(model, f"{DYN}:latency_aware=true", KEPT, ctx)
    assert len(seen) == 6  # Q, K, V, O, FFN up, FFN down: the projections only
    assert [(d.where, d.detail) for d in result.declined if d.code == "kept_float_int8_slower"] == [
        ("layer0.ffn.output/MatMul", "1.40×")]
    assert result.stats["quantized_MatMul"] == 5 and result.stats["latency_choice"] == "per-layer"
    assert result.stats["exclude_spec"] == "exclude=layer0.ffn.output/MatMul"
    assert ops(new)["MatMulInteger"] == 5
    feeds = token_feeds(2, 9)
    assert emb_cosine(model, new, feeds) > 0.99


def test_latency_aware_keeps_everything_int8_when_faster():
    model = encoder(layers=1)
    seen: list = []
    ctx = PassContext(values=_dyn_timers({}, (1.0, 0.6), seen))
    new, result = run_checked(model, f"{DYN}:latency_aware=true", KEPT, ctx)
    assert len(seen) == 6 and result.stats["quantized_MatMul"] == 6 and result.stats["latency_kept_float"] == 0
    assert not [d for d in result.declined if d.code.startswith("kept_float")]


def test_latency_aware_all_float_when_every_int8_variant_is_slower():
    model = encoder(layers=1)
    ctx = PassContext(values=_dyn_timers({"layer0.ffn.output/MatMul": 1.4}, (1.0, 1.3, 1.2), []))
    new, result = run_checked(model, f"{DYN}:latency_aware=true", KEPT, ctx)
    assert not result.modified and "MatMulInteger" not in ops(new)
    assert collections.Counter(d.code for d in result.declined if d.code.startswith("kept_float")) == {
        "kept_float_int8_model_slower": 5, "kept_float_int8_slower": 1}
