"""Normalise what exporters leave behind, before any pass runs.

* ``Constant`` nodes holding weights (Paddle and some TF exports) become initializers.
* ``Identity`` nodes whose input is a constant are bypassed (consumers read the constant).
* A two-input ``Sum`` becomes ``Add`` (same semantics, and the op every pass understands).
* Initializers that are also listed as graph inputs (IR < 4 exports) are treated as constants
  and leave the graph inputs: an optimizer can only fold weights it may assume fixed.
* Unnamed nodes get a deterministic name (their first output's name), so every report and
  decline can point at a node.
* Subgraphs computed from constants alone (``Unsqueeze``/``Reshape``/``Cast``/``Transpose``/
  ``Concat`` of initializers, their exact arithmetic) are folded into initializers
  (:func:`~onnxcompress.core.fold.fold_constants`): every pass sees a per-channel scale
  ``Unsqueeze(s)`` or a weight ``Reshape(w, Concat(...))`` as the constant it is, without
  ``simplify`` first. Only exact ops are folded (same bits as any runtime computes); no folded
  tensor grows the model by more than 64 KiB, and all of them together by no more than 1 MiB.
* :func:`upgrade_opset` converts a model to a newer opset when a pass needs one.

All of these are exact.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.fold import fold_constants
from onnxcompress.core.spill import copy_except, spillable

__all__ = ["normalize", "normalize_graph", "upgrade_opset"]

log = logging.getLogger(__name__)

_SCALAR_ATTRS = {"value_float": np.float32, "value_int": np.int64}
_LIST_ATTRS = {"value_floats": np.float32, "value_ints": np.int64}


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a normalised copy of ``model`` (the input is not modified)."""
    init_names = {i.name for i in model.graph.initializer}
    graph = serde.to_graph(model)
    stats = normalize_graph(graph)
    stats["initializer_inputs_dropped"] = sum(i.name in init_names for i in model.graph.input)
    if not any(stats.values()):
        return model
    log.info("normalize: %s", ", ".join(f"{k}={v}" for k, v in stats.items() if v))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return serde.to_model(graph, model)


def normalize_graph(graph: gs.Graph) -> dict[str, int]:
    """Apply every normalisation to ``graph`` in place and return counts of what changed."""
    outputs = {t.name for t in graph.outputs}
    stats = {"constants_to_initializers": 0, "identities_bypassed": 0, "sum_to_add": 0,
             "nodes_named": _name_nodes(graph), "constants_folded": 0}
    for node in list(graph.nodes):
        if node.op == "Constant" and _constant_to_initializer(node, outputs):
            stats["constants_to_initializers"] += 1
        elif node.op == "Sum" and len(node.inputs) == 2:
            node.op = "Add"
            stats["sum_to_add"] += 1
    for node in list(graph.nodes):
        if node.op == "Identity" and _bypass_identity(node, outputs):
            stats["identities_bypassed"] += 1
    stats["constants_folded"] = fold_constants(graph)
    return stats


def _name_nodes(graph: gs.Graph) -> int:
    taken = {n.name for n in graph.nodes if n.name}
    named = 0
    for node in graph.nodes:
        if node.name:
            continue
        base = node.outputs[0].name if node.outputs else node.op
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)
        named += 1
    return named


def _constant_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        if isinstance(value, gs.Constant):
            return value.values
        if isinstance(value, onnx.TensorProto):
            return numpy_helper.to_array(value)
        return None
    for key, dtype in _SCALAR_ATTRS.items():
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in _LIST_ATTRS.items():
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    return None  # sparse_value, value_string(s): leave the node alone


def _constant_to_initializer(node: gs.Node, outputs: set[str]) -> bool:
    out = node.outputs[0]
    if out.name in outputs:
        return False
    value = _constant_value(node)
    if value is None:
        return False
    out.to_constant(np.asarray(value))
    node.outputs.clear()
    return True


def _bypass_identity(node: gs.Node, outputs: set[str]) -> bool:
    src, out = node.inputs[0], node.outputs[0]
    if not isinstance(src, gs.Constant) or out.name in outputs:
        return False
    for consumer in list(out.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is out:
                consumer.inputs[i] = src
    node.outputs.clear()
    return True


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert ``model`` to default-domain opset ``target`` with onnx's version converter.

    The converter is given the model without its weights' bytes (:func:`_weights_apart`), which are
    put back into its result: the same model as converting the whole one, without serializing,
    copying and parsing the weights four times on the way (a second for ddddocr's 54 MB).

    Raises:
        InputError: The converter cannot convert this model.
    """
    current = serde.model_opset(model) or 0
    if current >= target:
        return model
    light, weights = _weights_apart(model)
    try:
        converted = onnx.version_converter.convert_version(light, target)
    except Exception as exc:
        raise InputError(f"cannot convert model from opset {current} to {target}: {exc}") from None
    del light
    for init in converted.graph.initializer:
        if init.name in weights:
            init.raw_data = weights[init.name]
    log.info("converted model from opset %d to %d", current, target)
    return converted


def _weights_apart(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, bytes]]:
    """A copy of ``model`` whose main-graph weights (``raw_data`` of at least 1 KiB, not a 1-D int64
    shape operand) have every field but their bytes, and those bytes by initializer name.

    onnx's version converter keeps an initializer's ``raw_data`` as opaque bytes (read and written
    back, never interpreted) and its upgrade adapters never read a weight's values (they turn
    attributes into new constants), so converting this copy and setting the bytes back gives what
    converting ``model`` gives.
    """
    light = serde.skeleton_model(model)
    weights: dict[str, bytes] = {}
    for init in model.graph.initializer:
        dest = light.graph.initializer.add()
        shape_operand = init.data_type == onnx.TensorProto.INT64 and len(init.dims) <= 1
        if spillable(init, serde.INLINE_BYTES) and not shape_operand and init.name not in weights:
            copy_except(init, dest, frozenset({"raw_data"}))
            weights[init.name] = init.raw_data
        else:
            dest.CopyFrom(init)
    return light, weights
