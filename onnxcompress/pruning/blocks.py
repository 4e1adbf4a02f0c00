"""Block constraints of grouped convolutions on the channel groups (see :mod:`.dependency`).

Each grouped conv says, for its input and its output, that the channels form ``group`` equal
blocks that must each lose the same number of channels. On one group the constraints are merged
into their common refinement; each refined block then loses ``k * w`` channels for one count
``k`` and fixed weights ``w`` (all 1 when the blocks nest, else a positive integer solution of the
"equal sum per block" equations: :func:`block_weights`). Groups that share a constrained tensor
and would each be frozen alone (ShuffleNet's stage streams: a Concat of the stem and a conv,
then residual convs, read by group-4 convs) are joined under one budget when that solves them
without pins.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from onnxcompress.core.graph import node_label
from onnxcompress.pruning.types import R_GROUPED

#: :class:`.dependency.Analysis` (that module imports this one; no import back, no cycle).
Analysis = Any

__all__ = ["block_constraints", "block_weights", "refine_blocks", "signatures"]


def block_constraints(analysis: Analysis, mark) -> None:
    """Turn the specs' block constraints into :attr:`Analysis.comp_blocks` (or pins and freezes).

    Groups that share a constrained tensor (a grouped conv reading a Concat of several producers,
    ShuffleNet's stage streams) and that would all be frozen each under its own rule (the others'
    channels pinned) are tried as one group under a shared budget (:attr:`Analysis.joined`): kept
    when their joint rule is solvable without any pin, else each keeps its own rule.
    """
    sig = signatures(analysis)
    cons = [(f"{node_label(s.node)} ({s.node.op})", t, np.asarray(labels, dtype=np.int64))
            for s in analysis.specs for t, labels in s.blocks if t in analysis.offsets]
    joined = _joined_keys(analysis, sig, cons)
    if joined:
        frozen = _frozen_alone(analysis, sig, cons)
        joined = {k: v for k, v in joined.items() if all(j in frozen for j, u in joined.items() if u == v)}
    if joined:
        pins: list = []
        trial = _run_constraints(analysis, _rekey(sig, joined), cons, lambda *a: pins.append(a))
        bad = {key for key, ok in trial.items() if not ok} | {k for p in pins for k in p[1]}
        joined = {k: v for k, v in joined.items() if v not in bad}
        analysis.joined = joined
        sig = _rekey(sig, joined)
    _run_constraints(analysis, sig, cons, lambda tensor, key, idx, where: mark(tensor, idx, R_GROUPED, where),
                     apply=True)


def _joined_keys(analysis: Analysis, sig: dict[int, set[str]], cons) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Group key -> the key of the union of the groups that share a constrained tensor with it."""
    parent: dict[tuple[str, ...], tuple[str, ...]] = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    for _, tensor, _ in cons:
        keys = {tuple(sorted(sig[int(c)])) for c in analysis.components(tensor) if int(c) in sig}
        first, *rest = sorted(keys) or [None]
        for k in rest:
            parent[find(k)] = find(first)
    members: dict = {}
    for k in parent:
        members.setdefault(find(k), []).append(k)
    out = {}
    for keys in members.values():
        if len(keys) > 1:
            union = tuple(sorted({n for k in keys for n in k}))
            out.update((k, union) for k in keys)
    return out


def _frozen_alone(analysis: Analysis, sig: dict[int, set[str]], cons) -> set[tuple[str, ...]]:
    """The group keys none of whose channels could go under their own rules (pins, marks, unsolvable)."""
    pinned: set[int] = set()

    def pin(tensor, keys, idx, where):
        comps = analysis.components(tensor)
        pinned.update(int(c) for c in (comps if idx is None else comps[np.asarray(idx)]))

    solved = _run_constraints(analysis, sig, cons, pin)
    by_key: dict[tuple[str, ...], list[int]] = {}
    for c, names in sig.items():
        by_key.setdefault(tuple(sorted(names)), []).append(c)
    return {key for key, comps in by_key.items()
            if not solved.get(key, True) or all(c in pinned or c in analysis.marks for c in comps)}


def _rekey(sig: dict[int, set[str]], joined: dict) -> dict[int, set[str]]:
    return {c: set(joined.get(tuple(sorted(names)), names)) for c, names in sig.items()}


