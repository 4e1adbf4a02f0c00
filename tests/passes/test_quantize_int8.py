"""The quantize_int8 pass: options, declines, cache, weights-only, determinism, fixture models."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxcompress
from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import Numerics, PassContext
from onnxcompress.passes.quantize_int8 import CPU_FLAGS, R_SENSITIVITY
from onnxcompress.pipeline.manager import PassManager, get_pass, parse_spec
from onnxcompress.quant import count_unfused_qdq, unfused_qdq
from onnxcompress.quant.placement import DECLINE_REASONS
from onnxcompress.runtime.data import FileSource, input_specs, open_source
from tests.helpers.builders import make_model
from tests.helpers.graphs import initializers, producers
from tests.helpers.quant import NO_VNNI, calibration_runs, compare, conv_classifier, qdq_params, quantize
from tests.helpers.runs import ort_run
from tests.helpers.tensors import feeds_for, rand

MODELS = Path(__file__).resolve().parents[2] / "models"
X = {"x": ["N", 3, 8, 8]}


def conv_relu_conv(rng: np.random.Generator, *, shared: bool = False, bias: float = 0.0) -> onnx.ModelProto:
    init = {"W1": rand(rng, 3, 3, 3, 3, scale=0.5), "B1": rand(rng, 3, scale=0.5) + np.float32(bias),
            "W2": rand(rng, 4, 3, 3, 3, scale=0.5),
            "B2": rand(rng, 4, scale=0.5)}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "W1" if shared else "W2", "B1" if shared else "B2"], ["y"], name="conv2",
                              pads=[1, 1, 1, 1])]
    if shared:
        del init["W2"], init["B2"]
    return make_model(nodes, X, ["y"], init)


def test_pass_contract():
    cls = get_pass("quantize_int8")
    assert cls.numerics == Numerics.LOSSY and cls.min_opset == 13
    assert set(cls.options) >= {"method", "percentile", "per_channel", "symmetric_activations", "reduce_range",
                                "exclude", "weights_only", "cache", "batch_size"}
    with pytest.raises(InputError, match="expected one of"):
        parse_spec("quantize_int8:method=kl")


def test_needs_calibration_data_unless_weights_only():
    model = conv_relu_conv(np.random.default_rng(0))
    with pytest.raises(InputError, match="^quantize_int8 needs calibration data"):
        quantize(model, calib=None)
    with pytest.raises(InputError, match="needs calibration data .give --calib"):
        onnxcompress.optimize(model, passes="quantize_int8", validate=False)
    q, result = quantize(model, "quantize_int8:weights_only=true", calib=None)
    assert result.stats["weights_int8"] == 2 and "vnni" not in result.stats


def test_weights_only_is_four_times_smaller_and_most_accurate():
    rng = np.random.default_rng(1)
    init = {"W": rand(rng, 64, 3, 5, 5, scale=0.5), "B": rand(rng, 64, scale=0.5),
            "G": rand(rng, 256, 64 * 64, scale=0.5), "H": rand(rng, 10, 256, scale=0.5)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "G"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["h"]), helper.make_node("Gemm", ["h", "H"], ["y"], transB=1)]
    model = make_model(nodes, X, ["y"], init)
    wo, result = quantize(model, "quantize_int8:weights_only=true", calib=None)
    full, _ = quantize(model)
    assert wo.ByteSize() < 0.27 * model.ByteSize()
    ops = {n.op_type for n in wo.graph.node}
    assert "DequantizeLinear" in ops and "QuantizeLinear" not in ops
    assert initializers(wo)["B"].dtype == np.float32  # biases stay float
    assert compare(model, wo) > compare(model, full) > 0.99
    assert result.stats["weights_int8"] == 3


def test_shared_initializer_quantized_once_without_editing_the_input():
    rng = np.random.default_rng(2)
    model = conv_relu_conv(rng, shared=True)
    before = model.SerializeToString()
    q, result = quantize(model)
    assert model.SerializeToString() == before
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] == convs[1].input[1]  # one int8 weight, one DQ (onnxruntime duplicates it per kernel)
    assert result.stats["weights_int8"] == 1 and result.stats["weights_shared"] == 1
    assert convs[0].input[2] != convs[1].input[2]  # the int32 biases differ: s_in differs
    for node in convs:
        bq, _, _, _ = qdq_params(q, node.input[2])
        ws = qdq_params(q, node.input[1])[1].astype(np.float64)
        s_in = float(qdq_params(q, node.input[0])[1])
        np.testing.assert_array_equal(bq, np.round(initializers(model)["B1"] / (s_in * ws)))
    assert compare(model, q) >= 0.99
    assert count_unfused_qdq(q) == 0


def test_non_constant_weight_declined():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="dyn"), helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, {"x": ["N", 3, 8, 8], "w": [4, 3, 3, 3]}, ["y"], {})
    calib = open_source([{"x": rand(rng, 8, 3, 8, 8, scale=0.5), "w": rand(rng, 4, 3, 3, 3, scale=0.5)}], model)
    q, result = quantize(model, calib=calib)
    assert ("dyn", "weight_not_constant") in result.where_codes()
    assert not result.modified and [n.op_type for n in q.graph.node] == ["Conv", "Relu"]
    assert all(d.code in DECLINE_REASONS for d in result.declined)


def test_graph_outputs_keep_name_and_float_type():
    """An intermediate tensor that is also a graph output is dequantized under its own name."""
    rng = np.random.default_rng(4)
    model = conv_relu_conv(rng)
    model.graph.output.insert(0, helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None))
    model = make_model(list(model.graph.node), X, ["r", "y"], initializers(model))
    q, _ = quantize(model)
    assert [o.name for o in q.graph.output] == ["r", "y"]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in q.graph.output)
    assert producers(q)["r"].op_type == "DequantizeLinear"
    assert compare(model, q) >= 0.99
    assert count_unfused_qdq(q) == 0


def test_dynamic_batch_dim():
    model = conv_relu_conv(np.random.default_rng(5))
    q, _ = quantize(model)
    assert q.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for n in (1, 5):
        (out,) = ort_run(q, feeds_for(model, n))
        assert out.shape == (n, 4, 8, 8)


def test_deterministic():
    model = conv_relu_conv(np.random.default_rng(6))
    a, _ = quantize(model, "quantize_int8:method=entropy")
    b, _ = quantize(model, "quantize_int8:method=entropy")
    assert a.SerializeToString() == b.SerializeToString()


def test_exclude_by_name_and_op_type():
    model = conv_relu_conv(np.random.default_rng(7))
    q, result = quantize(model, "quantize_int8:exclude=conv2")
    assert ("conv2", "excluded_by_option") in result.where_codes() and result.stats["excluded"] == 1
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    assert conv2.input[1] == "W2"  # float weight
    q, result = quantize(model, "quantize_int8:exclude=Conv")
    assert not result.modified and result.stats["excluded"] == 2


def test_degenerate_range_uses_safe_scale():
    """A Relu that is always 0 (very negative bias): quantized with scale 1 and reported."""
    model = conv_relu_conv(np.random.default_rng(8), bias=-1000.0)
    q, result = quantize(model)
    assert ("r", "degenerate_range") in result.where_codes()
    assert result.stats["degenerate_ranges"] == 1
    assert float(qdq_params(q, "r")[1]) == 1.0
    np.testing.assert_allclose(ort_run(q, feeds_for(model))[0], ort_run(model, feeds_for(model))[0], atol=0.1)


def _weight_qmax(q: onnx.ModelProto) -> int:
    return max(int(np.abs(qdq_params(q, n.input[1])[0].astype(int)).max()) for n in q.graph.node if n.op_type == "Conv")


def test_reduce_range_auto_follows_the_cpu(caplog):
    """Without VNNI, onnxruntime's u8s8 kernels saturate with 8-bit weights: auto gives 7 bits there."""
    model = conv_relu_conv(np.random.default_rng(9))
    with caplog.at_level(logging.WARNING):
        q, result = quantize(model, values={CPU_FLAGS: NO_VNNI})
    assert result.stats["vnni"] is False and result.stats["reduce_range"] is True
    assert _weight_qmax(q) == 64 and "VNNI" not in caplog.text
    assert compare(model, q) >= 0.99
    q, result = quantize(model, values={CPU_FLAGS: {"avx2", "avx512_vnni"}})
    assert result.stats["vnni"] is True and result.stats["reduce_range"] is False and _weight_qmax(q) == 127


