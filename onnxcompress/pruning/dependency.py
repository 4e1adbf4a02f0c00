"""Dependency analysis: which channels of a graph must be removed together.

Every channel of every channel tensor is a *slot* ``(tensor, index)``. The handlers link slots
that are the same channel (pass-through ops, residual adds, concat/split offsets, flatten ranges,
depthwise convs); the connected components of those links are *coupled channels*: removing one
removes all of its slots everywhere. A component is removable when it contains the output slot
of at least one source (a weight layer's free output channel) and carries no freeze or pin.

A :class:`Group` gathers the components that have the same set of source tensors: all output
channels of one conv, the channels of a residual stream (every conv feeding it), one conv's part
of a concat. Importance scores, ratios and ``round_to`` apply per group.

Grouped convolutions add *block constraints* (``NodeSpec.blocks``): the channels of their input
and of their output form ``group`` equal blocks that must each lose the same number of channels.
A constraint applies to the group with the most channels in the tensor (:attr:`Group.blocks`:
one block label per group channel, ``-1`` for channels no grouped conv constrains); the channels
of other groups there are pinned (``grouped_conv``). A coupled channel that has as many slots in
every block (a channel shuffle couples one channel of each block) needs no label; one whose slots
lie in one block is labelled with it; one spread over some blocks only is pinned. Several
constraints on one group are merged into their common refinement when it implies all of them;
the tensor (or group) is frozen (``grouped_conv``) when the labelled channels have different
numbers of slots in their blocks, or constraints do not merge.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from onnxcompress.core.graph import node_label
from onnxcompress.core.shapes import infer_graph
from onnxcompress.pruning.handlers import handle
from onnxcompress.pruning.layout import last_axis_tensors
from onnxcompress.pruning.types import (
    R_CONTROL_FLOW,
    R_EXCLUDED,
    R_GRAPH_INPUT,
    R_GRAPH_OUTPUT,
    R_GROUPED,
    R_NO_HANDLER,
    R_SHARED,
    GraphInfo,
    Layer,
    NodeSpec,
    ParamRef,
)

__all__ = ["Analysis", "Group", "analyze", "block_weights", "graph_info", "refine_blocks"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Group:
    """Channels pruned together under one budget.

    Attributes:
        index: Position in :attr:`Analysis.groups`.
        name: ``+``-joined labels of the source nodes.
        comps: Global component id of each group channel (the group's local order).
        removable: Per group channel: whether it may be removed.
        reasons: Freeze/pin reason -> number of group channels it blocks.
        frozen: The main reason when no channel is removable, else ``None``.
        blockers: ``"node (op): reason"`` for the nodes that froze or pinned channels.
        sources: Labels of the producers (weight layers) whose output channels are the group.
        source_tensors: Their output tensors.
        consumers: Labels of the weight layers that read the group's channels.
        tensors: Tensor -> group channel index of each of its channels (``-1``: another group).
        params: Every constant slice the group touches.
        blocks: Block label of each group channel under the grouped-conv constraints (``-1``:
            unconstrained), or ``None`` when no grouped conv constrains the group.
        block_weights: Channels each block label loses per unit (a budget shared by groups joined
            through grouped convs, e.g. ShuffleNet's stage streams), or ``None``: one each.
    """

    index: int
    name: str
    comps: np.ndarray
    removable: np.ndarray
    reasons: dict[str, int]
    frozen: str | None
    blockers: list[str]
    sources: list[str]
    source_tensors: list[str]
    consumers: list[str] = field(default_factory=list)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    params: list[ParamRef] = field(default_factory=list)
    blocks: np.ndarray | None = None
    block_weights: np.ndarray | None = None

    @property
    def size(self) -> int:
        """Number of channels of the group."""
        return len(self.comps)


@dataclass(eq=False)
class Analysis:
    """The result of :func:`analyze`.

    Attributes:
        graph: The analysed graph.
        info: Its shapes and opset.
        specs: One spec per node, in graph order.
        offsets: Channel tensor -> its first slot id.
        counts: Channel tensor -> number of channels.
        comp: Slot id -> component id.
        comp_group: Component id -> group index (``-1``: not in a group).
        comp_local: Component id -> index within its group.
        marks: Component id -> ``{reason: [where, ...]}`` for frozen or pinned components.
        groups: The groups, sorted by name.
        unknown_excludes: Names in ``exclude`` that match no node or tensor.
        comp_blocks: Component id -> block label under the grouped-conv constraints.
        joined: Group key -> the key of the joint group it is part of (a shared budget).
        key_weights: Group key -> channels each block label loses per unit (absent: 1 each).
    """

    graph: gs.Graph
    info: GraphInfo
    specs: list[NodeSpec]
    offsets: dict[str, int]
    counts: dict[str, int]
    comp: np.ndarray
    comp_group: np.ndarray
    comp_local: np.ndarray
    marks: dict[int, dict[str, list[str]]]
    groups: list[Group]
    unknown_excludes: list[str] = field(default_factory=list)
    comp_blocks: dict[int, int] = field(default_factory=dict)
    joined: dict[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict)
    key_weights: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict)

    def slots(self, tensor: str) -> np.ndarray:
        """Slot ids of ``tensor``'s channels."""
        return self.offsets[tensor] + np.arange(self.counts[tensor])

    def components(self, tensor: str) -> np.ndarray:
        """Component id of each channel of ``tensor``."""
        return self.comp[self.slots(tensor)]

    @property
    def layers(self) -> list[Layer]:
        """Every weight layer, in graph order."""
        return [s.layer for s in self.specs if s.layer is not None]

    def group(self, name: str) -> Group:
        """The group called ``name``."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


def graph_info(graph: gs.Graph, dims: Mapping[str, int] | None = None) -> GraphInfo:
    """Shapes of every tensor (onnx shape inference, then graphsurgeon's own) and the opset.

    ``dims``: values of symbolic input dims to infer at (the data's shapes, ``Dims.known()``); the
    others stay symbolic.
    """
    shapes: dict[str, tuple[int | None, ...]] = {}
    symbols: dict[str, tuple[str | None, ...]] = {}
    try:
        model = infer_graph(graph, dims)
        for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                        for d in tt.shape.dim)
                symbols[vi.name] = tuple(d.dim_param or None for d in tt.shape.dim)
    except Exception as exc:
        log.debug("pruning: shape inference failed: %s", exc)
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and t.shape is not None and name not in shapes:
            shapes[name] = tuple(d if isinstance(d, int) and d > 0 else None for d in t.shape)
            symbols[name] = tuple(d if isinstance(d, str) and d else None for d in t.shape)
    return GraphInfo(shapes, int(graph.opset or 0), frozenset(t.name for t in graph.outputs), symbols=symbols)


def analyze(graph: gs.Graph, *, protect_io: bool = True, exclude: tuple[str, ...] | list[str] = (),
            dims: Mapping[str, int] | None = None) -> Analysis:
    """Build the channel groups of ``graph`` (not modified).

    Args:
        graph: The graph (main graph; subgraphs are not entered: tensors they read freeze).
        protect_io: Freeze channels of graph outputs (graph inputs are always pinned).
        exclude: Node or tensor names whose channels are frozen (a node: all its tensors).
        dims: Symbolic input dims to trace shapes at (see :func:`graph_info`).
    """
    info = graph_info(graph, dims)
    info.last = last_axis_tensors(graph, info)
    specs = [handle(n, info) for n in graph.nodes]
    offsets, counts = _slot_table(graph, info)
    comp = _components(specs, offsets, sum(counts.values()))
    marks: dict[int, dict[str, list[str]]] = {}

    def mark(tensor: str, idx: np.ndarray | None, reason: str, where: str) -> None:
        if tensor not in offsets:
            return
        slots = offsets[tensor] + (np.arange(counts[tensor]) if idx is None else np.asarray(idx))
        for c in np.unique(comp[slots]):
            marks.setdefault(int(c), {}).setdefault(reason, []).append(where)

    _mark_specs(specs, offsets, mark)
    _mark_io(graph, protect_io, mark)
    unknown = _mark_exclude(graph, exclude, offsets, mark)
    _mark_subgraph_reads(graph, offsets, mark)
    analysis = Analysis(graph, info, specs, offsets, counts, comp, np.full(0, -1), np.full(0, -1), marks, [], unknown)
    _block_constraints(analysis, mark)
    _mark_shared(analysis, mark)
    _build_groups(analysis)
    return analysis


def _slot_table(graph: gs.Graph, info: GraphInfo) -> tuple[dict[str, int], dict[str, int]]:
    offsets, counts, total = {}, {}, 0
    for name, t in sorted(graph.tensors().items()):
        c = info.channels(t) if isinstance(t, gs.Variable) and name else None
        if isinstance(c, int) and c > 0:
            offsets[name], counts[name] = total, c
            total += c
    return offsets, counts


def _components(specs: list[NodeSpec], offsets: dict[str, int], total: int) -> np.ndarray:
    rows, cols = [np.arange(total)], [np.arange(total)]
    for spec in specs:
        for a, ia, b, ib in spec.links:
            if a in offsets and b in offsets:
                rows.append(offsets[a] + ia)
                cols.append(offsets[b] + ib)
    r, c = np.concatenate(rows), np.concatenate(cols)
    matrix = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(total, total))
    _, labels = connected_components(matrix, directed=False)
    return labels.astype(np.int64)


def _mark_specs(specs: list[NodeSpec], offsets: dict[str, int], mark) -> None:
    for spec in specs:
        where = f"{node_label(spec.node)} ({spec.node.op})"
        for tensor, reason in spec.freezes:
            mark(tensor, None, reason, where)
        for tensor, idx, reason in spec.pins:
            mark(tensor, idx, reason, where)
        for t in spec.tensors():
            if t.name in offsets and t.name not in spec.touched:
                mark(t.name, None, R_NO_HANDLER, where)


def _mark_io(graph: gs.Graph, protect_io: bool, mark) -> None:
    for t in graph.inputs:
        mark(t.name, None, R_GRAPH_INPUT, t.name)
    if protect_io:
        for t in graph.outputs:
            mark(t.name, None, R_GRAPH_OUTPUT, t.name)


def _mark_exclude(graph: gs.Graph, exclude, offsets: dict[str, int], mark) -> list[str]:
    names = set(exclude)
    found = set()
    for node in graph.nodes:
        if node.name in names:
            found.add(node.name)
            for t in [*node.inputs, *node.outputs]:
                mark(t.name, None, R_EXCLUDED, node.name)
    for name in sorted(names & set(graph.tensors())):
        found.add(name)
        mark(name, None, R_EXCLUDED, name)
    return sorted(names - found)


def _mark_subgraph_reads(graph: gs.Graph, offsets: dict[str, int], mark) -> None:
    main = {id(n) for n in graph.nodes}
    tensors = graph.tensors()
    for name in offsets:
        if any(id(n) not in main for n in tensors[name].outputs):
            mark(name, None, R_CONTROL_FLOW, name)


def _mark_shared(analysis: Analysis, mark) -> None:
    """Freeze channels of constants whose users would slice them differently (or not at all)."""
    by_const: dict[int, list[ParamRef]] = {}
    for spec in analysis.specs:
        for ref in spec.params:
            by_const.setdefault(id(ref.constant), []).append(ref)
    sig = _signatures(analysis)

    def candidates(ref: ParamRef) -> tuple[int, ...]:
        comps = analysis.comp[analysis.offsets[ref.tensor] + ref.slots.reshape(-1)]
        return tuple(int(c) if int(c) in sig and int(c) not in analysis.marks else -1 for c in comps)

    for refs in by_const.values():
        const = refs[0].constant
        signatures = set()
        for user in const.outputs:
            mine = [r for r in refs if r.node is user and r.tensor in analysis.offsets]
            signatures.add(tuple(sorted((r.index, r.axis, candidates(r)) for r in mine)))
        if len(signatures) > 1:
            for r in refs:
                mark(r.tensor, r.slots, R_SHARED, const.name)


def _block_constraints(analysis: Analysis, mark) -> None:
    """Turn the specs' block constraints into :attr:`Analysis.comp_blocks` (or pins and freezes).

    Groups that share a constrained tensor (a grouped conv reading a Concat of several producers,
    ShuffleNet's stage streams) and that would all be frozen each under its own rule (the others'
    channels pinned) are tried as one group under a shared budget (:attr:`Analysis.joined`): kept
    when their joint rule is solvable without any pin, else each keeps its own rule.
    """
    sig = _signatures(analysis)
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


def _signatures(analysis: Analysis) -> dict[int, set[str]]:
    sig: dict[int, set[str]] = {}
    for spec in analysis.specs:
        for name in spec.sources:
            if name in analysis.offsets:
                for c in np.unique(analysis.components(name)):
                    sig.setdefault(int(c), set()).add(name)
    return _rekey(sig, analysis.joined) if analysis.joined else sig


def _build_groups(analysis: Analysis) -> None:
    sig = _signatures(analysis)
    ncomp = int(analysis.comp.max()) + 1 if len(analysis.comp) else 0
    keys: dict[tuple[str, ...], list[int]] = {}
    for c, names in sig.items():
        keys.setdefault(tuple(sorted(names)), []).append(c)
    labels = {s.node.outputs[0].name: node_label(s.node) for s in analysis.specs if s.sources}
    analysis.comp_group = np.full(ncomp, -1, dtype=np.int64)
    analysis.comp_local = np.full(ncomp, -1, dtype=np.int64)
    named = sorted(("+".join(sorted(labels[t] for t in key)), key) for key in keys)
    for index, (name, key) in enumerate(named):
        # the sources' channels in order (a joined group's sources hold different parts of it; a
        # source may also hold other groups' channels: a conv added to a concat)
        first = np.concatenate([analysis.components(t) for t in key])
        _, pos = np.unique(first, return_index=True)
        comps = first[np.sort(pos)]
        comps = comps[np.isin(comps, keys[key])]
        analysis.comp_group[comps] = index
        analysis.comp_local[comps] = np.arange(len(comps))
        analysis.groups.append(_make_group(analysis, index, name, key, comps, labels))
    _fill_members(analysis)


def _make_group(analysis: Analysis, index: int, name: str, key: tuple[str, ...], comps: np.ndarray,
                labels: dict[str, str]) -> Group:
    reasons: Counter = Counter()
    blockers: set[str] = set()
    removable = np.ones(len(comps), dtype=bool)
    for i, c in enumerate(comps):
        found = analysis.marks.get(int(c))
        if found:
            removable[i] = False
            reasons.update(found.keys())
            blockers.update(f"{w}: {r}" for r, ws in found.items() for w in ws)
    frozen = None
    if not removable.any():
        frozen = min(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    blocks = None
    if any(int(c) in analysis.comp_blocks for c in comps):
        blocks = np.array([analysis.comp_blocks.get(int(c), -1) for c in comps], dtype=np.int64)
    return Group(index, name, comps, removable, dict(sorted(reasons.items())), frozen, sorted(blockers)[:8],
                 sorted(labels[t] for t in key), list(key), blocks=blocks,
                 block_weights=analysis.key_weights.get(key) if blocks is not None else None)


def _fill_members(analysis: Analysis) -> None:
    groups = analysis.groups
    for name in analysis.offsets:
        comps = analysis.components(name)
        owner = analysis.comp_group[comps]
        for gi in np.unique(owner[owner >= 0]):
            groups[gi].tensors[name] = np.where(owner == gi, analysis.comp_local[comps], -1)
    for spec in analysis.specs:
        for ref in spec.params:
            if ref.tensor in analysis.offsets:
                owner = analysis.comp_group[analysis.comp[analysis.offsets[ref.tensor] + ref.slots]]
                for gi in np.unique(owner[owner >= 0]):
                    groups[gi].params.append(ref)
        layer = spec.layer
        if layer is not None and layer.inp in analysis.offsets:
            owner = analysis.comp_group[analysis.components(layer.inp)]
            for gi in np.unique(owner[owner >= 0]):
                groups[gi].consumers.append(node_label(layer.node))
