"""The MAC model and the greedy allocation of :mod:`onnxcompress.pruning.budget`."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.core import serde
from onnxcompress.core.metrics import model_metrics
from onnxcompress.pruning.budget import MacModel, allocate
from onnxcompress.pruning.dependency import analyze
from onnxcompress.pruning.select import Budget, eligible_groups, levels
from tests.helpers.pruning import CASES, build, prune

DIMS = {"N": 1}


def mac_model(model):
    analysis = analyze(serde.to_graph(model), dims=DIMS)
    metrics = model_metrics(model, DIMS)
    return analysis, MacModel(analysis, {n.name: n.macs for n in metrics.per_node}, metrics.macs)


#: A tensor holds part of a group (Concat, Slice): the model assumes removals spread evenly.
PARTIAL = ("concat_two", "concat_cascade", "concat_input", "concat_spatial", "slice", "old_opset")


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_mac_model_predicts_the_pruned_macs(name, seed):
    """The prediction equals the pruned graph's MACs where each tensor holds whole groups, and is
    within 25 % where a tensor holds part of one."""
    model = build(name)
    analysis, macs = mac_model(model)
    pruned, _, remove, _ = prune(model, seed=seed)
    fractions = {gi: len(ch) / analysis.groups[gi].size for gi, ch in remove.items()}
    want = model_metrics(pruned, DIMS).macs
    assert macs.macs(fractions) == pytest.approx(want, rel=0.25 if name in PARTIAL else 1e-6)


def test_allocation_prefers_the_cheap_group_and_meets_the_goal():
    model = build("conv_chain")
    analysis, macs = mac_model(model)
    scores = {g.index: np.arange(g.size, dtype=float) for g in analysis.groups if g.frozen is None}
    budget = Budget(0.0, round_to=1)
    groups = eligible_groups(analysis, scores, budget)
    assert len(groups) >= 2
    steps = {g.index: levels(g, scores[g.index], budget) for g in groups}
    cheap, dear = groups[0].index, groups[1].index
    errors = {cheap: np.asarray(steps[cheap], float) * 1e-3, dear: np.asarray(steps[dear], float)}
    for g in groups[2:]:
        errors[g.index] = np.asarray(steps[g.index], float) * 10
    plan = allocate(groups, steps, errors, macs, 0.8, "measured")
    assert plan.predicted <= 0.8
    assert plan.counts.get(cheap, 0) > plan.counts.get(dear, 0)
    # the cap: levels end at max_group_ratio
    capped = Budget(0.0, round_to=1, max_group_ratio=0.25)
    assert max(levels(groups[0], scores[cheap], capped)) <= 0.25 * groups[0].size


def test_a_coarse_step_that_overshoots_is_replanned():
    """The cheapest group only has one coarse level (a joined group's step): taken greedily it lands far
    below the target; the replanned allocation reaches the target within the tolerance with the fine
    groups instead (at a higher predicted error)."""
    model = build("conv_chain")
    analysis, macs = mac_model(model)
    scores = {g.index: np.arange(g.size, dtype=float) for g in analysis.groups if g.frozen is None}
    budget = Budget(0.0, round_to=1)
    groups = eligible_groups(analysis, scores, budget)
    steps = {g.index: levels(g, scores[g.index], budget) for g in groups}
    coarse = groups[0].index
    steps[coarse] = [0, steps[coarse][-1]]  # all or nothing
    errors = {g.index: np.asarray(steps[g.index], float) * (1e-6 if g.index == coarse else 1.0) for g in groups}
    alone = {g.index: (steps[coarse][-1] / g.size if g.index == coarse else 0.0) for g in groups}
    target = (1.0 + macs.macs(alone) / macs.total) / 2  # halfway: the coarse step overshoots by a lot
    plan = allocate(groups, steps, errors, macs, target, "measured", tolerance=0.06)  # the fine steps: ~0.1
    assert target - 0.06 <= plan.predicted <= target
    assert plan.counts.get(coarse, 0) == 0
    greedy = allocate(groups, steps, errors, macs, target, "measured", tolerance=1.0)  # no replanning
    assert greedy.counts.get(coarse, 0) == steps[coarse][-1] and greedy.predicted < target - 0.06
