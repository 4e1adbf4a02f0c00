"""Attention-head pruning math: which blocks can lose heads, how important each head is, which go,
and the rewrite that removes them (the blocks come from :func:`onnxcompress.core.attention.find_blocks`).

Removing head ``h`` of a block with ``H`` heads of size ``dh`` removes the feature columns
``[h·dh, (h+1)·dh)`` of the Q, K and V projections (weights and biases; for onnxruntime's packed
QKV weight the same columns of each of the three sections), the same input rows of the output
projection ``O``, and rewrites every literal that counts heads (``H`` in the head-splitting
Reshapes, ``H·dh`` in the merging ones; ``num_heads``/``q_num_heads``/``kv_num_heads``). Heads are
independent until ``O`` sums them, so the pruned block computes exactly what the original computes
with the pruned heads' rows of ``O`` zeroed (:func:`mask_heads`, the equivalence oracle).

Importance (:func:`head_scores`): a head's contribution to the block's output is
``C_h · W_O[h]`` (its context times its rows of ``O``), and its score is that term's L2 norm over
the calibration tokens -- the exact size of what removing the head takes out of the residual
stream, where weight norms only bound it. Without data, ``‖W_V[h]‖·‖W_O[h]‖`` stands in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core.attention import R_NON_CONSTANT, AttentionBlock, Linear
from onnxcompress.core.graph import Names, const_values
from onnxcompress.runtime.data import CalibSource

__all__ = [
    "R_GRAPH_OUTPUT",
    "R_OUTSIDE_READ",
    "R_PER_HEAD_BIAS",
    "R_SHARED",
    "block_problem",
    "head_columns",
    "head_scores",
    "mask_heads",
    "prune_block",
    "select_heads",
    "weight_scores",
]

log = logging.getLogger(__name__)

R_SHARED = "shared_weight"
R_GRAPH_OUTPUT = "graph_output_inside_block"
R_OUTSIDE_READ = "head_tensor_read_outside_block"
R_PER_HEAD_BIAS = "per_head_attention_bias"


def head_columns(heads: Sequence[int] | np.ndarray, head_dim: int) -> np.ndarray:
    """Feature indices of ``heads`` (sorted as given): ``[h·dh, (h+1)·dh)`` for each."""
    heads = np.asarray(heads, dtype=np.int64)
    return (heads[:, None] * head_dim + np.arange(head_dim, dtype=np.int64)).reshape(-1)


def _linears(block: AttentionBlock) -> list[Linear]:
    return [lin for lin in (block.q, block.k, block.v, block.qkv, block.o) if lin is not None]


def _weights_problem(block: AttentionBlock) -> str | None:
    for lin in _linears(block):
        for t in (lin.weight, lin.bias):
            if t is None:
                continue
            if const_values(t) is None:
                return R_NON_CONSTANT
            if len(t.outputs) != 1:
                return R_SHARED
    return None


def _carried(block: AttentionBlock) -> tuple[list[gs.Tensor], set[int]]:
    """The tensors that carry heads, and those whose axes 0, 1 are ``[batch, seq]`` (safe to ``Shape``)."""
    tensors: list[gs.Tensor] = []
    safe: set[int] = set()
    for lin in (block.q, block.k, block.v, block.qkv):
        if lin is not None:
            outs = [lin.node.outputs[0], lin.output]
            tensors += outs
            safe.update(id(t) for t in outs)
    for node in block.nodes:
        tensors += node.outputs
        if node.op == "Reshape":
            safe.add(id(node.inputs[0]))
    return tensors, safe


def _reads_batch_seq(shape: gs.Node) -> bool:
    """A ``Shape`` whose value only feeds ``Gather``s of axis 0 or 1."""
    if "start" in shape.attrs or "end" in shape.attrs:
        return False
    for c in shape.outputs[0].outputs:
        index = const_values(c.inputs[1]) if c.op == "Gather" and len(c.inputs) > 1 else None
        if index is None or index.size != 1 or int(index.reshape(-1)[0]) not in (0, 1):
            return False
    return True


def _mask_problem(block: AttentionBlock) -> str | None:
    """A score bias with a heads axis (relative position bias) would need slicing too."""
    for node in block.nodes:
        if node.op not in ("Add", "Sub", "Where") or block.style != "decomposed":
            continue
        chain = {id(o) for n in block.nodes for o in n.outputs}
        for t in node.inputs:
            if id(t) in chain:
                continue
            shape = t.shape if isinstance(t, gs.Variable) else (None if const_values(t) is None else t.shape)
            if shape and len(shape) >= 4 and isinstance(shape[-3], int) and shape[-3] not in (1,) and block.heads > 1:
                return R_PER_HEAD_BIAS
    return None


#: Shape arithmetic a ``Shape`` read may flow through on its way back into the block.
_SHAPE_MATH = frozenset({"Gather", "Slice", "Cast", "Unsqueeze", "Squeeze", "Concat", "Div", "Mul", "Add", "Sub",
                         "Sqrt", "Reciprocal"})


def _feeds_block(t: gs.Tensor, inside: set[int], depth: int = 10) -> bool:
    """Every use of ``t`` (a shape read) ends, through shape arithmetic, in a node of the block:
    a computed Reshape target or the ``1/√dh`` scale, which read the pruned tensors themselves."""
    for c in t.outputs:
        if id(c) in inside:
            continue
        if depth == 0 or c.op not in _SHAPE_MATH or not all(_feeds_block(o, inside, depth - 1) for o in c.outputs):
            return False
    return True


def block_problem(graph: gs.Graph, block: AttentionBlock) -> str | None:
    """Why ``block`` cannot lose heads (a reason code), or ``None``."""
    problem = block.problem or _weights_problem(block) or _mask_problem(block)
    if problem:
        return problem
    tensors, safe = _carried(block)
    outputs = {id(t) for t in graph.outputs}
    if any(id(t) in outputs for t in tensors):
        return R_GRAPH_OUTPUT
    inside = {id(n) for n in block.nodes} | {id(lin.node) for lin in _linears(block)}
    inside |= {id(lin.bias_node) for lin in _linears(block) if lin.bias_node is not None}
    for t in tensors:
        for c in t.outputs:
            if id(c) in inside:
                continue
            if c.op != "Shape" or not ((id(t) in safe and _reads_batch_seq(c)) or _feeds_block(c.outputs[0], inside)):
                return R_OUTSIDE_READ
    return None


def _replace(node: gs.Node, index: int, values: np.ndarray, names: Names, base: str) -> None:
    """Point input ``index`` of ``node`` at a new constant (the old one is never edited)."""
    node.inputs[index] = gs.Constant(names.fresh(base), np.ascontiguousarray(values))


def _take(lin: Linear, cols: np.ndarray, side: str, names: Names) -> None:
    """Keep only the features ``cols`` of ``lin``'s outputs (``side="out"``, bias too) or inputs."""
    w = const_values(lin.weight)
    assert w is not None
    axis = lin.out_axis if side == "out" else lin.in_axis
    _replace(lin.node, 1, np.take(w, cols, axis=axis), names, f"{lin.weight.name}_heads")
    bias = const_values(lin.bias)
    if side != "out" or bias is None or bias.ndim != 1 or bias.size != w.shape[axis]:
        return
    holder = lin.bias_node if lin.bias_node is not None else lin.node
    index = next(i for i, t in enumerate(holder.inputs) if t is lin.bias)
    _replace(holder, index, bias[cols], names, f"{lin.bias.name}_heads" if lin.bias is not None else "bias_heads")