def test_reduce_range_forced_either_way(caplog):
    model = conv_relu_conv(np.random.default_rng(9))
    with caplog.at_level(logging.WARNING):
        q, result = quantize(model, "quantize_int8:reduce_range=false", values={CPU_FLAGS: NO_VNNI})
    assert _weight_qmax(q) == 127 and "no VNNI" in caplog.text  # asked for: kept, with the warning
    q, _ = quantize(model, "quantize_int8:reduce_range=true", values={CPU_FLAGS: {"avx2", "avx512_vnni"}})
    assert _weight_qmax(q) == 64
    with pytest.raises(InputError, match="reduce_range"):
        quantize(model, "quantize_int8:reduce_range=maybe")


def test_symmetric_activations():
    model = conv_relu_conv(np.random.default_rng(10))
    q, _ = quantize(model, "quantize_int8:symmetric_activations=true")
    first = next(n for n in q.graph.node if n.op_type == "Conv")
    _, _, zx, _ = qdq_params(q, first.input[0])
    assert zx.dtype == np.int8 and int(zx) == 0  # two-sided input: zero point 0
    _, _, zr, _ = qdq_params(q, "r")
    assert zr.dtype == np.int8 and int(zr) == -128  # one-sided Relu output: the whole int8 range
    assert compare(model, q) >= 0.99
    assert count_unfused_qdq(q) == 0


