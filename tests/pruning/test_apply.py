"""Applying a removal: the equivalence oracle on every pattern, rewrites, naming, approximations."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxcompress.core import serde
from onnxcompress.pruning.apply import apply_pruning, mask_channels, mask_inputs
from onnxcompress.pruning.dependency import analyze
from tests.helpers.builders import make_model, node
from tests.helpers.graphs import initializers, weight_shapes
from tests.helpers.pruning import CASES, X, assert_equivalent, build, padded_depthwise_gemm, prune, zeroed
from tests.helpers.runs import max_err
from tests.helpers.tensors import rand, random_feeds

# ---------------------------------------------------------------- the oracle


@pytest.mark.parametrize("name", sorted(CASES))
def test_pruned_equals_zeroed_original(name):
    case = CASES[name](np.random.default_rng(0))
    pruned, analysis, remove, report = assert_equivalent(case.model)
    pruned_groups = [analysis.groups[i].name for i, ch in remove.items() if len(ch)]
    assert len(pruned_groups) >= case.pruned_groups
    assert case.frozen <= {g.frozen for g in analysis.groups}
    assert report.removed == sum(len(ch) for ch in remove.values())
    assert [o.name for o in pruned.graph.output] == [o.name for o in case.model.graph.output]


def unread(model: onnx.ModelProto, remove: dict[int, np.ndarray]) -> onnx.ModelProto:
    """The original with the consumers' input columns of the chosen channels zeroed."""
    graph = serde.to_graph(model)
    mask_inputs(analyze(graph), remove)
    graph.cleanup().toposort()
    return serde.to_model(graph, model)


@pytest.mark.parametrize("name", sorted(CASES))
def test_uncompensated_pruning_equals_unread_channels_exactly(name):
    """Without bias compensation the pruned graph is the original whose consumers ignore the
    removed channels -- exact even through padded convs (the oracle used on real models)."""
    model = build(name)
    graph = serde.to_graph(model)
    analysis = analyze(graph)
    from tests.helpers.pruning import choose

    remove = choose(analysis, 0)
    apply_pruning(analysis, remove, compensate=False)
    graph.cleanup().toposort()
    pruned = serde.to_model(graph, model)
    onnx.checker.check_model(pruned, full_check=True)
    err, scale = max_err(unread(model, remove), pruned, random_feeds(model))
    assert err <= 1e-5 * max(1.0, scale)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["residual_projection", "concat_cascade", "se_block", "split_opset18", "depthwise_m2",
                        "flatten_gemm", "prelu_consts"]), st.integers(0, 10_000))
def test_any_choice_of_channels_is_equivalent(name, seed):
    assert_equivalent(build(name), seed=seed)


# ---------------------------------------------------------------- rewrites


def test_depthwise_group_follows_the_input_channels():
    pruned, analysis, remove, _ = prune(build("depthwise_m2"))
    kept = 8 - len(remove[analysis.group("a").index])
    dw = next(n for n in pruned.graph.node if n.name == "d")
    assert onnx.helper.get_attribute_value(dw.attribute[0]) == kept
    assert weight_shapes(pruned)["d"] == (2 * kept, 1, 3, 3)


@pytest.mark.parametrize("opset", [12, 17, 18])
def test_split_sizes_are_rewritten(opset):
    model = build(f"split_opset{opset}")
    remove = {0: np.array([0, 4, 5])}  # group "c": one channel of the first part, two of the second
    pruned, *_ = prune(model, remove)
    split = next(n for n in pruned.graph.node if n.op_type == "Split")
    first = 3 if opset < 18 else 4
    want = [first - 1, 8 - first - 2]
    if opset < 13:
        assert list(split.attribute[[a.name for a in split.attribute].index("split")].ints) == want
    else:
        assert initializers(pruned)[split.input[1]].tolist() == want
        assert "num_outputs" not in [a.name for a in split.attribute]
    err, _ = max_err(zeroed(model, remove), pruned, random_feeds(model))
    assert err < 1e-5


def test_slice_bounds_shift_and_never_empty():
    model = build("slice")  # channels [2, 7) of 8
    pruned, _, _, _ = prune(model, {0: np.array([0, 3])})
    starts, ends = (initializers(pruned)[next(n for n in pruned.graph.node if n.op_type == "Slice").input[i]] for i in (1, 2))
    assert starts.tolist()[0] == 1 and ends.tolist()[0] == 5
    # Removing every channel the slice reads would empty it: the plan gives one back.
    graph = serde.to_graph(model)
    analysis = analyze(graph)
    from onnxcompress.pruning.select import Budget, plan_removal

    scores = {0: np.array([9, 9, 1, 1, 1, 1, 1, 9], dtype=float)}
    plan = plan_removal(analysis, scores, Budget(0.7, round_to=1))
    assert plan.restored == 1 and len(plan.remove[0]) == 5


