"""QDQ placement, axes, scales, zero points, int32 biases, numerics and onnxruntime fusion, op by op."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcompress.quant import count_unfused_qdq, integer_op_counts, unfused_qdq
from onnxcompress.quant.params import activation_params, quantize_bias, quantize_weight
from tests.helpers.builders import make_model
from tests.helpers.graphs import consumers, producers
from tests.helpers.quant import compare, qdq_params, quantize
from tests.helpers.runs import ort_run
from tests.helpers.tensors import feeds_for, rand

X = {"x": ["N", 3, 8, 8]}


def conv(x: str, y: str, w: str, b: str | None = None, **attrs) -> onnx.NodeProto:
    attrs.setdefault("pads", [1, 1, 1, 1])
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=f"conv_{y}", **attrs)


def conv_weights(rng: np.random.Generator, prefix: str, cout: int, cin: int, k: int = 3) -> dict[str, np.ndarray]:
    return {f"{prefix}_W": rand(rng, cout, cin, k, k, scale=0.5), f"{prefix}_B": rand(rng, cout, scale=0.5)}


def check_fused(q: onnx.ModelProto, *expect: str) -> dict[str, int]:
    """Every expected integer kernel is there and no Q/DQ is left inside the integer region."""
    counts = integer_op_counts(q)
    for op in expect:
        assert counts.get(op, 0) >= 1, (op, counts)
    assert count_unfused_qdq(q) == 0, unfused_qdq(q)
    return counts


def input_scale(q: onnx.ModelProto, node: onnx.NodeProto) -> float:
    return float(qdq_params(q, node.input[0])[1])


# ------------------------------------------------------------------------------------------ Conv


@pytest.mark.parametrize("act", [None, "Relu", "Clip"])
def test_conv_placement_weights_bias_and_fusion(act):
    rng = np.random.default_rng(0)
    init = conv_weights(rng, "c", 8, 3)
    nodes = [conv("x", "c" if act else "y", "c_W", "c_B")]
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    elif act == "Clip":
        init.update(lo=np.array(0.0, np.float32), hi=np.array(6.0, np.float32))
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip"))
    model = make_model(nodes, X, ["y"], init)
    q, result = quantize(model)
    prod = producers(q)
    node = next(n for n in q.graph.node if n.op_type == "Conv")
    # input: graph input -> Q -> DQ -> Conv
    assert prod[node.input[0]].op_type == "DequantizeLinear"
    assert prod[prod[node.input[0]].input[0]].op_type == "QuantizeLinear"
    # weight: int8 per channel on axis 0, scale max|W_c| / 127, zero point 0
    wq, ws, wz, axis = qdq_params(q, node.input[1])
    w = init["c_W"]
    assert wq.dtype == np.int8 and axis == 0 and ws.shape == (8,) and not wz.any()
    np.testing.assert_allclose(ws, (np.abs(w).reshape(8, -1).max(1) / 127).astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(wq, np.round(w / ws[:, None, None, None]).astype(np.int8))
    # bias: int32, scale s_in * s_w, zero point 0
    bq, bs, bz, baxis = qdq_params(q, node.input[2])
    s_in = input_scale(q, node)
    assert bq.dtype == np.int32 and bz.dtype == np.int32 and not bz.any() and baxis == 0
    np.testing.assert_array_equal(bq, np.round(init["c_B"].astype(np.float64) / (s_in * ws.astype(np.float64))))
    np.testing.assert_allclose(bs, s_in * ws, rtol=1e-6)
    # output keeps its name and float type; a folded Relu/Clip reads the Conv directly
    out = q.graph.output[0]
    assert out.name == "y" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert prod["y"].op_type == "DequantizeLinear"
    if act:
        act_node = next(n for n in q.graph.node if n.op_type == act)
        assert prod[act_node.input[0]] is node or prod[act_node.input[0]].op_type == "Conv"
        assert [c.op_type for c in consumers(q)[act_node.output[0]]] == ["QuantizeLinear"]
        _, ys, yz, _ = qdq_params(q, "y")
        assert yz.dtype == np.uint8 and int(yz) == 0
        assert result.stats[f"{act.lower()}_folded"] == 1
        if act == "Clip":
            assert float(ys) <= 6.0 / 255 + 1e-7
    assert result.stats["quantized_Conv"] == 1 and result.stats["bias_int32"] == 1
    assert compare(model, q) >= 0.99
    check_fused(q, "QLinearConv")


def test_no_qdq_between_conv_and_relu_in_a_chain():
    """Conv-Relu-Conv-GAP-Flatten-Gemm: every Relu folded, zero unfused Q/DQ in onnxruntime."""
    rng = np.random.default_rng(1)
    init = {**conv_weights(rng, "c1", 8, 3), **conv_weights(rng, "c2", 8, 8),
            "g_W": rand(rng, 10, 8, scale=0.5), "g_B": rand(rng, 10, scale=0.5)}
    nodes = [conv("x", "a", "c1_W", "c1_B"), helper.make_node("Relu", ["a"], ["r"]),
             conv("r", "b", "c2_W", "c2_B"), helper.make_node("Relu", ["b"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "g_W", "g_B"], ["y"], transB=1)]
    model = make_model(nodes, X, ["y"], init)
    q, result = quantize(model)
    prod = producers(q)
    for relu in (n for n in q.graph.node if n.op_type == "Relu"):
        assert prod[relu.input[0]].op_type == "Conv"
    # Flatten shares GAP's parameters: same scale/zero point initializers before and after
    flat = next(n for n in q.graph.node if n.op_type == "Flatten")
    assert prod[flat.input[0]].input[1:] == prod["f"].input[1:]
    # the classifier's output stays float straight from the Gemm (QGemm with float output)
    assert prod["y"].op_type == "Gemm"
    counts = check_fused(q, "QLinearConv", "QLinearGlobalAveragePool", "QGemm")
    assert counts["QLinearConv"] == 2
    assert count_unfused_qdq(q, boundary=True) == 1  # the Q of the graph input
    assert result.stats["relu_folded"] == 2 and result.stats["quantized_Flatten"] == 1
    assert compare(model, q) >= 0.99


# ------------------------------------------------------------------------------- Gemm / MatMul


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_axis_follows_transb_and_beta_folds_into_bias(trans_b):
    rng = np.random.default_rng(2)
    w = rand(rng, 8, 16, scale=0.5) if trans_b else rand(rng, 16, 8, scale=0.5)
    init = {"W": w, "B": rand(rng, 8, scale=0.5)}
    model = make_model([helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=trans_b, beta=0.5)],
                       {"x": ["N", 16]}, ["y"], init)
    q, _ = quantize(model)
    gemm = next(n for n in q.graph.node if n.op_type == "Gemm")
    wq, ws, _, axis = qdq_params(q, gemm.input[1])
    assert axis == (0 if trans_b else 1) and ws.shape == (8,)
    np.testing.assert_allclose(ws, np.abs(w).max(axis=1 if trans_b else 0) / 127, rtol=1e-6)
    bq, _, _, _ = qdq_params(q, gemm.input[2])
    s_in = input_scale(q, gemm)
    np.testing.assert_array_equal(bq, np.round(0.5 * init["B"].astype(np.float64) / (s_in * ws.astype(np.float64))))
    assert next(a.f for a in gemm.attribute if a.name == "beta") == 1.0
    assert compare(model, q) >= 0.99
    check_fused(q, "QGemm")


def test_matmul_constant_weight_axis_1():
    rng = np.random.default_rng(3)
    w = rand(rng, 16, 8, scale=0.5)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
                        helper.make_node("MatMul", ["r", "W2"], ["y"])],
                       {"x": ["N", 4, 16]}, ["y"], {"W": w, "W2": rand(rng, 8, 5, scale=0.5)})
    q, result = quantize(model)
    first = next(n for n in q.graph.node if n.op_type == "MatMul")
    wq, ws, _, axis = qdq_params(q, first.input[1])
    assert axis == 1 and ws.shape == (8,)
    np.testing.assert_array_equal(wq, np.round(w / ws[None, :]).astype(np.int8))
    assert result.stats["relu_folded"] == 1  # the first MatMul's output is quantized for the second
    assert compare(model, q) >= 0.99
    check_fused(q, "QLinearMatMul", "MatMulIntegerToFloat")


def test_conv_transpose_gets_int8_weight_on_axis_1_only():
    rng = np.random.default_rng(4)
    w = rand(rng, 3, 6, 3, 3, scale=0.5)
    model = make_model([helper.make_node("ConvTranspose", ["x", "W"], ["y"])], X, ["y"], {"W": w})
    q, result = quantize(model)
    node = next(n for n in q.graph.node if n.op_type == "ConvTranspose")
    wq, ws, _, axis = qdq_params(q, node.input[1])
    assert axis == 1 and ws.shape == (6,) and wq.dtype == np.int8
    np.testing.assert_allclose(ws, np.abs(w).max(axis=(0, 2, 3)) / 127, rtol=1e-6)
    assert node.input[0] == "x"  # no integer kernel: its activations are not quantized on its account
    assert result.stats.get("q_inserted", 0) == 0
    kinds = [u.kind for u in unfused_qdq(q)]
    assert kinds == ["weight"]
    assert compare(model, q) >= 0.999


# ------------------------------------------------------------------------- Add, Concat, pools


def test_add_of_two_quantized_branches():
    rng = np.random.default_rng(5)
    init = {**conv_weights(rng, "a", 4, 3), **conv_weights(rng, "b", 4, 3)}
    nodes = [conv("x", "ya", "a_W", "a_B"), conv("x", "yb", "b_W", "b_B"),
             helper.make_node("Add", ["ya", "yb"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    model = make_model(nodes, X, ["y"], init)
    q, result = quantize(model)
    prod = producers(q)
    add = next(n for n in q.graph.node if n.op_type == "Add")
    assert all(prod[i].op_type == "DequantizeLinear" for i in add.input)
    assert result.stats["quantized_Add"] == 1 and result.stats["relu_folded"] == 1
    assert compare(model, q) >= 0.99
    check_fused(q, "QLinearConv", "QLinearAdd")


def test_concat_and_constant_operand():
    rng = np.random.default_rng(6)
    init = {**conv_weights(rng, "a", 4, 3), **conv_weights(rng, "b", 4, 3), **conv_weights(rng, "c", 5, 8),
            "k": np.float32(0.5) * np.ones((1, 8, 1, 1), np.float32)}
    nodes = [conv("x", "ya", "a_W", "a_B"), conv("x", "yb", "b_W", "b_B"),
             helper.make_node("Concat", ["ya", "yb"], ["cat"], axis=1),
             helper.make_node("Mul", ["cat", "k"], ["m"]), conv("m", "y", "c_W", "c_B")]
    model = make_model(nodes, X, ["y"], init)
    q, result = quantize(model)
    assert result.stats["quantized_Concat"] == 1 and result.stats["constants_quantized"] == 1
    assert compare(model, q) >= 0.99
    check_fused(q, "QLinearConcat", "QLinearMul")


def _concat_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Three conv branches into a Concat; ``yc`` is also read by a Relu that is a graph output."""
    init = {**conv_weights(rng, "a", 4, 3), **conv_weights(rng, "b", 4, 3), **conv_weights(rng, "c", 4, 3),
            **conv_weights(rng, "d", 5, 12)}
    init["b_W"] = init["b_W"] * np.float32(0.1)  # a branch with a much narrower range than the Concat's
    nodes = [conv("x", "ya", "a_W", "a_B"), conv("x", "yb", "b_W", "b_B"), conv("x", "yc", "c_W", "c_B"),
             helper.make_node("Relu", ["yc"], ["side"]),
             helper.make_node("Concat", ["ya", "yb", "yc"], ["cat"], axis=1), conv("cat", "y", "d_W", "d_B")]
    return make_model(nodes, X, ["y", "side"], init)


