"""Non-uniform pruning under a global MAC budget: how many channels each group loses.

The MAC model: every weight layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight) costs
``base * f_out * f_in``, ``base`` its MACs at the run's dims, ``f_out`` the kept fraction of its
output channels and ``f_in`` of its input channels (1 for a depthwise conv, whose weight has one
input column per output channel; ConvTranspose likewise for ``f_out``). A tensor holding channels of several groups (a Concat) keeps
``1 - sum_g share_g * removed_g / size_g``. Other ops' MACs (attention score MatMuls) are fixed.
The achieved ratio is measured on the pruned graph afterwards; the model is exact for Conv/Gemm
chains and only assumes, within a tensor, that a group's removals are spread evenly.

The error model: per group, a predicted output error for each removal count the selection can
give (:func:`~.select.levels`), from :mod:`.sensitivity`: measured on calibration data, or the
fraction of the group's importance removed.

Allocation (:func:`allocate`): greedy, starting from nothing removed; each move takes one group one
level further, the group whose cheapest path ahead (within a few levels) costs the least predicted
error per MAC saved; it stops as soon as the predicted MACs reach the target.

A channel budget (``ratio=R`` with ``allocate=sensitivity``) runs the same allocator on a
:class:`ChannelModel`: the "cost" is the number of channels kept in the eligible groups, the
target ``1 - R``, so the greedy move is the least predicted error per channel removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import node_label
from onnxcompress.pruning.dependency import Analysis, Group

__all__ = ["OVERSHOOT", "BudgetPlan", "ChannelModel", "GroupPlan", "MacModel", "allocate", "plan_for_counts"]

log = logging.getLogger(__name__)

#: Levels looked ahead by a greedy move (non-convex measured curves).
LOOKAHEAD = 6


@dataclass
class _Term:
    base: float
    outs: dict[int, float]  # group index -> share of the output channels
    ins: dict[int, float]  # group index -> share of the input channels (empty: depthwise)

    def macs(self, removed: dict[int, float]) -> float:
        f_out = 1.0 - sum(s * removed.get(g, 0.0) for g, s in self.outs.items())
        f_in = 1.0 - sum(s * removed.get(g, 0.0) for g, s in self.ins.items())
        return self.base * f_out * f_in


class MacModel:
    """The model's MACs as a function of the fraction of each group removed.

    Args:
        analysis: The dependency analysis.
        node_macs: Node label -> MACs (``model_metrics(...).per_node`` at the run's dims).
        total: The whole model's MACs.
    """

    def __init__(self, analysis: Analysis, node_macs: dict[str, int], total: int):
        self.total = float(total)
        self.terms: list[_Term] = []
        self.by_group: dict[int, list[int]] = {}
        for node in analysis.graph.nodes:
            base = float(node_macs.get(node_label(node), 0)) if node.op in _MAC_OPS else 0.0
            factors = _factors(analysis, node) if base > 0 else None
            if not factors:
                continue
            self.terms.append(_Term(base, *factors))
            for g in set(factors[0]) | set(factors[1]):
                self.by_group.setdefault(g, []).append(len(self.terms) - 1)
        self._fixed = self.total - sum(t.base for t in self.terms)

    def macs(self, removed: dict[int, float]) -> float:
        """MACs when each group loses the fraction ``removed[g]`` of its channels."""
        return self._fixed + sum(t.macs(removed) for t in self.terms)

    def group_macs(self, index: int, removed: dict[int, float]) -> float:
        """MACs of the layers reading or writing group ``index``'s channels."""
        return sum(self.terms[i].macs(removed) for i in self.by_group.get(index, []))

    def neighbours(self, index: int) -> set[int]:
        """Groups sharing a layer with group ``index``."""
        out: set[int] = set()
        for i in self.by_group.get(index, []):
            out.update(self.terms[i].outs)
            out.update(self.terms[i].ins)
        return out


class ChannelModel:
    """The channels kept in ``groups`` as a function of the fraction of each group removed: the cost
    model of a channel budget, with :class:`MacModel`'s interface (``macs`` = channels kept).

    Args:
        groups: The eligible groups; ``total`` is the sum of their sizes.
    """

    def __init__(self, groups: list[Group]):
        self.size = {g.index: float(g.size) for g in groups}
        self.total = float(sum(self.size.values()))

    def macs(self, removed: dict[int, float]) -> float:
        """Channels kept when each group loses the fraction ``removed[g]``."""
        return sum(self.group_macs(g, removed) for g in self.size)

    def group_macs(self, index: int, removed: dict[int, float]) -> float:
        """Channels kept in group ``index``."""
        return self.size.get(index, 0.0) * (1.0 - removed.get(index, 0.0))

    def neighbours(self, index: int) -> set[int]:
        """None: one group's count never changes another's."""
        return set()


#: Undershoot of the MAC target (ratio) that :func:`allocate` accepts before replanning.
OVERSHOOT = 0.02

#: Ops whose MACs :func:`~onnxcompress.core.metrics.model_metrics` counts.
_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _factors(analysis: Analysis, node) -> tuple[dict[int, float], dict[int, float]] | None:
    """The group shares of the two channel counts a weight layer's MACs are proportional to.

    Conv: ``prod(y) * prod(w[1:])``: the output channels, and the input channels unless the weight
    has one input column per group (depthwise). ConvTranspose: ``prod(x) * prod(w[1:])``: the input
    channels, and the output channels unless it is depthwise (``group == C_in``). Gemm/MatMul: output columns times the
    input's channels. ``None`` without a constant weight or any pruned channel."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    shape = tuple(getattr(weight, "shape", None) or ()) if isinstance(weight, gs.Constant) else ()
    if not shape:
        return None
    x, y = node.inputs[0].name, node.outputs[0].name
    if node.op == "Conv":
        out, inp = _shares(analysis, y), (_shares(analysis, x) if len(shape) > 1 and shape[1] > 1 else {})
    elif node.op == "ConvTranspose":
        depthwise = int(node.attrs.get("group", 1)) == shape[0] > 1  # w[1] = the multiplier, fixed
        inp, out = _shares(analysis, x), ({} if depthwise else _shares(analysis, y))
    else:
        out, inp = _shares(analysis, y), _shares(analysis, x)
    return (out, inp) if out or inp else None


def _shares(analysis: Analysis, tensor: str) -> dict[int, float]:
    if tensor not in analysis.offsets or not analysis.counts.get(tensor):
        return {}
    owner = analysis.comp_group[analysis.components(tensor)]
    n = len(owner)
    out = {}
    for g in np.unique(owner[owner >= 0]):
        out[int(g)] = float(np.sum(owner == g)) / n
    return out


@dataclass
class GroupPlan:
    """One group's share of the budget."""

    index: int
    name: str
    anchor: str
    size: int
    removed: int
    macs: int
    error: float

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {"group": self.name, "anchor": self.anchor, "kept": self.size - self.removed, "total": self.size,
                "macs": self.macs, "predicted_error": round(self.error, 6)}


@dataclass
class BudgetPlan:
    """The allocation: channels to remove per group and what the models predict.

    Attributes:
        target: Target MAC ratio (``None`` for a ``ratio`` plan).
        predicted: Predicted MAC ratio of the plan.
        macs_before: The model's MACs before.
        method: ``measured`` (output error on calibration data) or ``importance``.
        groups: Every eligible group, by name.
        counts: Group index -> channels to remove.
    """

    target: float | None
    predicted: float
    macs_before: int
    method: str
    groups: list[GroupPlan] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)

    @property
    def error(self) -> float:
        """Predicted error of the plan (sum over groups)."""
        return float(sum(g.error for g in self.groups))

    def as_dicts(self) -> list[dict]:
        """The per-group rows, JSON-ready."""
        return [g.as_dict() for g in self.groups]


