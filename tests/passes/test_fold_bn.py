"""Tests of the fold_bn pass: structure, full checker, ORT numerics against the original, flags/stats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnxcompress.core import serde
from onnxcompress.core.pass_api import BN_GAMMA, Numerics, PassContext, PassResult
from onnxcompress.passes.fold_bn import DECLINE_REASONS, FoldBn
from onnxcompress.pipeline.manager import get_pass
from tests.helpers.builders import make_model
from tests.helpers.graphs import initializers, op_types
from tests.helpers.runs import ort_run, run_passes
from tests.helpers.tensors import rand, random_feeds

Shape = Sequence[Any] | None


# ---------------------------------------------------------------- builders


def bn_params(rng: np.random.Generator, prefix: str, c: int) -> dict[str, np.ndarray]:
    """Non-trivial BN statistics: gamma of both signs away from 1, mean != 0, var in [0.5, 2]."""
    return {
        f"{prefix}_g": (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(np.float32),
        f"{prefix}_b": rng.normal(0.0, 1.0, c).astype(np.float32),
        f"{prefix}_m": rng.normal(0.5, 1.0, c).astype(np.float32),
        f"{prefix}_v": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def bn_node(x: str, y: str, prefix: str, **attrs: Any) -> onnx.NodeProto:
    attrs.setdefault("epsilon", 1e-3)
    ins = [x] + [f"{prefix}_{k}" for k in "gbmv"]
    return helper.make_node("BatchNormalization", ins, [y], name=prefix, **attrs)


def fold(model: onnx.ModelProto, dims: Sequence[int] = (2,), ctx: PassContext | None = None,
         numerics: bool = True) -> tuple[onnx.ModelProto, PassResult]:
    """Run fold_bn via the PassManager; check the result and compare it with the original in ORT."""
    new, records = run_passes(model, "fold_bn", ctx)
    onnx.checker.check_model(new, full_check=True)
    assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]
    for dim in dims if numerics else ():
        feeds = random_feeds(model, seed=dim, dim=dim)
        for want, got in zip(ort_run(model, feeds), ort_run(new, feeds), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    result = records[0].result
    assert all(d.code in DECLINE_REASONS for d in result.declined)
    return new, result


def signature(model: onnx.ModelProto) -> tuple:
    """What a pass may change: nodes, initializer values, outputs."""
    nodes = [(n.op_type, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
             for n in model.graph.node]
    inits = {i.name: numpy_helper.to_array(i).tobytes() for i in model.graph.initializer}
    return nodes, inits, [o.name for o in model.graph.output]


def assert_declined(model: onnx.ModelProto, reason: str, where: str | None = None,
                    numerics: bool = True) -> PassResult:
    """The pass leaves ``model`` alone and says ``reason`` (for ``where``)."""
    new, result = fold(model, numerics=numerics)
    assert not result.modified and result.stats["folded"] == 0
    assert signature(new) == signature(model)
    assert reason in [d.code for d in result.declined], result.declined
    if where is not None:
        assert (where, reason) in result.where_codes()
    return result


def conv_bn_model(rng: np.random.Generator, x_shape: Sequence[Any], w_shape: Sequence[int], *,
                  op: str = "Conv", bias: bool = True, **conv_attrs: Any) -> onnx.ModelProto:
    """``x -> op(W, b) -> c -> BN -> y`` with BN over the op's output channels."""
    cout = w_shape[0] if op == "Conv" else w_shape[1] * conv_attrs.get("group", 1)
    inits = {"W": rand(rng, *w_shape, scale=0.5)} | ({"B": rand(rng, cout, scale=0.5)} if bias else {}) | bn_params(rng, "bn", cout)
    conv = helper.make_node(op, ["x", "W"] + (["B"] if bias else []), ["c"], name="conv", **conv_attrs)
    return make_model([conv, bn_node("c", "y", "bn")], {"x": x_shape}, ["y"], inits)


