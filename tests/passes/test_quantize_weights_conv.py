"""quantize_weights with ops=conv: Conv/ConvTranspose weights through DequantizeLinear (per output
channel or blocked along the input channels), numerics against onnxruntime, declines, determinism."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import PassContext
from onnxcompress.passes.quantize_weights import LATENCY_TIMER
from onnxcompress.pipeline.manager import parse_spec
from onnxcompress.quant.gptq import HessianInput, collect_hessians, conv_rows
from onnxcompress.quant.weightonly import conv_layout, rtn
from onnxcompress.runtime.data import open_source
from tests.helpers.builders import make_model, node
from tests.helpers.graphs import initializers
from tests.helpers.runs import ort_run, run_checked, run_passes

SIZE = "quantize_weights:ops=conv:prefer=size"


def conv_model(cin: int = 64, cout: int = 32, k: int = 3, group: int = 1, transpose: bool = False,
               seed: int = 0, dims=("N", None, "H", "W")) -> onnx.ModelProto:
    """One Conv (or ConvTranspose) with a float bias, input ``[N, cin, H, W]`` (symbolic dims)."""
    rng = np.random.default_rng(seed)
    shape = (cin, cout // group, k, k) if transpose else (cout, cin // group, k, k)
    w = (rng.standard_normal(shape) / np.sqrt(cin * k * k / group)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    op = "ConvTranspose" if transpose else "Conv"
    x = [d if d is not None else cin for d in dims]
    return make_model([node(op, ["x", "W", "b"], "y", group=group, pads=[1, 1, 1, 1])], {"x": x}, ["y"],
                      {"W": w, "b": b})


def feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    cin = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    return {"x": np.random.default_rng(seed).standard_normal((2, cin, 9, 9)).astype(np.float32)}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def expected_weight(model: onnx.ModelProto, bits: int, block: int) -> np.ndarray:
    """The dequantized weight the pass should produce (the layout's matrix through rtn)."""
    w = numpy_helper.to_array(model.graph.initializer[0])
    layout = conv_layout(model.graph.node[0].op_type, w.shape, block)
    q = rtn(layout.matrix(w), bits, layout.block or layout.matrix(w).shape[0])
    return layout.tensor(q.dequantize())


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("block", [0, 32])
@pytest.mark.parametrize("bits", [4, 8])
def test_conv_weights_dequantized_as_the_math_says(bits, block, transpose):
    model = conv_model(transpose=transpose)
    new, result = run_checked(model, f"{SIZE}:bits={bits}:block_size={block}", [])
    assert result.stats[f"quantized_{'ConvTranspose' if transpose else 'Conv'}"] == 1
    assert new.opset_import[0].version == 21
    assert [n.op_type for n in new.graph.node] == ["DequantizeLinear", model.graph.node[0].op_type]
    dq = new.graph.node[0]
    attrs = {a.name: a.i for a in dq.attribute}
    in_axis, out_axis = (0, 1) if transpose else (1, 0)
    assert attrs == ({"axis": in_axis, "block_size": 32} if block else {"axis": out_axis})
    types = {t.name: t.data_type for t in new.graph.initializer}
    assert types[dq.input[0]] == (TensorProto.INT4 if bits == 4 else TensorProto.INT8)
    assert types["b"] == TensorProto.FLOAT  # the bias stays float
    x = feeds(model)
    got, ref = ort_run(new, x)[0], ort_run(model, x)[0]
    assert rel(got, ref) < (0.15 if bits == 4 else 0.01)
    # the same as the float conv run on the expected dequantized weight
    expect = onnx.ModelProto()
    expect.CopyFrom(model)
    expect.graph.initializer[0].CopyFrom(numpy_helper.from_array(expected_weight(model, bits, block), "W"))
    np.testing.assert_allclose(got, ort_run(expect, x)[0], rtol=1e-4, atol=1e-4)
    assert len(new.SerializeToString()) < len(model.SerializeToString()) * (0.3 if bits == 4 else 0.4)


def test_depthwise_is_per_channel_and_grouped_blocks_per_group():
    dw = conv_model(cin=32, cout=32, group=32)
    new, result = run_checked(dw, f"{SIZE}:bits=8:block_size=32", [])
    assert result.stats["quantized_Conv"] == 1
    assert {a.name: a.i for a in new.graph.node[0].attribute} == {"axis": 0}
    x = feeds(dw)
    assert rel(ort_run(new, x)[0], ort_run(dw, x)[0]) < 0.01
    grouped = conv_model(cin=128, cout=64, group=2)  # 64 input channels per group: two blocks of 32
    new, _ = run_checked(grouped, f"{SIZE}:bits=4:block_size=32", [])
    dq = new.graph.node[0]
    assert {a.name: a.i for a in dq.attribute} == {"axis": 1, "block_size": 32}
    assert list(initializers(new)[dq.input[1]].shape) == [64, 2, 3, 3]
    x = feeds(grouped)
    assert rel(ort_run(new, x)[0], ort_run(grouped, x)[0]) < 0.15


def test_default_ops_leave_convs_alone():
    model = conv_model()
    _, result = run_passes(model, "quantize_weights:prefer=size")
    assert not result[0].result.modified


def test_declines_shared_nonconstant_and_graph_output_conv_weights():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    pads = helper.make_attribute("pads", [1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="a"),
             helper.make_node("Conv", ["a", "W"], ["b"], name="b"),  # shared
             helper.make_node("Conv", ["b", "x2"], ["c"], name="c"),  # computed weight
             helper.make_node("Conv", ["c", "V"], ["y"], name="y")]  # V is also a graph output
    for n in nodes:
        n.attribute.append(pads)
    vi = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi("x", ["N", 16, "H", "W"]), vi("x2", [16, 16, 3, 3])],
                              [vi("y", ["N", 16, "H", "W"]), vi("V", [16, 16, 3, 3])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w.copy(), "V")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    before = initializers(model)
    new, result = run_checked(model, SIZE, ["weight_shared", "weight_not_constant", "weight_is_graph_output"])
    assert sorted(result.decline_counts().items()) == [("weight_is_graph_output", 1), ("weight_not_constant", 1),
                                                       ("weight_shared", 2)]
    after = initializers(new)
    for name in ("W", "V"):  # never edited in place
        np.testing.assert_array_equal(after[name], before[name])
    assert not result.modified


