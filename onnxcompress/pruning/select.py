"""Which channels to remove: per-group budgets (local) or one ranking over all groups (global).

Constraints, always: a group keeps at least one channel and at most ``max_group_ratio`` of it
goes; only removable channels (no freeze, no pin) are candidates; when a group has at least
``round_to`` channels its kept count is a multiple of ``round_to`` (rounded to the nearest
multiple, never below ``round_to``); smaller groups are left alone. Finally no tensor may lose
all its channels (a Split or Slice output that only reads removed channels gets one back, and
in a block-constrained group every other block gets one back too).
Ties are broken by a permutation seeded with ``seed``, so the choice is deterministic.

Groups read or written by grouped convs (:attr:`~.dependency.Group.blocks`) lose the same number
``k`` of channels from every block (``k * w`` from a block of weight ``w`` in groups joined under a
shared budget, :attr:`~.dependency.Group.block_weights`): within each block the ``k`` least important removable
channels go (channels outside any block: the same fraction, by score, not rounded). ``k``
follows the group's target fraction of the smallest block, capped so that every block keeps at
least one channel. ``round_to`` then applies per block (each block keeps a multiple of it) if
some ``k > 0`` allows that, else to the blocks' total kept count; when no ``k > 0`` satisfies
either, ``round_to`` is relaxed for that group (:attr:`Plan.relaxed`, logged), though the blocks
still keep at least ``round_to`` channels in total.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from onnxcompress.pruning.dependency import Analysis, Group

__all__ = ["Budget", "Plan", "choose", "eligible_groups", "levels", "max_removal", "plan_removal", "round_keep",
           "uniform_count", "uniform_want"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """The user's pruning budget.

    Attributes:
        ratio: Fraction of channels to remove.
        scope: ``local`` (every group loses ``ratio``) or ``global`` (one ranking).
        max_group_ratio: At most this fraction of any group is removed.
        round_to: Kept channel count is a multiple of this (groups with >= ``round_to`` channels).
        seed: Seed of the tie-breaking permutation.
    """

    ratio: float
    scope: str = "local"
    max_group_ratio: float = 0.9
    round_to: int = 1
    seed: int = 0


@dataclass
class Plan:
    """Channels to remove, by group index (local channel indices, sorted).

    Attributes:
        remove: Group index -> channels to remove.
        skipped_small: Names of groups left alone because they have fewer than ``round_to`` channels.
        restored: Channels given back so that no tensor ends up empty.
        relaxed: Names of block-constrained groups pruned without ``round_to`` (no block count fits it).
    """

    remove: dict[int, np.ndarray] = field(default_factory=dict)
    skipped_small: list[str] = field(default_factory=list)
    restored: int = 0
    relaxed: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of channels removed."""
        return int(sum(len(v) for v in self.remove.values()))


def round_keep(keep: int, round_to: int) -> int:
    """``keep`` rounded to the nearest multiple of ``round_to`` (at least ``round_to``)."""
    if round_to <= 1:
        return keep
    return max(round_to, math.floor(keep / round_to + 0.5) * round_to)


