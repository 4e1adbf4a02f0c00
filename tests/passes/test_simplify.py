"""Tests of the simplify pass: structure, graph signature, full checker, ORT numerics, determinism."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxcompress.core import proto, serde
from onnxcompress.core.pass_api import Numerics, PassContext, PassResult
from onnxcompress.passes import simplify as simplify_module
from onnxcompress.passes.simplify import Simplify
from onnxcompress.pipeline.manager import get_pass, registry
from tests.helpers.builders import make_model, node, parse
from tests.helpers.graphs import op_types
from tests.helpers.runs import ort_run, run_passes
from tests.helpers.tensors import random_feeds

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
MODES = ["simplify", "simplify:onnxsim=false"]


def io_signature(model: onnx.ModelProto) -> list:
    """Names, element types and shapes (with symbolic dims) of the graph inputs, then outputs."""
    return [[(v.name, v.type.SerializeToString()) for v in values] for values in (model.graph.input, model.graph.output)]


def simplify(model: onnx.ModelProto, spec: str = "simplify") -> tuple[onnx.ModelProto, PassResult]:
    """Run ``spec``; check the full checker, the unchanged I/O signature and ORT numerics."""
    new, records = run_passes(model, spec)
    onnx.checker.check_model(new, full_check=True)
    assert io_signature(new) == io_signature(model)
    for dim in (2, 3):
        feeds = random_feeds(model, seed=dim, dim=dim)
        for want, got in zip(ort_run(model, feeds), ort_run(new, feeds), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    return new, records[0].result


def initializer_names(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.initializer}


# ---------------------------------------------------------------- contract


def test_registered_exact_with_summary():
    assert registry()["simplify"] is Simplify
    assert get_pass("simplify").numerics is Numerics.EXACT
    assert Simplify.summary().startswith("Simplifies the graph")
    assert set(Simplify.options) >= {"onnxsim", "fold_constants", "max_fold_bytes"}
    assert simplify_module.__all__ == ["Simplify"]


def test_stats_are_reported():
    model = parse(HEADER + "g (float[2,3] x) => (float[2,3] y) { a = Identity(x)  y = Relu(a) }")
    _, result = simplify(model)
    assert {"nodes_before", "nodes_after", "identities_removed", "dropouts_removed", "constants_folded",
            "dead_nodes_removed", "onnxsim_nodes_removed"} <= set(result.stats)
    assert result.stats["nodes_before"] == 2 and result.stats["nodes_after"] == 1
    assert result.modified


# ---------------------------------------------------------------- positive cases


@pytest.mark.parametrize("spec", MODES)
def test_identity_chain_removed(spec):
    model = parse(HEADER + """g (float[2,3] x) => (float[2,3] y) {
        a = Identity(x)
        b = Identity(a)
        c = Relu(b)
        d = Identity(c)
        y = Sigmoid(d)
    }""")
    new, result = simplify(model, spec)
    assert op_types(new) == ["Relu", "Sigmoid"]
    if spec.endswith("false"):
        assert result.stats["identities_removed"] == 3


@pytest.mark.parametrize("spec", MODES)
def test_identity_before_graph_output_removed_keeping_the_name(spec):
    model = parse(HEADER + "g (float[2,3] x) => (float[2,3] y) { r = Relu(x)  y = Identity(r) }")
    new, _ = simplify(model, spec)
    assert op_types(new) == ["Relu"]
    assert list(new.graph.node[0].output) == ["y"]


@pytest.mark.parametrize("spec", MODES)
def test_dropout_removed(spec):
    model = parse(HEADER + """g (float[2,3] x) => (float[2,3] y) {
        d, mask = Dropout(x)
        y = Relu(d)
    }""")
    new, result = simplify(model, spec)
    assert op_types(new) == ["Relu"]
    if spec.endswith("false"):
        assert result.stats["dropouts_removed"] == 1


def test_dropout_with_constant_false_training_mode_removed():
    model = parse(HEADER + """g (float[2,3] x) => (float[2,3] y) <float r = {0.5}, bool t = {0}> {
        d = Dropout(x, r, t)
        y = Relu(d)
    }""")
    new, _ = simplify(model, "simplify:onnxsim=false")
    assert op_types(new) == ["Relu"]


def test_shape_subgraph_folded_into_reshape():
    model = parse(HEADER + """g (float[2,3,4] x) => (float[2,12] y) <int64 zero = {0}, int64[1] axes = {0},
                                                                 int64[1] minus_one = {-1}> {
        s = Shape(x)
        n = Gather(s, zero)
        u = Unsqueeze(n, axes)
        shape = Concat<axis=0>(u, minus_one)
        y = Reshape(x, shape)
    }""")
    new, _ = simplify(model)
    assert op_types(new) == ["Reshape"]
    assert new.graph.node[0].input[1] in initializer_names(new)


def test_constant_subgraph_folded_by_own_folding():
    # Max is not one of the exact ops normalize folds before any pass (core.fold): simplify does
    model = parse(HEADER + """g (float[2,3] x) => (float[2,3] y) <float[3] a = {1, 2, 9}, float[3] b = {4, 5, 6}> {
        s = Max(a, b)
        t = Mul(s, s)
        y = Add(x, t)
    }""")
    new, result = simplify(model, "simplify:onnxsim=false")
    assert op_types(new) == ["Add"]
    assert result.stats["constants_folded"] == 2
    folded = next(i for i in new.graph.initializer if i.name == new.graph.node[0].input[1])
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(folded), [16, 25, 81])


@pytest.mark.parametrize("spec", MODES)
def test_constant_graph_output_keeps_its_name(spec):
    model = parse(HEADER + """g (float[3] x) => (float[3] y, float[3] c) <float[3] a = {-1, 2, -3}> {
        y = Relu(x)
        c = Abs(a)
    }""")
    new, _ = simplify(model, spec)
    assert [o.name for o in new.graph.output] == ["y", "c"]


def test_dead_branch_removed():
    model = parse(HEADER + """g (float[2,3] x) => (float[2,3] y) {
        y = Relu(x)
        dead = Neg(x)
        deader = Exp(dead)
    }""")
    new, _ = simplify(model)
    assert op_types(new) == ["Relu"]


@pytest.mark.parametrize("spec", MODES)
def test_small_expand_folded_large_expand_kept(spec):
    model = parse(HEADER + """g (float[4] x) => (float[2048,256] big, float[4,4] small)
                   <float[1] one = {1}, int64[2] big_shape = {2048, 256}, int64[2] small_shape = {4, 4}> {
        big = Expand(one, big_shape)
        e = Expand(one, small_shape)
        small = Add(e, x)
    }""")
    new, result = simplify(model, spec)
    assert sorted(op_types(new)) == ["Add", "Expand"]
    expand = next(n for n in new.graph.node if n.op_type == "Expand")
    assert list(expand.output) == ["big"]
    assert all(i.name != "big" for i in new.graph.initializer)
    if spec.endswith("false"):
        assert ("big", "result_too_large", "2097152 bytes, 2097132 more than its source constants") in result.declined


def _dequantized_weights(n: int = 4, rows: int = 256) -> onnx.ModelProto:
    """``n`` int8 weights dequantized in the graph (``Cast -> Mul``), as already-quantized exports
    store them: folding would make each 4x larger."""
    rng = np.random.default_rng(0)
    nodes, inits = [], {}
    x = "x"
    for i in range(n):
        inits[f"q{i}"] = rng.integers(-127, 128, size=(rows, rows), dtype=np.int8)
        inits[f"s{i}"] = np.array(0.01, dtype=np.float32)
        nodes += [node("Cast", [f"q{i}"], f"c{i}", to=onnx.TensorProto.FLOAT), node("Mul", [f"c{i}", f"s{i}"], f"w{i}"),
                  node("MatMul", [x, f"w{i}"], f"y{i}")]
        x = f"y{i}"
    nodes.append(node("Identity", [x], "y"))
    return make_model(nodes, {"x": ["N", rows]}, ["y"], inits)


@pytest.mark.parametrize("spec", MODES)
def test_dequantization_chains_not_folded_past_the_growth_budget(spec):
    model = _dequantized_weights()  # 4 x 64 KiB of int8 -> 4 x 256 KiB of float if folded
    new, result = simplify(model, spec + ":max_fold_bytes=300000")
    folded = sum(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 for i in new.graph.initializer)
    assert folded <= 1  # one weight's growth (196,608 bytes) fits the 300,000-byte budget, two do not
    assert sum(n.op_type == "Cast" for n in new.graph.node) >= 3
    np.testing.assert_allclose(*[ort_run(m, random_feeds(m))[0] for m in (model, new)], rtol=1e-5, atol=1e-5)
    if spec == "simplify":
        assert any(d[1] == "onnxsim_folding_grew_weights" for d in result.declined)


def test_matmul_add_on_token_rows_stays_matmul():
    """onnxsim's MatMul+Add -> Gemm fusion wraps 3-D projections in Reshapes: it is switched off."""
    w, b = np.ones((8, 8), np.float32), np.ones(8, np.float32)
    model = make_model([node("MatMul", ["x", "w"], "m"), node("Add", ["m", "b"], "y")], {"x": ["N", 5, 8]}, ["y"],
                       {"w": w, "b": b})
    new, _ = simplify(model)
    assert sorted(op_types(new)) == ["Add", "MatMul"]