# ---------------------------------------------------------------- registry / contract


def test_registered_and_documented() -> None:
    cls = get_pass("fold_bn")
    assert cls is FoldBn and cls.numerics == Numerics.EXACT
    assert cls.summary().startswith("Fold") and len(cls.summary()) < 120
    for word in ("Before:", "After:", "Fires", "Declines"):
        assert word in cls.__doc__


# ---------------------------------------------------------------- BN after Conv-like ops


@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn(bias: bool) -> None:
    rng = np.random.default_rng(1)
    model = conv_bn_model(rng, [2, 3, 8, 8], [4, 3, 3, 3], bias=bias, pads=[1, 1, 1, 1])
    ctx = PassContext()
    new, result = fold(model, ctx=ctx)
    assert op_types(new) == ["Conv"]
    node = new.graph.node[0]
    assert list(node.output) == ["y"] and list(node.input) == ["x", "conv_W_folded", "conv_B_folded"]
    assert sorted(initializers(new)) == ["conv_B_folded", "conv_W_folded"]
    assert result.modified and result.stats == {"bn_folded": 1, "folded": 1} and not result.declined
    np.testing.assert_array_equal(ctx.get(BN_GAMMA)["y"], initializers(model)["bn_g"].astype(np.float64))


@pytest.mark.parametrize("cin, cout, group", [(4, 6, 2), (4, 8, 4), (6, 6, 6)],
                         ids=["group2", "depthwise_x2", "depthwise"])
