"""Constant subgraphs folded before any pass (core.fold through normalize): exact, bounded in size,
names kept, shared initializers untouched, and every pass sees the folded constants."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.core import serde
from onnxcompress.core.fold import EXACT_OPS, MAX_FOLD_BYTES, evaluate_node, fold_constants
from onnxcompress.core.normalize import normalize
from onnxcompress.core.pass_api import PassContext
from tests.helpers.builders import make_model, node
from tests.helpers.graphs import initializers, op_types
from tests.helpers.pruning import bn, bn_node, ints
from tests.helpers.runs import ort_run, run_passes
from tests.helpers.tensors import calib_for, rand, random_feeds

RNG = np.random.default_rng


def _f32(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return rand(RNG(seed), *shape, scale=scale)


# (op, opset, input arrays, attributes): each is run alone in onnxruntime and by evaluate_node
OP_CASES = [
    ("Unsqueeze", 9, [_f32(4)], {"axes": [1, 2]}),
    ("Unsqueeze", 13, [_f32(4), ints(-1, 0)], {}),
    ("Squeeze", 11, [_f32(1, 4, 1)], {"axes": [-1]}),
    ("Squeeze", 13, [_f32(1, 4, 1)], {}),
    ("Reshape", 13, [_f32(2, 3, 4), ints(0, -1)], {}),
    ("Reshape", 14, [_f32(2, 3, 4), ints(4, 0, 2)], {"allowzero": 0}),
    ("Flatten", 13, [_f32(2, 3, 4)], {"axis": -1}),
    ("Transpose", 13, [_f32(2, 3, 4)], {"perm": [1, 2, 0]}),
    ("Transpose", 13, [_f32(2, 3, 4)], {}),
    ("Concat", 13, [_f32(2, 3), _f32(2, 1, seed=1)], {"axis": -1}),
    ("Concat", 13, [ints(1), ints(-1, 8)], {"axis": 0}),
    ("Expand", 13, [_f32(3, 1), ints(2, 1, 4)], {}),
    ("Tile", 13, [_f32(2, 3), ints(2, 2)], {}),
    ("Slice", 9, [_f32(5, 6)], {"starts": [1, -4], "ends": [100, -1], "axes": [0, 1]}),
    ("Slice", 13, [_f32(5, 6), ints(-1, 4), ints(-100, 0), ints(0, 1), ints(-2, -1)], {}),
    ("Slice", 13, [_f32(5, 6), ints(1), ints(2 ** 62), ints(-1), ints(2)], {}),
    ("Gather", 13, [_f32(4, 5), ints(-1, 0, 2)], {"axis": 1}),
    ("Shape", 15, [_f32(2, 3, 4)], {"start": 1, "end": -1}),
    ("Size", 13, [_f32(2, 3, 4)], {}),
    ("ConstantOfShape", 13, [ints(2, 3)], {"value": helper.make_tensor("v", TensorProto.INT32, [1], [7])}),
    ("ConstantOfShape", 13, [ints(3)], {}),
    ("Cast", 13, [_f32(64, scale=1e4)], {"to": TensorProto.FLOAT16}),
    ("Cast", 13, [_f32(64, scale=50.0)], {"to": TensorProto.INT32}),
    ("Cast", 13, [np.arange(2 ** 40, 2 ** 40 + 64, dtype=np.int64) * 3], {"to": TensorProto.FLOAT}),
    ("Cast", 13, [_f32(64).astype(np.float64) / 3], {"to": TensorProto.FLOAT}),
    ("Cast", 13, [np.array([0.0, -0.0, 1.5, np.nan], np.float32)], {"to": TensorProto.BOOL}),
    ("Add", 13, [_f32(8, 4, scale=1e3), _f32(4, seed=1, scale=1e-3)], {}),
    ("Sub", 13, [_f32(8, 4), _f32(8, 4, seed=1)], {}),
    ("Mul", 13, [_f32(8, 4, scale=1e20), _f32(8, 1, seed=1, scale=1e20)], {}),
    ("Div", 13, [_f32(64), _f32(64, seed=1, scale=1e-6)], {}),
    ("Mul", 13, [ints(3, -7, 2 ** 40), ints(5, 9, 2 ** 30)], {}),
    ("Add", 13, [_f32(64).astype(np.float16), _f32(64, seed=1).astype(np.float16)], {}),
    ("Neg", 13, [_f32(8)], {}),
    ("Abs", 13, [_f32(8)], {}),
    ("Sqrt", 13, [np.abs(_f32(256, scale=1e3)) + 1e-3], {}),
    ("Reciprocal", 13, [_f32(256, scale=1e-3)], {}),
    ("Identity", 13, [_f32(3)], {}),
]


def _single_node_model(op: str, opset: int, args: list[np.ndarray], attrs: dict) -> onnx.ModelProto:
    names = [f"i{k}" for k in range(len(args))]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for n, a in zip(names, args)]
    graph = helper.make_graph([helper.make_node(op, names, ["y"], name="n", **attrs)], "g", inputs,
                              [onnx.ValueInfoProto(name="y")])  # untyped: onnxruntime infers it
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("op, opset, args, attrs", OP_CASES, ids=[f"{c[0]}{c[1]}_{i}" for i, c in enumerate(OP_CASES)])
def test_each_exact_op_gives_onnxruntimes_bits(op, opset, args, attrs):
    model = _single_node_model(op, opset, args, attrs)
    (expected,) = ort_run(model, {f"i{k}": a for k, a in enumerate(args)})
    got = evaluate_node(serde.to_graph(model).nodes[0], args, opset)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), np.ascontiguousarray(expected).reshape(-1).view(np.uint8))
    assert not any(np.shares_memory(got, a) for a in args)


def test_every_exact_op_has_a_case():
    assert {c[0] for c in OP_CASES} == EXACT_OPS


@pytest.mark.parametrize("op, args, attrs", [
    ("Div", [ints(7), ints(2)], {}),  # integer division is not folded
    ("Cast", [np.array([np.nan], np.float32)], {"to": TensorProto.INT32}),  # undefined result
    ("Cast", [np.array([3e9], np.float32)], {"to": TensorProto.INT32}),
    ("Gather", [_f32(4), ints(4)], {}),
    ("Exp", [_f32(4)], {}),
])
def test_inexact_or_undefined_cases_are_refused(op, args, attrs):
    model = _single_node_model(op, 13, args, attrs)
    with pytest.raises(ValueError):
        evaluate_node(serde.to_graph(model).nodes[0], args, 13)


def _densenet_block(rng: np.random.Generator, shared_scale: bool = False) -> onnx.ModelProto:
    """Caffe2's DenseNet layer: BN without affine, then ``Mul``/``Add`` by ``Unsqueeze``-d vectors,
    Relu, a 1x1 and a 3x3 conv, concatenated with the block input; then a 1x1 conv."""
    c_in, c_mid = 4, 8
    nodes = [node("Conv", ["x", "w0"], "a"), bn_node("a", "b", "bn"),
             node("Unsqueeze", ["s"], "su", axes=[1, 2]), node("Mul", ["b", "su"], "bm"),
             node("Unsqueeze", ["t"], "tu", axes=[1, 2]), node("Add", ["bm", "tu"], "ba"), node("Relu", ["ba"], "r"),
             node("Conv", ["r", "w1"], "c1"), node("Relu", ["c1"], "c1r"),
             node("Conv", ["c1r", "w2"], "c2", pads=[1, 1, 1, 1]), node("Concat", ["x", "c2"], "cat", axis=1),
             node("Conv", ["cat", "w3", "b3"], "y")]
    inits = {"w0": rand(rng, c_mid, 3, 1, 1, scale=0.5), **bn(rng, "bn", c_mid), "s": rng.uniform(0.5, 1.5, c_mid),
             "t": rand(rng, c_mid, scale=0.3), "w1": rand(rng, 16, c_mid, 1, 1, scale=0.3),
             "w2": rand(rng, c_in, 16, 3, 3, scale=0.1), "w3": rand(rng, 5, 3 + c_in, 1, 1, scale=0.3),
             "b3": rand(rng, 5, scale=0.1)}
    outputs = ["y"]
    inputs = {"x": ["N", 3, 8, 8]}
    if shared_scale:  # s also scales another input: it must come out untouched
        nodes.append(node("Mul", ["z", "s"], "zs"))
        outputs.append("zs")
        inputs["z"] = [c_mid]
    return make_model(nodes, inputs, outputs, inits, opset=11)


def _prune_stats(records) -> dict:
    return next(r for r in records if r.name == "prune_channels").result.stats


def test_densenet_block_with_unsqueezed_scale_is_folded_and_pruned_without_simplify():
    model = _densenet_block(RNG(0))
    folded, records = run_passes(model, "fold_bn")
    assert "Unsqueeze" not in op_types(folded) and "BatchNormalization" not in op_types(folded)
    assert op_types(folded).count("Mul") == 0 and op_types(folded).count("Add") == 0  # scale/shift in the conv
    feeds = random_feeds(model)
    for a, b in zip(ort_run(model, feeds), ort_run(folded, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    pruned, records = run_passes(model, "fold_bn,prune_channels:ratio=0.5:round_to=1")
    stats = _prune_stats(records)
    assert stats["groups_pruned"] >= 2 and not stats.get("groups_frozen_broadcast_mismatch")
    onnx.checker.check_model(pruned, full_check=True)
    assert initializers(pruned)["w1"].shape[0] < 16 if "w1" in initializers(pruned) else True
    assert ort_run(pruned, feeds)[0].shape == ort_run(model, feeds)[0].shape


def test_shared_initializer_is_not_edited():
    model = _densenet_block(RNG(1), shared_scale=True)
    s = initializers(model)["s"].copy()
    normalized = normalize(model)
    assert np.array_equal(initializers(normalized)["s"], s)  # still there, for the graph output's Mul
    assert np.array_equal(initializers(normalized)["su"], s.reshape(-1, 1, 1))  # a new constant
    pruned, records = run_passes(model, "prune_channels:ratio=0.5:round_to=1")
    assert _prune_stats(records)["groups_pruned"] >= 1
    assert np.array_equal(initializers(pruned)["s"], s)
    feeds = random_feeds(model)
    np.testing.assert_array_equal(ort_run(pruned, feeds)[1], ort_run(model, feeds)[1])


def test_concat_of_constant_shapes_becomes_one_shape_and_prunes_through():
    rng = RNG(2)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Unsqueeze", ["one"], "one1", axes=[0]), node("Concat", ["one1", "minus1"], "shape", axis=0),
             node("Reshape", ["ar", "shape"], "f"), node("MatMul", ["f", "wf"], "h")]
    inits = {"w1": rand(rng, 8, 3, 4, 4, scale=0.2), "b1": rand(rng, 8, scale=0.4), "one": np.array(1, np.int64),
             "minus1": ints(-1), "wf": rand(rng, 8 * 25, 6, scale=0.1)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 6])],
                              [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k)
                               for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)  # no shape inference through the computed shape
    normalized = normalize(model)
    assert op_types(normalized) == ["Conv", "Relu", "Reshape", "MatMul"]
    assert initializers(normalized)["shape"].tolist() == [1, -1]
    pruned, records = run_passes(model, "prune_channels:ratio=0.5:round_to=1")
    assert _prune_stats(records)["groups_pruned"] == 1
    head = pruned.graph.node[-1]  # the MatMul (a Gemm once the removed channels' bias is compensated)
    assert initializers(pruned)[head.input[1]].shape[0] < 8 * 25


def test_constant_subgraph_feeding_a_graph_output_keeps_its_name():
    rng = RNG(3)
    nodes = [node("Conv", ["x", "w"], "y"), node("Unsqueeze", ["s"], "su", axes=[0]),
             node("Mul", ["su", "two"], "scale"), node("Reshape", ["scale", "shape"], "consumed"),
             node("Add", ["y", "consumed"], "z")]
    inits = {"w": rand(rng, 4, 3, 1, 1, scale=0.5), "s": rand(rng, 4, scale=1.0), "two": np.float32(2.0),
             "shape": ints(1, 4, 1, 1)}
    model = make_model(nodes, {"x": [1, 3, 4, 4]}, ["z", "scale"], inits, opset=11)
    normalized = normalize(model)
    onnx.checker.check_model(normalized, full_check=True)
    assert [o.name for o in normalized.graph.output] == ["z", "scale"]
    assert op_types(normalized) == ["Conv", "Constant", "Add"]
    assert normalized.graph.node[1].output[0] == "scale" and normalized.graph.node[1].name == "scale"
    assert "consumed" in initializers(normalized)
    feeds = random_feeds(model)
    for a, b in zip(ort_run(model, feeds), ort_run(normalized, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_big_generated_tensors_are_not_materialized():
    nodes = [node("Concat", ["d0", "d1"], "shape", axis=0), node("Expand", ["half", "shape"], "big"),
             node("Add", ["x", "big"], "a"), node("ConstantOfShape", ["shape"], "zeros"), node("Add", ["a", "zeros"], "y")]
    inits = {"d0": ints(512), "d1": ints(1024), "half": np.float32(0.5)}
    model = make_model(nodes, {"x": [512, 1024]}, ["y"], inits, opset=13)
    normalized = normalize(model)
    assert sorted(op_types(normalized)) == ["Add", "Add", "ConstantOfShape", "Expand"]  # 2 MB each: kept as ops
    assert initializers(normalized)["shape"].tolist() == [512, 1024]  # their shape is folded
    assert normalized.ByteSize() < 4096
    small = make_model(nodes, {"x": [8, 16]}, ["y"], {**inits, "d0": ints(8), "d1": ints(16)}, opset=13)
    assert op_types(normalize(small)) == ["Add", "Add"]  # 512 bytes: folded


def test_total_growth_is_bounded():
    # ten 8 KiB fills (ConstantOfShape: the light model zoo's weights) with a 40 KiB budget: five are folded
    nodes = [node("ConstantOfShape", ["shape"], f"fill{i}") for i in range(10)]
    nodes += [node("Sum", ["x", *(f"fill{i}" for i in range(10))], "y")]
    model = make_model(nodes, {"x": [2048]}, ["y"], {"shape": ints(2048)}, opset=13)
    graph = serde.to_graph(model)
    assert fold_constants(graph, max_total=40 * 1024) == 5
    assert sum(isinstance(graph.tensors()[f"fill{i}"], gs.Constant) for i in range(10)) == 5
    assert fold_constants(serde.to_graph(model)) == 10  # 80 KiB: within the default 1 MiB


def test_growth_limit_counts_sources_that_stay():
    rng = RNG(4)
    w = rand(rng, 256, 128, scale=0.1)  # 128 KiB: over the limit
    assert w.nbytes > MAX_FOLD_BYTES
    nodes = [node("Transpose", ["w"], "wt"), node("MatMul", ["x", "wt"], "h"), node("MatMul", ["h", "w"], "y")]
    model = make_model(nodes, {"x": [2, 128]}, ["y"], {"w": w}, opset=13)
    assert op_types(normalize(model)) == ["Transpose", "MatMul", "MatMul"]  # w is shared: it would be stored twice
    alone = make_model(nodes[:2], {"x": [2, 128]}, ["h"], {"w": w}, opset=13)
    normalized = normalize(alone)
    assert op_types(normalized) == ["MatMul"] and list(initializers(normalized)) == ["wt"]  # no growth: folded


def test_folded_model_is_exact_in_onnxruntime_and_deterministic():
    rng = RNG(5)
    c = 6
    nodes = [node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "sd"), node("Reciprocal", ["sd"], "inv"),
             node("Mul", ["gamma", "inv"], "k"), node("Reshape", ["k", "kshape"], "k4"),
             node("Conv", ["x", "w"], "a"), node("Mul", ["a", "k4"], "am"),
             node("Neg", ["mean"], "nm"), node("Mul", ["nm", "k"], "nmk"), node("Add", ["nmk", "beta"], "shift"),
             node("Cast", ["shift"], "shift16", to=TensorProto.FLOAT16), node("Cast", ["shift16"], "shift32", to=TensorProto.FLOAT),
             node("Unsqueeze", ["shift32"], "sh", axes=[1, 2]), node("Add", ["am", "sh"], "b"),
             node("Transpose", ["wg"], "wgt", perm=[1, 0]), node("Flatten", ["b"], "fb"),
             node("Gather", ["wgt", "idx"], "wsel", axis=0), node("MatMul", ["fb", "wsel"], "y")]
    inits = {"var": rng.uniform(0.1, 2.0, c), "eps": np.float32(1e-5), "gamma": rand(rng, c, scale=1.0),
             "kshape": ints(1, c, 1, 1), "w": rand(rng, c, 3, 3, 3, scale=0.3), "mean": rand(rng, c, scale=1.0),
             "beta": rand(rng, c, scale=1.0), "wg": rand(rng, 4, c * 36, scale=0.1), "idx": np.arange(c * 36 - 1, -1, -1)}
    model = make_model(nodes, {"x": ["N", 3, 8, 8]}, ["y"], inits, opset=11)
    normalized = normalize(model)
    assert op_types(normalized) == ["Conv", "Mul", "Add", "Flatten", "MatMul"]
    feeds = random_feeds(model)
    np.testing.assert_array_equal(ort_run(model, feeds)[0], ort_run(normalized, feeds)[0])
    assert normalize(model).SerializeToString() == normalized.SerializeToString()


def test_fold_constants_on_a_graph_returns_the_count_and_keeps_sources():
    model = _densenet_block(RNG(6))
    graph = serde.to_graph(model)
    s = graph.tensors()["s"]
    before = s.values.copy()
    assert fold_constants(graph) == 2
    assert isinstance(graph.tensors()["su"], gs.Constant) and np.array_equal(s.values, before)
    assert fold_constants(graph) == 0


# --- every pass reads the folded constants ------------------------------------------------------


def _conv_bn_via_reshape(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv -> BN whose parameters come out of Reshape([C,1]) of initializers (-> [C])."""
    c = 8
    params = bn(rng, "p", c)
    nodes = [node("Reshape", [f"p_{k}", "flat"], f"bn_{k}") for k in "gbmv"]
    nodes += [node("Conv", ["x", "w", "wb"], "a"), bn_node("a", "b", "bn"), node("Relu", ["b"], "r"),
              node("Conv", ["r", "w2", "wb2"], "y")]
    inits = {f"p_{k}": v.reshape(c, 1) for k, v in ((k[-1], v) for k, v in params.items())}
    inits |= {"flat": ints(-1), "w": rand(rng, c, 3, 3, 3, scale=0.3), "wb": rand(rng, c, scale=0.1),
              "w2": rand(rng, 4, c, 3, 3, scale=0.2), "wb2": rand(rng, 4, scale=0.1)}
    return make_model(nodes, {"x": [1, 3, 10, 10]}, ["y"], inits, opset=13)