def test_per_tensor_weights():
    model = conv_relu_conv(np.random.default_rng(11))
    q, _ = quantize(model, "quantize_int8:per_channel=false")
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    _, ws, _, axis = qdq_params(q, conv.input[1])
    assert ws.shape == () and axis is None
    assert compare(model, q) >= 0.98


def test_old_opset_is_upgraded():
    rng = np.random.default_rng(12)
    model = make_model([helper.make_node("Conv", ["x", "W"], ["y"])], X, ["y"], {"W": rand(rng, 4, 3, 3, 3, scale=0.5)}, opset=11)
    q, _ = quantize(model)
    assert serde.model_opset(q) >= 13
    assert compare(model, q) >= 0.99


class CountingSource(FileSource):
    """A file source that counts how often it is iterated (each iteration is one pass of model runs)."""

    runs = 0

    def batches(self, batch_size: int = 32):
        CountingSource.runs += 1
        yield from super().batches(batch_size)


def test_cache_hit_skips_the_model_runs(tmp_path):
    rng = np.random.default_rng(13)
    model = conv_relu_conv(rng)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rand(rng, 48, 3, 8, 8, scale=0.5))
    cache = tmp_path / "stats.npz"
    source = CountingSource(data, input_specs(model))

    def run(spec: str, m: onnx.ModelProto = model):
        ctx = PassContext(calib=source, values={CPU_FLAGS: NO_VNNI})
        return PassManager(parse_spec(spec), ctx).run(m)

    CountingSource.runs = 0
    first, rec = run(f"quantize_int8:method=minmax:cache={cache}")
    assert CountingSource.runs == 1 and cache.exists() and rec[0].result.stats["cache_tensors"] == 0
    second, rec = run(f"quantize_int8:method=entropy:cache={cache}")
    stats = rec[0].result.stats
    assert CountingSource.runs == 1, "a cache hit must not run the model"
    assert stats["cache_tensors"] == stats["tensors_calibrated"] == 3 and stats["calib_samples"] == 0
    third, _ = run(f"quantize_int8:method=minmax:cache={cache}")
    assert third.SerializeToString() == first.SerializeToString()
    other = conv_relu_conv(np.random.default_rng(14))  # other weights: another key, recalibrated
    run(f"quantize_int8:cache={cache}", other)
    assert CountingSource.runs == 2