def test_grouped_conv_bn(cin: int, cout: int, group: int) -> None:
    rng = np.random.default_rng(2)
    model = conv_bn_model(rng, [2, cin, 7, 7], [cout, cin // group, 3, 3], group=group, strides=[2, 2])
    new, result = fold(model)
    assert op_types(new) == ["Conv"] and result.stats["bn_folded"] == 1


@pytest.mark.parametrize("spatial", [1, 3])
def test_conv_nd_bn(spatial: int) -> None:
    rng = np.random.default_rng(3)
    model = conv_bn_model(rng, [2, 3] + [6] * spatial, [5, 3] + [3] * spatial, bias=spatial == 1)
    new, _ = fold(model)
    assert op_types(new) == ["Conv"]


@pytest.mark.parametrize("group, stride, bias", [(1, 1, True), (2, 2, False), (2, 2, True)])
def test_conv_transpose_bn(group: int, stride: int, bias: bool) -> None:
    rng = np.random.default_rng(4)
    model = conv_bn_model(rng, [2, 4, 5, 5], [4, 3, 3, 3], op="ConvTranspose", bias=bias, group=group,
                          strides=[stride, stride], output_padding=[stride - 1, stride - 1])
    new, result = fold(model)
    assert op_types(new) == ["ConvTranspose"] and result.stats["bn_folded"] == 1
    assert initializers(new)["conv_W_folded"].shape == (4, 3, 3, 3)


@pytest.mark.parametrize("c_shape", [None, (), (4,), (1, 4), (5, 1), (5, 4)], ids=str)
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn(trans_b: int, c_shape: tuple | None) -> None:
    rng = np.random.default_rng(5)
    inits = {"B": rand(rng, *((4, 6) if trans_b else (6, 4)), scale=0.5)} | bn_params(rng, "bn", 4)
    ins = ["x", "B"]
    if c_shape is not None:
        inits["C"] = rand(rng, *c_shape, scale=0.5) if c_shape else np.float32(0.7)
        ins.append("C")
    gemm = helper.make_node("Gemm", ins, ["c"], name="fc", alpha=0.7, beta=1.3, transB=trans_b, transA=1)
    model = make_model([gemm, bn_node("c", "y", "bn")], {"x": [6, 5]}, ["y"], inits)
    new, _ = fold(model)
    assert op_types(new) == ["Gemm"]
    attrs = {a.name: helper.get_attribute_value(a) for a in new.graph.node[0].attribute}
    assert attrs["beta"] == 1.0 and attrs["alpha"] == pytest.approx(0.7) and attrs["transA"] == 1


@pytest.mark.parametrize("relu", [False, True], ids=["input_shape_known", "rank_from_inference"])
def test_matmul_bn_becomes_gemm(relu: bool) -> None:
    rng = np.random.default_rng(6)
    inits = {"B": rand(rng, 6, 4, scale=0.5)} | bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Relu", ["x"], ["r"])] if relu else []
    nodes += [helper.make_node("MatMul", ["r" if relu else "x", "B"], ["c"], name="mm"), bn_node("c", "y", "bn")]
    model = make_model(nodes, {"x": ["N", 6]}, ["y"], inits)
    new, result = fold(model, dims=(1, 3))
    assert op_types(new) == (["Relu"] if relu else []) + ["Gemm"]
    assert result.stats["matmul_to_gemm"] == 1 and result.stats["bn_folded"] == 1


# ---------------------------------------------------------------- Mul / Add / Sub / Div


def conv_then(rng: np.random.Generator, steps: list[tuple[str, Any, bool]], spatial: int = 2) -> onnx.ModelProto:
    """``x -> Conv -> step ... -> y``; a step is (op, constant, conv side first)."""
    inits = {"W": rand(rng, 4, 3, *[3] * spatial, scale=0.5), "B": rand(rng, 4, scale=0.5)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["t0"], name="conv")]
    for i, (op, const, first) in enumerate(steps):
        inits[f"k{i}"] = np.asarray(const, dtype=np.float32)
        ins = [f"t{i}", f"k{i}"] if first else [f"k{i}", f"t{i}"]
        out = "y" if i == len(steps) - 1 else f"t{i + 1}"
        nodes.append(helper.make_node(op, ins, [out], name=f"{op.lower()}{i}"))
    return make_model(nodes, {"x": [2, 3] + [6] * spatial}, ["y"], inits)


AFFINE_CASES = {
    "mul_c11_add_1c11": [("Mul", "c11", True), ("Add", "1c11", False)],
    "mul_scalar_sub": [("Mul", "scalar", False), ("Sub", "c11", True)],
    "div_rsub": [("Div", "1c11", True), ("Sub", "c11", False)],
    "mul_1_add_1111": [("Mul", "one", True), ("Add", "1111", True)],
}


def const_of(rng: np.random.Generator, kind: str) -> np.ndarray:
    shapes = {"c11": (4, 1, 1), "1c11": (1, 4, 1, 1), "scalar": (), "one": (1,), "1111": (1, 1, 1, 1)}
    return rng.uniform(0.5, 2.0, shapes[kind]) * rng.choice([-1.0, 1.0], shapes[kind])


@pytest.mark.parametrize("case", sorted(AFFINE_CASES))
def test_conv_elementwise_fold(case: str) -> None:
    rng = np.random.default_rng(7)
    model = conv_then(rng, [(op, const_of(rng, kind), first) for op, kind, first in AFFINE_CASES[case]])
    new, result = fold(model)
    assert op_types(new) == ["Conv"] and list(new.graph.node[0].output) == ["y"]
    assert result.stats == {"elementwise_folded": 2, "folded": 2}


def test_conv1d_channel_column_folds() -> None:
    rng = np.random.default_rng(8)
    model = conv_then(rng, [("Mul", rand(rng, 4, 1, scale=0.5), True)], spatial=1)
    new, _ = fold(model)
    assert op_types(new) == ["Conv"]


def test_chain_conv_bn_mul_add_collapses() -> None:
    rng = np.random.default_rng(9)
    inits = {"W": rand(rng, 4, 3, 3, 3, scale=0.5), "s": rand(rng, 1, 4, 1, 1, scale=0.5) + 1,
             "t": rand(rng, 4, 1, 1, scale=0.5)}
    inits |= bn_params(rng, "bn", 4)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "b", "bn"),
        helper.make_node("Mul", ["b", "s"], ["m"], name="mul"),
        helper.make_node("Add", ["t", "m"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["y"], name="relu"),
    ]
    model = make_model(nodes, {"x": [2, 3, 6, 6]}, ["y"], inits)
    new, result = fold(model)
    assert op_types(new) == ["Conv", "Relu"] and list(new.graph.node[0].output) == ["a"]
    assert result.stats["folded"] == 3 and sorted(initializers(new)) == ["conv_B_folded", "conv_W_folded"]