def _run_constraints(analysis: Analysis, sig: dict[int, set[str]], cons, pin, apply: bool = False) -> dict:
    """Apply the constraints ``cons`` under signatures ``sig``; ``{group key: solvable}``.

    ``pin(tensor, key, indices, where)`` receives every pin; with ``apply`` the labels and block
    weights go into the analysis and unsolvable groups are frozen.
    """
    per_key: dict[tuple[str, ...], list[dict[int, int]]] = {}
    for where, tensor, labels in cons:
        found = _tensor_blocks(analysis, sig, tensor, labels,
                               lambda idx, t=tensor, w=where: pin(t, _key_at(analysis, sig, t, idx), idx, w))
        if found is not None:
            per_key.setdefault(found[0], []).append(found[1])
    solved = {}
    for key, constraints in per_key.items():
        comps = sorted({c for m in constraints for c in m})
        stacked = np.array([[m.get(c, -1) for m in constraints] for c in comps], dtype=np.int64)
        labels = _refined(stacked)
        weights = block_weights(stacked, labels)
        solved[key] = weights is not None
        if not apply:
            continue
        if weights is None:
            members = [c for c, names in sig.items() if tuple(sorted(names)) == key]
            for c in members:
                analysis.marks.setdefault(c, {}).setdefault(R_GROUPED, []).append("incompatible grouped convs")
            continue
        analysis.comp_blocks.update((c, int(b)) for c, b in zip(comps, labels) if b >= 0)
        if np.any(weights != 1):
            analysis.key_weights[key] = weights
    return solved


def _key_at(analysis: Analysis, sig: dict[int, set[str]], tensor: str, idx) -> set[tuple[str, ...]]:
    """The group keys of the pinned channels of ``tensor`` (``idx`` ``None``: all of them)."""
    comps = analysis.components(tensor) if idx is None else analysis.components(tensor)[np.asarray(idx)]
    return {tuple(sorted(sig[int(c)])) for c in comps if int(c) in sig}