# ---------------------------------------------------------------- negative cases


@pytest.mark.parametrize("spec", MODES)
def test_identity_from_graph_input_to_graph_output_stays(spec):
    model = parse(HEADER + "g (float[2] x, float[2] z) => (float[2] y, float[2] z2) { y = Relu(x)  z2 = Identity(z) }")
    new, result = simplify(model, spec)
    assert sorted(op_types(new)) == ["Identity", "Relu"]
    assert [o.name for o in new.graph.output] == ["y", "z2"]
    assert not result.modified


@pytest.mark.parametrize("spec", MODES)
def test_dropout_with_used_mask_stays(spec):
    model = parse(HEADER + """g (float[2,3] x) => (float[2,3] y, bool[2,3] m, float[2,3] mf) {
        d, m = Dropout(x)
        y = Relu(d)
        mf = Cast<to=1>(m)
    }""")
    new, result = simplify(model, spec)
    assert "Dropout" in op_types(new)
    if spec.endswith("false"):
        assert any(d.code == "dropout_mask_used" for d in result.declined)


def test_dropout_in_training_mode_stays():
    model = parse(HEADER + """g (float[2,3] x, bool train) => (float[2,3] y) <float r = {0.0}> {
        d = Dropout(x, r, train)
        y = Relu(d)
    }""")
    new, result = simplify(model, "simplify:onnxsim=false")
    assert "Dropout" in op_types(new)
    assert ("d", "dropout_mode_not_constant") in result.where_codes()


