"""What values an integer graph input may take, read from the ops it reaches (for random inputs).

Random integer inputs must respect what they index: token ids drawn past the end of an embedding
table make onnxruntime fail (``Gather ... indices element out of data bounds``). :func:`integer_domains`
follows each integer input forward through ops that keep its values (Identity, Unsqueeze, Squeeze,
Reshape, Flatten, Expand, Transpose, Cast to an integer type; ``Shape``/``Size`` only read its shape
and are ignored) to the ops that use the values:

* the indices of a ``Gather`` whose data is a constant (or computed from constants by elementwise
  ops, as in a weight-quantized embedding table): the input is an **index** into a table of
  ``data.shape[axis]`` rows (the smallest table when it reaches several); also the ids and segment
  ids of onnxruntime's ``EmbedLayerNormalization`` (word and segment tables);
* a ``Cast`` to a float or bool type (attention masks turned into additive masks or pooling
  weights), or the mask inputs of onnxruntime's ``EmbedLayerNormalization``/``Attention``: a **mask**
  (random inputs are all ones: nothing masked);
* a comparison (``Equal``, ``Less``, ...: a padding mask computed from token ids): valid for any
  value, so it does not constrain an input that also indexes a table; alone it is **unknown**;
* graph outputs: values only passed through (no constraint);
* anything else (arithmetic on the integers, a Gather on computed data, a subgraph): **unknown**,
  with the op that makes it so.

An input that reaches both a table and a mask is an index (ones are within range of any table of
two rows or more). An input that reaches nothing that reads its values is ``free``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

__all__ = ["IntegerDomain", "integer_domains", "VALUE_PRESERVING_OPS"]

#: Ops whose output holds the values of their data input (input 0), rearranged or retyped.
VALUE_PRESERVING_OPS = frozenset({"Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Transpose"})
_ELEMENTWISE = frozenset({"Cast", "Mul", "Add", "Sub", "Div", "DequantizeLinear", "Identity"})
_SHAPE_ONLY = frozenset({"Shape", "Size"})
_COMPARISONS = frozenset({"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"})
_INT_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                        onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
                        onnx.TensorProto.UINT64})
#: onnxruntime contrib ops: input index -> index of the table it indexes (int) or "mask".
_CONTRIB: dict[str, dict[int, int | str]] = {"EmbedLayerNormalization": {0: 2, 1: 4, 7: "mask"}, "Attention": {3: "mask"}}


@dataclass(frozen=True)
class IntegerDomain:
    """The values an integer input may take.

    Attributes:
        kind: ``index`` (draw in ``[0, high)``), ``mask`` (ones), ``free`` (values unused) or ``unknown``.
        high: The number of rows of the smallest table indexed (``index`` only).
        reason: For ``unknown``: the op that reads the values, as ``Op 'node name'``; for ``index``:
            the table(s) indexed.
    """

    kind: str
    high: int | None = None
    reason: str = ""


def _table_rows(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of the model's constants by name: initializers, Constant node outputs, and values computed
    from those alone by elementwise ops (a weight-quantized table: ``Cast``/``Mul``/``DequantizeLinear``)."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:  # nodes are in topological order in a valid model
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(attr.t.dims)
        elif node.op_type in _ELEMENTWISE and node.domain in ("", "ai.onnx") and len(node.output) == 1 \
                and node.input and all(not n or n in shapes for n in node.input):
            ins = [shapes[n] for n in node.input if n][:1 if node.op_type == "DequantizeLinear" else None]
            try:
                shapes[node.output[0]] = tuple(int(d) for d in np.broadcast_shapes(*ins))
            except ValueError:
                continue
    return shapes


def _cast_target(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _gather_axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


@dataclass(frozen=True)
class _Use:
    """How a node uses an integer value: ``follow`` (its outputs carry the values), ``ignore``,
    ``index`` (into ``table`` of ``rows`` rows), ``mask`` or ``unknown`` (``label`` names the node)."""

    kind: str
    rows: int = 0
    table: str = ""
    label: str = ""


def _contrib_use(node: onnx.NodeProto, slot: int, consts: dict[str, tuple[int, ...]]) -> _Use | None:
    target = _CONTRIB[node.op_type][slot]
    if target == "mask":
        return _Use("mask")
    table = node.input[int(target)] if len(node.input) > int(target) else ""
    return _Use("index", consts[table][0], table) if table in consts and consts[table] else None


def _use(node: onnx.NodeProto, slot: int, consts: dict[str, tuple[int, ...]]) -> _Use:
    """How ``node`` uses the value at input ``slot``."""
    op = node.op_type
    found: _Use | None = None
    if node.domain in ("", "ai.onnx"):
        if op in _SHAPE_ONLY:
            found = _Use("ignore")
        elif op in VALUE_PRESERVING_OPS and slot == 0:
            found = _Use("follow")
        elif op == "Cast":
            found = _Use("follow") if _cast_target(node) in _INT_TYPES else _Use("mask")
        elif op in _COMPARISONS:
            found = _Use("compare", label=f"{op} {node.name or node.output[0]!r}")
        elif op == "Gather" and slot == 1 and node.input[0] in consts:
            shape = consts[node.input[0]]
            axis = _gather_axis(node) % max(1, len(shape))
            found = _Use("index", shape[axis], node.input[0]) if shape and shape[axis] > 0 else None
    elif node.domain == "com.microsoft" and op in _CONTRIB and slot in _CONTRIB[op]:
        found = _contrib_use(node, slot, consts)
    return found or _Use("unknown", label=f"{op} {node.name or node.output[0]!r}")


def _domain(name: str, consumers: dict[str, list[tuple[onnx.NodeProto, int]]],
            consts: dict[str, tuple[int, ...]]) -> IntegerDomain:
    """Follow ``name`` forward (graph outputs are pass-through values: they constrain nothing)."""
    tables: dict[str, int] = {}
    mask, compare = False, ""
    stack, seen = [name], {name}
    while stack:
        value = stack.pop()
        for node, slot in consumers.get(value, []):
            use = _use(node, slot, consts)
            if use.kind == "unknown":
                return IntegerDomain("unknown", reason=use.label)
            if use.kind == "index":
                tables[use.table] = use.rows
            mask = mask or use.kind == "mask"
            compare = compare or (use.label if use.kind == "compare" else "")
            if use.kind == "follow":
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        stack.append(out)
    if tables:
        return IntegerDomain("index", min(tables.values()), ", ".join(sorted(tables)))
    if compare:
        return IntegerDomain("unknown", reason=compare)
    return IntegerDomain("mask") if mask else IntegerDomain("free")


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Value name -> ``(node, input slot)`` of every node reading it; a node with subgraphs reading it
    implicitly (an outer-scope name) counts as an unknown use at slot -1."""
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name:
                uses[name].append((node, slot))
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for inner in _names_read(sub):
                    uses[inner].append((node, -1))
    return uses


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names = {n for node in graph.node for n in node.input if n}
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _names_read(sub)
    return names


def integer_domains(model: onnx.ModelProto) -> dict[str, IntegerDomain]:
    """The :class:`IntegerDomain` of every integer graph input (initializer-backed inputs excluded)."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    consts = _table_rows(model)
    consumers = _consumers(graph)
    found = {}
    for inp in graph.input:
        if inp.name in inits or inp.type.tensor_type.elem_type not in _INT_TYPES:
            continue
        found[inp.name] = _domain(inp.name, consumers, consts)
    return found