def test_matmulnbits_format_declines_convs_and_keeps_matmuls():
    rng = np.random.default_rng(0)
    inits = {"W": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
             "M": rng.standard_normal((5, 6)).astype(np.float32)}
    model = make_model([node("Conv", ["x", "W"], "c", pads=[1, 1, 1, 1]), node("MatMul", ["c", "M"], "y")],
                       {"x": ["N", 4, 5, 5]}, ["y"], inits)
    new, result = run_checked(model, "quantize_weights:ops=matmul|conv:format=matmulnbits:prefer=size:block_size=16",
                              ["format_not_supported"])
    assert result.decline_counts() == {"format_not_supported": 1}
    assert result.stats["quantized_MatMul"] == 1 and "quantized_Conv" not in result.stats


@pytest.mark.parametrize("spec", ["quantize_weights:ops=matmul|conv:method=kmeans", "quantize_weights:ops=conv|pool",
                                  "quantize_weights:ops=conv:fallback_bits=4", "quantize_weights:ops=conv:fallback_bits=9",
                                  "quantize_weights:ops=conv:bits=8:fallback_bits=4",
                                  "quantize_weights:method=kmeans:fallback_bits=8",
                                  "quantize_weights:format=matmulnbits:bits=4:fallback_bits=5",
                                  "quantize_weights:ops=conv:fallback_bits=8:max_error=0"])
def test_conv_option_combinations_refused(spec):
    with pytest.raises(InputError):
        parse_spec(spec)


def test_conv_pass_is_deterministic():
    model = conv_model(cin=64, cout=64)
    a, _ = run_passes(model, f"{SIZE}:bits=4", PassContext(seed=4))
    b, _ = run_passes(model, f"{SIZE}:bits=4", PassContext(seed=4))
    assert a.SerializeToString() == b.SerializeToString()


@pytest.mark.parametrize("ratio", [1.3, 1.02])
def test_prefer_speed_reverts_convs_when_the_model_runs_slower(ratio):
    """onnxruntime (1.32) keeps DequantizeLinear → Conv as two nodes (no folding of the constant
    weight): the model timing decides; convs have no one-layer timing, so slower means all revert."""
    model = conv_model()
    seen = []

    def timer(pair):
        seen.append(pair)
        return ratio

    new, records = run_passes(model, "quantize_weights:ops=conv:bits=4", PassContext(values={LATENCY_TIMER: timer}))
    result = records[0].result
    assert len(seen) == 1 and result.stats["latency_scope"] == "model"
    if ratio > 1.05:
        assert not result.modified and [n.op_type for n in new.graph.node] == ["Conv"]
        assert [(d.code, d.detail) for d in result.declined] == [("slower_than_float", "model 1.30× float")]
        x = feeds(model)
        np.testing.assert_array_equal(ort_run(new, x)[0], ort_run(model, x)[0])
    else:
        assert result.modified and result.stats["quantized_Conv"] == 1 and not result.declined


# ------------------------------------------------------------------------- GPTQ on im2col, 8/4 mix

GPTQ = f"{SIZE}:method=gptq"


def conv_calib(model: onnx.ModelProto, n: int = 24, seed: int = 5, hw: int = 9):
    cin = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((cin, 4))  # correlated channels (as real activations are): an informative Hessian
    z = rng.standard_normal((n, 4, hw, hw))
    x = (np.einsum("cr,nrhw->nchw", mix, z) + 0.2 * rng.standard_normal((n, cin, hw, hw))).astype(np.float32)
    return open_source([{"x": x[i: i + 1]} for i in range(n)], model), x


