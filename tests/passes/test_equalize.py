"""Tests of the equalize pass (cross-layer equalization): structure, ORT numerics, declines, ranges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcompress.core import serde
from onnxcompress.core.pass_api import Numerics, PassContext, PassResult
from onnxcompress.passes import equalize as equalize_module
from onnxcompress.passes.equalize import DECLINE_REASONS, Equalize
from onnxcompress.pipeline.manager import get_pass, parse_spec
from onnxcompress.pruning.handlers import HANDLERS
from onnxcompress.pruning.handlers_channelwise import _unary
from onnxcompress.pruning.handlers_common import _frozen
from onnxcompress.pruning.types import R_LAST_AXIS, R_NO_HANDLER, R_NONCONST, R_UNKNOWN_DIM, R_UNSUPPORTED
from tests.helpers.builders import make_model
from tests.helpers.graphs import initializers, op_types
from tests.helpers.runs import ort_run, run_passes
from tests.helpers.tensors import random_feeds

MODELS = Path(__file__).resolve().parents[2] / "models"

# ---------------------------------------------------------------- builders


def spread_weight(rng: np.random.Generator, *shape: int, axis: int = 0) -> np.ndarray:
    """Random weights whose slices along ``axis`` have ranges spread over ~3 decades."""
    w = rng.standard_normal(shape)
    scale = np.exp(rng.uniform(-3.5, 3.5, shape[axis]))
    bshape = [1] * len(shape)
    bshape[axis] = -1
    return (w * scale.reshape(bshape)).astype(np.float32)


def conv(x: str, w: str, y: str, b: str | None = None, **attrs: Any) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=y, **attrs)


def chain_model(rng: np.random.Generator, mid: list[onnx.NodeProto] | None = None, *, x_shape=None,
                c: int = 6, outputs: tuple[str, ...] = ("y",), extra: dict | None = None,
                c2: int | None = None, tail: list[onnx.NodeProto] = ()) -> onnx.ModelProto:
    """``x -> Conv1(W1, B1) -> t0 -> mid... -> tN -> Conv2(W2, B2) -> y`` (mid defaults to Relu)."""
    mid = [helper.make_node("Relu", ["t0"], ["t1"], name="relu")] if mid is None else mid
    last = mid[-1].output[0] if mid else "t0"
    inits = {"W1": spread_weight(rng, c, 3, 3, 3), "B1": rng.standard_normal(c),
             "W2": spread_weight(rng, 5, c2 or c, 3, 3, axis=1), "B2": rng.standard_normal(5)} | (extra or {})
    nodes = [conv("x", "W1", "t0", "B1", pads=[1, 1, 1, 1]), *mid, conv(last, "W2", "y", "B2"), *tail]
    return make_model(nodes, {"x": x_shape or [2, 3, 8, 8]}, list(outputs), inits)


def node_weights(model: onnx.ModelProto, node_name: str) -> list[np.ndarray]:
    inits = initializers(model)
    node = next(n for n in model.graph.node if n.name == node_name)
    return [inits[i] for i in node.input[1:] if i in inits]


def equalize(model: onnx.ModelProto, spec: str = "equalize", dims=(2,), rtol: float = 1e-5,
             ctx: PassContext | None = None) -> tuple[onnx.ModelProto, PassResult]:
    """Run ``spec`` (equalize last); check the model and compare with the original in ORT."""
    new, records = run_passes(model, spec, ctx)
    onnx.checker.check_model(new, full_check=True)
    assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]
    for dim in dims:
        feeds = random_feeds(model, seed=dim, dim=dim)
        for want, got in zip(ort_run(model, feeds), ort_run(new, feeds), strict=True):
            assert np.linalg.norm(got - want) <= rtol * np.linalg.norm(want), np.linalg.norm(got - want)
    result = records[-1].result
    assert all(d.code in DECLINE_REASONS for d in result.declined), result.declined
    return new, result


def assert_declined(model: onnx.ModelProto, reason: str, spec: str = "equalize") -> PassResult:
    new, result = equalize(model, spec)
    assert not result.modified and result.stats["groups"] == 0, result.stats
    assert initializers(new).keys() == initializers(model).keys()
    for k, v in initializers(model).items():
        np.testing.assert_array_equal(initializers(new)[k], v)
    assert reason in [d.code for d in result.declined], result.declined
    return result


def out_ranges(w: np.ndarray, axis: int = 0) -> np.ndarray:
    w = np.moveaxis(np.abs(w), axis, 0)
    return w.reshape(w.shape[0], -1).max(axis=1)


def in_ranges(w: np.ndarray, axis: int = 1) -> np.ndarray:
    return out_ranges(w, axis)


# ---------------------------------------------------------------- contract


def test_registered_and_documented() -> None:
    cls = get_pass("equalize")
    assert cls is Equalize and cls.numerics == Numerics.EXACT
    for word in ("Before:", "After:", "Math", "Fires", "Declines", "Numerics"):
        assert word in cls.__doc__
    assert parse_spec("equalize:relu6_as_relu=true")[0].effective_numerics() == Numerics.APPROX


# ---------------------------------------------------------------- positive cases


def test_chain_ranges_equalized() -> None:
    rng = np.random.default_rng(0)
    model = chain_model(rng)
    new, result = equalize(model)
    assert result.modified and result.stats["groups"] == 1 and result.stats["layers"] == 2
    assert op_types(new) == ["Conv", "Relu", "Conv"]
    (w1, b1), (w2, _) = node_weights(model, "t0"), node_weights(model, "y")
    (v1, c1), (v2, _) = node_weights(new, "t0"), node_weights(new, "y")
    want = np.sqrt(out_ranges(w1) * in_ranges(w2))
    np.testing.assert_allclose(out_ranges(v1), want, rtol=1e-5)
    np.testing.assert_allclose(in_ranges(v2), want, rtol=1e-5)
    s = np.sqrt(out_ranges(w1) / in_ranges(w2))
    np.testing.assert_allclose(c1, b1 / s, rtol=1e-5)
    assert result.stats["spread_max_after"] < result.stats["spread_max_before"]


def test_depthwise_chain_converges() -> None:
    """conv 1x1 -> Relu -> depthwise 3x3 -> Relu -> conv 1x1: the dw conv is rescaled on both sides."""
    rng = np.random.default_rng(1)
    c = 8
    inits = {"W1": spread_weight(rng, c, 3, 1, 1), "B1": rng.standard_normal(c),
             "Wd": spread_weight(rng, c, 1, 3, 3), "Bd": rng.standard_normal(c),
             "W2": spread_weight(rng, 4, c, 1, 1, axis=1)}
    nodes = [conv("x", "W1", "a", "B1"), helper.make_node("Relu", ["a"], ["ra"]),
             conv("ra", "Wd", "d", "Bd", group=c, pads=[1, 1, 1, 1]), helper.make_node("Relu", ["d"], ["rd"]),
             conv("rd", "W2", "y")]
    model = make_model(nodes, {"x": [2, 3, 6, 6]}, ["y"], inits)
    new, result = equalize(model)
    assert result.stats["groups"] == 2 and result.stats["layers"] == 3 and result.stats["sweeps"] > 1
    (v1, _), (vd, _), (v2,) = node_weights(new, "a"), node_weights(new, "d"), node_weights(new, "y")
    np.testing.assert_allclose(out_ranges(v1), out_ranges(vd), rtol=0.05)  # dw in-range == its out-range
    np.testing.assert_allclose(out_ranges(vd), in_ranges(v2), rtol=0.05)


@pytest.mark.parametrize("trans_b1, trans_b2, second", [(1, 0, "Gemm"), (0, 1, "Gemm"), (1, 0, "MatMul")])
def test_gemm_pair(trans_b1: int, trans_b2: int, second: str) -> None:
    rng = np.random.default_rng(2)
    b1 = spread_weight(rng, 7, 5, axis=0) if trans_b1 else spread_weight(rng, 5, 7, axis=1)
    b2 = spread_weight(rng, 4, 7, axis=1) if trans_b2 else spread_weight(rng, 7, 4, axis=0)
    inits = {"B1": b1, "C1": rng.standard_normal((1, 7)), "B2": b2}
    nodes = [helper.make_node("Gemm", ["x", "B1", "C1"], ["h"], name="fc1", transB=trans_b1, alpha=0.5, beta=2.0),
             helper.make_node("Relu", ["h"], ["r"])]
    if second == "Gemm":
        nodes.append(helper.make_node("Gemm", ["r", "B2"], ["y"], name="fc2", transB=trans_b2))
    else:
        nodes.append(helper.make_node("MatMul", ["r", "B2"], ["y"], name="fc2"))
    model = make_model(nodes, {"x": ["N", 5]}, ["y"], inits)
    new, result = equalize(model, dims=(1, 3))
    assert result.stats["groups"] == 1 and initializers(new)["C1"].shape == (1, 7)
    v1, v2 = node_weights(new, "fc1")[0], node_weights(new, "fc2")[0]
    np.testing.assert_allclose(out_ranges(v1, 0 if trans_b1 else 1), in_ranges(v2, 1 if trans_b2 else 0),
                               rtol=1e-5)


def test_matmul_chain_3d() -> None:
    """Transformer-style MatMul -> Relu -> MatMul on [N, T, K] (channel axis last)."""
    rng = np.random.default_rng(3)
    inits = {"B1": spread_weight(rng, 6, 8, axis=1), "B2": spread_weight(rng, 8, 6, axis=0)}
    nodes = [helper.make_node("MatMul", ["x", "B1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "B2"], ["y"], name="mm2")]
    model = make_model(nodes, {"x": ["N", 3, 6]}, ["y"], inits)
    _, result = equalize(model, dims=(1, 2))
    assert result.stats["groups"] == 1


@pytest.mark.parametrize("case", ["leaky", "prelu", "maxpool_pad", "avgpool", "clip_min0", "identity"])
def test_commuting_ops_between(case: str) -> None:
    rng = np.random.default_rng(4)
    extra: dict[str, np.ndarray] = {}
    if case == "leaky":
        mid = [helper.make_node("LeakyRelu", ["t0"], ["t1"], alpha=0.1)]
    elif case == "prelu":
        mid = [helper.make_node("PRelu", ["t0", "slope"], ["t1"])]
        extra["slope"] = rng.uniform(0.05, 0.3, (6, 1, 1))
    elif case == "maxpool_pad":
        mid = [helper.make_node("Relu", ["t0"], ["r"]),
               helper.make_node("Pad", ["r", "pads"], ["p"], mode="constant"),
               helper.make_node("MaxPool", ["p"], ["t1"], kernel_shape=[2, 2], strides=[2, 2])]
        extra["pads"] = np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)
    elif case == "avgpool":
        mid = [helper.make_node("AveragePool", ["t0"], ["t1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    elif case == "clip_min0":
        mid = [helper.make_node("Clip", ["t0", "zero"], ["t1"])]
        extra["zero"] = np.array(0.0, dtype=np.float32)
    else:
        mid = [helper.make_node("Identity", ["t0"], ["t1"])]
    _, result = equalize(chain_model(rng, mid, extra=extra))
    assert result.stats["groups"] == 1, result.declined


@pytest.mark.parametrize("batch", [2, "N"])
def test_flatten_into_gemm_dynamic_batch(batch) -> None:
    """Conv -> Relu -> MaxPool -> Flatten -> Gemm: channel c covers H*W consecutive Gemm inputs."""
    rng = np.random.default_rng(5)
    inits = {"W1": spread_weight(rng, 4, 3, 3, 3), "B1": rng.standard_normal(4),
             "G": spread_weight(rng, 3, 4 * 9, axis=1), "C": rng.standard_normal(3)}
    nodes = [conv("x", "W1", "c", "B1"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "G", "C"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, {"x": [batch, 3, 8, 8]}, ["y"], inits)
    new, result = equalize(model, dims=(1, 3))
    assert result.stats["groups"] == 1
    g = node_weights(new, "fc")[0].reshape(3, 4, 9)
    np.testing.assert_allclose(out_ranges(node_weights(new, "c")[0]), in_ranges(g), rtol=1e-5)


def test_concat_and_split() -> None:
    """Two convs concatenated, read by one conv; a conv split into two convs."""
    rng = np.random.default_rng(6)
    inits = {"Wa": spread_weight(rng, 3, 3, 3, 3), "Wb": spread_weight(rng, 5, 3, 3, 3),
             "Wc": spread_weight(rng, 6, 8, 1, 1, axis=1), "Wd": spread_weight(rng, 2, 2, 1, 1, axis=1),
             "We": spread_weight(rng, 3, 4, 1, 1, axis=1), "split": np.array([2, 4], dtype=np.int64)}
    nodes = [conv("x", "Wa", "a"), conv("x", "Wb", "b"), helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Concat", ["a", "rb"], ["cat"], axis=1), conv("cat", "Wc", "c"),
             helper.make_node("Split", ["c", "split"], ["s1", "s2"], axis=1),
             conv("s1", "Wd", "y1"), conv("s2", "We", "y2")]
    model = make_model(nodes, {"x": ["N", 3, 6, 6]}, ["y1", "y2"], inits)
    new, result = equalize(model, dims=(1, 2))
    assert result.stats["groups"] == 3 and not result.declined[2:], result.declined
    wc = node_weights(new, "c")[0]
    np.testing.assert_allclose(out_ranges(node_weights(new, "a")[0]), in_ranges(wc)[:3], rtol=0.03)


def test_branches_that_all_absorb() -> None:
    """A tensor read by two convs is fine: the scale goes into both, r2 is the max over both."""
    rng = np.random.default_rng(7)
    inits = {"W1": spread_weight(rng, 6, 3, 3, 3), "W2": spread_weight(rng, 4, 6, 1, 1, axis=1),
             "W3": spread_weight(rng, 2, 6, 3, 3, axis=1)}
    nodes = [conv("x", "W1", "a"), helper.make_node("Relu", ["a"], ["r"]), conv("r", "W2", "y1"),
             conv("r", "W3", "y2")]
    model = make_model(nodes, {"x": [2, 3, 6, 6]}, ["y1", "y2"], inits)
    new, result = equalize(model)
    assert result.stats["groups"] == 1 and result.stats["layers"] == 3
    r2 = np.maximum(in_ranges(node_weights(new, "y1")[0]), in_ranges(node_weights(new, "y2")[0]))
    np.testing.assert_allclose(out_ranges(node_weights(new, "a")[0]), r2, rtol=1e-5)


def test_relu6_as_relu_is_approx() -> None:
    rng = np.random.default_rng(8)
    mid = [helper.make_node("Clip", ["t0", "lo", "hi"], ["t1"], name="relu6")]
    model = chain_model(rng, mid, extra={"lo": np.array(0.0), "hi": np.array(6.0)})
    assert_declined(model, "clip_not_equivariant")
    new, records = run_passes(model, "equalize:relu6_as_relu=true")
    result = records[0].result
    assert result.stats["clip_to_relu"] == 1 and op_types(new) == ["Conv", "Relu", "Conv"]
    assert records[0].numerics == Numerics.APPROX
    onnx.checker.check_model(new, full_check=True)
    # Equal to the original with the Clip replaced by Relu.
    relu = onnx.ModelProto()
    relu.CopyFrom(model)
    relu.graph.node[1].CopyFrom(helper.make_node("Relu", ["t0"], ["t1"]))
    feeds = random_feeds(model)
    np.testing.assert_allclose(ort_run(new, feeds)[0], ort_run(relu, feeds)[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- negative cases


def test_residual_add_declines() -> None:
    rng = np.random.default_rng(9)
    inits = {"W1": spread_weight(rng, 4, 4, 3, 3), "W2": spread_weight(rng, 4, 4, 3, 3),
             "W3": spread_weight(rng, 2, 4, 1, 1)}
    nodes = [conv("x", "W1", "a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
             conv("r", "W2", "b", pads=[1, 1, 1, 1]), helper.make_node("Add", ["r", "b"], ["s"]),
             conv("s", "W3", "y")]
    model = make_model(nodes, {"x": [1, 4, 6, 6]}, ["y"], inits)
    result = assert_declined(model, "residual_add")
    assert len(result.declined) == 3  # a and b reach the Add; y is a graph output


def test_shared_weight_is_copied() -> None:
    """W1 is also used by another conv: equalize writes a copy and the other user keeps W1."""
    rng = np.random.default_rng(10)
    model = chain_model(rng, tail=[conv("x", "W1", "z", pads=[1, 1, 1, 1])], outputs=("y", "z"))
    w1 = initializers(model)["W1"].copy()
    graph = serde.to_graph(model)
    shared = graph.tensors()["W1"]
    before = shared.values.copy()
    Equalize().run(graph, PassContext())
    np.testing.assert_array_equal(shared.values, before)  # never edited in place
    new, result = equalize(model)
    assert result.stats["groups"] == 1
    np.testing.assert_array_equal(initializers(new)["W1"], w1)
    users = {n.name: list(n.input) for n in new.graph.node}
    assert users["z"][1] == "W1" and users["t0"][1] != "W1"


def test_non_constant_weight_declines() -> None:
    rng = np.random.default_rng(11)
    model = chain_model(rng)
    w2 = initializers(model)["W2"]
    graph = model.graph
    keep = [i for i in graph.initializer if i.name != "W2"]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.input.append(helper.make_tensor_value_info("W2", onnx.TensorProto.FLOAT, list(w2.shape)))
    onnx.checker.check_model(model, full_check=True)
    assert_declined(model, "weight_not_constant")


def test_graph_output_in_the_middle_declines() -> None:
    model = chain_model(np.random.default_rng(12), outputs=("y", "t1"))
    assert_declined(model, "graph_output")


def test_relu6_declines_by_default_opset10_attrs() -> None:
    rng = np.random.default_rng(13)
    mid = [helper.make_node("Clip", ["t0"], ["t1"], min=0.0, max=6.0)]
    nodes = [conv("x", "W1", "t0", "B1", pads=[1, 1, 1, 1]), *mid, conv("t1", "W2", "y", "B2")]
    inits = {"W1": spread_weight(rng, 6, 3, 3, 3), "B1": rng.standard_normal(6),
             "W2": spread_weight(rng, 5, 6, 3, 3, axis=1), "B2": rng.standard_normal(5)}
    model = make_model(nodes, {"x": [2, 3, 8, 8]}, ["y"], inits, opset=10)
    assert_declined(model, "clip_not_equivariant")


def test_multi_consumer_not_absorbing_declines() -> None:
    rng = np.random.default_rng(14)
    model = chain_model(rng, tail=[helper.make_node("Sigmoid", ["t1"], ["z"])], outputs=("y", "z"))
    assert_declined(model, "op_does_not_commute")


@pytest.mark.parametrize("value", [0.5, None], ids=["nonzero_value", "channel_pad"])
def test_pad_declines(value) -> None:
    rng = np.random.default_rng(15)
    pads = [0, 0, 1, 1, 0, 0, 1, 1] if value else [0, 1, 0, 0, 0, 1, 0, 0]
    ins = ["t0", "pads"] + (["v"] if value else [])
    mid = [helper.make_node("Pad", ins, ["t1"])]
    extra = {"pads": np.array(pads, dtype=np.int64)} | ({"v": np.array(value)} if value else {})
    model = chain_model(rng, mid, c=6 if value else 4, c2=6, extra=extra)  # a channel pad adds 2 channels
    # A non-zero value is equalize's rule; a channel pad is the pruning op table's (it cannot follow it).
    result = assert_declined(model, "pad_not_spatial_zero" if value else R_UNSUPPORTED)
    assert "t0 -> t1 (Pad)" in [d.where for d in result.declined]


def test_dynamic_spatial_flatten_declines() -> None:
    rng = np.random.default_rng(16)
    inits = {"W1": spread_weight(rng, 4, 3, 3, 3), "G": spread_weight(rng, 36, 3)}
    nodes = [conv("x", "W1", "c"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "G"], ["y"])]
    model = make_model(nodes, {"x": ["N", 3, "H", "W"]}, ["y"], inits)
    _, records = run_passes(model, "equalize")
    result = records[0].result
    assert not result.modified
    assert ("c -> f (Flatten)", R_UNKNOWN_DIM) in result.where_codes()  # the op table's code


def test_exclude_and_zero_iterations() -> None:
    model = chain_model(np.random.default_rng(17))
    assert_declined(model, "excluded", "equalize:exclude=y")
    _, result = equalize(model, "equalize:iterations=0")
    assert not result.modified


# ---------------------------------------------------------------- idempotence, determinism, fixtures


def test_idempotent_and_deterministic() -> None:
    rng = np.random.default_rng(18)
    model = chain_model(rng, [helper.make_node("Relu", ["t0"], ["t1"]),
                              helper.make_node("MaxPool", ["t1"], ["t2"], kernel_shape=[2, 2])])
    first, _ = run_passes(model, "equalize")
    again, _ = run_passes(model, "equalize")
    assert first.SerializeToString() == again.SerializeToString()
    second, records = run_passes(first, "equalize")
    assert not records[0].result.modified
    assert second.graph.SerializeToString() == first.graph.SerializeToString()


@pytest.mark.parametrize("name, groups", [("vgg_digits", 7), ("resnet_digits", 3), ("concat_digits", 17)])
def test_fixture_models_exact(name: str, groups: int) -> None:
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing")
    model = onnx.load(str(path))
    new, records = run_passes(model, "fold_bn,equalize")
    result = records[-1].result
    assert result.stats["groups"] == groups
    assert result.stats["spread_max_after"] < result.stats["spread_max_before"]
    x = np.load(MODELS / "digits_test.npz")["input"][:96]
    ref, got = ort_run(model, {"input": x})[0], ort_run(new, {"input": x})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref)


@pytest.mark.parametrize("case", ["bn", "mul_add", "div_sub", "shared_zero_bn"])
def test_affine_ops_between(case: str) -> None:
    """BN (mean and beta rescaled), Mul/Div by a per-channel constant (range factor), Add/Sub of one."""
    rng = np.random.default_rng(19)
    extra: dict[str, np.ndarray] = {}
    if case in ("bn", "shared_zero_bn"):
        names = ["g", "z", "z", "v"] if case == "shared_zero_bn" else ["g", "b", "m", "v"]
        mid = [helper.make_node("BatchNormalization", ["t0", *names], ["n"], epsilon=1e-3),
               helper.make_node("Relu", ["n"], ["t1"])]
        extra = {"g": rng.uniform(-2, 2, 6), "b": rng.standard_normal(6), "m": rng.standard_normal(6),
                 "v": rng.uniform(0.5, 2, 6), "z": np.zeros(6)}
    elif case == "mul_add":
        mid = [helper.make_node("Mul", ["k", "t0"], ["m"]), helper.make_node("Add", ["m", "a"], ["t1"])]
        extra = {"k": rng.uniform(0.1, 3, (6, 1, 1)), "a": np.array([0.5])}
    else:
        mid = [helper.make_node("Div", ["t0", "k"], ["m"]), helper.make_node("Sub", ["a", "m"], ["t1"])]
        extra = {"k": rng.uniform(0.5, 3, (1, 6, 1, 1)), "a": rng.standard_normal((6, 1, 1))}
    model = chain_model(rng, mid, extra={k: v for k, v in extra.items() if any(k in n.input for n in mid)})
    new, result = equalize(model, dims=(1, 2))
    assert result.stats["groups"] == 1, result.declined
    if case == "mul_add":
        assert initializers(new)[next(n.input[1] for n in new.graph.node if n.op_type == "Add")].shape == (6, 1, 1)


def test_standalone_on_unfolded_fixture() -> None:
    """Without fold_bn, Conv -> BN -> Relu -> Conv pairs still equalize (the BN is rescaled) and stay exact."""
    path = MODELS / "resnet_digits.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing")
    model = onnx.load(str(path))
    new, records = run_passes(model, "equalize")
    assert records[0].result.stats["groups"] == 3
    x = np.load(MODELS / "digits_test.npz")["input"][:64]
    ref, got = ort_run(model, {"input": x})[0], ort_run(new, {"input": x})[0]
    assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref)


# ---------------------------------------------------------------- one channel-flow description (pruning's op table)


def sum_chain(rng: np.random.Generator) -> onnx.ModelProto:
    """``Conv -> Sum(t0) -> Conv``: a one-input Sum is the identity, but the op table has no handler for Sum."""
    return chain_model(rng, [helper.make_node("Sum", ["t0"], ["t1"], name="sum")])


def test_op_without_table_handler_declines_with_its_reason() -> None:
    result = assert_declined(sum_chain(np.random.default_rng(20)), R_NO_HANDLER)
    assert ("t0 -> sum (Sum)", R_NO_HANDLER) in result.where_codes()


def test_channel_flow_comes_from_the_table(monkeypatch) -> None:
    """An op is followed once the table has its handler *and* equalize has its scaling rule."""
    model = sum_chain(np.random.default_rng(21))
    monkeypatch.setitem(equalize_module._RULES, "Sum", equalize_module._commutes)
    assert_declined(model, R_NO_HANDLER)  # a rule alone: the table cannot say where the channels go
    monkeypatch.setitem(HANDLERS, "Sum", _unary)
    _, result = equalize(model)
    assert result.stats["groups"] == 1 and result.stats["layers"] == 2
    monkeypatch.delitem(equalize_module._RULES, "Sum")  # the table alone: equalize does not know it commutes
    no_rule = "op_does_not_commute"
    assert ("t0 -> sum (Sum)", no_rule) in assert_declined(model, no_rule).where_codes()


def test_table_freeze_reaches_equalize(monkeypatch) -> None:
    """A freeze the table puts on an op equalize has a rule for declines equalize there, with its reason."""
    monkeypatch.setitem(HANDLERS, "Relu", _frozen(R_UNSUPPORTED))
    _, records = run_passes(chain_model(np.random.default_rng(22)), "equalize")
    result = records[0].result
    assert result.stats["groups"] == 0 and ("t0 -> relu (Relu)", R_UNSUPPORTED) in result.where_codes()


@pytest.mark.parametrize("op", ["Add", "Concat"])
def test_matmul_last_axis_through_the_table(op: str) -> None:
    """A 3-D MatMul's channels (last axis) go through an Add of a ``[K]`` constant (rescaled along the
    last axis); ops outside the table's last-axis set (Concat) decline with its reason."""
    rng = np.random.default_rng(23)
    k = 8 if op == "Add" else 10
    inits = {"B1": spread_weight(rng, 6, 8, axis=1), "B2": spread_weight(rng, k, 6, axis=0),
             "k": rng.standard_normal(8 if op == "Add" else (1, 3, 2))}
    mid = helper.make_node(op, ["h", "k"], ["a"], **({"axis": -1} if op == "Concat" else {}))
    nodes = [helper.make_node("MatMul", ["x", "B1"], ["h"], name="mm1"), mid, helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "B2"], ["y"], name="mm2")]
    model = make_model(nodes, {"x": [1, 3, 6]}, ["y"], inits)
    if op == "Concat":
        assert ("mm1 -> a (Concat)", R_LAST_AXIS) in assert_declined(model, R_LAST_AXIS).where_codes()
        return
    new, result = equalize(model, dims=(1,))
    assert result.stats["groups"] == 1
    s = out_ranges(initializers(model)["B1"], 1) / out_ranges(initializers(new)["B1"], 1)
    np.testing.assert_allclose(initializers(new)[next(n.input[1] for n in new.graph.node if n.op_type == "Add")],
                               inits["k"] / s, rtol=1e-5)