def test_hist_sample_bins_a_sample_of_large_runs_only(tmp_path):
    """``hist_sample``: runs of at most twice that many values per tensor are binned whole (the
    same model as without it); above, a sample, keyed apart in the cache; too small is refused."""
    rng = np.random.default_rng(15)
    model = conv_relu_conv(rng)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rand(rng, 48, 3, 8, 8, scale=0.5))
    cache = tmp_path / "stats.npz"
    source = CountingSource(data, input_specs(model))

    def run(spec: str):
        ctx = PassContext(calib=source, values={CPU_FLAGS: NO_VNNI})
        return PassManager(parse_spec(spec), ctx).run(model)[0].SerializeToString()

    exact = run("quantize_int8")
    assert run("quantize_int8:hist_sample=4096") == exact  # at most 32 x 3 x 8 x 8 = 6144 values per run
    CountingSource.runs = 0
    sampled = run(f"quantize_int8:hist_sample=64:cache={cache}")
    assert sampled != exact and run(f"quantize_int8:hist_sample=64:cache={cache}") == sampled
    assert CountingSource.runs == 1
    run(f"quantize_int8:cache={cache}")
    assert CountingSource.runs == 2, "exact statistics must not come from a sampled cache"
    with pytest.raises(InputError, match="hist_sample"):
        run("quantize_int8:hist_sample=63")


@pytest.mark.parametrize("name", ["resnet_digits", "mobilenetv2_digits"])
def test_fixture_models_fuse_completely(name):
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not generated")
    model = serde.load_model(path)
    calib = open_source(MODELS / "digits_calib.npz", model, limit=64)
    ctx = PassContext(calib=calib, values={CPU_FLAGS: NO_VNNI})
    q, records = PassManager(parse_spec("fold_bn,quantize_int8"), ctx).run(model)
    stats = records[-1].result.stats
    assert stats["quantized_Conv"] >= 9 and not records[-1].result.declined
    assert [u for u in unfused_qdq(q) if u.kind != "boundary"] == []
    test = np.load(MODELS / "digits_test.npz")
    (ref,), (got,) = ort_run(model, {"input": test["input"][:128]}), ort_run(q, {"input": test["input"][:128]})
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.98


def test_excluded_relu_is_not_folded():
    model = conv_relu_conv(np.random.default_rng(15))
    q, result = quantize(model, "quantize_int8:exclude=relu1")
    assert ("relu1", "excluded_by_option") in result.where_codes() and "relu_folded" not in result.stats
    relu = next(n for n in q.graph.node if n.op_type == "Relu")
    assert producers(q)[relu.input[0]].op_type == "DequantizeLinear"  # the Conv output is quantized itself
    assert compare(model, q) >= 0.99


# ------------------------------------------------------------------ mixed precision (max_drop / min_cosine)


def outlier_calib(model: onnx.ModelProto, rng: np.random.Generator, labels: bool = False, n: int = 64):
    """Calibration data with one huge outlier: with minmax, conv_a's input scale becomes very coarse."""
    x = rand(rng, n, 3, 8, 8, scale=1.0)
    x[0, 0, 0, 0] = 300.0
    item = {"x": x}
    if labels:
        (logits,) = ort_run(model, {"x": x})
        item["labels"] = logits.argmax(1)  # the float model is always right on this data
    return open_source([item], model)


def test_min_cosine_falls_back_most_sensitive_first():
    from onnxcompress.quant.options import QuantConfig
    from onnxcompress.quant.sensitivity import Evaluator, Quantizer, rank_layers

    rng = np.random.default_rng(20)
    model = conv_classifier(rng, mid=6)
    calib = outlier_calib(model, rng)
    q = Quantizer(model, QuantConfig(), method="minmax")
    q.calibrate(calib)
    evaluate = Evaluator(model, calib)
    full = evaluate(q.export()).cosine
    order = [name for name, _ in rank_layers(q, evaluate)]
    target = 1 - (1 - full) / 4  # a quarter of the full model's cosine loss
    mixed, result = quantize(model, f"quantize_int8:method=minmax:min_cosine={target}", calib=calib)
    kept = [d.where for d in result.declined if d.code == R_SENSITIVITY]
    assert 1 <= len(kept) < len(order) and kept == order[:len(kept)] and kept[0] == "conv_a"
    assert result.stats["fallback_layers"] == len(kept) and result.stats["mixed_cosine"] >= target - 1e-6
    assert "excluded" not in result.stats
    onnx.checker.check_model(mixed, full_check=True)
    again, _ = quantize(model, f"quantize_int8:method=minmax:{result.stats['exclude_spec']}", calib=calib)
    assert again.SerializeToString() == mixed.SerializeToString()