def test_two_conv_bn_pairs() -> None:
    rng = np.random.default_rng(10)
    inits = {"W1": rand(rng, 4, 3, 3, 3, scale=0.5), "W2": rand(rng, 5, 4, 1, 1, scale=0.5),
             "B2": rand(rng, 5, scale=0.5)}
    inits |= bn_params(rng, "bn1", 4) | bn_params(rng, "bn2", 5)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"),
        bn_node("c1", "b1", "bn1"),
        helper.make_node("Relu", ["b1"], ["r"]),
        helper.make_node("Conv", ["r", "W2", "B2"], ["c2"], name="conv2"),
        bn_node("c2", "y", "bn2"),
    ]
    model = make_model(nodes, {"x": [2, 3, 6, 6]}, ["y"], inits)
    new, result = fold(model)
    assert op_types(new) == ["Conv", "Relu", "Conv"] and result.stats["bn_folded"] == 2


# ---------------------------------------------------------------- BN before Conv


@pytest.mark.parametrize("cin, cout, group, bias, attrs", [
    (3, 4, 1, True, {}),
    (3, 4, 1, False, {"strides": [2, 2], "dilations": [2, 2], "auto_pad": "VALID"}),
    (4, 6, 2, True, {"pads": [0, 0, 0, 0]}),
    (4, 8, 4, False, {}),
], ids=["plain", "strided_valid", "group2", "depthwise"])
def test_bn_before_conv(cin: int, cout: int, group: int, bias: bool, attrs: dict) -> None:
    rng = np.random.default_rng(11)
    inits = {"W": rand(rng, cout, cin // group, 3, 3, scale=0.5)} | ({"B": rand(rng, cout, scale=0.5)} if bias else {})
    inits |= bn_params(rng, "bn", cin)
    nodes = [bn_node("x", "t", "bn"),
             helper.make_node("Conv", ["t", "W"] + (["B"] if bias else []), ["y"], name="conv", group=group, **attrs)]
    model = make_model(nodes, {"x": [2, cin, 9, 9]}, ["y"], inits)
    new, result = fold(model)
    assert op_types(new) == ["Conv"] and new.graph.node[0].input[0] == "x"
    assert result.stats == {"bn_folded_forward": 1, "folded": 1}


# ---------------------------------------------------------------- opsets, dynamic shapes


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 14, 15])
def test_bn_older_opsets(opset: int) -> None:
    rng = np.random.default_rng(12)
    attrs = {"momentum": 0.9} | ({"spatial": 1} if opset < 9 else {})
    inits = {"W": rand(rng, 4, 3, 3, 3, scale=0.5)} | bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", "bn", **attrs)]
    model = make_model(nodes, {"x": [2, 3, 6, 6]}, ["y"], inits, opset=opset)
    new, _ = fold(model)
    assert op_types(new) == ["Conv"] and new.opset_import[0].version == opset


def test_dynamic_batch_two_sizes() -> None:
    rng = np.random.default_rng(13)
    model = conv_bn_model(rng, ["N", 3, 8, 8], [4, 3, 3, 3], pads=[1, 1, 1, 1])
    new, _ = fold(model, dims=(1, 3))
    assert op_types(new) == ["Conv"]
    assert new.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


# ---------------------------------------------------------------- declines


