"""latency_aware: one-layer models, the keep-float decision (with injected timings), islands, the exclude spec."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcompress.core.errors import InputError
from onnxcompress.core.shapes import concrete_shapes
from onnxcompress.passes.quantize_int8 import LATENCY_TIMER, MODEL_TIMER, R_ISLAND, R_MODEL_SLOWER, R_SLOWER
from onnxcompress.pipeline.manager import parse_spec
from onnxcompress.quant import count_unfused_qdq
from onnxcompress.quant.latency import island_layers, measure_ratio, time_layers
from onnxcompress.quant.options import QuantConfig
from onnxcompress.quant.sensitivity import Quantizer
from onnxcompress.runtime.data import open_source
from tests.helpers.builders import make_model
from tests.helpers.quant import compare, quantize
from tests.helpers.runs import ort_run
from tests.helpers.tensors import calib_for, rand

X = {"x": ["N", 3, 8, 8]}


def residual(rng: np.random.Generator) -> onnx.ModelProto:
    """conv1 -> Relu -> conv2 ; add(conv2, conv1 branch) -> Relu -> GlobalAveragePool -> Flatten -> fc."""
    init = {"W1": rand(rng, 4, 3, 3, 3, scale=0.5), "B1": rand(rng, 4, scale=0.5),
            "W2": rand(rng, 4, 4, 3, 3, scale=0.5), "B2": rand(rng, 4, scale=0.5),
            "F": rand(rng, 6, 4, scale=0.5), "Fb": rand(rng, 6, scale=0.5)}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "W2", "B2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["b", "r"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["t"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["t"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "F", "Fb"], ["y"], name="fc", transB=1)]
    return make_model(nodes, X, ["y"], init)


def fake_timer(ratios: dict[str, float], seen: list | None = None):
    """A deterministic layer timer: checks the two one-layer models, then returns the given ratio."""
    def timer(layer, pair):
        onnx.checker.check_model(pair.float_model, full_check=True)
        onnx.checker.check_model(pair.int8_model, full_check=True)
        assert "QuantizeLinear" not in {n.op_type for n in pair.float_model.graph.node}
        assert pair.int8_model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8  # integer in
        (ref,), (got,) = ort_run(pair.float_model, pair.float_feeds), ort_run(pair.int8_model, pair.int8_feeds)
        assert ref.shape == got.shape
        if seen is not None:
            seen.append((layer, {k: v.shape for k, v in pair.float_feeds.items()}))
        return ratios.get(layer, 0.5)
    return timer


def timers(layers: dict[str, float], models: tuple[float, ...] = (1.0, 0.8, 0.7), seen: list | None = None) -> dict:
    """Context slot values with both timers; ``models``: float, all-int8, per-layer choice (ratios vs float)."""
    return {LATENCY_TIMER: fake_timer(layers, seen), MODEL_TIMER: lambda ms: list(models[:len(ms)])}


def test_slow_layers_kept_float_with_ratio_in_reason():
    model = residual(np.random.default_rng(0))
    seen: list = []
    q, result = quantize(model, "quantize_int8:latency_aware=true",
                         values=timers({"conv2": 1.5, "fc": 1.04}, seen=seen))
    assert [layer for layer, _ in seen] == ["conv1", "conv2", "fc"]  # compute layers only, graph order
    assert result.stats["latency_choice"] == "per-layer" and result.stats["latency_ratio_mixed"] == 0.7
    assert seen[0][1] == {"x": (1, 3, 8, 8)} and seen[2][1] == {"f": (1, 4)}  # real shapes, batch 1
    assert ("conv2", R_SLOWER, "1.50×") in result.declined
    assert not any(d.where == "fc" for d in result.declined)  # 1.04 is within the 5 % margin
    assert result.stats["latency_measured"] == 3 and result.stats["latency_kept_float"] == 1
    assert result.stats["exclude_spec"] == "exclude=conv2"
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    assert conv2.input[1] == "W2"  # float weight
    assert compare(model, q) >= 0.99
    onnx.checker.check_model(q, full_check=True)


def test_exclude_spec_reproduces_the_decision():
    model = residual(np.random.default_rng(1))
    aware, result = quantize(model, "quantize_int8:latency_aware=true", values=timers({"conv1": 2.0, "fc": 1.2}))
    assert result.stats["exclude_spec"] == "exclude=conv1|fc"
    again, _ = quantize(model, f"quantize_int8:{result.stats['exclude_spec']}")
    assert again.SerializeToString() == aware.SerializeToString()


def test_margin_option():
    model = residual(np.random.default_rng(2))
    _, result = quantize(model, "quantize_int8:latency_aware=true:latency_margin=0",
                         values=timers({"fc": 1.04}))
    assert ("fc", R_SLOWER, "1.04×") in result.declined


def test_all_compute_slower_leaves_no_int8_island():
    """With both convs and the Gemm float, the Add and pool would only add Q/DQ: kept float too."""
    model = residual(np.random.default_rng(3))
    q, result = quantize(model, "quantize_int8:latency_aware=true",
                         values=timers({"conv1": 3.0, "conv2": 3.0, "fc": 3.0}))
    assert {d.where for d in result.declined if d.code == R_ISLAND} == {"add", "gap"}
    assert not ({"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in q.graph.node})
    feeds = {"x": rand(np.random.default_rng(4), 2, 3, 8, 8, scale=0.5)}
    np.testing.assert_allclose(ort_run(q, feeds)[0], ort_run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_islands_logic_directly():
    model = residual(np.random.default_rng(5))
    q = Quantizer(model, QuantConfig())
    assert island_layers(q, ["conv2"]) == []  # add still touches conv1's quantized output (via relu1)
    assert island_layers(q, ["conv1", "conv2"]) == []  # gap feeds the quantized fc (through Flatten)
    assert island_layers(q, ["conv1", "conv2", "fc"]) == ["add", "gap"]


def test_shared_weight_and_graph_output():
    """A weight shared by two convs, and an intermediate tensor that is a graph output."""
    rng = np.random.default_rng(6)
    init = {"W": rand(rng, 3, 3, 3, 3, scale=0.5), "B": rand(rng, 3, scale=0.5)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W", "B"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    model = make_model(nodes, X, ["r", "y"], init)
    before = model.SerializeToString()
    q, result = quantize(model, "quantize_int8:latency_aware=true", values=timers({"c2": 2.0}))
    assert model.SerializeToString() == before
    assert [o.name for o in q.graph.output] == ["r", "y"]
    assert ("c2", R_SLOWER, "2.00×") in result.declined
    assert compare(model, q) >= 0.99 and count_unfused_qdq(q) == 0


def test_dynamic_spatial_dims_get_a_concrete_value():
    """Other dynamic dims than the batch get 32 (as for random data), so the layer is still timed."""
    rng = np.random.default_rng(7)
    model = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="c")], {"x": ["N", 3, "H", "W"]}, ["y"],
                       {"W": rand(rng, 4, 3, 3, 3, scale=0.5)})
    shapes = concrete_shapes(model, batch=2)
    assert shapes["x"] == (2, 3, 32, 32) and shapes["y"] == (2, 4, 30, 30)
    q = Quantizer(model, QuantConfig())
    q.calibrate(open_source([{"x": rand(rng, 8, 3, 12, 12, scale=0.5)}], model))
    timings = time_layers(q, batch=2, timer=lambda *a: 0.9)
    assert [(t.node, t.ratio, t.kept_float) for t in timings] == [("c", 0.9, False)]


def test_measure_ratio_runs_real_sessions():
    """The real measurement returns a finite positive ratio (its value is not asserted: it is a timing)."""
    rng = np.random.default_rng(8)
    model = residual(rng)
    q = Quantizer(model, QuantConfig())
    q.calibrate(calib_for(model, n=16))
    out = {}
    time_layers(q, timer=lambda layer, pair: out.setdefault(layer, pair) and 1.0)
    ratio = measure_ratio(out["conv2"], rounds=4, warmup=1, target_ms=0.05)
    assert math.isfinite(ratio) and ratio > 0


def test_bad_options():
    model = residual(np.random.default_rng(9))
    with pytest.raises(InputError, match="latency_margin"):
        quantize(model, "quantize_int8:latency_aware=true:latency_margin=-0.1")
    with pytest.raises(InputError, match="latency_batch"):
        quantize(model, "quantize_int8:latency_aware=true:latency_batch=0")
    with pytest.raises(InputError, match="weights_only"):
        parse_spec("quantize_int8:latency_aware=true:weights_only=true")


def test_model_check_prefers_all_int8_when_faster():
    model = residual(np.random.default_rng(10))
    plain, _ = quantize(model)
    q, result = quantize(model, "quantize_int8:latency_aware=true", values=timers({"conv2": 1.5}, (1.0, 0.6, 0.7)))
    assert result.stats["latency_choice"] == "all int8" and result.stats["exclude_spec"] == "exclude="
    assert not [d for d in result.declined if d.code.startswith("kept_float")]
    assert q.SerializeToString() == plain.SerializeToString()


def test_model_check_keeps_float_when_every_int8_variant_is_slower():
    model = residual(np.random.default_rng(11))
    q, result = quantize(model, "quantize_int8:latency_aware=true", values=timers({"conv2": 1.5}, (1.0, 1.3, 1.2)))
    assert result.stats["latency_choice"] == "float"
    reasons = {d.where: (d.code, d.detail) for d in result.declined}
    assert reasons["conv2"] == (R_SLOWER, "1.50×") and reasons["conv1"] == (R_MODEL_SLOWER, "1.20×")
    assert set(reasons) >= {"conv1", "conv2", "add", "gap", "fc"}
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in q.graph.node}


def test_model_check_can_be_turned_off():
    model = residual(np.random.default_rng(12))

    def no_model_timer(models):
        raise AssertionError("the whole-model check must not run")

    values = {**timers({"conv2": 1.5}), MODEL_TIMER: no_model_timer}
    _, result = quantize(model, "quantize_int8:latency_aware=true:latency_check=false", values=values)
    assert "latency_choice" not in result.stats and result.stats["exclude_spec"] == "exclude=conv2"