def prune_block(graph: gs.Graph, block: AttentionBlock, keep: Sequence[int] | np.ndarray) -> None:
    """Rewrite ``block`` of ``graph`` to keep only the heads ``keep`` (see the module docstring)."""
    names = Names(graph)
    keep = np.sort(np.asarray(keep, dtype=np.int64))
    kept = len(keep)
    cols = head_columns(keep, block.head_dim)
    for lin in (block.q, block.k, block.v):
        if lin is not None:
            _take(lin, cols, "out", names)
    if block.qkv is not None:
        section = block.qkv.out_features // 3
        _take(block.qkv, np.concatenate([s * section + cols for s in range(3)]), "out", names)
        block.node.attrs["num_heads"] = kept
        if "qkv_hidden_sizes" in block.node.attrs:
            block.node.attrs["qkv_hidden_sizes"] = [kept * block.head_dim] * 3
    for attr in ("q_num_heads", "kv_num_heads"):
        if block.style == "opset23" and attr in block.node.attrs:
            block.node.attrs[attr] = kept
    assert block.o is not None
    _take(block.o, cols, "in", names)
    for t in _carried(block)[0]:
        if isinstance(t, gs.Variable):
            t.shape = None  # stale annotations (exporters' value_info) would contradict the new widths
    clones: dict[int, gs.Node] = {}
    for e in block.shapes:
        holder = e.holder if e.holder is e.reshape else _own_concat(graph, e.holder, block, clones, names)
        values = const_values(holder.inputs[e.input_index])
        assert values is not None
        new = values.copy()
        new.reshape(-1)[e.position] = kept * e.unit
        _replace(holder, e.input_index, new, names, f"{holder.inputs[e.input_index].name}_heads")


def _own_concat(graph: gs.Graph, concat: gs.Node, block: AttentionBlock, clones: dict[int, gs.Node],
                names: Names) -> gs.Node:
    """A copy of a shape ``Concat`` for this block's Reshapes only (dynamo computes one target for
    the Q/K/V Reshapes of every layer; blocks may keep different head counts)."""
    if id(concat) not in clones:
        out = gs.Variable(names.fresh(f"{concat.outputs[0].name}_heads"), dtype=concat.outputs[0].dtype)
        clone = gs.Node("Concat", names.fresh(f"{concat.name or 'Concat'}_heads"), dict(concat.attrs),
                        list(concat.inputs), [out])
        graph.nodes.append(clone)
        for reshape in {id(e.reshape): e.reshape for e in block.shapes if e.holder is concat}.values():
            reshape.inputs[1] = out
        clones[id(concat)] = clone
    return clones[id(concat)]