def test_decline_bn_params_not_constant() -> None:
    rng = np.random.default_rng(20)
    inits = {"W": rand(rng, 4, 3, 3, 3, scale=0.5)} | {k: v for k, v in bn_params(rng, "bn", 4).items() if k[-1] in "mv"}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", "bn")]
    model = make_model(nodes, {"x": [2, 3, 6, 6], "bn_g": [4], "bn_b": [4]}, ["y"], inits)
    assert_declined(model, "bn_params_not_constant", "bn")


def test_decline_conv_output_other_consumer() -> None:
    rng = np.random.default_rng(21)
    inits = {"W": rand(rng, 4, 3, 3, 3, scale=0.5)} | bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", "bn"),
             helper.make_node("Relu", ["c"], ["z"])]
    model = make_model(nodes, {"x": [2, 3, 6, 6]}, ["y", "z"], inits)
    assert_declined(model, "conv_output_has_other_consumers", "bn")


def test_decline_conv_output_is_graph_output() -> None:
    rng = np.random.default_rng(22)
    inits = {"W": rand(rng, 4, 3, 3, 3, scale=0.5)} | bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", "bn")]
    model = make_model(nodes, {"x": [2, 3, 6, 6]}, ["c", "y"], inits)
    assert_declined(model, "conv_output_is_graph_output", "bn")


@pytest.mark.parametrize("attrs", [{"pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"}], ids=["pads", "same"])
def test_decline_bn_before_padded_conv(attrs: dict) -> None:
    rng = np.random.default_rng(23)
    inits = {"W": rand(rng, 4, 3, 3, 3, scale=0.5)} | bn_params(rng, "bn", 3)
    nodes = [bn_node("x", "t", "bn"), helper.make_node("Conv", ["t", "W"], ["y"], name="conv", **attrs)]
    model = make_model(nodes, {"x": [2, 3, 6, 6]}, ["y"], inits)
    assert_declined(model, "bn_before_padded_conv", "bn")


def test_decline_bn_before_conv_output_is_graph_output() -> None:
    rng = np.random.default_rng(24)
    inits = {"W": rand(rng, 4, 3, 1, 1, scale=0.5)} | bn_params(rng, "bn", 3)
    nodes = [bn_node("x", "t", "bn"), helper.make_node("Conv", ["t", "W"], ["y"], name="conv")]
    model = make_model(nodes, {"x": [2, 3, 6, 6]}, ["t", "y"], inits)
    assert_declined(model, "bn_output_is_graph_output", "bn")


@pytest.mark.parametrize("shape, spatial", [((1, 1, 1, 4), 2), ((1, 1, 4, 1), 2), ((4,), 1), ((1, 1, 4, 1, 1), 2)],
                         ids=["last_axis", "height", "c_vector_on_length", "rank_grows"])
def test_decline_mul_broadcast_off_channel(shape: tuple, spatial: int) -> None:
    rng = np.random.default_rng(25)
    # conv_then's Conv outputs [2, 4, 4(, 4)]: C == 4 == every spatial size, so only the axis can tell
    model = conv_then(rng, [("Mul", rng.uniform(0.5, 2, shape), True)], spatial=spatial)
    assert_declined(model, "not_per_channel", "mul0")


@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_non_constant_operand_is_no_candidate(op: str) -> None:
    """A Mul/Add of a conv output by a computed tensor (a SiLU's ``x * sigmoid(x)``, a residual Add)
    does not match the pattern: left alone and not reported as a decline."""
    rng = np.random.default_rng(26)
    inits = {"W": rand(rng, 4, 3, 3, 3, scale=0.5)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
             helper.make_node(op, ["c", "s"], ["y"], name="mul")]
    model = make_model(nodes, {"x": [2, 3, 6, 6]}, ["y"], inits)
    new, result = fold(model)
    assert not result.modified and result.stats["folded"] == 0 and not result.declined
    assert signature(new) == signature(model)


def test_decline_constant_divided_by_conv() -> None:
    rng = np.random.default_rng(27)
    model = conv_then(rng, [("Div", np.float32(2.0), False)])
    assert_declined(model, "not_affine_in_conv_output", "div0")


