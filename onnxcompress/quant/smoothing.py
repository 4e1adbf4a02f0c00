"""SmoothQuant-style smoothing: which linear layers can share a per-channel scale with the op that
produces their input, the scales, and the exact folding (the pass is :mod:`onnxcompress.passes.smooth`).

A *group* is a source tensor ``t`` (the output of a LayerNormalization, of a decomposed layer
norm's final ``Add(Mul(n, gamma), beta)``, of a ``Mul``/``Div`` by a constant (the final ``* 0.5``
of an exported GELU), or of a linear layer ``MatMul/Gemm (+ bias Add)`` with a constant weight) and the linear layers (MatMul/Gemm, constant 2-D weight, input 0) that read it,
directly or through ops that keep the channel (last axis) of every element:

* ``Reshape`` that keeps the last dimension (``[b, s, C] -> [b*s, C]``), or splits it into heads
  (``[.., C] -> [.., h, d]``) and later merges them back (``[.., h, d] -> [.., C]``);
* ``Transpose`` that keeps the last axis last (the head axis is followed to the merge);
* the attention ``MatMul(P, V)`` with the chain as its second operand (the scale of ``V``'s
  columns is the scale of the product's columns).

Dividing channel ``j`` of ``t`` by ``s_j`` and multiplying row ``j`` of every reader's weight
by ``s_j`` leaves the function unchanged. Shapes come from shape inference; a Reshape whose
shapes are not known is not followed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import const_values, constant_info, opt_input
from onnxcompress.core.shapes import infer_graph

__all__ = [
    "R_GRAPH_OUTPUT",
    "R_OTHER_READERS",
    "R_PRODUCER",
    "SmoothGroup",
    "find_groups",
    "graph_shapes",
    "linear_reader",
    "smooth_scales",
]

R_PRODUCER = "no_foldable_producer"  # detail: the op found where the scale would go
R_OTHER_READERS = "shared_with_other_readers"  # the source also feeds ops that cannot take the scale
R_GRAPH_OUTPUT = "graph_output"  # a tensor on the way is a graph output

_SHAPE_READERS = frozenset({"Shape", "Size"})
Shapes = dict[str, list]


def linear_reader(node: gs.Node) -> bool:
    """``node`` is a MatMul/Gemm with a constant float 2-D weight and an activation input 0."""
    if node.op not in ("MatMul", "Gemm") or isinstance(node.inputs[0], gs.Constant):
        return False
    w = constant_info(opt_input(node, 1))
    if w is None or w[0] != np.float32 or len(w[1]) != 2:
        return False
    return node.op == "MatMul" or not int(node.attrs.get("transA", 0))


def _last_dim_vector(t: gs.Tensor | None, channels: int | None) -> bool:
    """``t`` is a float constant broadcasting along the last axis only (a scalar, or ``[1, .., C]``)."""
    v = const_values(t)
    if v is None or v.dtype != np.float32 or not v.size:
        return False
    if v.size == 1:
        return True
    return all(d == 1 for d in v.shape[:-1]) and (channels is None or v.shape[-1] == channels)


@dataclass
class SmoothGroup:
    """A source tensor, how its scale is folded, and the linear layers reading it.

    Attributes:
        source: The tensor whose channels are divided by ``s``.
        kind: ``layernorm``, ``decomposed``, ``scale``, ``linear`` or ``inserted`` (a ``Mul`` by ``1 / s``
            in front of the readers).
        producer: The LayerNormalization, the final Add of a decomposed norm, or the linear node.
        bias_add: The bias Add after a linear producer (``source`` is its output), if any.
        readers: The linear layers whose weight rows are multiplied by ``s``.
        inputs: Their input tensors (calibrated: per-channel maxima).
        split: Direct readers of ``source`` that lead only to ``readers`` (the others read the
            unsmoothed value: the producer is then copied for these).
    """

    source: gs.Variable
    kind: str
    producer: gs.Node
    bias_add: gs.Node | None = None
    readers: list[gs.Node] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    split: list[gs.Node] = field(default_factory=list)


def graph_shapes(graph: gs.Graph) -> Shapes:
    """``{tensor: [int or symbolic name]}`` from shape inference (``graph`` is not modified)."""
    model = infer_graph(graph)
    out: Shapes = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return out


def _shape(shapes: Shapes, t: gs.Tensor) -> list | None:
    s = shapes.get(t.name)
    return list(s) if s is not None else None


def _reshape_step(node: gs.Node, shapes: Shapes, head: int | None, backward: bool) -> tuple[bool, int | None]:
    """Whether a Reshape keeps channels, and the head axis after it (walking back or forward)."""
    a, b = _shape(shapes, node.inputs[0]), _shape(shapes, node.outputs[0])
    if backward:
        a, b = b, a  # a: where we are, b: where we go
    if not a or not b or not isinstance(a[-1], int) or not isinstance(b[-1], int):
        return False, head
    # row-major: an output last axis of size a[-2] * a[-1] is exactly the input's last two axes
    if head is None and a[-1] == b[-1]:
        return True, None
    if head is None and len(b) >= 2 and isinstance(b[-2], int) and b[-2] * b[-1] == a[-1]:
        return True, len(b) - 2  # channels split into (head, d)
    if head == len(a) - 2 and isinstance(a[-2], int) and a[-2] * a[-1] == b[-1]:
        return True, None  # heads merged back (leading axes may be flattened at the same time)
    return False, head


def _step(node: gs.Node, t: gs.Tensor, shapes: Shapes, head: int | None, backward: bool) -> tuple[bool, int | None]:
    """Whether ``node`` (reached through ``t``) keeps channels; the head axis after it."""
    if node.op == "Reshape":
        if node.inputs[0] is not t:
            return False, head
        return _reshape_step(node, shapes, head, backward)
    if node.op == "Transpose":
        perm = [int(p) for p in node.attrs.get("perm", [])]
        if not perm or perm[-1] != len(perm) - 1:
            return False, head
        if head is None:
            return True, None
        return True, (perm[head] if backward else perm.index(head))
    if node.op == "MatMul" and len(node.inputs) == 2 and node.inputs[1] is t and node.inputs[0] is not t \
            and not any(isinstance(i, gs.Constant) for i in node.inputs):
        return True, head
    return False, head


def _source_kind(node: gs.Node, shapes: Shapes, channels: int | None) -> tuple[str, gs.Node, gs.Node | None] | None:
    """``(kind, producer, bias Add)`` if ``node``'s output can take the scale, else ``None``."""
    if node.op == "LayerNormalization":
        rank = len(_shape(shapes, node.inputs[0]) or [])
        axis = int(node.attrs.get("axis", -1))
        beta = opt_input(node, 2)
        ok = axis in (-1, rank - 1) and _last_dim_vector(opt_input(node, 1), channels) and (
            beta is None or _last_dim_vector(beta, channels)) and len([o for o in node.outputs if o.name]) == 1
        return ("layernorm", node, None) if ok else None
    if linear_reader(node):
        return "linear", node, None
    if node.op in ("Mul", "Div") and len(node.inputs) == 2 and not isinstance(node.inputs[0], gs.Constant) \
            and _last_dim_vector(node.inputs[1], channels) or node.op == "Mul" and len(node.inputs) == 2 \
            and not isinstance(node.inputs[1], gs.Constant) and _last_dim_vector(node.inputs[0], channels):
        return "scale", node, None  # x * c or x / c: c / s or c * s (a GELU's final * 0.5)
    if node.op != "Add":
        return None
    for i in (0, 1):
        other, c = node.inputs[1 - i], node.inputs[i]
        if not _last_dim_vector(c, channels) or isinstance(other, gs.Constant) or not other.inputs \
                or len(other.outputs) != 1:
            continue
        prev = other.inputs[0]
        if linear_reader(prev):
            return "linear", prev, node
        if prev.op == "Mul" and any(_last_dim_vector(g, channels) and not isinstance(n, gs.Constant)
                                    for g, n in ((prev.inputs[0], prev.inputs[1]), (prev.inputs[1], prev.inputs[0]))):
            return "decomposed", node, None
    return None


