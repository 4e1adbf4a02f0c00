"""Grouped (non-depthwise) Conv/ConvTranspose: equal removal per block, merged constraints, rewrites."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcompress.core import serde
from onnxcompress.pruning.blocks import block_weights, refine_blocks
from onnxcompress.pruning.dependency import analyze
from onnxcompress.pruning.select import Budget, plan_removal
from tests.helpers.builders import make_model, node
from tests.helpers.pruning import X, assert_equivalent, bn, bn_node, build, prune, zeroed
from tests.helpers.runs import max_err
from tests.helpers.tensors import rand, random_feeds


def conv_attrs(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """Node name -> (weight shape, group) for every Conv/ConvTranspose."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose"):
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            out[n.name] = (values[n.input[1]].shape, group)
    return out


def scores_of(analysis, seed=0):
    rng = np.random.default_rng(seed)
    return {g.index: rng.random(g.size) for g in analysis.groups if g.frozen is None}


def per_block(group, removed: np.ndarray) -> list[int]:
    return np.bincount(group.blocks[removed], minlength=int(group.blocks.max()) + 1).tolist()


# ---------------------------------------------------------------- constraints


def test_refine_nested_blocks_keeps_the_finer():
    g2, g4 = np.repeat(np.arange(2), 8), np.repeat(np.arange(4), 4)
    assert refine_blocks(np.stack([g2, g4], axis=1)).tolist() == g4.tolist()
    partial = np.where(np.arange(16) < 8, g4, -1)  # a Slice of the first half, read with group=2
    labels = refine_blocks(np.stack([g2, partial], axis=1))
    assert labels is None  # block 0 of g2 holds 2 refined blocks, block 1 only 1


def test_refine_incompatible_blocks():
    g3, g2 = np.repeat(np.arange(3), 4), np.repeat(np.arange(2), 6)
    assert refine_blocks(np.stack([g3, g2], axis=1)) is None