def test_decline_bn_alone_on_graph_input() -> None:
    rng = np.random.default_rng(28)
    model = make_model([bn_node("x", "y", "bn")], {"x": [2, 3, 4, 4]}, ["y"], bn_params(rng, "bn", 3))
    assert_declined(model, "no_conv_to_fold_into", "bn")


def test_decline_conv_weight_not_constant() -> None:
    rng = np.random.default_rng(29)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", "bn")]
    model = make_model(nodes, {"x": [2, 3, 6, 6], "W": [4, 3, 3, 3]}, ["y"], bn_params(rng, "bn", 4))
    assert_declined(model, "weight_not_constant", "bn")


def test_decline_training_mode() -> None:
    rng = np.random.default_rng(30)
    inits = {"W": rand(rng, 4, 3, 3, 3, scale=0.5)} | bn_params(rng, "bn", 4)
    bn = helper.make_node("BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"], ["y", "rm", "rv"],
                          name="bn", training_mode=1)
    model = make_model([helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn],
                       {"x": [2, 3, 6, 6]}, ["y", "rm", "rv"], inits, opset=15)
    assert_declined(model, "bn_training_mode", "bn", numerics=False)


def test_decline_non_finite_scale() -> None:
    rng = np.random.default_rng(31)
    inits = {"W": rand(rng, 4, 3, 3, 3, scale=0.5)} | bn_params(rng, "bn", 4)
    inits["bn_v"] = np.array([1, 0, 1, 1], np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", "bn", epsilon=0.0)]
    model = make_model(nodes, {"x": [2, 3, 6, 6]}, ["y"], inits)
    assert_declined(model, "non_finite_scale", "bn", numerics=False)


def test_decline_matmul_3d_channel_axis_mismatch() -> None:
    rng = np.random.default_rng(32)
    inits = {"B": rand(rng, 6, 4, scale=0.5)} | bn_params(rng, "bn", 4)
    nodes = [helper.make_node("MatMul", ["x", "B"], ["c"], name="mm"), bn_node("c", "y", "bn")]
    model = make_model(nodes, {"x": [2, 4, 6]}, ["y"], inits)  # BN normalizes axis 1 (size 4), not N
    assert_declined(model, "unsupported_layout", "bn")


# ---------------------------------------------------------------- shared weights, naming


def shared_model(rng: np.random.Generator, second_bn: bool) -> onnx.ModelProto:
    inits = {"W": rand(rng, 4, 3, 3, 3, scale=0.5),
             "B": rand(rng, 4, scale=0.5)} | bn_params(rng, "bn1", 4) | bn_params(rng, "bn2", 4)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c1"], name="conv1"), bn_node("c1", "y1", "bn1"),
             helper.make_node("Conv", ["x", "W", "B"], ["c2" if second_bn else "y2"], name="conv2", pads=[1] * 4)]
    if second_bn:
        nodes.append(bn_node("c2", "y2", "bn2"))
    else:
        inits = {k: v for k, v in inits.items() if not k.startswith("bn2")}
    return make_model(nodes, {"x": [2, 3, 6, 6]}, ["y1", "y2"], inits)


def test_shared_weight_both_folded() -> None:
    model = shared_model(np.random.default_rng(40), second_bn=True)
    new, result = fold(model)
    assert op_types(new) == ["Conv", "Conv"] and result.stats["bn_folded"] == 2
    names = sorted(initializers(new))
    assert names == ["conv1_B_folded", "conv1_W_folded", "conv2_B_folded", "conv2_W_folded"]
    assert result.stats["shared_copied"] == 2  # W and B copied for conv1; conv2 then was their last user


def test_shared_weight_other_user_keeps_original() -> None:
    model = shared_model(np.random.default_rng(41), second_bn=False)
    new, _ = fold(model)
    after = initializers(new)
    assert sorted(after) == ["B", "W", "conv1_B_folded", "conv1_W_folded"]
    np.testing.assert_array_equal(after["W"], initializers(model)["W"])
    assert list(new.graph.node[1].input) == ["x", "W", "B"]  # numerics (in fold) prove conv2 unchanged


