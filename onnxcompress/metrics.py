"""Model metrics: file size, parameters, MACs per node and in total, op counts.

MACs are counted for the compute-bound ops (Conv, ConvTranspose, Gemm, MatMul) from shapes
inferred with concrete input sizes; dynamic dims take the values given (batch 1 by default).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from . import serde

__all__ = ["NodeMacs", "ModelMetrics", "model_metrics", "concrete_inputs", "concrete_shapes"]

log = logging.getLogger(__name__)

DEFAULT_DIM = 1


@dataclass
class NodeMacs:
    """MACs of one node (per sample at the given input shapes)."""

    name: str
    op_type: str
    macs: int


@dataclass
class ModelMetrics:
    """What ``onnxcompress inspect`` reports."""

    file_bytes: int
    params: int
    macs: int
    nodes: int
    opset: int | None
    op_counts: dict[str, int] = field(default_factory=dict)
    per_node: list[NodeMacs] = field(default_factory=list)
    inputs: dict[str, list] = field(default_factory=dict)
    outputs: dict[str, list] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def concrete_inputs(model: onnx.ModelProto, dims: dict[str, int] | None = None,
                    default: int = DEFAULT_DIM) -> dict[str, list[int]]:
    """Concrete shape of each graph input: symbolic dims from ``dims`` by name, else ``default``."""
    dims = dims or {}
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        shape = []
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                shape.append(int(dims.get(d.dim_param, default)))
        out[inp.name] = shape
    return out


def _with_concrete_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A weight-less copy of the graph (:func:`serde.light_model`) with fixed input shapes."""
    light = serde.light_model(model)
    for inp in light.graph.input:
        if inp.name in shapes:
            for d, v in zip(inp.type.tensor_type.shape.dim, shapes[inp.name]):
                d.Clear()
                d.dim_value = v
    del light.graph.value_info[:]
    return light


def concrete_shapes(model: onnx.ModelProto, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Every tensor whose shape is fully known once the graph inputs' dynamic dims are fixed
    (the leading one to ``batch``, any other to :data:`onnxcompress.calib.DEFAULT_DYNAMIC_DIM`).

    Shape inference runs on a weight-less copy; a failure gives ``{}`` (callers use defaults).
    """
    from .calib import DEFAULT_DYNAMIC_DIM

    inits = {i.name for i in model.graph.initializer}
    fixed = {}
    for inp in model.graph.input:
        if inp.name not in inits:
            dims = inp.type.tensor_type.shape.dim
            fixed[inp.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else
                               batch if axis == 0 else DEFAULT_DYNAMIC_DIM for axis, d in enumerate(dims)]
    try:
        inferred = serde.infer_shapes(_with_concrete_inputs(model, fixed))
    except Exception as exc:  # noqa: BLE001 - inference is best effort
        log.debug("shape inference failed: %s", exc)
        return {}
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") and d.dim_value > 0
                                                          for d in tt.shape.dim):
            shapes[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
    return shapes


def _shape_map(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _prod(xs) -> int:
    return int(np.prod(xs, dtype=np.int64)) if len(xs) else 1


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    def shape(i: int, outputs: bool = False):
        names = node.output if outputs else node.input
        s = shapes.get(names[i]) if i < len(names) and names[i] else None
        return None if s is None or any(v < 0 for v in s) else s

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    w, y, x = shape(1), shape(0, outputs=True), shape(0)
    if node.op_type == "Conv" and w and y:
        return _prod(y) * _prod(w[1:])
    if node.op_type == "ConvTranspose" and w and x:
        return _prod(x) * _prod(w[1:])  # W is [C_in, C_out/group, k...]
    if node.op_type == "Gemm" and x and y:
        k = x[0] if attrs.get("transA", 0) else x[-1]
        return _prod(y) * k
    if node.op_type == "MatMul" and x and y:
        return _prod(y) * x[-1]
    return 0


def model_metrics(model: onnx.ModelProto, dims: dict[str, int] | None = None,
                  default_dim: int = DEFAULT_DIM) -> ModelMetrics:
    """Compute :class:`ModelMetrics` for ``model``.

    Args:
        model: The model (not modified).
        dims: Values for symbolic input dims, by name.
        default_dim: Value for any other symbolic input dim (the batch, usually).
    """
    shapes_in = concrete_inputs(model, dims, default_dim)
    inferred = serde.infer_shapes(_with_concrete_inputs(model, shapes_in))
    shapes = _shape_map(inferred)
    per_node = [NodeMacs(n.name or n.output[0], n.op_type, _node_macs(n, shapes)) for n in inferred.graph.node]
    params = sum(_prod(list(i.dims)) for i in model.graph.initializer)
    params += sum(_prod(list(a.t.dims)) for n in model.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value")
    outputs = {o.name: shapes.get(o.name, []) for o in model.graph.output}
    return ModelMetrics(
        file_bytes=serde.model_bytes(model),
        params=params,
        macs=sum(n.macs for n in per_node),
        nodes=len(model.graph.node),
        opset=serde.model_opset(model),
        op_counts=dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        per_node=[n for n in per_node if n.macs],
        inputs=shapes_in,
        outputs=outputs,
    )
