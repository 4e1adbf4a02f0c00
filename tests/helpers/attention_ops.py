"""Attention graphs beyond tests/helpers/transformer.py. One self-attention block built on an attention *op*: onnxruntime's ``com.microsoft.Attention``
(packed ``[D, 3·D]`` QKV weight, ``num_heads``) or ONNX opset-23 ``Attention`` (3-D inputs with
``q_num_heads``/``kv_num_heads``, or 4-D inputs from head-splitting Reshapes), each followed by
an output projection (MatMul + Add) and a residual: ``x [batch, seq, dim] -> y [batch, seq, dim]``;
and an encoder whose head count is computed at run time (:func:`dynamic_heads_encoder`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests.helpers.builders import node
from tests.helpers.transformer import encoder

__all__ = ["dynamic_heads_encoder", "fused_attention", "opset23_attention"]


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], dim: int, opsets: dict[str, int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", dim])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", dim])],
        [numpy_helper.from_array(v, name=k) for k, v in inits.items()])
    ir = 10 if opsets.get("", 17) >= 21 else 8
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()], ir_version=ir)


def _weights(rng: np.random.Generator, dim: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    w = (rng.standard_normal((dim, n_out)) / math.sqrt(dim)).astype(np.float32)
    return w, (0.05 * rng.standard_normal(n_out)).astype(np.float32)


def _output(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], rng: np.random.Generator, ctx: str, dim: int) -> None:
    inits["o.weight"], inits["o.bias"] = _weights(rng, dim, dim)
    nodes += [node("MatMul", [ctx, "o.weight"], "o/MatMul"), node("Add", ["o/MatMul", "o.bias"], "o/Add"),
              node("Add", ["o/Add", "x"], "y")]


def fused_attention(heads: int = 4, dim: int = 32, seed: int = 0) -> onnx.ModelProto:
    """``x -> com.microsoft.Attention(x, W_qkv, b_qkv) -> O -> + x``."""
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {}
    inits["qkv.weight"], inits["qkv.bias"] = _weights(rng, dim, 3 * dim)
    nodes = [helper.make_node("Attention", ["x", "qkv.weight", "qkv.bias"], ["ctx"], name="attn",
                              domain="com.microsoft", num_heads=heads)]
    _output(nodes, inits, rng, "ctx", dim)
    return _model(nodes, inits, dim, {"": 17, "com.microsoft": 1})


def opset23_attention(heads: int = 4, dim: int = 32, seed: int = 0, *, four_d: bool = False,
                      kv_heads: int | None = None) -> onnx.ModelProto:
    """``x -> Q/K/V (MatMul + Add) -> Attention (opset 23) -> O -> + x``; ``four_d``: the
    inputs are split into heads by ``Reshape [0, 0, H, dh]`` + ``Transpose``, the output merged back."""
    rng = np.random.default_rng(seed)
    dh = dim // heads
    inits: dict[str, np.ndarray] = {}
    if four_d:
        inits["heads_shape"] = np.array([0, 0, heads, dh], dtype=np.int64)
        inits["merge_shape"] = np.array([0, 0, dim], dtype=np.int64)
    nodes, ins = [], []
    for p in ("q", "k", "v"):
        n_out = dim if p == "q" or kv_heads is None else kv_heads * dh
        inits[f"{p}.weight"], inits[f"{p}.bias"] = _weights(rng, dim, n_out)
        nodes += [node("MatMul", ["x", f"{p}.weight"], f"{p}/MatMul"), node("Add", [f"{p}/MatMul", f"{p}.bias"], f"{p}/Add")]
        if four_d:
            nodes += [node("Reshape", [f"{p}/Add", "heads_shape"], f"{p}/Reshape"),
                      node("Transpose", [f"{p}/Reshape"], f"{p}/Transpose", perm=[0, 2, 1, 3])]
        ins.append(f"{p}/Transpose" if four_d else f"{p}/Add")
    attrs = {} if four_d else {"q_num_heads": heads, "kv_num_heads": kv_heads or heads}
    nodes.append(helper.make_node("Attention", ins, ["attn"], name="attn", **attrs))
    ctx = "attn"
    if four_d:
        nodes += [node("Transpose", ["attn"], "attn/Transpose", perm=[0, 2, 1, 3]),
                  node("Reshape", ["attn/Transpose", "merge_shape"], "merged")]
        ctx = "merged"
    _output(nodes, inits, rng, ctx, dim)
    return _model(nodes, inits, dim, {"": 23})


def dynamic_heads_encoder() -> onnx.ModelProto:
    """Q's split Reshape with its ``[H, dh]`` tail computed as ``Shape(q)[2] / dh``: no literal to rewrite."""
    model = encoder(layers=1, heads=4, dim=32, heads_shape="computed")
    extra = [node("Shape", ["layer0.attention.query/Add"], "h/shape"),
             node("Gather", ["h/shape", "h/two"], "h/width", axis=0),
             node("Div", ["h/width", "h/dh"], "h/heads"),
             node("Concat", ["h/heads", "h/dh"], "h/tail", axis=0)]
    inits = [numpy_helper.from_array(np.array([2], np.int64), "h/two"), numpy_helper.from_array(np.array([8], np.int64), "h/dh")]
    concat = next(n for n in model.graph.node if n.output[0] == "layer0.attention.query/heads_shape")
    concat.input[2] = "h/tail"
    index = list(model.graph.node).index(concat)
    for i, n in enumerate(extra):
        model.graph.node.insert(index + i, n)
    model.graph.initializer.extend(inits)
    onnx.checker.check_model(model, full_check=True)
    return model