def _two_readers(g_p: int, g_q: int) -> onnx.ModelProto:
    """``a`` (12 channels) read by two grouped convs whose (12-channel) outputs are added."""
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "wp", "bp"], "p", group=g_p), node("Conv", ["ar", "wq", "bq"], "q", group=g_q),
             node("Add", ["p", "q"], "s"), node("Conv", ["s", "w3"], "y")]
    inits = {"w1": rand(rng, 12, 3, 1, 1, scale=0.4), "b1": rand(rng, 12, scale=0.4),
             "wp": rand(rng, 12, 12 // g_p, 1, 1, scale=0.4), "bp": rand(rng, 12, scale=0.4),
             "wq": rand(rng, 12, 12 // g_q, 1, 1, scale=0.4), "bq": rand(rng, 12, scale=0.4),
             "w3": rand(rng, 4, 12, 1, 1, scale=0.4)}
    return make_model(nodes, X, ["y"], inits)


def test_non_nested_grouped_readers_share_a_weighted_budget():
    """group 3 and group 2 on 12 channels: refined blocks [0,4) [4,6) [6,8) [8,12) lose 2, 1, 1, 2
    channels per unit, so every block of both convs loses the same count."""
    model = _two_readers(3, 2)
    groups = {g.name: g for g in analyze(serde.to_graph(model)).groups}
    assert groups["a"].frozen is None and groups["a"].block_weights.tolist() == [2, 1, 1, 2]
    _, analysis, remove, _ = assert_equivalent(model)
    group = analysis.group("a")
    removed = np.flatnonzero(np.isin(group.tensors["ar"], remove[group.index]))  # channels of ar
    for g in (3, 2):
        assert len(set(np.bincount(removed // (12 // g), minlength=g).tolist())) == 1
    assert len(removed)


def test_block_weights_rules():
    g2, g4 = np.repeat(np.arange(2), 8), np.repeat(np.arange(4), 4)
    stacked = np.stack([g2, g4], axis=1)
    assert block_weights(stacked, refine_blocks(stacked)).tolist() == [1, 1, 1, 1]  # nested: one each
    partial = np.where(np.arange(16) < 8, g4, -1)  # [0,4) [4,8) [8,16): g2 needs c0 + c1 == c2
    stacked = np.stack([g2, partial], axis=1)
    labels = np.unique(stacked, axis=0, return_inverse=True)[1].reshape(-1)
    assert block_weights(stacked, labels).tolist() == [1, 1, 2]


def test_nested_grouped_readers_merge():
    model = _two_readers(2, 4)
    analysis = analyze(serde.to_graph(model))
    for name in ("a", "p+q"):
        group = analysis.group(name)
        assert group.frozen is None and group.blocks.tolist() == np.repeat(np.arange(4), 3).tolist()
    assert_equivalent(model)


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("name", ["grouped_g2", "grouped_g4", "grouped_residual", "grouped_and_dense_readers",
                                  "grouped_transpose"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_every_block_loses_the_same_count(name, ratio):
    analysis = analyze(serde.to_graph(build(name)))
    plan = plan_removal(analysis, scores_of(analysis), Budget(ratio, round_to=1))
    blocked = [g for g in analysis.groups if g.blocks is not None and g.frozen is None]
    assert blocked
    for g in blocked:
        removed = plan.remove.get(g.index, np.zeros(0, np.int64))
        counts = per_block(g, removed)
        assert len(set(counts)) == 1, (g.name, counts)
        sizes = np.bincount(g.blocks[g.blocks >= 0]).tolist()
        assert all(c < s for c, s in zip(counts, sizes))  # every block keeps a channel


def test_lowest_scores_go_within_each_block():
    analysis = analyze(serde.to_graph(build("grouped_g2")))
    a = analysis.group("a")
    scores = scores_of(analysis)
    plan = plan_removal(analysis, scores, Budget(0.25, round_to=1))
    removed = plan.remove[a.index]
    for b in range(2):
        block = np.flatnonzero(a.blocks == b)
        want = block[np.argsort(scores[a.index][block])[:2]]
        assert sorted(removed[a.blocks[removed] == b].tolist()) == sorted(want.tolist())


def test_round_to_per_block_then_total():
    analysis = analyze(serde.to_graph(build("grouped_g2")))  # a: 2 blocks of 8; g: 2 blocks of 4
    scores = scores_of(analysis)
    a, g = analysis.group("a"), analysis.group("g")
    plan = plan_removal(analysis, scores, Budget(0.5, round_to=4))
    assert per_block(a, plan.remove[a.index]) == [4, 4]  # every block keeps 4
    assert per_block(g, plan.remove[g.index]) == [2, 2]  # blocks smaller than 4: 4 kept in total
    plan = plan_removal(analysis, scores, Budget(0.5, round_to=8))
    assert per_block(a, plan.remove[a.index]) == [4, 4]  # no block can keep 8 of 8 - k: 8 in total
    assert g.index not in plan.remove and not plan.relaxed  # 8 channels never go below round_to


def test_round_to_relaxed_when_no_count_fits():
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "wg", "bg"], "g", group=3), node("Conv", ["g", "w2"], "y")]
    model = make_model(nodes, X, ["y"], {"w1": rand(rng, 15, 3, 1, 1, scale=0.4), "b1": rand(rng, 15, scale=0.4), "wg": rand(rng, 6, 5, 1, 1, scale=0.4),
                                         "bg": rand(rng, 6, scale=0.4), "w2": rand(rng, 4, 6, 1, 1, scale=0.4)})
    analysis = analyze(serde.to_graph(model))
    a = analysis.group("a")
    plan = plan_removal(analysis, scores_of(analysis), Budget(0.5, round_to=8))
    assert plan.relaxed == ["a"] and per_block(a, plan.remove[a.index]) == [2, 2, 2]  # keeps 9 >= 8


def test_global_scope_respects_blocks():
    analysis = analyze(serde.to_graph(build("grouped_g4")))
    plan = plan_removal(analysis, scores_of(analysis), Budget(0.5, scope="global", round_to=1))
    for g in analysis.groups:
        if g.blocks is not None and g.index in plan.remove:
            assert len(set(per_block(g, plan.remove[g.index]))) == 1


# ---------------------------------------------------------------- rewrites


@pytest.mark.parametrize("g", [2, 4])
def test_grouped_weight_shape_and_group_stay_valid(g):
    model = build(f"grouped_g{g}")
    pruned, analysis, remove, _ = prune(model)
    ka = 16 - len(remove[analysis.group("a").index])
    kg = 8 - len(remove[analysis.group("g").index])
    (shape, group) = conv_attrs(pruned)["g"]
    assert group == g and shape == (kg, ka // g, 3, 3) and ka % g == 0 and kg % g == 0


def test_grouped_transpose_weight_layout():
    pruned, analysis, remove, _ = prune(build("grouped_transpose"))
    ka = 8 - len(remove[analysis.group("a").index])
    kt = 6 - len(remove[analysis.group("t").index])
    assert conv_attrs(pruned)["t"] == ((ka, kt // 2, 2, 2), 2)


@pytest.mark.parametrize("seed", range(6))
def test_random_choices_are_equivalent(seed):
    for name in ("grouped_g4", "grouped_residual", "grouped_and_dense_readers", "grouped_transpose"):
        assert_equivalent(build(name, seed), seed=seed)


def test_only_input_side_removed():
    model = build("grouped_fed_by_pruned_conv")
    analysis = analyze(serde.to_graph(model))
    a = analysis.group("a")
    pruned, *_ = prune(model, {a.index: np.array([1, 6])})
    assert conv_attrs(pruned)["y"] == ((6, 3, 1, 1), 2)
    with pytest.raises(ValueError, match="blocks keep different counts"):
        prune(model, {a.index: np.array([1, 2])})  # both from block 0: not a valid plan


def test_padded_grouped_compensation_is_exact_inside():
    """Removed inputs with a non-zero constant meet a padded grouped 3x3: exact off the border."""
    rng = np.random.default_rng(3)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), bn_node("a", "an", "bn"), node("Relu", ["an"], "ar"),
             node("Conv", ["ar", "wg", "bg"], "y", group=2, pads=[1, 1, 1, 1])]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "wg": rand(rng, 4, 4, 3, 3, scale=0.4), "bg": rand(rng, 4, scale=0.4), **bn(rng, "bn", 8)}
    inits["bn_b"] = np.abs(inits["bn_b"]) + 1.0
    model = make_model(nodes, X, ["y"], inits)
    pruned, _, remove, report = prune(model, {0: np.array([0, 5])})
    assert report.compensated == report.approximate == 1
    feeds = random_feeds(model)
    from tests.helpers.runs import ort_run

    got, want = ort_run(pruned, feeds)[0], ort_run(zeroed(model, remove), feeds)[0]
    np.testing.assert_allclose(got[:, :, 1:-1, 1:-1], want[:, :, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
    err, _ = max_err(zeroed(model, remove), pruned, feeds)
    assert err > 1e-4  # the border differs: approximate, and reported as such


def test_restoring_a_channel_restores_one_per_block():
    """A Slice reading only channel 0 would be emptied: channel 0 comes back, and so does one
    channel of the other block, so the grouped conv's blocks stay equal."""
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Slice", ["ar", "s0", "e4", "ax"], "s"), node("Conv", ["s", "wg", "bg"], "g", group=2),
             node("Conv", ["g", "wy"], "y1"), node("Slice", ["ar", "s0", "e1", "ax"], "t"),
             node("Conv", ["t", "wt"], "y2"), node("Conv", ["ar", "wz"], "y3")]
    def ints(v):
        return np.asarray([v], np.int64)
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4), "s0": ints(0), "e4": ints(4),
             "e1": ints(1), "ax": ints(1),
             "wg": rand(rng, 4, 2, 1, 1, scale=0.4), "bg": rand(rng, 4, scale=0.4),
             "wy": rand(rng, 2, 4, 1, 1, scale=0.4), "wt": rand(rng, 2, 1, 1, 1, scale=0.4),
             "wz": rand(rng, 2, 8, 1, 1, scale=0.4)}
    model = make_model(nodes, X, ["y1", "y2", "y3"], inits)
    analysis = analyze(serde.to_graph(model))
    a = analysis.group("a")
    assert a.blocks.tolist() == [0, 0, 1, 1, -1, -1, -1, -1]
    scores = {g.index: np.ones(g.size) for g in analysis.groups if g.frozen is None}
    scores[a.index] = np.array([0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    plan = plan_removal(analysis, scores, Budget(0.5, round_to=1))
    assert plan.restored == 2 and plan.remove[a.index].tolist() == [4, 5]
    pruned, *_ = prune(model, plan.remove)
    err, scale = max_err(zeroed(model, plan.remove), pruned, random_feeds(model))
    assert err <= 1e-5 * max(1.0, scale)
