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
constraints on one group are merged into their common refinement, whose blocks lose channels in
fixed proportions (:attr:`Group.block_weights`) that satisfy all of them; the tensor is frozen
(``grouped_conv``) when the labelled channels have different numbers of slots in their blocks.
Groups that would each be frozen by such pins (ShuffleNet's stage streams) are joined into one
group with one budget when that needs no pin (:mod:`.blocks`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import node_label
from onnxcompress.core.shapes import infer_graph
from onnxcompress.pruning.blocks import block_constraints, signatures
from onnxcompress.pruning.handlers import handle
from onnxcompress.pruning.layout import last_axis_tensors
from onnxcompress.pruning.types import (
    R_CONTROL_FLOW,
    R_EXCLUDED,
    R_GRAPH_INPUT,
    R_GRAPH_OUTPUT,
    R_NO_HANDLER,
    R_SHARED,
    GraphInfo,
    Layer,
    NodeSpec,
    ParamRef,
)

__all__ = ["Analysis", "Group", "analyze", "graph_info"]

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
    block_constraints(analysis, mark)
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
    from scipy.sparse import coo_matrix  # imported here: scipy.sparse costs start-up time to every run
    from scipy.sparse.csgraph import connected_components

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
    sig = signatures(analysis)

    def candidates(ref: ParamRef) -> tuple[int, ...]:
        comps = analysis.comp[analysis.offsets[ref.tensor] + ref.slots.reshape(-1)]
        return tuple(int(c) if int(c) in sig and int(c) not in analysis.marks else -1 for c in comps)

    for refs in by_const.values():
        const = refs[0].constant
        slicings = set()
        for user in const.outputs:
            mine = [r for r in refs if r.node is user and r.tensor in analysis.offsets]
            slicings.add(tuple(sorted((r.index, r.axis, candidates(r)) for r in mine)))
        if len(slicings) > 1:
            for r in refs:
                mark(r.tensor, r.slots, R_SHARED, const.name)


def _build_groups(analysis: Analysis) -> None:
    sig = signatures(analysis)
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