def test_share_concat_scales_rounds_concat_inputs_once_on_the_concat_grid():
    model = _concat_model(np.random.default_rng(16))
    own, _ = quantize(model)
    shared, _ = quantize(model, "quantize_int8:share_concat_scales=true")
    _, s_cat, z_cat, _ = qdq_params(shared, "cat")
    for name in ("ya", "yb"):  # read only by the Concat: the Concat's scale and zero point
        _, s, z, _ = qdq_params(shared, name)
        assert (s, z) == (s_cat, z_cat)
    assert qdq_params(own, "yb")[1] < s_cat  # by default each input keeps its own grid
    assert qdq_params(shared, "yc")[1] != s_cat  # also read by the Relu: its own grid
    assert compare(model, shared) >= 0.99
    check_fused(shared, "QLinearConv", "QLinearConcat")
    # one rounding instead of two: the shared model's Concat output is at least as close to float's
    feeds = feeds_for(model, 16)
    probe = [_with_output(m, "cat") for m in (model, own, shared)]
    ref, a, b = (ort_run(m, feeds)[-1] for m in probe)
    assert np.abs(b - ref).mean() <= np.abs(a - ref).mean()


def test_concat_output_range_is_its_inputs_union_without_measuring_it(monkeypatch):
    """The Concat output's range is the union of its inputs' (it copies their values): its statistics
    are not gathered, and the model is the same bytes as when they are; a Concat followed by a
    folded Relu clamps values, so that one is measured."""
    import onnxcompress.passes.quantize_int8 as pass_module

    asked: list[list[str]] = []
    real = pass_module.collect_statistics
    monkeypatch.setattr(pass_module, "collect_statistics",
                        lambda m, names, *a, **k: asked.append(list(names)) or real(m, names, *a, **k))
    model = _concat_model(np.random.default_rng(16))
    q, result = quantize(model)
    assert "cat" not in asked[-1] and {"ya", "yb", "yc"} <= set(asked[-1])
    assert result.stats["tensors_calibrated"] == len(asked[-1])
    monkeypatch.setattr(pass_module, "measured_tensors", lambda plan: plan.calibrated())  # measure it too
    every, _ = quantize(model)
    assert "cat" in asked[-1] and every.SerializeToString() == q.SerializeToString()
    # negative: a Relu folded into the Concat's output clamps it; that range is measured
    monkeypatch.undo()
    monkeypatch.setattr(pass_module, "collect_statistics",
                        lambda m, names, *a, **k: asked.append(list(names)) or real(m, names, *a, **k))
    relu = onnx.ModelProto()
    relu.CopyFrom(model)
    cat = next(n for n in relu.graph.node if n.op_type == "Concat")
    cat.output[0] = "cat_pre"
    relu.graph.node.insert(list(relu.graph.node).index(cat) + 1, helper.make_node("Relu", ["cat_pre"], ["cat"]))
    quantize(relu)
    assert "cat" in asked[-1]


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m