def trace_source(x: gs.Tensor, shapes: Shapes) -> tuple[gs.Variable | None, tuple, str]:
    """Walk back from a linear layer's input to the tensor that can take the scale.

    Returns ``(source, (kind, producer, bias Add), "")``, or ``(None, (), reason detail)``.
    """
    t, head = x, None
    while True:
        if not t.inputs:
            return None, (), "graph input"
        node = t.inputs[0]
        channels = (_shape(shapes, t) or [None])[-1]
        found = _source_kind(node, shapes, channels if isinstance(channels, int) else None) if head is None else None
        if found is not None:
            return t, found, ""
        ok, head = _step(node, node.inputs[1] if node.op == "MatMul" else node.inputs[0], shapes, head, True)
        if not ok:
            return None, (), node.op
        t = node.inputs[1] if node.op == "MatMul" else node.inputs[0]


def _closure(t: gs.Tensor, shapes: Shapes, head: int | None, outputs: set[str],
             seen: dict) -> tuple[list[gs.Node], list[gs.Node], bool]:
    """``(linear readers, other readers, reaches a graph output)`` forward from ``t``."""
    linear, other, out = [], [], t.name in outputs
    for node in t.outputs:
        if node.op in _SHAPE_READERS:
            continue
        if head is None and linear_reader(node) and node.inputs[0] is t:
            linear.append(node)
            continue
        ok, nxt = _step(node, t, shapes, head, False)
        if not ok or id(node) in seen:
            other.append(node)
            continue
        seen[id(node)] = True
        lin, oth, o = _closure(node.outputs[0], shapes, nxt, outputs, seen)
        linear += lin
        other += oth
        out |= o
    return linear, other, out