def test_initializers_never_edited_in_place() -> None:
    model = shared_model(np.random.default_rng(42), second_bn=True)
    graph = serde.to_graph(model)
    tensors = graph.tensors()
    before = {name: np.array(tensors[name].values, copy=True) for name in ("W", "B", "bn1_g", "bn2_v")}
    originals = {name: tensors[name] for name in before}
    result = FoldBn().run(graph, PassContext())
    assert result.modified
    for name, values in before.items():
        np.testing.assert_array_equal(originals[name].values, values)
    assert all(n.inputs[1] is not originals["W"] for n in graph.nodes)


def test_folded_names_are_uniquified() -> None:
    rng = np.random.default_rng(43)
    model = conv_bn_model(rng, [2, 3, 6, 6], [4, 3, 3, 3])
    taken = rand(rng, 4, 3, 3, 3, scale=0.5)
    extra = helper.make_node("Conv", ["x", "conv_W_folded"], ["z"], name="other")
    model = make_model([*model.graph.node, extra], {"x": [2, 3, 6, 6]}, ["y", "z"],
                       initializers(model) | {"conv_W_folded": taken})
    new, _ = fold(model)
    assert "conv_W_folded_1" in initializers(new)
    np.testing.assert_array_equal(initializers(new)["conv_W_folded"], taken)


def test_unnamed_nodes_use_output_names() -> None:
    rng = np.random.default_rng(44)
    model = conv_then(rng, [("Mul", const_of(rng, "c11"), True), ("Add", const_of(rng, "c11"), True)])
    for node in model.graph.node:
        node.name = ""
    new, result = fold(model)
    assert sorted(initializers(new)) == ["t0_B_folded", "t0_W_folded"]  # one name per chain, not one per fold
    assert result.stats["folded"] == 2


# ---------------------------------------------------------------- determinism, idempotence


def test_deterministic_and_idempotent() -> None:
    rng = np.random.default_rng(50)
    model = shared_model(rng, second_bn=True)
    first, _ = run_passes(model, "fold_bn")
    second, _ = run_passes(model, "fold_bn")
    assert first.SerializeToString() == second.SerializeToString()
    again, records = run_passes(first, "fold_bn")
    assert not records[0].result.modified and signature(again) == signature(first)


# ---------------------------------------------------------------- property test


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(["Conv", "ConvTranspose", "BN->Conv"]), spatial=st.integers(1, 2),
       group=st.integers(1, 3), cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), bias=st.booleans(),
       stride=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_random_conv_configs(op: str, spatial: int, group: int, cin_g: int, cout_g: int, bias: bool,
                             stride: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cin, cout = cin_g * group, cout_g * group
    w_shape = [cout, cin_g] if op != "ConvTranspose" else [cin, cout_g]
    inits = {"W": rand(rng, *w_shape, *[3] * spatial, scale=0.5)} | ({"B": rand(rng, cout, scale=0.5)} if bias else {})
    conv_op = "Conv" if op == "BN->Conv" else op
    conv_in = "t" if op == "BN->Conv" else "x"
    conv = helper.make_node(conv_op, [conv_in, "W"] + (["B"] if bias else []), ["c" if conv_in == "x" else "y"],
                            group=group, strides=[stride] * spatial)
    if op == "BN->Conv":
        nodes, inits = [bn_node("x", "t", "bn"), conv], inits | bn_params(rng, "bn", cin)
    else:
        nodes, inits = [conv, bn_node("c", "y", "bn")], inits | bn_params(rng, "bn", cout)
    model = make_model(nodes, {"x": [2, cin] + [7] * spatial}, ["y"], inits)
    new, result = fold(model)
    assert op_types(new) == [conv_op] and result.stats["folded"] == 1
