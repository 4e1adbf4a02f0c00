"""Reading a model back: initializers, weight shapes, op types, producers and consumers."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["WEIGHT_OPS", "consumers", "initializers", "op_types", "producers", "weight_shapes"]

#: Ops whose input 1 is the weight :func:`weight_shapes` reports.
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializer name -> array, for the main graph."""
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Node name -> shape of its input 1 (an initializer), for every Conv/Gemm/MatMul, in node order."""
    values = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {n.name: values[n.input[1]] for n in model.graph.node if n.op_type in WEIGHT_OPS}


def op_types(model: onnx.ModelProto) -> list[str]:
    """Op types of the main graph's nodes, in order."""
    return [n.op_type for n in model.graph.node]


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node writing it."""
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes reading it, in node order."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out