@pytest.mark.parametrize("op", ["MaxPool", "Resize", "Reshape"])
def test_passthrough_shares_its_input_parameters(op):
    rng = np.random.default_rng(7)
    init = {**conv_weights(rng, "a", 4, 3), **conv_weights(rng, "b", 4, 4)}
    if op == "MaxPool":
        mid = helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[2, 2], strides=[2, 2])
    elif op == "Resize":
        init.update(roi=np.zeros(0, np.float32), scales=np.array([1, 1, 2, 2], np.float32))
        mid = helper.make_node("Resize", ["r", "roi", "scales"], ["m"], mode="nearest")
    else:
        init["shape"] = np.array([0, 4, 16, 4], np.int64)
        mid = helper.make_node("Reshape", ["r", "shape"], ["m"])
    nodes = [conv("x", "a", "a_W", "a_B"), helper.make_node("Relu", ["a"], ["r"]), mid, conv("m", "y", "b_W", "b_B")]
    model = make_model(nodes, X, ["y"], init)
    q, result = quantize(model)
    prod = producers(q)
    node = next(n for n in q.graph.node if n.op_type == op)
    before, after = prod[node.input[0]], prod["m"]
    assert before.op_type == after.op_type == "DequantizeLinear"
    assert before.input[1:] == after.input[1:]  # the very same scale / zero point constants
    assert result.stats[f"quantized_{op}"] == 1
    assert result.stats["tensors_calibrated"] == 3  # x, r, y: the passthrough output reuses r's range
    assert compare(model, q) >= 0.99
    check_fused(q, "QLinearConv")