def test_uneven_split_by_num_outputs() -> None:
    """Opset 18 ``Split(num_outputs=2)`` of 5 channels gives 3 + 2: the table knows it (the old walker
    ignored ``num_outputs`` and declined with "unknown static shape")."""
    rng = np.random.default_rng(24)
    inits = {"W1": spread_weight(rng, 5, 3, 1, 1), "Wa": spread_weight(rng, 2, 3, 1, 1, axis=1),
             "Wb": spread_weight(rng, 2, 2, 1, 1, axis=1)}
    nodes = [conv("x", "W1", "c"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Split", ["r"], ["s1", "s2"], axis=1, num_outputs=2),
             conv("s1", "Wa", "ya"), conv("s2", "Wb", "yb")]
    model = make_model(nodes, {"x": ["N", 3, 4, 4]}, ["ya", "yb"], inits, opset=18)
    new, result = equalize(model, dims=(1, 2))
    assert result.stats["groups"] == 1 and result.stats["layers"] == 3
    r2 = np.concatenate([in_ranges(node_weights(new, "ya")[0]), in_ranges(node_weights(new, "yb")[0])])
    np.testing.assert_allclose(out_ranges(node_weights(new, "c")[0]), r2, rtol=1e-5)


def test_prelu_with_computed_slope_declines() -> None:
    """The table follows PRelu only with a constant slope (pruning slices it): equalize declines with its reason."""
    rng = np.random.default_rng(25)
    inits = {"W1": spread_weight(rng, 6, 3, 3, 3), "W2": spread_weight(rng, 5, 6, 3, 3, axis=1)}
    nodes = [conv("x", "W1", "t0"), helper.make_node("PRelu", ["t0", "slope"], ["t1"], name="prelu"),
             conv("t1", "W2", "y")]
    model = make_model(nodes, {"x": [2, 3, 8, 8], "slope": [6, 1, 1]}, ["y"], inits)
    result = assert_declined(model, R_NONCONST)
    assert ("t0 -> prelu (PRelu)", R_NONCONST) in result.where_codes()