@pytest.mark.parametrize("spec", MODES)
def test_dynamic_input_shape_stays_symbolic(spec):
    model = parse(HEADER + """g (float[N,3] x) => (float[N,3] y) <int64[2] shape = {-1, 3}> {
        s = Shape(x)
        r = Reshape(x, s)
        y = Relu(r)
    }""")
    new, _ = simplify(model, spec)
    assert new.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert new.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"


@pytest.mark.parametrize("spec", MODES)
def test_graph_input_that_is_a_graph_output(spec):
    model = parse(HEADER + "g (float[2] x, float[2] w) => (float[2] x, float[2] y, float[2] w) { y = Relu(x) }")
    new, _ = simplify(model, spec)
    assert [o.name for o in new.graph.output] == ["x", "y", "w"]
    assert [i.name for i in new.graph.input] == ["x", "w"]


def test_random_ops_not_folded():
    model = parse(HEADER + """g (float[2,3] x) => (float[2,3] y) <int64[2] shape = {2, 3}> {
        z = ConstantOfShape(shape)
        r = RandomUniformLike(z)
        y = Add(x, r)
    }""")
    new, _ = run_passes(model, "simplify:onnxsim=false")
    onnx.checker.check_model(new, full_check=True)
    assert "RandomUniformLike" in op_types(new)