def test_fold_bn_folds_bn_whose_parameters_are_computed_from_constants():
    model = _conv_bn_via_reshape(RNG(7))
    new, records = run_passes(model, "fold_bn")
    assert op_types(new) == ["Conv", "Relu", "Conv"]
    feeds = random_feeds(model)
    np.testing.assert_allclose(ort_run(new, feeds)[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-5)


def _weights_through_constant_ops(rng: np.random.Generator) -> onnx.ModelProto:
    """Two convs and two Gemms whose weights are Reshape/Squeeze/Transpose of initializers."""
    nodes = [node("Reshape", ["w1flat", "w1shape"], "w1"), node("Conv", ["x", "w1", "b1"], "a", pads=[1, 1, 1, 1]),
             node("Relu", ["a"], "ar"), node("Squeeze", ["w2u", "zero"], "w2"),
             node("Conv", ["ar", "w2", "b2"], "c", pads=[1, 1, 1, 1]), node("Relu", ["c"], "cr"),
             node("GlobalAveragePool", ["cr"], "g"), node("Flatten", ["g"], "f"),
             node("Transpose", ["wfT"], "wf"), node("Gemm", ["f", "wf", "bf"], "h"), node("Relu", ["h"], "hr"),
             node("Transpose", ["woT"], "wo"), node("Gemm", ["hr", "wo", "bo"], "y")]
    inits = {"w1flat": rand(rng, 16 * 27, scale=0.3), "w1shape": ints(16, 3, 3, 3), "b1": rand(rng, 16, scale=0.1),
             "w2u": rand(rng, 1, 32, 16, 3, 3, scale=0.1), "zero": ints(0), "b2": rand(rng, 32, scale=0.1),
             "wfT": rand(rng, 64, 32, scale=0.3), "bf": rand(rng, 64, scale=0.1),
             "woT": rand(rng, 10, 64, scale=0.3), "bo": rand(rng, 10, scale=0.1)}
    return make_model(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits, opset=13)


@pytest.mark.parametrize("spec, stat, minimum", [
    ("prune_channels:ratio=0.5:round_to=1", "groups_pruned", 3),
    ("equalize", "groups", 3),
    ("factorize_svd:rank_ratio=0.25:max_mac_ratio=1:min_channels=8:spatial=true", "layers_factorized", 3),
    ("factorize_tucker:rank_ratio=0.5:max_mac_ratio=1:min_channels=8", "layers_factorized", 1),
    ("quantize_int8", "weights_int8", 4),
])
def test_every_pass_sees_weights_computed_from_constants(spec, stat, minimum):
    model = _weights_through_constant_ops(RNG(8))
    new, records = run_passes(model, spec, PassContext(calib=calib_for(model, 16)))
    onnx.checker.check_model(new, full_check=True)
    stats = records[0].result.stats
    assert stats.get(stat, 0) >= minimum, stats