def test_met_target_is_plain_quantization_and_deterministic():
    rng = np.random.default_rng(21)
    model = conv_classifier(rng, mid=6)
    calib = outlier_calib(model, rng)
    plain, _ = quantize(model, calib=calib)
    a, result = quantize(model, "quantize_int8:min_cosine=0", calib=calib)
    b, _ = quantize(model, "quantize_int8:min_cosine=0", calib=calib)
    assert result.stats["fallback_layers"] == 0 and result.stats["exclude_spec"] == "exclude="
    assert a.SerializeToString() == b.SerializeToString() == plain.SerializeToString()


def test_unreachable_target_keeps_every_layer_float(caplog):
    rng = np.random.default_rng(22)
    model = conv_classifier(rng, mid=6)
    with caplog.at_level(logging.WARNING):
        q, result = quantize(model, "quantize_int8:min_cosine=1.0", calib=outlier_calib(model, rng))
    kept = {d.where for d in result.declined if d.code == R_SENSITIVITY}
    if result.stats["fallback_layers"] == 4:  # cos == 1.0 may hold before the last one (float rounding)
        assert kept == {"conv_a", "conv_b", "gap", "fc"} and "every layer had to stay float" in caplog.text
        assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in q.graph.node}
    assert result.stats["fallback_layers"] >= 3


def test_max_drop_with_labels_is_an_accuracy_drop():
    rng = np.random.default_rng(23)
    model = conv_classifier(rng, mid=6)
    q, result = quantize(model, "quantize_int8:method=minmax:max_drop=0", calib=outlier_calib(model, rng, labels=True))
    assert result.stats["mixed_bound"] == "accuracy drop" and result.stats["mixed_drop"] <= 0
    assert compare(model, q) >= 0.99


def test_max_drop_without_labels_bounds_top1_disagreement(caplog):
    rng = np.random.default_rng(24)
    model = conv_classifier(rng, mid=6)
    with caplog.at_level(logging.INFO):
        _, result = quantize(model, "quantize_int8:max_drop=1.5", calib=outlier_calib(model, rng))
    assert result.stats["mixed_bound"] == "top-1 disagreement (no labels)" and result.stats["mixed_drop"] <= 1.5
    assert "no labels" in caplog.text


def test_max_drop_needs_a_classifier_output():
    model = conv_relu_conv(np.random.default_rng(25))
    with pytest.raises(InputError, match="classifier"):
        quantize(model, "quantize_int8:max_drop=1")
    _, result = quantize(model, "quantize_int8:min_cosine=0.5")  # cosine works on any output
    assert result.stats["fallback_layers"] == 0


def test_mixed_precision_calibrates_once(caplog):
    rng = np.random.default_rng(26)
    model = conv_classifier(rng, mid=6)
    with caplog.at_level(logging.INFO, logger="onnxcompress.quant.calibrate"):
        _, result = quantize(model, "quantize_int8:method=minmax:min_cosine=0.99999999",
                             calib=outlier_calib(model, rng))
    assert result.stats["fallback_layers"] >= 1 and calibration_runs(caplog.records) == 1


def test_mixed_precision_bad_options_refused_at_parse_time():
    with pytest.raises(InputError, match=r"option max_drop=-1.0: must be >= 0"):
        parse_spec("quantize_int8:max_drop=-1")
    with pytest.raises(InputError, match=r"option min_cosine=2.0: must be in \[-1, 1\]"):
        parse_spec("quantize_int8:min_cosine=2")
    with pytest.raises(InputError, match="need full quantization, not weights_only"):
        parse_spec("quantize_int8:weights_only=true:min_cosine=0.9")