def test_conv_rows_hessian_is_the_patch_gram():
    model = conv_model(cin=4, cout=3, k=3)
    source, x = conv_calib(model, n=3, hw=5)
    hs, samples = collect_hessians(model, [HessianInput("c", "x", 36, conv_rows({"pads": [1, 1, 1, 1]}, (3, 3)))],
                                   source, batch_size=2)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = [xp[n, :, i:i + 3, j:j + 3].reshape(-1) for n in range(3) for i in range(5) for j in range(5)]
    p = np.array(patches)
    assert samples == 3
    np.testing.assert_allclose(hs["c"], p.T @ p, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("block", [0, 16])
def test_gptq_conv_output_error_matches_onnxruntime_and_beats_rtn(block):
    model = conv_model(cin=32, cout=16)
    source, x = conv_calib(model)
    spec = f"{GPTQ}:bits=4:block_size={block}"
    new, result = run_checked(model, spec, [], PassContext(calib=source))
    st = result.stats
    assert st["gptq_layers"] == 1 and st["quantized_Conv"] == 1 and st["calib_samples"] == 24
    assert st["output_error"] < 0.8 * st["output_error_rtn"]
    b = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b")).reshape(1, -1, 1, 1)
    ref = ort_run(model, {"x": x})[0]
    got = ort_run(new, {"x": x})[0]
    # the pass's error is the layer's relative output error on its calibration data
    assert rel(got - b, ref - b) == pytest.approx(st["output_error"], rel=1e-3)
    rtn_model, _ = run_passes(model, f"{SIZE}:bits=4:block_size={block}")
    assert rel(ort_run(rtn_model, {"x": x})[0] - b, ref - b) == pytest.approx(st["output_error_rtn"], rel=1e-3)
    types = {t.name: t.data_type for t in new.graph.initializer}
    assert types[new.graph.node[0].input[0]] == TensorProto.INT4
    again, _ = run_passes(model, spec, PassContext(calib=source))
    assert again.SerializeToString() == new.SerializeToString()


def test_gptq_conv_skips_grouped_convs_and_declines_as_rtn():
    dw = conv_model(cin=16, cout=16, group=16)
    source, x = conv_calib(dw)
    new, result = run_checked(dw, f"{GPTQ}:bits=8", [], PassContext(calib=source))
    assert result.stats["quantized_Conv"] == 1 and "gptq_layers" not in result.stats  # no Hessian per group
    rtn_model, _ = run_passes(dw, f"{SIZE}:bits=8")
    np.testing.assert_array_equal(ort_run(new, {"x": x})[0], ort_run(rtn_model, {"x": x})[0])


def fallback_model() -> onnx.ModelProto:
    """A 3×3 depthwise conv (9 weights per channel, one of them an outlier 3× the largest of the rest:
    4 bits lose ~10 %) then a 1×1 conv (~5 % at 4 bits)."""
    rng = np.random.default_rng(2)
    dw = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)
    dw[:, 0, 0, 0] = 3 * np.abs(dw).max(axis=(1, 2, 3))
    inits = {"D": dw,
             "P": (rng.standard_normal((32, 16, 1, 1)) / 4).astype(np.float32)}
    return make_model([node("Conv", ["x", "D"], "d", group=16, pads=[1, 1, 1, 1]), node("Conv", ["d", "P"], "y")],
                      {"x": ["N", 16, "H", "W"]}, ["y"], inits)


@pytest.mark.parametrize("max_error", [1e-4, 0.08, 10.0])
def test_fallback_bits_keep_the_layers_over_max_error_at_8_bits(max_error):
    model = fallback_model()
    source, x = conv_calib(model)
    new, result = run_checked(model, f"{GPTQ}:bits=4:block_size=0:fallback_bits=8:max_error={max_error}", [],
                              PassContext(calib=source))
    types = {t.name: t.data_type for t in new.graph.initializer}
    bits = {n.output[0]: types[n.input[0]] for n in new.graph.node if n.op_type == "DequantizeLinear"}
    got = [bits[n.input[1]] for n in new.graph.node if n.op_type == "Conv"]
    expect = {1e-4: [TensorProto.INT8] * 2, 0.08: [TensorProto.INT8, TensorProto.INT4],
              10.0: [TensorProto.INT4] * 2}[max_error]
    assert got == expect
    assert result.stats.get("fallback_layers", 0) == sum(t == TensorProto.INT8 for t in got)
    ref = ort_run(model, {"x": x})[0]
    assert rel(ort_run(new, {"x": x})[0], ref) < (0.01 if max_error < 1e-3 else 0.2)


def test_gptq_conv_leaves_shared_and_output_weights_alone():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    model = make_model([node("Conv", ["x", "W"], "a", pads=[1, 1, 1, 1]), node("Conv", ["a", "W"], "y", pads=[1, 1, 1, 1])],
                       {"x": ["N", 8, "H", "W"]}, ["y"], {"W": w})
    source, _ = conv_calib(model, n=4)
    new, result = run_checked(model, GPTQ, ["weight_shared"], PassContext(calib=source))
    assert not result.modified and result.decline_counts() == {"weight_shared": 2}
    np.testing.assert_array_equal(initializers(new)["W"], w)