def find_groups(graph: gs.Graph, shapes: Shapes, *,
                insert: bool = False) -> tuple[list[SmoothGroup], list[tuple[gs.Node, str, str]]]:
    """Smoothable groups, and ``(linear node, decline code, detail)`` for the linear layers left out.

    With ``insert``, the linear layers that would be left out are grouped by input tensor instead
    (kind ``inserted``: a ``Mul`` by ``1 / s`` goes in front of them) and nothing is declined.
    """
    outputs = {t.name for t in graph.outputs}
    groups: dict[str, SmoothGroup] = {}
    declined: list[tuple[gs.Node, str, str]] = []
    for node in graph.nodes:
        if not linear_reader(node):
            continue
        source, found, why = trace_source(node.inputs[0], shapes)
        if source is None:
            declined.append((node, R_PRODUCER, why))
            continue
        if source.name not in groups:
            groups[source.name] = SmoothGroup(source, *found)
        groups[source.name].readers.append(node)
        groups[source.name].inputs.append(node.inputs[0].name)
    kept = []
    for g in groups.values():
        reason = _check_group(g, shapes, outputs)
        if reason is None:
            kept.append(g)
        else:
            declined += [(n, *reason) for n in g.readers]
    if insert:
        return kept + _inserted_groups([n for n, _, _ in declined]), []
    return kept, declined


def _inserted_groups(nodes: list[gs.Node]) -> list[SmoothGroup]:
    """One ``inserted`` group per input tensor of ``nodes``."""
    groups: dict[str, SmoothGroup] = {}
    for n in nodes:
        x = n.inputs[0]
        g = groups.setdefault(x.name, SmoothGroup(x, "inserted", n))
        g.readers.append(n)
        g.inputs.append(x.name)
        g.split.append(n)
    return list(groups.values())


def _check_group(g: SmoothGroup, shapes: Shapes, outputs: set[str]) -> tuple[str, str] | None:
    """Why group ``g`` cannot be smoothed, or ``None`` (fills ``g.split``)."""
    members = {id(n) for n in g.readers}
    if g.source.name in outputs:
        return R_GRAPH_OUTPUT, g.source.name
    for reader in g.source.outputs:
        if reader.op in _SHAPE_READERS:
            continue
        if linear_reader(reader) and reader.inputs[0] is g.source:
            lin, other, out = [reader], [], False
        else:
            ok, nxt = _step(reader, g.source, shapes, None, False)
            lin, other, out = _closure(reader.outputs[0], shapes, nxt, outputs, {}) if ok else ([], [reader], False)
        if out:
            return R_GRAPH_OUTPUT, reader.name
        if any(id(n) not in members for n in lin):
            return R_OTHER_READERS, next(n.name for n in lin if id(n) not in members)
        if other and (lin or g.kind == "linear"):
            return R_OTHER_READERS, other[0].op
        if lin:
            g.split.append(reader)
    if len(g.split) == len([r for r in g.source.outputs if r.op not in _SHAPE_READERS]):
        g.split = []  # every reader takes the scale: no copy needed
    return None


def smooth_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float, *, limit: float = 1e4) -> np.ndarray:
    """``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)``, 1 where either maximum is 0, clamped to
    ``[1 / limit, limit]`` (float64)."""
    x = np.asarray(x_absmax, np.float64)
    w = np.asarray(w_absmax, np.float64)
    ok = (x > 0) & (w > 0)
    s = np.ones_like(x)
    s[ok] = x[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1.0 / limit, limit)