def test_split_outputs_share_the_input_parameters():
    rng = np.random.default_rng(10)
    init = {**conv_weights(rng, "a", 4, 3), **conv_weights(rng, "b", 3, 2), **conv_weights(rng, "c", 3, 2),
            "sizes": np.array([2, 2], np.int64)}
    nodes = [conv("x", "a", "a_W", "a_B"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Split", ["r", "sizes"], ["s0", "s1"], axis=1),
             conv("s0", "p", "b_W", "b_B"), conv("s1", "q", "c_W", "c_B"), helper.make_node("Add", ["p", "q"], ["y"])]
    model = make_model(nodes, X, ["y"], init)
    q, result = quantize(model)
    prod = producers(q)
    assert prod["s0"].input[1:] == prod["s1"].input[1:] == prod[next(
        n for n in q.graph.node if n.op_type == "Split").input[0]].input[1:]
    assert result.stats["quantized_Split"] == 1
    assert compare(model, q) >= 0.99
    check_fused(q, "QLinearConv", "QLinearAdd")


def test_average_pools_get_their_own_scale():
    rng = np.random.default_rng(8)
    init = conv_weights(rng, "a", 4, 3)
    nodes = [conv("x", "a", "a_W", "a_B"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p"], ["y"])]
    model = make_model(nodes, X, ["y"], init)
    q, _ = quantize(model)
    prod = producers(q)
    pool = next(n for n in q.graph.node if n.op_type == "AveragePool")
    assert prod[pool.input[0]].input[1] != prod["p"].input[1]
    assert compare(model, q) >= 0.99
    check_fused(q, "QLinearAveragePool", "QLinearGlobalAveragePool")


def test_passthrough_on_a_float_input_is_left_alone():
    """No orphan pair: a Transpose between a graph input and a float Softmax stays float."""
    model = make_model([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]),
                        helper.make_node("Softmax", ["t"], ["y"])], X, ["y"], {})
    q, result = quantize(model)
    assert not result.modified
    assert [n.op_type for n in q.graph.node] == ["Transpose", "Softmax"]


# ----------------------------------------------------------------------------- unit helpers


def test_count_unfused_qdq_sees_a_float_island():
    """Q/DQ around a Tanh (no integer kernel) between two convs is float work; boundary ones are not counted."""
    rng = np.random.default_rng(9)
    init = {**conv_weights(rng, "a", 4, 3), **conv_weights(rng, "b", 4, 4)}
    nodes = [conv("x", "a", "a_W", "a_B"), helper.make_node("Tanh", ["a"], ["s"]),
             conv("s", "y", "b_W", "b_B")]
    q, _ = quantize(make_model(nodes, X, ["y"], init))
    kinds = sorted(u.kind for u in unfused_qdq(q))
    assert kinds.count("activation") == 2  # the DQ before the Tanh and the Q after it
    assert count_unfused_qdq(q) == 2 and count_unfused_qdq(q, boundary=True) == 4


def test_params_math():
    p = activation_params(-1.0, 3.0)
    assert p.zero_point.dtype == np.uint8 and float(p.scale) == pytest.approx(4 / 255)
    assert int(p.zero_point) == round(1 / float(p.scale))
    assert activation_params(0.5, 2.0).zero_point == 0  # range widened to contain 0
    s = activation_params(-1.0, 3.0, symmetric=True)
    assert s.zero_point.dtype == np.int8 and int(s.zero_point) == 0 and float(s.scale) == pytest.approx(3 / 127)
    one = activation_params(0.0, 6.0, symmetric=True, one_sided=True)
    assert int(one.zero_point) == -128 and float(one.scale) == pytest.approx(6 / 255)
    degenerate = activation_params(0.0, 0.0)
    assert degenerate.degenerate and float(degenerate.scale) == 1.0
    w = np.array([[1.0, -2.0], [0.0, 0.0]], np.float32)
    wq, wp = quantize_weight(w, 0, qmax=64)
    assert wq.tolist() == [[32, -64], [0, 0]] and wp.scale.tolist() == [pytest.approx(2 / 64), 1.0]
    bq, bp = quantize_bias(np.array([1e9, 0.5]), 1e-3, wp)  # channel 0 would overflow int32
    assert bq.dtype == np.int32 and bq[0] == 2**31 - 1


def test_cpu_flags(tmp_path):
    from onnxcompress.quant import cpu_flags, has_vnni

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2 avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse4_2", "avx2", "avx512_vnni"} and has_vnni(cpu_flags(info)) is True
    assert has_vnni({"avx2"}) is False and has_vnni(None) is None
    assert cpu_flags(tmp_path / "missing") is None