@pytest.mark.parametrize("spec", MODES)
def test_batchnorm_is_left_to_fold_bn(spec):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    c = [rng.uniform(0.5, 2.0, 4).astype(np.float32) for _ in range(4)]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["c"]),
         onnx.helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 6, 6])],
        [onnx.numpy_helper.from_array(a, n) for a, n in zip([w, *c], "wgbmv")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    new, _ = simplify(model, spec)
    assert op_types(new) == ["Conv", "BatchNormalization"]


# ---------------------------------------------------------------- options and failure handling


def test_fold_constants_off():
    model = parse(HEADER + """g (float[3] x) => (float[3] y) <float[3] a = {1, 2, 3}> {
        t = Exp(a)
        y = Add(x, t)
    }""")
    new, _ = simplify(model, "simplify:onnxsim=false:fold_constants=false")
    assert op_types(new) == ["Exp", "Add"]
    new, _ = simplify(model, "simplify:fold_constants=false")
    assert op_types(new) == ["Exp", "Add"]
    new, _ = simplify(model, "simplify:onnxsim=false")
    assert op_types(new) == ["Add"]


def test_onnxsim_failure_is_a_decline(monkeypatch, caplog):
    import onnxsim

    def boom(model, **kw):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(onnxsim, "simplify", boom)
    model = parse(HEADER + "g (float[2] x) => (float[2] y) { a = Identity(x)  y = Relu(a) }")
    with caplog.at_level(logging.WARNING):
        new, result = simplify(model)
    assert ("<model>", "onnxsim_failed", "RuntimeError: boom") in result.declined
    assert "onnxsim failed" in caplog.text
    assert op_types(new) == ["Relu"]


def test_onnxsim_renaming_the_graph_io_is_refused(monkeypatch):
    import onnxsim

    real = onnxsim.simplify

    def renaming(model, **kw):
        out, check = real(model, **kw)
        out.graph.output[0].name = "renamed"
        out.graph.node[-1].output[0] = "renamed"
        return out, check

    monkeypatch.setattr(onnxsim, "simplify", renaming)
    model = parse(HEADER + "g (float[2] x) => (float[2] y) { a = Identity(x)  y = Relu(a) }")
    new, result = simplify(model)
    assert ("<model>", "onnxsim_failed", "changed the graph inputs or outputs") in result.declined
    assert op_types(new) == ["Relu"]


def test_sibling_subgraph_initializers_are_hoisted():
    """gs exports an outer constant into every branch that reads it; onnxsim crashed on the repeats."""
    model = parse(HEADER + """g (float[2] x) => (float[2] y, float[2] z) <int64 a = {1}, int64 b = {1}, float[1] k = {2}> {
        c = Equal(a, b)
        y = If(c) <then_branch = g1 () => (float[2] yt) { yt = Mul(x, k) },
                   else_branch = g2 () => (float[2] ye) { ye = Neg(x) }>
        z = If(c) <then_branch = g3 () => (float[2] zt) { zt = Add(x, k) },
                   else_branch = g4 () => (float[2] ze) { ze = Neg(x) }>
    }""")
    exported = serde.to_model(serde.to_graph(model))
    proto.hoist_subgraph_initializers(exported)
    assert [i.name for i in exported.graph.initializer].count("k") == 1
    branches = [a.g for n in exported.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    assert len(branches) == 4 and all(not sub.initializer for sub in branches)
    new, _ = simplify(model)
    assert "If" not in op_types(new)


def test_deterministic():
    model = parse(HEADER + """g (float[N,3,4] x) => (float[N,12] y, float[3] c) <int64[1] zero = {0}, int64[1] one = {1},
                                          int64[1] minus_one = {-1}, float[3] a = {1, -2, 3}> {
        i = Identity(x)
        d = Dropout(i)
        s = Shape(d)
        n = Slice(s, zero, one)
        shape = Concat<axis=0>(n, minus_one)
        shape2 = Concat<axis=0>(minus_one, minus_one)
        r = Reshape(d, shape)
        y = Relu(r)
        c = Abs(a)
    }""")
    first, _ = simplify(model)
    for _ in range(2):
        again, _ = simplify(model)
        assert again.SerializeToString() == first.SerializeToString()


def test_run_returns_the_replacement_graph():
    """Called directly (without the manager), the pass hands back the simplified graph."""
    model = parse(HEADER + "g (float[2] x) => (float[2] y) { a = Identity(x)  y = Relu(a) }")
    graph = serde.to_graph(model)
    result = Simplify().run(graph, PassContext())
    assert isinstance(result.graph, gs.Graph)
    assert [n.op for n in result.graph.nodes] == ["Relu"]


def test_merged_duplicate_constants_show_in_the_stats():
    """onnxsim merging two equal constants changes the graph without changing the node count: the
    stats say what changed (constants 2 -> 1), and an unchanged graph reports modified False."""
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y) <float[3] a = {1.0, 2.0, 3.0}, float[3] b = {1.0, 2.0, 3.0}> {
    m = Mul(x, a)
    y = Add(m, b)
}""")
    new, result = simplify(model)
    s = result.stats
    assert result.modified and s["nodes_before"] == s["nodes_after"] == 2
    assert (s["constants_before"], s["constants_after"]) == (2, 1)
    _, again = simplify(new)
    assert not again.modified and again.stats["constants_before"] == again.stats["constants_after"] == 1