def max_removal(group: Group, budget: Budget) -> int:
    """Most channels ``group`` may lose (``round_to`` respected)."""
    n = group.size
    cap = min(math.floor(budget.max_group_ratio * n + 1e-9), n - 1, int(group.removable.sum()))
    if cap <= 0:
        return 0
    if budget.round_to > 1:
        keep = -(-(n - cap) // budget.round_to) * budget.round_to
        cap = n - keep if keep <= n else 0
    return max(cap, 0)


def _order(group: Group, scores: np.ndarray, seed: int) -> np.ndarray:
    """Removable channels, least important first (ties: seeded permutation)."""
    rng = np.random.default_rng([seed, group.index])
    tiebreak = rng.permutation(group.size)
    order = np.lexsort((tiebreak, scores))
    return order[group.removable[order]]


def _count(group: Group, want: int, budget: Budget) -> int:
    """``want`` removals adjusted for ``round_to`` and capped."""
    keep = round_keep(group.size - want, budget.round_to)
    return int(min(max(group.size - keep, 0), max_removal(group, budget)))


def _eligible(analysis: Analysis, scores: dict[int, np.ndarray], budget: Budget, plan: Plan) -> list[Group]:
    out = []
    for g in analysis.groups:
        if g.frozen is not None or g.index not in scores or g.size < 2:
            continue
        if budget.round_to > 1 and g.size < budget.round_to:
            plan.skipped_small.append(g.name)
            continue
        out.append(g)
    return out


def _global_counts(groups: list[Group], scores: dict[int, np.ndarray], budget: Budget) -> dict[int, int]:
    """Greedy: the globally least important channels, within each group's cap (not yet rounded)."""
    target = math.floor(budget.ratio * sum(g.size for g in groups) + 0.5)
    raw_caps = {g.index: min(math.floor(budget.max_group_ratio * g.size + 1e-9), g.size - 1,
                             int(g.removable.sum())) for g in groups}
    candidates = []
    for g in groups:
        for rank, ch in enumerate(_order(g, scores[g.index], budget.seed)):
            candidates.append((float(scores[g.index][ch]), g.name, rank, g.index))
    candidates.sort()
    counts = {g.index: 0 for g in groups}
    taken = 0
    for _, _, _, index in candidates:
        if taken >= target:
            break
        if counts[index] < raw_caps[index]:
            counts[index] += 1
            taken += 1
    return counts


def _block_count(target: float, sizes: np.ndarray, cap: int, round_to: int,
                 weights: np.ndarray | None = None) -> tuple[int, bool]:
    """``(k, relaxed)``: units per block (block ``b`` loses ``k * weights[b]``), nearest to ``target``
    among the ``round_to``-valid ones."""
    w = np.ones(len(sizes), dtype=np.int64) if weights is None else weights
    floor_kept = min(round_to, int(sizes.sum()))  # like plain groups: never below round_to
    candidates = [k for k in range(cap + 1) if int((sizes - k * w).sum()) >= floor_kept]
    if round_to <= 1:
        return min(candidates, key=lambda c: (abs(c - target), c)), False
    rules = (lambda k: all((s - k * x) % round_to == 0 and s - k * x >= round_to for s, x in zip(sizes, w)),
             lambda k: int((sizes - k * w).sum()) % round_to == 0)  # the blocks' total
    for rule in rules:
        valid = [k for k in candidates[1:] if rule(k)]
        if valid:
            return min([0, *valid], key=lambda c: (abs(c - target), c)), False
    k = min(candidates, key=lambda c: (abs(c - target), c))
    return k, k > 0


def _blocked_choice(group: Group, scores: np.ndarray, want: int, budget: Budget) -> tuple[np.ndarray, bool]:
    """``(channels to remove, round_to relaxed)`` for a group with block constraints."""
    labels = group.blocks
    order = _order(group, scores, budget.seed)
    frac = want / group.size
    blocks = np.unique(labels[labels >= 0])
    sizes = np.array([int(np.sum(labels == b)) for b in blocks])
    weights = np.ones(len(blocks), dtype=np.int64) if group.block_weights is None else group.block_weights[blocks]
    cap = min(min(math.floor(budget.max_group_ratio * s + 1e-9), s - 1, int(np.sum(group.removable & (labels == b))))
              // int(w) for b, s, w in zip(blocks, sizes, weights))
    k, relaxed = _block_count(frac * (sizes / weights).min(), sizes, max(cap, 0), budget.round_to, weights)
    chosen = [order[labels[order] == b][:k * int(w)] for b, w in zip(blocks, weights)]
    free = order[labels[order] < 0]
    n_free = int(np.sum(labels < 0))
    chosen.append(free[:min(math.floor(frac * n_free + 0.5), math.floor(budget.max_group_ratio * n_free + 1e-9))])
    return np.sort(np.concatenate(chosen)).astype(np.int64), relaxed


def eligible_groups(analysis: Analysis, scores: dict[int, np.ndarray], budget: Budget) -> list[Group]:
    """The groups a budget may prune (not frozen, scored, >= 2 channels, not below ``round_to``)."""
    return _eligible(analysis, scores, budget, Plan())


def choose(group: Group, scores: np.ndarray, want: int, budget: Budget) -> tuple[np.ndarray, bool]:
    """``(channels to remove, round_to relaxed)`` when ``group`` should lose about ``want`` channels
    (``round_to``, the cap and block constraints applied)."""
    if group.blocks is not None:
        return _blocked_choice(group, scores, want, budget)
    n = _count(group, want, budget)
    return np.sort(_order(group, scores, budget.seed)[:n]), False


def uniform_want(group: Group, budget: Budget) -> int:
    """Channels ``budget.ratio`` asks of ``group`` under a uniform local budget (before rounding)."""
    return math.floor(budget.ratio * group.size + 0.5)


def uniform_count(group: Group, budget: Budget) -> int:
    """Channels a uniform local budget removes from ``group`` (``round_to``, cap and blocks applied)."""
    return len(choose(group, np.zeros(group.size), uniform_want(group, budget), budget)[0])


def levels(group: Group, scores: np.ndarray, budget: Budget) -> list[int]:
    """Every removal count :func:`choose` can give for ``group``, ascending (starts with 0)."""
    if group.blocks is None:
        return sorted({_count(group, want, budget) for want in range(1, group.size)} | {0})
    return sorted({len(choose(group, scores, want, budget)[0]) for want in range(1, group.size)} | {0})


def plan_removal(analysis: Analysis, scores: dict[int, np.ndarray], budget: Budget,
                 counts: dict[int, int] | None = None) -> Plan:
    """Choose the channels to remove.

    Args:
        analysis: The dependency analysis.
        scores: Group index -> channel scores (normalised per group for ``global``).
        budget: Ratio, scope and constraints.
        counts: Group index -> channels to remove (a non-uniform allocation, e.g. from
            :mod:`.budget`); replaces ``budget.ratio`` and ``scope`` (groups not listed keep all).
    """
    plan = Plan()
    groups = _eligible(analysis, scores, budget, plan)
    if counts is not None:
        wants = dict(counts)
    elif budget.scope == "global":
        wants = _global_counts(groups, scores, budget)
    else:
        wants = {g.index: uniform_want(g, budget) for g in groups}
    for g in groups:
        if counts is not None and not wants.get(g.index, 0):
            continue
        chosen, relaxed = choose(g, scores[g.index], wants.get(g.index, 0), budget)
        if relaxed:
            plan.relaxed.append(g.name)
            log.info("prune_channels: group %s: round_to=%d relaxed (its grouped-conv blocks allow no "
                     "multiple)", g.name, budget.round_to)
        if len(chosen):
            plan.remove[g.index] = chosen
    plan.restored = _keep_tensors_nonempty(analysis, plan, scores)
    return plan


def _keep_tensors_nonempty(analysis: Analysis, plan: Plan, scores: dict[int, np.ndarray]) -> int:
    """Give back the best removed channel of any tensor that would lose every channel."""
    removed = np.zeros(len(analysis.comp_group), dtype=bool)
    for gi, local in plan.remove.items():
        removed[analysis.groups[gi].comps[local]] = True
    restored = 0
    for name in sorted(analysis.offsets):
        comps = np.unique(analysis.components(name))
        if not removed[comps].all():
            continue
        best = max(comps, key=lambda c: (scores[analysis.comp_group[c]][analysis.comp_local[c]], -c))
        gi, local = int(analysis.comp_group[best]), int(analysis.comp_local[best])
        back = _give_back(analysis.groups[gi], plan.remove[gi], local, scores[gi])
        plan.remove[gi] = np.setdiff1d(plan.remove[gi], back)
        removed[analysis.groups[gi].comps[back]] = False
        restored += len(back)
        log.debug("prune_channels: kept one channel of %s so that it is not empty", name)
    return restored


def _give_back(group: Group, removed: np.ndarray, local: int, scores: np.ndarray) -> np.ndarray:
    """``local``, plus (block-constrained groups) the best removed channels of every block: one
    unit of each (``block_weights`` channels; one each without weights), ``local`` counting in its own."""
    labels = group.blocks
    if labels is None or labels[local] < 0:
        return np.asarray([local], dtype=np.int64)
    back = [local]
    for b in np.unique(labels[labels >= 0]):
        n = 1 if group.block_weights is None else int(group.block_weights[b])
        n -= int(b == labels[local])
        mine = removed[(labels[removed] == b) & (removed != local)]
        if len(mine) and n > 0:
            back += [int(m) for m in mine[np.lexsort((-mine, scores[mine]))[::-1][:n]]]
    return np.asarray(back, dtype=np.int64)
