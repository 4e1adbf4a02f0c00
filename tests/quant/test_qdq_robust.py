"""Quantizer robustness on what exported models contain, checked against onnxruntime's fusions.

Lookup-table activations (LeakyRelu/Sigmoid/Softmax fused, HardSigmoid/Tanh not), Resize modes,
Shape readers of quantized tensors, int8 activations read by several nodes, models that are
already quantized, opset < 13 with Constant-node weights, and a transformer-style block
(MatMul, Softmax, LayerNormalization, Gelu), shape-derived (static) operands such as a
detector's anchor grid, and elementwise ops with no path to a quantized Conv/Gemm/MatMul.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress.core import serde
from onnxcompress.core.pass_api import PassResult
from onnxcompress.quant import count_unfused_qdq, integer_op_counts, placement, rewrite, unfused_qdq
from onnxcompress.quant.options import QuantConfig
from onnxcompress.quant.params import QParams
from onnxcompress.quant.placement import R_EXCLUDED, R_ISOLATED, R_OUTPUT_CONCAT, R_QUANTIZED, R_STATIC
from onnxcompress.runtime.data import open_source
from tests.helpers.builders import make_model
from tests.helpers.graphs import consumers, initializers, op_types, producers
from tests.helpers.quant import compare, qdq_params, quantize
from tests.helpers.runs import ort_run
from tests.helpers.tensors import feeds_for, rand

X = {"x": ["N", 3, 8, 8]}


def conv(x: str, y: str, prefix: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, f"{prefix}_W", f"{prefix}_B"], [y], name=f"conv_{y}", pads=[1, 1, 1, 1])


def weights(rng: np.random.Generator, prefix: str, cout: int, cin: int) -> dict[str, np.ndarray]:
    return {f"{prefix}_W": rand(rng, cout, cin, 3, 3, scale=0.5), f"{prefix}_B": rand(rng, cout, scale=0.5)}


def activation_chain(op: str, attrs: dict, opset: int = 17) -> onnx.ModelProto:
    """Conv -> op -> MaxPool -> Conv."""
    rng = np.random.default_rng(0)
    init = {**weights(rng, "a", 4, 3), **weights(rng, "b", 4, 4)}
    nodes = [conv("x", "c", "a"), helper.make_node(op, ["c"], ["act"], **attrs),
             helper.make_node("MaxPool", ["act"], ["p"], kernel_shape=[2, 2], strides=[2, 2]), conv("p", "y", "b")]
    return make_model(nodes, X, ["y"], init, opset=opset)


def no_island(q: onnx.ModelProto) -> None:
    assert count_unfused_qdq(q) == 0, unfused_qdq(q)


# ------------------------------------------------------------------------------ lut activations


@pytest.mark.parametrize(("op", "attrs", "kernel"), [
    ("LeakyRelu", {"alpha": 0.1}, "QLinearLeakyRelu"),
    ("Sigmoid", {}, "QLinearSigmoid"),
    ("Softmax", {"axis": 1}, "QLinearSoftmax"),
])
def test_lut_activation_and_the_maxpool_after_it_run_on_integers(op, attrs, kernel):
    model = activation_chain(op, attrs)
    q, result = quantize(model)
    assert result.stats[f"quantized_{op}"] == 1 and result.stats["quantized_MaxPool"] == 1
    node = next(n for n in q.graph.node if n.op_type == op)
    assert producers(q)[node.input[0]].op_type == "DequantizeLinear"
    assert [c.op_type for c in consumers(q)[node.output[0]]] == ["QuantizeLinear"]
    # the activation's output gets its own calibrated parameters; the MaxPool reuses them
    pool = next(n for n in q.graph.node if n.op_type == "MaxPool")
    assert producers(q)[pool.input[0]].input[1:] == producers(q)["p"].input[1:]
    counts = integer_op_counts(q)
    assert counts.get(kernel) == 1 and counts.get("QLinearConv") == 2, counts
    no_island(q)
    assert compare(model, q) >= 0.99


@pytest.mark.parametrize("op", ["HardSigmoid", "Tanh"])
def test_activation_without_integer_kernel_stays_float(op):
    q, result = quantize(activation_chain(op, {}))
    assert f"quantized_{op}" not in result.stats and "quantized_MaxPool" not in result.stats
    node = next(n for n in q.graph.node if n.op_type == op)
    assert producers(q)[node.input[0]].op_type == "DequantizeLinear"  # the Conv's output, dequantized


def test_lut_activation_on_a_float_input_is_left_alone():
    model = make_model([helper.make_node("Sigmoid", ["x"], ["y"])], X, ["y"], {})
    q, result = quantize(model)
    assert op_types(q) == ["Sigmoid"] and not result.modified


# ---------------------------------------------------------------------------------------- Resize


@pytest.mark.parametrize(("mode", "fused"), [("nearest", True), ("linear", False)])
def test_resize_passes_integers_through_only_in_nearest_mode(mode, fused):
    rng = np.random.default_rng(1)
    init = {**weights(rng, "a", 4, 3), **weights(rng, "b", 4, 4), "scales": np.array([1, 1, 2, 2], np.float32)}
    nodes = [conv("x", "c", "a"), helper.make_node("Resize", ["c", "", "scales"], ["r"], mode=mode),
             conv("r", "y", "b")]
    model = make_model(nodes, X, ["y"], init)
    q, result = quantize(model)
    assert ("quantized_Resize" in result.stats) is fused
    if fused:
        no_island(q)
    else:  # onnxruntime interpolates in float: the Resize stays a float island between two Q/DQ
        assert [u.op for u in unfused_qdq(q) if u.kind == "activation"] == ["DequantizeLinear", "QuantizeLinear"]
    assert compare(model, q) >= 0.99


# ---------------------------------------------------------------------------------- Shape readers


def test_shape_reads_the_quantized_tensor_not_its_dequantization():
    """c = Conv(x); y = Reshape(Conv(c), Shape(c)): the Shape reads Q(c), nothing stays float."""
    rng = np.random.default_rng(2)
    init = {**weights(rng, "a", 4, 3), **weights(rng, "b", 4, 4)}
    nodes = [conv("x", "c", "a"), conv("c", "d", "b"), helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("Reshape", ["d", "s"], ["y"])]
    model = make_model(nodes, X, ["y"], init)
    q, result = quantize(model)
    shape = next(n for n in q.graph.node if n.op_type == "Shape")
    assert producers(q)[shape.input[0]].op_type == "QuantizeLinear"
    assert result.stats["shape_reads_quantized"] == 1
    no_island(q)
    assert compare(model, q) >= 0.99


# ------------------------------------------------------------- int8 activations read by several nodes


def residual(relu: bool) -> onnx.ModelProto:
    """a = Conv(x) [-> Relu]; y = Conv(a + Conv(a)): ``a`` is read by a Conv and an Add."""
    rng = np.random.default_rng(3)
    init = {**weights(rng, "a", 8, 3), **weights(rng, "b", 8, 8), **weights(rng, "c", 8, 8)}
    nodes = [conv("x", "a0", "a")] + ([helper.make_node("Relu", ["a0"], ["a1"])] if relu else [])
    a = "a1" if relu else "a0"
    nodes += [conv(a, "b", "b"), helper.make_node("Add", [a, "b"], ["s"]), conv("s", "y", "c")]
    return make_model(nodes, X, ["y"], init)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_shared_tensor_fuses_with_uint8_and_int8_activations(relu, symmetric):
    model = residual(relu)
    q, result = quantize(model, f"quantize_int8:symmetric_activations={str(symmetric).lower()}")
    counts = integer_op_counts(q)
    assert counts.get("QLinearConv") == 3 and counts.get("QLinearAdd") == 1, counts
    no_island(q)
    assert compare(model, q) >= 0.99
    add = next(n for n in q.graph.node if n.op_type == "Add")
    _, _, zp, _ = qdq_params(q, add.input[0])
    assert zp.dtype == np.uint8  # the shared tensor, whatever the option
    if symmetric:
        assert result.stats["uint8_fanout"] == 1
        assert int(zp) == (0 if relu else 128)  # int8 zero point -128 (one-sided) or 0, plus 128
        single = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "b_float"]
        assert numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == single[0].input[2])).dtype \
            == np.int8  # a tensor with one reader keeps int8
    else:
        assert "uint8_fanout" not in result.stats


def test_uint8_fanout_only_re_encodes_shared_tensors():
    """``fanout_uint8`` changes nothing but the encoding: same scale and axis, zero point + 128 as uint8,
    only for the tensor read by several nodes (``a0``)."""
    graph = serde.to_graph(residual(relu=False))
    plan = placement.plan_placement(graph, QuantConfig(symmetric_activations=True), PassResult())
    params = {plan.root(t): QParams(np.float32(0.05), np.int8(-3 + i)) for i, t in enumerate(plan.tensors)}
    result = PassResult()
    shifted = rewrite.fanout_uint8(graph, plan, params, result)
    changed = sorted(n for n in params if shifted[n] is not params[n])
    assert changed == ["a0"] and result.stats["uint8_fanout"] == 1
    old, new = params["a0"], shifted["a0"]
    assert new.zero_point.dtype == np.uint8 and int(new.zero_point) == int(old.zero_point) + 128
    assert new.scale is old.scale and new.axis == old.axis


def test_uint8_fanout_encoding_is_bit_identical():
    """The pass's output equals, bit for bit in onnxruntime, itself with every uint8 tensor put
    back to int8 (``q - 128``: zero points and quantized constants)."""
    model = residual(relu=False)
    shifted, result = quantize(model, "quantize_int8:symmetric_activations=true")
    assert result.stats["uint8_fanout"] == 1
    plain = onnx.ModelProto()
    plain.CopyFrom(shifted)
    del plain.graph.value_info[:]  # the Q outputs' element types follow their zero points again
    for init in plain.graph.initializer:
        if init.data_type == onnx.TensorProto.UINT8:
            values = numpy_helper.to_array(init).astype(np.int16) - 128
            init.CopyFrom(numpy_helper.from_array(values.astype(np.int8), init.name))
    onnx.checker.check_model(plain, full_check=True)
    assert {i.data_type for i in plain.graph.initializer} & {onnx.TensorProto.UINT8} == set()
    feeds = feeds_for(model)
    for a, b in zip(ort_run(plain, feeds), ort_run(shifted, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- already quantized


def test_already_quantized_model_is_left_alone():
    model = residual(relu=True)
    once, _ = quantize(model)
    twice, result = quantize(once)
    assert not result.modified and [d.code for d in result.declined] == [R_QUANTIZED]
    assert op_types(twice) == op_types(once)


# ------------------------------------------------------------ opset < 13, weights in Constant nodes


def test_opset_11_with_constant_node_weights():
    rng = np.random.default_rng(4)
    w, b = rand(rng, 4, 3, 3, 3, scale=0.5), rand(rng, 4, scale=0.5)
    gw, gb = rand(rng, 4 * 8 * 8, 5, scale=0.5), rand(rng, 5, scale=0.5)
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(v, name))
             for name, v in (("W", w), ("B", b), ("GW", gw), ("GB", gb))]
    nodes += [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("LeakyRelu", ["c"], ["l"], alpha=0.2),
              helper.make_node("Flatten", ["l"], ["f"]), helper.make_node("Gemm", ["f", "GW", "GB"], ["y"])]
    model = make_model(nodes, X, ["y"], {}, opset=11)
    q, result = quantize(model)
    assert q.opset_import[0].version >= 13
    assert result.stats["quantized_Conv"] == 1 and result.stats["quantized_Gemm"] == 1
    assert result.stats["weights_int8"] == 2 and result.stats["bias_int32"] == 2
    assert compare(model, q) >= 0.99
    no_island(q)


# ------------------------------------------------------------------- transformer-style block


def test_transformer_block_quantizes_matmuls_and_keeps_the_rest_float():
    """LayerNorm -> MatMul(Wq) -> Softmax -> MatMul(Wv) -> Gelu -> MatMul(Wo) + residual (opset 20)."""
    rng = np.random.default_rng(5)
    d = 16
    init = {"g": np.ones(d, np.float32), "beta": np.zeros(d, np.float32),
            "Wq": rand(rng, d, d, scale=0.5), "Wv": rand(rng, d, d, scale=0.5), "Wo": rand(rng, d, d, scale=0.5)}
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "beta"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "Wq"], ["q"]), helper.make_node("Softmax", ["q"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "Wv"], ["v"]), helper.make_node("Gelu", ["v"], ["h"]),
             helper.make_node("MatMul", ["h", "Wo"], ["o"]), helper.make_node("Add", ["o", "x"], ["y"])]
    model = make_model(nodes, {"x": ["N", 6, d]}, ["y"], init, opset=20)
    q, result = quantize(model)
    assert result.stats["quantized_MatMul"] == 3
    for op in ("LayerNormalization", "Gelu"):
        assert f"quantized_{op}" not in result.stats
        node = next(n for n in q.graph.node if n.op_type == op)
        assert producers(q).get(node.output[0]) is node  # float output, no Q folded onto it
    for mm in (n for n in q.graph.node if n.op_type == "MatMul"):
        _, ws, _, axis = qdq_params(q, mm.input[1])
        assert axis == 1 and ws.shape == (d,)
    counts = integer_op_counts(q)
    assert sum(v for k, v in counts.items() if "MatMul" in k) == 3, counts
    assert compare(model, q) >= 0.99


# ------------------------------------------------------------------- Concat as the graph output


def test_concat_feeding_only_the_graph_output_stays_float():
    """Detector head: boxes (large range) and sigmoid scores (0..1) concatenated into the output."""
    rng = np.random.default_rng(6)
    init = {**weights(rng, "a", 4, 3), **weights(rng, "b", 2, 3), "k": np.array(300.0, np.float32)}
    nodes = [conv("x", "c", "a"), helper.make_node("Mul", ["c", "k"], ["box"]),
             conv("x", "d", "b"), helper.make_node("Sigmoid", ["d"], ["score"]),
             helper.make_node("Concat", ["box", "score"], ["y"], axis=1)]
    model = make_model(nodes, X, ["y"], init)
    q, result = quantize(model)
    assert "quantized_Concat" not in result.stats and result.stats["quantized_Sigmoid"] == 1
    assert (R_OUTPUT_CONCAT in [d.code for d in result.declined])
    assert producers(q)["y"].op_type == "Concat"
    feeds = feeds_for(model)
    ref, got = ort_run(model, feeds)[0], ort_run(q, feeds)[0]
    scores = np.abs(ref[:, 4:] - got[:, 4:]).max()
    assert scores <= 0.05  # their own [0, 1] scale; one scale with the boxes (step ~5) would zero them
    no_island(q)


# ------------------------------------------------- static (shape-derived) operands and isolated ops


def const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def anchor_head() -> onnx.ModelProto:
    """YOLO-style decode: ``(Conv(x) + anchors) * strides`` with anchors/strides built from Shape(x).

    ``anchors = Range(0, W) + 0.5`` (Shape -> Gather -> Cast -> Range -> Add) and
    ``strides = ConstantOfShape(Shape(anchors)) + 8``: both depend on the input's shape only.
    """
    rng = np.random.default_rng(9)
    init = {**weights(rng, "a", 4, 3), "half": np.array(0.5, np.float32), "eight": np.array(8.0, np.float32)}
    nodes = [conv("x", "c", "a"), helper.make_node("Shape", ["x"], ["shp"]),
             const("i3", np.array(3, np.int64)), helper.make_node("Gather", ["shp", "i3"], ["w_i"]),
             helper.make_node("Cast", ["w_i"], ["w_f"], to=onnx.TensorProto.FLOAT),
             const("zero", np.array(0.0, np.float32)), const("one", np.array(1.0, np.float32)),
             helper.make_node("Range", ["zero", "w_f", "one"], ["grid"]),
             helper.make_node("Add", ["grid", "half"], ["anchors"], name="anchor_add"),
             helper.make_node("Shape", ["anchors"], ["ashp"]),
             helper.make_node("ConstantOfShape", ["ashp"], ["zeros"],
                              value=numpy_helper.from_array(np.zeros(1, np.float32))),
             helper.make_node("Add", ["zeros", "eight"], ["strides"], name="stride_add"),
             helper.make_node("Add", ["c", "anchors"], ["box"], name="box_add"),
             helper.make_node("Mul", ["box", "strides"], ["y"], name="box_mul")]
    return make_model(nodes, X, ["y"], init)


def test_static_tensors_are_the_shape_derived_ones():
    graph = serde.to_graph(anchor_head())
    static = placement.static_tensors(graph)
    assert {"shp", "w_i", "w_f", "grid", "anchors", "ashp", "zeros", "strides"} <= static
    assert not {"x", "c", "box", "y"} & static
    nodes = [helper.make_node("RandomNormal", [], ["r"], shape=[1, 3, 8, 8]),
             helper.make_node("Add", ["x", "r"], ["y"])]
    assert not placement.static_tensors(serde.to_graph(make_model(nodes, X, ["y"], {}))) & {"r", "y"}


def test_anchor_and_stride_arithmetic_stays_float():
    model = anchor_head()
    q, result = quantize(model)
    declined = dict(result.where_codes())
    assert declined["box_add"] == R_STATIC and declined["box_mul"] == R_STATIC
    assert declined["anchor_add"] == R_STATIC and declined["stride_add"] == R_STATIC
    assert "quantized_Add" not in result.stats and "quantized_Mul" not in result.stats
    prod = producers(q)
    assert prod["anchors"].op_type == "Add" and prod["strides"].op_type == "Add"  # no Q/DQ on them
    assert result.stats["quantized_Conv"] == 1 and prod["y"].op_type == "Mul"
    feeds = feeds_for(model)
    ref, got = ort_run(model, feeds)[0], ort_run(q, feeds)[0]
    # only the conv output is quantized (step s): y = 8 * (c + anchors), so |error| stays near 8 * s / 2
    step = float(qdq_params(q, "c")[1])
    assert np.abs(ref - got).max() <= 8 * 3 * step and compare(model, q) >= 0.999
    no_island(q)


def test_elementwise_ops_away_from_any_conv_stay_float():
    """``Add -> Mul`` on a graph input, beside a Conv branch: quantizing them only adds Q/DQ work."""
    rng = np.random.default_rng(10)
    init = {**weights(rng, "a", 4, 3), "k": rand(rng, 1, 3, 1, 1, scale=0.5), "m": rand(rng, 1, 3, 1, 1, scale=0.5)}
    nodes = [conv("x", "y1", "a"), helper.make_node("Add", ["x", "k"], ["s"], name="lone_add"),
             helper.make_node("Mul", ["s", "m"], ["y2"], name="lone_mul")]
    model = make_model(nodes, X, ["y1", "y2"], init)
    q, result = quantize(model)
    declined = dict(result.where_codes())
    assert declined.get("lone_add") == R_ISOLATED and declined.get("lone_mul") == R_ISOLATED
    assert result.stats["quantized_Conv"] == 1 and "quantized_Add" not in result.stats
    feeds = feeds_for(model)
    np.testing.assert_array_equal(ort_run(model, feeds)[1], ort_run(q, feeds)[1])  # y2 bit-exact float
    assert compare(model, q) >= 0.99
    no_island(q)


def test_elementwise_only_model_is_left_unchanged():
    init = {"k": np.array(0.25, np.float32)}
    nodes = [helper.make_node("Add", ["x", "k"], ["s"], name="add"),
             helper.make_node("AveragePool", ["s"], ["y"], name="pool", kernel_shape=[2, 2])]
    model = make_model(nodes, X, ["y"], init)
    q, result = quantize(model)
    assert not result.modified
    assert {d.where for d in result.declined if d.code == R_ISOLATED} == {"add", "pool"}
    assert not [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def test_excluding_a_conv_does_not_turn_its_add_float():
    """Rule 12 is decided without exclusions: quantizing one layer alone (sensitivity) still works."""
    rng = np.random.default_rng(11)
    init = {**weights(rng, "a", 3, 3), "shared": rand(rng, 1, 3, 1, 1, scale=0.5)}
    nodes = [conv("x", "c", "a"), helper.make_node("Add", ["c", "shared"], ["s"], name="add"),
             helper.make_node("Mul", ["s", "shared"], ["y"], name="mul")]  # shared initializer, graph output
    model = make_model(nodes, X, ["y"], init)
    q, result = quantize(model, "quantize_int8:exclude=conv_c")
    declined = dict(result.where_codes())
    assert declined["conv_c"] == R_EXCLUDED and R_ISOLATED not in declined.values()
    assert result.stats["quantized_Add"] == 1 and result.stats["quantized_Mul"] == 1
    assert np.array_equal(initializers(model)["shared"], init["shared"])  # quantized as a copy, never in place
    assert compare(model, q) >= 0.99


def test_min_max_ranges_bin_nothing_and_give_the_same_model(tmp_path, monkeypatch):
    """method=minmax (every tensor), and a SiLU output under any method, get min/max-only statistics:
    the same model as from full histograms (which a ``cache`` keeps, for runs with other methods)."""
    import onnxcompress.passes.quantize_int8 as pass_module

    rng = np.random.default_rng(12)
    init = {**weights(rng, "a", 4, 3), **weights(rng, "b", 4, 4)}
    nodes = [conv("x", "c", "a"), helper.make_node("Sigmoid", ["c"], ["sg"]),
             helper.make_node("Mul", ["c", "sg"], ["silu"], name="silu_mul"), conv("silu", "y", "b")]
    model = make_model(nodes, X, ["y"], init)
    asked: list[tuple[list[str], list[str]]] = []
    real = pass_module.collect_statistics
    monkeypatch.setattr(pass_module, "collect_statistics", lambda m, names, *a, **k:
                        asked.append((list(names), sorted(k.get("minmax", [])))) or real(m, names, *a, **k))
    for method in ("mse", "minmax"):
        q, _ = quantize(model, f"quantize_int8:method={method}")
        names, lean = asked[-1]
        assert lean == (sorted(names) if method == "minmax" else ["silu"])
        full, _ = quantize(model, f"quantize_int8:method={method}:cache={tmp_path / method}.npz")
        assert asked[-1][1] == [] and full.SerializeToString() == q.SerializeToString()


def test_silu_output_keeps_its_full_range_whatever_the_method():
    """Conv -> SiLU (Sigmoid, Mul) -> Conv: the Mul output's scale is the min/max one under mse too."""
    rng = np.random.default_rng(12)
    init = {**weights(rng, "a", 4, 3), **weights(rng, "b", 4, 4)}
    nodes = [conv("x", "c", "a"), helper.make_node("Sigmoid", ["c"], ["sg"]),
             helper.make_node("Mul", ["c", "sg"], ["silu"], name="silu_mul"), conv("silu", "y", "b")]
    model = make_model(nodes, X, ["y"], init)
    plan = placement.plan_placement(serde.to_graph(model), QuantConfig(), PassResult())
    assert plan.unclipped == {"silu"}
    scales = {}
    for method in ("mse", "minmax", "percentile"):
        q, result = quantize(model, f"quantize_int8:method={method}")
        assert result.stats["quantized_Mul"] == 1
        scales[method] = float(qdq_params(q, "silu")[1])
        assert compare(model, q) >= 0.99
    assert scales["mse"] == scales["minmax"] == scales["percentile"]
    c_mse, c_minmax = (float(qdq_params(quantize(model, f"quantize_int8:method={m}")[0], "c")[1])
                       for m in ("mse", "minmax"))
    assert c_mse != c_minmax  # other tensors still follow the method