def mask_heads(block: AttentionBlock, drop: Sequence[int] | np.ndarray, graph: gs.Graph) -> None:
    """Zero the rows of ``O`` that read the heads ``drop`` (a new constant): the original model
    with those heads silenced, which the pruned model must equal."""
    assert block.o is not None
    w = const_values(block.o.weight)
    assert w is not None
    zeroed = w.copy()
    index = [slice(None)] * w.ndim
    index[block.o.in_axis] = head_columns(np.asarray(drop, dtype=np.int64), block.head_dim)  # type: ignore[call-overload]
    zeroed[tuple(index)] = 0
    _replace(block.o.node, 1, zeroed, Names(graph), f"{block.o.weight.name}_masked")


def _o_rows(block: AttentionBlock) -> np.ndarray:
    """``O``'s weight as ``[H, dh, out]``."""
    assert block.o is not None
    w = const_values(block.o.weight)
    assert w is not None
    w = w if block.o.in_axis == 0 else w.T
    return w.reshape(block.heads, block.head_dim, -1).astype(np.float64)


def weight_scores(block: AttentionBlock) -> np.ndarray:
    """Data-free scores: ``‖W_V[h]‖ · ‖W_O[h]‖`` (the V columns of the packed weight when fused)."""
    o = np.linalg.norm(_o_rows(block).reshape(block.heads, -1), axis=1)
    v_lin = block.v if block.v is not None else block.qkv
    assert v_lin is not None
    w = const_values(v_lin.weight)
    assert w is not None
    w = w if v_lin.out_axis == 1 else w.T
    w = w[:, -block.heads * block.head_dim:]
    v = np.linalg.norm(w.reshape(w.shape[0], block.heads, block.head_dim), axis=(0, 2))
    return o * v


def _context_perm(block: AttentionBlock) -> tuple[int, ...] | None:
    """How to transpose a 4-D context to ``[b, s, H, dh]`` (``None``: it is 3-D, ``[b, s, H·dh]``)."""
    if block.style == "fused" or "q_num_heads" in block.node.attrs:
        return None
    for c in block.context.outputs:
        if c.op == "Transpose" and len(c.attrs.get("perm", [])) == 4:
            return tuple(int(p) for p in c.attrs["perm"])
    return (0, 2, 1, 3)


def head_scores(model: onnx.ModelProto, blocks: Sequence[AttentionBlock], data: CalibSource, *,
                batch_size: int = 8, progress: bool = False) -> dict[str, np.ndarray]:
    """``‖C_h · W_O[h]‖`` per head of every block over the calibration tokens (see the module docstring)."""
    rows = {b.name: _o_rows(b) for b in blocks}
    sums = {b.name: np.zeros(b.heads) for b in blocks}
    perms = {b.name: _context_perm(b) for b in blocks}

    def consume(batch: object, tensors: dict[str, np.ndarray]) -> None:
        for b in blocks:
            c = tensors[b.context.name]
            perm = perms[b.name]
            c = c.transpose(perm) if perm is not None else c
            c = c.reshape(-1, b.heads, b.head_dim).astype(np.float64)
            for h in range(b.heads):
                sums[b.name][h] += float(np.square(c[:, h] @ rows[b.name][h]).sum())

    from onnxcompress.runtime.capture import capture  # onnxruntime only when scoring on data

    capture(model, [b.context.name for b in blocks], data, consume, batch_size=batch_size, progress=progress)
    return {k: np.sqrt(v) for k, v in sums.items()}


def select_heads(scores: dict[str, np.ndarray], ratio: float, scope: str = "local",
                 min_heads: int = 1) -> dict[str, np.ndarray]:
    """The heads to keep per block (sorted): the lowest-scoring ``ratio`` of each block (``local``)
    or of all heads, scores divided by their block's mean (``global``); never fewer than ``min_heads``."""
    if scope == "local":
        out = {}
        for name, s in scores.items():
            drop = min(math.floor(ratio * len(s) + 0.5), max(len(s) - min_heads, 0))
            order = np.argsort(s, kind="stable")
            out[name] = np.sort(order[drop:])
        return out
    pool = sorted((float(s[h] / max(s.mean(), 1e-30)), name, h) for name, s in scores.items() for h in range(len(s)))
    total = math.floor(ratio * len(pool) + 0.5)
    kept = {name: set(range(len(s))) for name, s in scores.items()}
    for _, name, h in pool:
        if total == 0:
            break
        if len(kept[name]) > min_heads:
            kept[name].discard(h)
            total -= 1
    return {name: np.array(sorted(k), dtype=np.int64) for name, k in kept.items()}