def plan_for_counts(groups: list[Group], levels: dict[int, list[int]], errors: dict[int, np.ndarray],
                    counts: dict[int, int], model: MacModel | ChannelModel, target: float | None,
                    method: str) -> BudgetPlan:
    """A :class:`BudgetPlan` describing ``counts`` (removals per group, each one of its levels)."""
    removed = {g.index: counts.get(g.index, 0) / g.size for g in groups}
    rows = []
    for g in sorted(groups, key=lambda g: g.name):
        n = counts.get(g.index, 0)
        err = float(np.interp(n, levels[g.index], errors[g.index]))
        rows.append(GroupPlan(g.index, g.name, g.sources[0] if g.sources else g.name, g.size, n,
                              int(round(model.group_macs(g.index, removed))), err))
    predicted = model.macs(removed) / model.total if model.total > 0 else 1.0
    return BudgetPlan(target, predicted, int(model.total), method, rows, {k: v for k, v in counts.items() if v})


def allocate(groups: list[Group], levels: dict[int, list[int]], errors: dict[int, np.ndarray],
             model: MacModel | ChannelModel,
             target: float, method: str, tolerance: float = OVERSHOOT) -> BudgetPlan:
    """Removal counts reaching ``target`` (MAC ratio) at the least summed predicted error.

    A greedy step of a coarse group (a joined group loses tens of channels per level) can overshoot:
    when the plan lands more than ``tolerance`` below ``target``, the allocation is redone with each
    pruned group held one level lower, and of those that land within ``tolerance`` the one with the
    least predicted error replaces it (none: the greedy plan stays).

    Args:
        groups: Eligible groups.
        levels: Group index -> achievable removal counts, ascending, starting with 0.
        errors: Group index -> predicted error at each level (0 at level 0).
        model: The MAC model (or a :class:`ChannelModel`: the target is then the fraction of the
            groups' channels kept).
        target: Target MAC ratio of the whole model (channel ratio with a :class:`ChannelModel`).
        method: How ``errors`` were obtained (recorded in the plan).
        tolerance: Undershoot of ``target`` accepted without trying the alternatives.
    """
    plan = _greedy(groups, levels, errors, model, target, method)
    if plan.predicted >= target - tolerance:
        return plan
    plans = [plan]
    for gi, n in sorted(plan.counts.items()):
        lv = {**levels, gi: [v for v in levels[gi] if v < n]}
        err = {**errors, gi: errors[gi][:len(lv[gi])]}
        counts = _greedy(groups, lv, err, model, target, method).counts
        plans.append(plan_for_counts(groups, levels, errors, counts, model, target, method))

    within = [p for p in plans[1:] if target - tolerance <= p.predicted <= target + 1e-9]
    best = min(within, key=lambda p: p.error) if within else plan
    if best is not plan:
        log.info("prune_channels: a coarse step overshot the MAC target %.3f (%.3f); replanned to %.3f", target,
                 plan.predicted, best.predicted)
    return best