def _tensor_blocks(analysis: Analysis, sig: dict[int, set[str]], tensor: str, labels: np.ndarray,
                   pin) -> tuple[tuple[str, ...], dict[int, int]] | None:
    """One grouped conv's rule on ``tensor`` (every block loses as many channels) as block labels
    of the components of one group: ``(group key, {component: block})``, or ``None``.

    The rule is kept for the group with the most channels in ``tensor``; the channels of other
    groups there are pinned (``pin(indices)``), channels of no group never change. A component
    with as many channels in every block needs no label; one inside a single block is labelled
    with it (all such components must have the same number of channels there); one spread over
    some blocks only is pinned, and so are the labelled ones when some block has none of them
    (that block can lose nothing). ``None`` (the tensor frozen) when the multiplicities differ.
    """
    comps = analysis.components(tensor)
    owner = [tuple(sorted(sig[int(c)])) if int(c) in sig else None for c in comps]
    sizes = Counter(o for o in owner if o is not None)
    if not sizes:
        return None
    key = max(sizes, key=lambda k: (sizes[k], k))
    other = np.array([o is not None and o != key for o in owner])
    if other.any():
        pin(np.flatnonzero(other))
    mine = np.array([o == key for o in owner])
    uniq, inverse = np.unique(comps[mine], return_inverse=True)
    counts = np.zeros((len(uniq), int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (inverse.reshape(-1), labels[mine]), 1)
    uniform = np.all(counts == counts[:, :1], axis=1)
    single = (counts > 0).sum(axis=1) == 1
    spread = ~uniform & ~single
    if spread.any():
        pin(np.flatnonzero(mine)[spread[inverse.reshape(-1)]])
    labelled = single & ~uniform
    if len(set(counts.max(axis=1)[labelled].tolist())) > 1:
        pin(None)
        return None
    block = np.argmax(counts, axis=1)
    if labelled.any() and len(np.unique(block[labelled])) < counts.shape[1]:
        pin(np.flatnonzero(mine)[labelled[inverse.reshape(-1)]])  # a block without any: none may go
        return None
    return key, {int(c): int(block[k]) for k, c in enumerate(uniq) if labelled[k]}


def refine_blocks(stacked: np.ndarray) -> np.ndarray | None:
    """One block label per channel whose "equal count per block" rule implies every column's.

    Args:
        stacked: ``[channels, constraints]`` block labels (``-1``: the constraint does not cover it).

    Returns:
        Labels of the common refinement (``-1``: free), or ``None`` if equal counts per refined
        block would not give equal counts per block of some constraint (its blocks contain
        different numbers of refined blocks).
    """
    labels = _refined(stacked)
    for col in stacked.T:
        per_block = {len(np.unique(labels[col == b])) for b in np.unique(col[col >= 0])}
        if len(per_block) > 1:
            return None
    return labels


def _refined(stacked: np.ndarray) -> np.ndarray:
    """The common refinement of the constraints' blocks (one label per distinct row; ``-1``: free)."""
    labels = np.full(len(stacked), -1, dtype=np.int64)
    covered = (stacked >= 0).any(axis=1)
    if covered.any():
        _, inverse = np.unique(stacked[covered], axis=0, return_inverse=True)
        labels[covered] = inverse.reshape(-1)
    return labels


def block_weights(stacked: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    """How many channels each refined block loses per unit, so that every constraint holds.

    Args:
        stacked: ``[channels, constraints]`` block labels (as for :func:`refine_blocks`).
        labels: The refined labels (:func:`refine_blocks`).

    Returns:
        One positive integer weight per refined label (all 1 when equal counts per refined block
        satisfy every constraint, the rule :func:`refine_blocks` checks), else a positive integer
        solution of the block-sum equations (:func:`_smallest_positive`; a budget shared by the
        groups of ShuffleNet's stage streams, whose grouped convs' blocks hold different numbers of
        refined blocks), else ``None``.
    """
    n = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    rows = []
    for col in stacked.T:
        sums = []
        for b in np.unique(col[col >= 0]):
            row = np.zeros(n)
            for lab in np.unique(labels[col == b]):
                row[lab] += 1
            sums.append(row)
        rows += [r - sums[0] for r in sums[1:]]
    if not rows or not np.any(rows):
        return np.ones(n, dtype=np.int64)
    system = np.array(rows)
    if not np.abs(system @ np.ones(n)).max() > 0:
        return np.ones(n, dtype=np.int64)
    sizes = np.bincount(labels[labels >= 0], minlength=n)
    return _smallest_positive(system, sizes)


def _smallest_positive(system: np.ndarray, sizes: np.ndarray, span: int = 8) -> np.ndarray | None:
    """A positive integer ``w`` with ``system @ w == 0``: among small integer combinations
    (coefficients in ``[-span, span]``) of a rational basis, the one whose unit removes the smallest
    fraction of any block (the finest steps), then the most proportional to ``sizes``. Equal-sized
    blocks make ``sizes`` itself a solution: the fallback when the search finds none (or the space
    has more than 3 dimensions); ``None`` only if it is not one."""
    import sympy

    basis = sympy.Matrix(system.astype(np.int64).tolist()).nullspace()
    if not basis:
        return None
    fallback = sizes // np.gcd.reduce(sizes) if np.all(sizes > 0) and not np.abs(system @ sizes).max() else None
    if len(basis) > 3:
        return None if fallback is None else fallback.astype(np.int64)
    vecs = []
    for b in basis:
        den = sympy.ilcm(*[sympy.fraction(x)[1] for x in b])
        vecs.append([int(x * den) for x in b])
    base = np.array(vecs, dtype=np.int64)  # [dims, n]
    grid = np.stack(np.meshgrid(*[np.arange(-span, span + 1)] * len(base), indexing="ij"), -1).reshape(-1, len(base))
    cand = grid @ base
    cand = cand[np.all(cand > 0, axis=1)]
    if not len(cand):
        return None if fallback is None else fallback.astype(np.int64)
    per = cand / np.maximum(sizes, 1)  # the fraction of each block one unit removes
    spread = per.max(axis=1) / per.min(axis=1)
    best = cand[np.lexsort((cand.sum(axis=1), np.round(spread, 9), np.round(per.max(axis=1), 9)))[0]]
    return best // np.gcd.reduce(best)


def signatures(analysis: Analysis) -> dict[int, set[str]]:
    sig: dict[int, set[str]] = {}
    for spec in analysis.specs:
        for name in spec.sources:
            if name in analysis.offsets:
                for c in np.unique(analysis.components(name)):
                    sig.setdefault(int(c), set()).add(name)
    return _rekey(sig, analysis.joined) if analysis.joined else sig