def test_reshape_shape_and_flatten_rows():
    model = build("reshape_matmul")
    pruned, *_ = prune(model, {0: np.array([1, 6])})
    reshape = next(n for n in pruned.graph.node if n.op_type == "Reshape")
    assert initializers(pruned)[reshape.input[1]].tolist() == [-1, 6 * 25]
    assert [n.op_type for n in pruned.graph.node].count("Gemm") == 1  # the MatMul took a bias


def test_resize_sizes_follow():
    pruned, *_ = prune(build("resize_sizes"), {0: np.array([0, 1, 2])})
    resize = next(n for n in pruned.graph.node if n.op_type == "Resize")
    assert initializers(pruned)[resize.input[3]].tolist() == [2, 5, 12, 12]


def test_constants_are_new_and_originals_untouched():
    model = build("conv_bn_relu")
    graph = serde.to_graph(model)
    analysis = analyze(graph)
    before = {name: np.array(t.values, copy=True) for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    objects = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    report = apply_pruning(analysis, {0: np.array([1, 2])})
    for name, t in objects.items():
        np.testing.assert_array_equal(t.values, before[name])
    new = [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t.name not in objects]
    assert new and all("_pruned" in t.name for t in new)
    assert len({t.name for t in new}) == len(new) == report.constants


def test_gemm_alpha_beta_and_added_bias():
    model = build("flatten_gemm")
    pruned, _, remove, report = prune(model, {analysis_index(model, "h"): np.array([0, 5])})
    gemm = next(n for n in pruned.graph.node if n.name == "y")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["beta"] == 1.0 and attrs["alpha"] == 0.5
    assert report.compensated == 1
    err, _ = max_err(zeroed(model, remove), pruned, random_feeds(model))
    assert err < 1e-5


def analysis_index(model: onnx.ModelProto, name: str) -> int:
    return analyze(serde.to_graph(model)).group(name).index


def test_layers_report_kept_indices():
    model = build("conv_chain")
    *_, report = prune(model, {0: np.array([1, 2]), 1: np.array([0])})
    layers = {p.node.name: p for p in report.layers}
    assert layers["b"].kept_in.tolist() == [0, 3, 4, 5, 6, 7] and layers["b"].kept_out.tolist() == list(range(1, 8))
    assert layers["y"].in_changed and not layers["a"].in_changed


def test_padded_kxk_consumer_is_approximate_only_at_the_border():
    """A removed channel's constant (here relu(bias) > 0) meets a padded 3x3 conv: the fold is
    exact in the interior and differs on the 1-pixel border, where the zeroed original sees padding."""
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "w2", "b2"], "y", pads=[1, 1, 1, 1])]
    model = make_model(nodes, X, ["y"], {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": np.abs(rand(rng, 8, scale=0.4)) + 0.5,
                                         "w2": rand(rng, 4, 8, 3, 3, scale=0.4), "b2": rand(rng, 4, scale=0.4)})
    pruned, _, remove, report = prune(model, {0: np.array([2, 5])})
    assert report.compensated == report.approximate == 1
    feeds = random_feeds(model)
    from tests.helpers.runs import ort_run

    got, want = ort_run(pruned, feeds)[0], ort_run(zeroed(model, remove), feeds)[0]
    np.testing.assert_allclose(got[:, :, 1:-1, 1:-1], want[:, :, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
    assert np.abs(got - want).max() > 1e-3


def test_mask_channels_keeps_shapes():
    model = build("concat_two")
    graph = serde.to_graph(model)
    analysis = analyze(graph)
    assert mask_channels(analysis, {0: np.array([0]), 1: np.array([1])}) == 2
    graph.cleanup()
    masked = serde.to_model(graph, model)
    assert weight_shapes(masked) == weight_shapes(model)


def test_padded_depthwise_of_a_removed_constant_is_reported_approximate():
    """A removed channel's non-zero constant through a padded depthwise conv is constant only off
    the border: the downstream fold is reported approximate (a zero constant stays exact)."""
    *_, report = prune(padded_depthwise_gemm(np.random.default_rng(0)), {0: np.array([2, 5])})
    assert report.compensated == report.approximate == 1
    # relu(negative bias) = 0: the depthwise output is its bias everywhere
    model = padded_depthwise_gemm(np.random.default_rng(0), bias_sign=-1.0)
    pruned, _, remove, report = prune(model, {0: np.array([2, 5])})
    assert report.compensated == 1 and report.approximate == 0
    err, scale = max_err(zeroed(model, remove), pruned, random_feeds(model))
    assert err <= 1e-5 * max(1.0, scale)
