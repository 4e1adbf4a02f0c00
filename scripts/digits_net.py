#!/usr/bin/env python3
"""A ~400 M-MAC digits-sized CNN (input ``1×1×32×32``, fixed batch 1) for tool-speed benchmarks.

Not trained: He-initialized weights and random BatchNormalization statistics, deterministic for a
seed. Its shape gives pruning and reconstruction the structures of real networks:

* stem ``Conv 3×3 1→64 → BN → Relu``;
* a residual block at 32×32 (``Conv 3×3 64→128``, ``Conv 3×3 128→128``, 1×1 projection, Add) then a
  squeeze-and-excite gate (GlobalAveragePool, two 1×1 convs, Sigmoid, Mul);
* an inverted-residual style depthwise block at 16×16 (``1×1 128→256``, depthwise ``3×3`` stride 2,
  ``1×1 256→256``);
* a concat block (``Conv 3×3 256→128`` and ``Conv 1×1 256→128``, Concat);
* a residual block at 8×8 (stride-2 ``3×3 256→256``, ``3×3 256→256``, 1×1 projection);
* ``GlobalAveragePool → Flatten → Gemm 256→10``.

Used by ``scripts/bench_reconstruct.py``. ``python scripts/digits_net.py -o big_digits.onnx`` writes it
and prints its MACs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build"]


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, bn: bool = True,
             relu: bool = True) -> str:
        fan = cin // group * k * k
        w = self.const("w", self.rng.normal(0, np.sqrt(2.0 / fan), (cout, cin // group, k, k)))
        y = self.node("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)
        if bn:
            params = [self.rng.uniform(0.5, 1.5, cout), self.rng.normal(0, 0.1, cout),
                      self.rng.normal(0, 0.1, cout), self.rng.uniform(0.5, 2.0, cout)]
            y = self.node("BatchNormalization", [y] + [self.const(p, v) for p, v in zip("gbmv", params)])
        return self.node("Relu", [y]) if relu else y


def build(seed: int = 0) -> onnx.ModelProto:
    """The model (see the module docstring)."""
    b = _Builder(seed)
    x = b.conv("input", 1, 64, 3)
    # residual block at 32x32
    h = b.conv(b.conv(x, 64, 128, 3), 128, 128, 3, relu=False)
    x = b.node("Relu", [b.node("Add", [h, b.conv(x, 64, 128, 1, relu=False)])])
    # squeeze-and-excite
    s = b.node("GlobalAveragePool", [x])
    s = b.conv(s, 128, 32, 1, bn=False)
    s = b.node("Sigmoid", [b.conv(s, 32, 128, 1, bn=False, relu=False)])
    x = b.node("Mul", [x, s])
    # depthwise block, stride 2
    x = b.conv(b.conv(b.conv(x, 128, 256, 1), 256, 256, 3, stride=2, group=256), 256, 256, 1)
    # concat block
    x = b.node("Concat", [b.conv(x, 256, 128, 3), b.conv(x, 256, 128, 1)], axis=1)
    # residual block at 8x8
    h = b.conv(b.conv(x, 256, 256, 3, stride=2), 256, 256, 3, relu=False)
    x = b.node("Relu", [b.node("Add", [h, b.conv(x, 256, 256, 1, stride=2, relu=False)])])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    w = b.const("fc_w", b.rng.normal(0, np.sqrt(1.0 / 256), (10, 256)))
    fc = b.const("fc_b", np.zeros(10))
    b.nodes.append(helper.make_node("Gemm", [x, w, fc], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(b.nodes, "digits400m",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = build(args.seed)
    onnx.save(model, args.output)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from onnxcompress.core.metrics import model_metrics

    print(f"{args.output}: {model_metrics(model).macs / 1e6:.0f} M MACs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
