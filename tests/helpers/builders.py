"""Tiny models for tests: from ONNX text, from nodes and arrays, one Conv, a small conv net.

Every model passes onnx's full checker; float initializers are stored as float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.tensors import he

__all__ = ["conv_model", "make_model", "node", "parse", "small_net", "yolo_like", "yolo_split_head"]


def parse(text: str) -> onnx.ModelProto:
    """Parse ONNX text syntax and check the model."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def make_model(nodes: list[onnx.NodeProto], inputs: dict, outputs: Sequence[str],
               inits: dict[str, np.ndarray], opset: int = 17, types: dict[str, int] | None = None) -> onnx.ModelProto:
    """A model with float32 inputs/outputs; ``inputs`` maps names to shapes (symbolic dims allowed).

    ``types`` gives other element types for some inputs (``TensorProto`` codes). Float initializers
    are stored as float32, others as given. Output shapes come from inference; intermediate shapes
    stay unknown, as in many exported models. The model passes the full checker.
    """
    def tensor(name: str, value) -> onnx.TensorProto:
        arr = np.asarray(value)
        return numpy_helper.from_array(arr.astype(np.float32) if arr.dtype.kind == "f" else arr, name=name)

    types = types or {}
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [tensor(k, v) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # types the graph outputs
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def node(op: str, ins: Sequence[str], outs: Sequence[str] | str, **attrs: Any) -> onnx.NodeProto:
    """A node named after its first output."""
    outs = [outs] if isinstance(outs, str) else list(outs)
    return helper.make_node(op, list(ins), outs, name=outs[0], **attrs)


def conv_model(w: np.ndarray, x_shape: Sequence[Any] | None, bias: np.ndarray | None = None,
               **attrs: Any) -> onnx.ModelProto:
    """One Conv ``y = Conv(x, W[, B])`` named ``conv``, with input ``x`` of shape ``x_shape``."""
    inits = {"W": w} | ({"B": bias} if bias is not None else {})
    conv = helper.make_node("Conv", ["x", "W"] + (["B"] if bias is not None else []), ["y"], "conv", **attrs)
    return make_model([conv], {"x": x_shape}, ["y"], inits)


def small_net(seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] → Conv(3→8,3x3,p1) → Relu → Conv(8→4,3x3,p1,s2) → Relu → Flatten → Gemm(64→10)."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": he(rng, 8, 3, 3, 3), "b1": (0.1 * rng.standard_normal(8)).astype(np.float32),
        "w2": he(rng, 4, 8, 3, 3), "b2": (0.1 * rng.standard_normal(4)).astype(np.float32),
        "wg": he(rng, 10, 64), "bg": (0.1 * rng.standard_normal(10)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["out"], "fc", transB=1),
    ]
    return make_model(nodes, {"x": ["N", 3, 8, 8]}, ["out"], inits)


def yolo_split_head(classes: int = 6, seed: int = 0) -> onnx.ModelProto:
    """A YOLOv8-like head ``x [N, 3, 64] -> y [N, 4+classes, 64]``: box logits (scale ~60) and class
    logits (scale ~1) are concatenated, split again, then ``Relu`` (boxes) and ``Sigmoid`` (scores)
    are concatenated into ``y``. One int8 scale on the first Concat crushes the class logits: the
    score rows lose ~25 dB while the whole output still looks fine."""
    rng = np.random.default_rng(seed)
    wb, ws = rng.standard_normal((4, 3, 1)) * 60, rng.standard_normal((classes, 3, 1))
    nodes = [node("Conv", ["x", "wb"], "bl"), node("Conv", ["x", "ws"], "sl"),
             node("Concat", ["bl", "sl"], "head", axis=1), node("Split", ["head", "split"], ["bx", "sc"], axis=1),
             node("Relu", ["bx"], "box"), node("Sigmoid", ["sc"], "score"),
             node("Concat", ["box", "score"], "y", axis=1)]
    init = {"wb": wb, "ws": ws, "split": np.array([4, classes], dtype=np.int64)}
    return make_model(nodes, {"x": ["N", 3, 64]}, ["y"], init)


def yolo_like(score_noise: float = 0.0, seed: int = 0, classes: int = 6, score_step: float = 0.0) -> onnx.ModelProto:
    """A YOLO-like head ``x [N, 3, 64] -> y [N, 4+classes, 64]``: box rows ``320·Sigmoid(Conv)``
    (0-320) concatenated with class-score rows ``Sigmoid(Conv)`` (0-1). ``score_noise`` perturbs
    only the score conv's weights (a candidate whose scores are off but whose boxes are exact);
    ``score_step`` > 0 rounds the scores to that step (uint8 QuantizeLinear/DequantizeLinear, as an
    int8 model with a coarse activation scale does)."""
    rng = np.random.default_rng(seed)
    wb = rng.standard_normal((4, 3, 1))
    ws = rng.standard_normal((classes, 3, 1))
    ws = ws + score_noise * np.random.default_rng(seed + 1).standard_normal(ws.shape)
    inits = {"wb": wb, "ws": ws, "k": np.array(320.0)}
    nodes = [node("Conv", ["x", "wb"], "bc"), node("Sigmoid", ["bc"], "bs"), node("Mul", ["bs", "k"], "box"),
             node("Conv", ["x", "ws"], "sc"), node("Sigmoid", ["sc"], "score")]
    score = "score"
    if score_step > 0:
        inits |= {"qs": np.array(score_step, dtype=np.float32), "qz": np.array(0, dtype=np.uint8)}
        nodes += [node("QuantizeLinear", ["score", "qs", "qz"], "score_q"),
                  node("DequantizeLinear", ["score_q", "qs", "qz"], "score_dq")]
        score = "score_dq"
    nodes.append(node("Concat", ["box", score], "y", axis=1))
    return make_model(nodes, {"x": ["N", 3, 64]}, ["y"], inits)