def _greedy(groups: list[Group], levels: dict[int, list[int]], errors: dict[int, np.ndarray],
            model: MacModel | ChannelModel, target: float, method: str) -> BudgetPlan:
    """The greedy allocation: the cheapest error per MAC saved first, then levels given back."""
    size = {g.index: g.size for g in groups}
    state = {g.index: 0 for g in groups}
    removed = {g.index: 0.0 for g in groups}
    goal = target * model.total
    current = model.macs(removed)
    cache: dict[int, tuple[float, float] | None] = {}
    while current > goal + 1e-9:
        for g in groups:
            if g.index not in cache:
                cache[g.index] = _best_move(g.index, state, levels, errors, removed, size, model)
        moves = [(cost, -saved, g.name, g.index) for g in groups if (m := cache[g.index]) is not None
                 for cost, saved in [m]]
        if not moves:
            log.info("prune_channels: MAC target %.3f not reachable; the plan stops at %.3f", target,
                     current / model.total)
            break
        gi = min(moves)[3]
        state[gi] += 1
        removed[gi] = levels[gi][state[gi]] / size[gi]
        current = model.macs(removed)
        for n in model.neighbours(gi) | {gi}:
            cache.pop(n, None)
    _give_back(groups, state, levels, errors, removed, size, model, goal)
    counts = {gi: levels[gi][s] for gi, s in state.items()}
    return plan_for_counts(groups, levels, errors, counts, model, target, method)


def _give_back(groups: list[Group], state: dict[int, int], levels: dict[int, list[int]], errors: dict[int, np.ndarray],
               removed: dict[int, float], size: dict[int, int], model: MacModel | ChannelModel, goal: float) -> None:
    """Undo single levels (most error saved first) while the MACs stay within ``goal``."""
    while True:
        best = None
        for g in groups:
            s = state[g.index]
            if s == 0:
                continue
            trial = dict(removed)
            trial[g.index] = levels[g.index][s - 1] / size[g.index]
            if model.macs(trial) > goal + 1e-9:
                continue
            key = (-float(errors[g.index][s] - errors[g.index][s - 1]), g.name)
            best = min(best, (key, g.index)) if best is not None else (key, g.index)
        if best is None:
            return
        gi = best[1]
        state[gi] -= 1
        removed[gi] = levels[gi][state[gi]] / size[gi]


def _best_move(gi: int, state: dict[int, int], levels: dict[int, list[int]], errors: dict[int, np.ndarray],
               removed: dict[int, float], size: dict[int, int],
               model: MacModel | ChannelModel) -> tuple[float, float] | None:
    """``(error per MAC saved, MACs saved by the next level)`` of the best path ahead, or ``None``."""
    s, lv = state[gi], levels[gi]
    if s + 1 >= len(lv):
        return None
    here = model.group_macs(gi, removed)
    best = None
    first_saved = 0.0
    for j in range(s + 1, min(len(lv), s + 1 + LOOKAHEAD)):
        trial = dict(removed)
        trial[gi] = lv[j] / size[gi]
        saved = here - model.group_macs(gi, trial)
        if j == s + 1:
            first_saved = saved
        if saved <= 0:
            continue
        cost = max(float(errors[gi][j] - errors[gi][s]), 0.0) / saved
        best = cost if best is None else min(best, cost)
    return None if best is None else (best, first_saved)