def _saturating_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv -> SiLU -> Conv (y); Conv -> Sigmoid (p, a score); Conv -> Sigmoid and Add (q): wide logits."""
    init = {**weights(rng, "a", 4, 3), **weights(rng, "b", 4, 4), **weights(rng, "s", 4, 3), **weights(rng, "t", 4, 3)}
    for k in ("a_W", "s_W", "t_W"):
        init[k] = init[k] * 40  # conv outputs reach about -100 .. 100
    nodes = [conv("x", "c", "a"), helper.make_node("Sigmoid", ["c"], ["sg"]),
             helper.make_node("Mul", ["c", "sg"], ["silu"], name="silu_mul"), conv("silu", "y", "b"),
             conv("x", "d", "s"), helper.make_node("Sigmoid", ["d"], ["p"]),
             conv("x", "e", "t"), helper.make_node("Sigmoid", ["e"], ["se"]),
             helper.make_node("Add", ["e", "se"], ["q"], name="add_e")]
    return make_model(nodes, X, ["y", "p", "q"], init)


def test_inputs_of_saturating_activations_are_clamped(monkeypatch):
    """Rule 14: read only by a SiLU -> clamped below at -8; only by a Sigmoid -> [-8, 8]; another
    reader (the Add) -> not clamped. The clamp buys resolution where the activation is not flat."""
    model = _saturating_model(np.random.default_rng(13))
    plan = placement.plan_placement(serde.to_graph(model), QuantConfig(), PassResult())
    s = placement.SATURATION
    assert plan.bounds["c"] == (-s, np.inf) and plan.bounds["d"] == (-s, s) and "e" not in plan.bounds
    q, _ = quantize(model)
    monkeypatch.setattr(placement, "SATURATION", np.inf)
    unclamped, _ = quantize(model)
    assert float(qdq_params(q, "c")[1]) < 0.7 * float(qdq_params(unclamped, "c")[1])
    assert float(qdq_params(q, "d")[1]) < 0.7 * float(qdq_params(unclamped, "d")[1])
    feeds = feeds_for(model, 16)
    ref, new, old = ort_run(model, feeds), ort_run(q, feeds), ort_run(unclamped, feeds)

    def sqnr(r, c):
        return 10 * np.log10((r ** 2).sum() / ((r - c) ** 2).sum())

    assert sqnr(ref[1], new[1]) > sqnr(ref[1], old[1]) + 3  # the score p (its own 1/255 grid limits the gain)
    assert sqnr(ref[0], new[0]) > sqnr(ref[0], old[0])  # y, after the SiLU: its own Q/DQ dominates



@pytest.mark.parametrize("spec", ["quantize_int8", "quantize_int8:dynamic=true"])
def test_fused_attention_declined_by_name(spec):
    """onnxruntime's fused ops carry a third of a BERT's weights: leaving them float is said, per node."""
    model = serde.load_model("models/text_ortfused.onnx")
    _, result = quantize(model, spec, calib=open_source("models/text_calib.npz", model, limit=8))
    declined = {(d.where, d.detail) for d in result.declined if d.code == placement.R_OP}
    assert ("Attention_0", "com.microsoft.Attention") in declined
    assert ("EmbedLayerNormalization_0", "com.microsoft.EmbedLayerNormalization") in declined
