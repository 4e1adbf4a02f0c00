"""Shape arithmetic evaluated at concrete input shapes, so that onnx's inference can follow it.

Exporters compute Reshape targets and Resize sizes from tensor shapes: ``Shape -> Gather -> Mul ->
Unsqueeze -> Concat -> Reshape``. onnx's data propagation follows such chains only for some op
versions (``Mul`` from opset 14, for one): where it stops, every shape after it is unknown, and the
MAC count fell back to onnxruntime's symbolic inference (a sympy import, ~0.4 s, then a pure-Python
pass over the graph). :func:`fill_shapes` evaluates those chains with numpy instead (the exact ops
of :mod:`onnxcompress.core.fold`, each output at most :data:`MAX_VALUES` values) wherever the
shapes they read are known, turns their nodes into constants in a weight-less copy, infers again,
and repeats while that finds new values.

Before/After (``Reshape(x, Concat(Unsqueeze(Mul(Gather(Shape(x), 0), 2)), [-1]))``, ``x`` of shape
``[4, 3, 8]``, opset 13): onnx types the Reshape output and leaves its shape unknown; after, its
shape is ``[8, 12]``. Values computed from shapes at concrete input dims are the values any run at
those dims computes, so the shapes found are exact; ops outside :data:`~onnxcompress.core.fold.EXACT_OPS`
(``Where``, ``Equal``, ``Range``...) stop the evaluation, and the caller falls back as before.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxcompress.core.fold import EXACT_OPS, evaluate_node

__all__ = ["MAX_VALUES", "fill_shapes", "full_shapes"]

log = logging.getLogger(__name__)

#: Largest tensor (values) evaluated: shape arithmetic, not data.
MAX_VALUES = 1024
#: Rounds of evaluate, freeze, infer (each can only reach further down the graph).
_ROUNDS = 8
_SKIPPED = frozenset({"Expand", "Tile", "ConstantOfShape"})  # they make data, not shapes


def full_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Every tensor of ``model`` with a shape of known dims: inputs, value_info, outputs, initializers."""
    out = {i.name: list(i.dims) for i in model.graph.initializer}
    out.update({vi.name: dims for vi in _infos(model) if (dims := _dims(vi)) is not None})
    return out


def fill_shapes(light: onnx.ModelProto, inferred: onnx.ModelProto, wanted: Collection[str]) -> None:
    """Write into ``inferred`` (onnx's inference of ``light``, a weight-less model at concrete
    input dims) the shapes of the ``wanted`` tensors it lacks that shape arithmetic reveals."""
    wanted = set(wanted)
    work, last = copy.deepcopy(light), inferred
    for out in work.graph.output:  # inferred afresh: an exporter's declared output dims can be wrong
        out.type.tensor_type.ClearField("shape")
    values = _constants(light)
    for _ in range(_ROUNDS):
        found = full_shapes(last)
        if wanted <= found.keys():
            break
        new = _evaluate(work, values, found)
        if not new:
            break
        values.update(new)
        _freeze(work, new)
        try:
            last = onnx.shape_inference.infer_shapes(work, data_prop=True)
        except Exception as exc:  # onnx rejects the frozen copy: keep what was found
            log.debug("shape inference after shape arithmetic failed: %s", exc)
            break
    if last is not inferred:
        _write(inferred, {vi.name: vi for vi in _infos(last) if vi.name in wanted and _dims(vi) is not None})


def _infos(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    return [*model.graph.input, *model.graph.value_info, *model.graph.output]


def _dims(vi: onnx.ValueInfoProto) -> list[int] | None:
    """The dims of ``vi`` when its shape is fully known."""
    tt = vi.type.tensor_type
    if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
        return [d.dim_value for d in tt.shape.dim]
    return None


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of the small initializers stored in the model and of its Constant nodes."""
    tensors = {i.name: i for i in model.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            if value is not None:
                tensors[node.output[0]] = value
    values = {}
    for name, t in tensors.items():
        if int(np.prod(list(t.dims), dtype=np.int64)) <= MAX_VALUES:
            try:
                values[name] = numpy_helper.to_array(t)
            except Exception as exc:  # data that does not match its dims: not a value to reason with
                log.debug("shape arithmetic: %s unreadable: %s", name, exc)
    return values


def _evaluate(model: onnx.ModelProto, values: dict[str, np.ndarray], shapes: dict[str, list[int]]
              ) -> dict[str, np.ndarray]:
    """Outputs of the nodes evaluable now: a ``Shape`` of a tensor with a known shape, or an exact op
    whose inputs all have values (in graph order, so a chain is evaluated in one round)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    known = dict(values)
    new: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if (node.domain not in ("", "ai.onnx") or len(node.output) != 1 or node.output[0] in known
                or node.op_type not in EXACT_OPS or node.op_type in _SKIPPED):
            continue
        args = _args(node, known, shapes)
        if args is None:
            continue
        try:
            out = evaluate_node(_gs_node(node), args, opset)
        except Exception as exc:  # an unsupported case of the op: not evaluated
            log.debug("shape arithmetic: %s not evaluated: %s", node.name or node.output[0], exc)
            continue
        if out.size <= MAX_VALUES:
            known[node.output[0]] = new[node.output[0]] = out
    return new


def _args(node: onnx.NodeProto, known: dict[str, np.ndarray], shapes: dict[str, list[int]]
          ) -> list[np.ndarray | None] | None:
    """The input values ``node`` is evaluated on, or None while one is unknown (a ``Shape`` reads
    an array of the input's shape that takes no memory)."""
    if node.op_type == "Shape":
        dims = shapes.get(node.input[0])
        return None if dims is None else [np.broadcast_to(np.zeros((), np.bool_), dims)]
    if not all(not i or i in known for i in node.input):
        return None
    return [known[i] if i else None for i in node.input]


def _gs_node(node: onnx.NodeProto) -> gs.Node:
    """The op type and attributes of ``node`` as :func:`~onnxcompress.core.fold.evaluate_node` reads them."""
    attrs = {}
    for a in node.attribute:  # (a tensor attribute that does not decode raises: the node is not evaluated)
        value = onnx.helper.get_attribute_value(a)
        attrs[a.name] = gs.Constant(a.name, numpy_helper.to_array(value)) if isinstance(value, onnx.TensorProto) else value
    return gs.Node(op=node.op_type, attrs=attrs)


def _freeze(model: onnx.ModelProto, new: dict[str, np.ndarray]) -> None:
    """Turn the nodes of ``model`` (the caller's own copy) computing ``new`` into Constant nodes of those values."""
    for node in model.graph.node:
        if len(node.output) == 1 and node.output[0] in new:
            name, output = node.name, node.output[0]
            node.Clear()
            node.CopyFrom(onnx.helper.make_node("Constant", [], [output], name=name,
                                                value=numpy_helper.from_array(new[output])))


def _write(inferred: onnx.ModelProto, found: dict[str, onnx.ValueInfoProto]) -> None:
    """``found`` (type and full shape) in place of ``inferred``'s value_info or output entry of
    the same name, or added to its value_info; graph inputs and initializers are left alone."""
    fixed = {i.name for i in inferred.graph.initializer} | {i.name for i in inferred.graph.input}
    infos = {vi.name: vi for vi in _infos(inferred) if vi.name not in fixed}
    for name, vi in found.items():
        if name in fixed or (name in infos and _dims(infos[name]) is not None):
            continue
        if name in infos:
            infos[name].type.CopyFrom(vi.type)
        else:
            inferred.graph.value_info.add().CopyFrom(vi)
