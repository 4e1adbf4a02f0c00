"""Tiny graphs for the pruning tests, and the equivalence oracle.

Oracle: remove channels from a copy of the model (``apply_pruning``), zero the same channels'
producer filters in another copy (``mask_channels``: biases kept, so each removed channel outputs
the constant the pruned graph assumes), and compare both in onnxruntime (optimizations off).
The cases' weights and biases are normal of scale 0.4 unless said otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxcompress.core import serde
from onnxcompress.pruning.apply import ApplyReport, apply_pruning, mask_channels
from onnxcompress.pruning.dependency import Analysis, analyze
from onnxcompress.pruning.select import Budget, plan_removal
from tests.helpers.builders import make_model, node
from tests.helpers.runs import max_err
from tests.helpers.tensors import rand, random_feeds

__all__ = ["CASES", "X", "Case", "assert_equivalent", "bn", "bn_node", "build", "choose", "ints",
           "padded_depthwise_gemm", "prune", "zeroed"]


def ints(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def bn(rng: np.random.Generator, prefix: str, c: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_g": rng.uniform(0.5, 1.5, c).astype(np.float32),
        f"{prefix}_b": rng.normal(0.0, 0.5, c).astype(np.float32),
        f"{prefix}_m": rng.normal(0.0, 0.5, c).astype(np.float32),
        f"{prefix}_v": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def bn_node(x: str, y: str, prefix: str) -> onnx.NodeProto:
    return node("BatchNormalization", [x] + [f"{prefix}_{k}" for k in "gbmv"], y, epsilon=1e-3)


@dataclass
class Case:
    """A test graph.

    Attributes:
        model: The model.
        exact: The pruned model equals the zeroed original up to float rounding.
        frozen: Reasons expected among the frozen groups.
        pruned_groups: Minimum number of groups the oracle can prune.
    """

    model: onnx.ModelProto
    exact: bool = True
    frozen: set[str] = field(default_factory=set)
    pruned_groups: int = 1


X = {"x": ["N", 3, 8, 8]}


def conv_chain(rng):
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "w2", "b2"], "b"), node("Relu", ["b"], "br"),
             node("Conv", ["br", "w3", "b3"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "w2": rand(rng, 8, 8, 3, 3, scale=0.4), "b2": rand(rng, 8, scale=0.4),
             "w3": rand(rng, 4, 8, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits), pruned_groups=2)


def conv_bn_relu(rng):
    nodes = [node("Conv", ["x", "w1"], "a"), bn_node("a", "an", "bn1"), node("Relu", ["an"], "ar"),
             node("Conv", ["ar", "w2"], "b"), bn_node("b", "bb", "bn2"), node("Relu", ["bb"], "br"),
             node("Conv", ["br", "w3"], "y")]
    inits = {"w1": rand(rng, 8, 3, 3, 3, scale=0.4), "w2": rand(rng, 8, 8, 1, 1, scale=0.4),
             "w3": rand(rng, 4, 8, 1, 1, scale=0.4),
             **bn(rng, "bn1", 8), **bn(rng, "bn2", 8)}
    return Case(make_model(nodes, X, ["y"], inits), pruned_groups=2)


def residual_identity(rng):
    # c2 (3x3, padded) reads the residual stream: its constant input must be 0 for an exact
    # oracle, so the stream's producers have biases <= 0 before the ReLU.
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "r"),
             node("Conv", ["r", "w2"], "b", pads=[1, 1, 1, 1]), bn_node("b", "bb", "bn2"),
             node("Add", ["bb", "r"], "s"), node("Relu", ["s"], "sr"),
             node("Conv", ["sr", "w3", "b3"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": -np.abs(rand(rng, 8, scale=0.4)),
             "w2": rand(rng, 8, 8, 3, 3, scale=0.4),
             "w3": rand(rng, 4, 8, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.4), **bn(rng, "bn2", 8)}
    inits["bn2_b"] = -np.abs(inits["bn2_b"]) - 2.0  # BN(bias 0) < 0 for every channel
    inits["bn2_m"] = np.abs(inits["bn2_m"])
    return Case(make_model(nodes, X, ["y"], inits))


def residual_projection(rng):
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "r"),
             node("Conv", ["r", "w2", "b2"], "b"), node("Relu", ["b"], "br"),
             node("Conv", ["br", "w3", "b3"], "c"), node("Conv", ["r", "wp", "bp"], "p"),
             node("Add", ["c", "p"], "s"), node("Relu", ["s"], "sr"), node("Conv", ["sr", "w4", "b4"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "w2": rand(rng, 8, 8, 1, 1, scale=0.4), "b2": rand(rng, 8, scale=0.4),
             "w3": rand(rng, 16, 8, 1, 1, scale=0.4), "b3": rand(rng, 16, scale=0.4),
             "wp": rand(rng, 16, 8, 1, 1, scale=0.4), "bp": rand(rng, 16, scale=0.4),
             "w4": rand(rng, 4, 16, 1, 1, scale=0.4), "b4": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits), pruned_groups=3)


def concat_two(rng):
    nodes = [node("Conv", ["x", "wa", "ba"], "a"), node("Conv", ["x", "wb", "bb"], "b", pads=[1, 1, 1, 1]),
             node("Concat", ["a", "b"], "c", axis=1), node("Relu", ["c"], "cr"), node("Conv", ["cr", "w3", "b3"], "y")]
    inits = {"wa": rand(rng, 6, 3, 1, 1, scale=0.4), "ba": rand(rng, 6, scale=0.4),
             "wb": rand(rng, 4, 3, 3, 3, scale=0.4), "bb": rand(rng, 4, scale=0.4),
             "w3": rand(rng, 5, 10, 1, 1, scale=0.4), "b3": rand(rng, 5, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits), pruned_groups=2)


def concat_cascade(rng):
    nodes = [node("Conv", ["x", "wa", "ba"], "a"), node("Conv", ["x", "wb", "bb"], "b"),
             node("Concat", ["a", "b"], "c1", axis=1), node("Conv", ["x", "wc", "bc"], "c"),
             node("Concat", ["c1", "c"], "c2", axis=-3), node("Relu", ["c2"], "cr"),
             node("Conv", ["cr", "w3", "b3"], "y")]
    inits = {"wa": rand(rng, 6, 3, 1, 1, scale=0.4), "ba": rand(rng, 6, scale=0.4),
             "wb": rand(rng, 4, 3, 1, 1, scale=0.4), "bb": rand(rng, 4, scale=0.4),
             "wc": rand(rng, 5, 3, 1, 1, scale=0.4), "bc": rand(rng, 5, scale=0.4),
             "w3": rand(rng, 3, 15, 1, 1, scale=0.4), "b3": rand(rng, 3, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits), pruned_groups=3)


def concat_spatial(rng):
    # Concat along H of the channels, a slice of them and a constant equal to relu(b1): every
    # removed channel stays a constant (b1), so the fold is exact; the constant is sliced.
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Slice", ["ar", "st", "en", "ax"], "top"), node("Concat", ["ar", "top", "k"], "c", axis=2),
             node("Conv", ["c", "w2", "b2"], "y")]
    b1 = np.abs(rand(rng, 8, scale=0.4))
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": b1, "st": ints(0), "en": ints(4), "ax": ints(2),
             "k": np.broadcast_to(b1.reshape(1, 8, 1, 1), (2, 8, 2, 8)).copy(), "w2": rand(rng, 4, 8, 1, 1, scale=0.4),
             "b2": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, {"x": [2, 3, 8, 8]}, ["y"], inits))


def concat_input(rng):
    nodes = [node("Conv", ["x", "wa", "ba"], "a"), node("Concat", ["a", "x", "k"], "c", axis=1),
             node("Relu", ["c"], "cr"), node("Conv", ["cr", "w3", "b3"], "y")]
    inits = {"wa": rand(rng, 6, 3, 1, 1, scale=0.4), "ba": rand(rng, 6, scale=0.4),
             "k": rand(rng, 1, 2, 8, 8, scale=0.4),
             "w3": rand(rng, 4, 11, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.4)}
    model = make_model(nodes, {"x": [2, 3, 8, 8]}, ["y"], {**inits, "k": np.repeat(inits["k"], 2, axis=0)})
    return Case(model)


def split_case(opset: int):
    def build(rng):
        split_in = ["c", "sizes"] if opset >= 13 else ["c"]
        attrs = {"axis": 1}
        if opset < 13:
            attrs["split"] = [3, 5]
        if opset >= 18:
            split_in, attrs = ["c"], {"axis": 1, "num_outputs": 2}
        nodes = [node("Conv", ["x", "w1", "b1"], "c"), node("Split", split_in, ["s0", "s1"], **attrs),
                 node("Relu", ["s0"], "r0"), node("Sigmoid", ["s1"], "r1"),
                 node("Conv", ["r0", "wa", "ba"], "ya"), node("Conv", ["r1", "wb", "bb"], "yb"),
                 node("Add", ["ya", "yb"], "y")]
        n0, n1 = (4, 4) if opset >= 18 else (3, 5)
        inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4),
                 "wa": rand(rng, 4, n0, 1, 1, scale=0.4), "ba": rand(rng, 4, scale=0.4),
                 "wb": rand(rng, 4, n1, 1, 1, scale=0.4), "bb": rand(rng, 4, scale=0.4)}
        if 13 <= opset < 18:
            inits["sizes"] = ints(3, 5)
        return Case(make_model(nodes, X, ["y"], inits, opset=opset))
    return build


def slice_case(rng):
    nodes = [node("Conv", ["x", "w1", "b1"], "c"), node("Sigmoid", ["c"], "cr"),
             node("Slice", ["cr", "st", "en", "ax"], "s"), node("Conv", ["s", "w2", "b2"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4), "st": ints(2, 1),
             "en": ints(-1, 100), "ax": ints(1, 2),
             "w2": rand(rng, 4, 5, 1, 1, scale=0.4), "b2": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits))


def depthwise(m: int):
    def build(rng):
        nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
                 node("Conv", ["ar", "wd", "bd"], "d", group=8), node("Clip", ["d", "lo", "hi"], "dr"),
                 node("Conv", ["dr", "w2", "b2"], "y")]
        inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4),
                 "wd": rand(rng, 8 * m, 1, 3, 3, scale=0.4), "bd": rand(rng, 8 * m, scale=0.4),
                 "lo": np.float32(0.0), "hi": np.float32(6.0), "w2": rand(rng, 4, 8 * m, 1, 1, scale=0.4),
                 "b2": rand(rng, 4, scale=0.4)}
        return Case(make_model(nodes, X, ["y"], inits))
    return build


def grouped(g: int):
    """A grouped 3x3 conv (no padding: the fold of removed inputs is exact) between two convs:
    its input blocks come from ``a``, its output blocks are its own group."""
    def build(rng):
        nodes = [node("Conv", ["x", "w1", "b1"], "a"), bn_node("a", "an", "bn1"), node("Relu", ["an"], "ar"),
                 node("Conv", ["ar", "wg", "bg"], "g", group=g), node("Relu", ["g"], "gr"),
                 node("Conv", ["gr", "w2", "b2"], "h"), node("Relu", ["h"], "hr"), node("Conv", ["hr", "w3"], "y")]
        inits = {"w1": rand(rng, 16, 3, 1, 1, scale=0.4), "b1": rand(rng, 16, scale=0.4),
                 "wg": rand(rng, 8, 16 // g, 3, 3, scale=0.4), "bg": rand(rng, 8, scale=0.4),
                 "w2": rand(rng, 8, 8, 1, 1, scale=0.4), "b2": rand(rng, 8, scale=0.4),
                 "w3": rand(rng, 4, 8, 1, 1, scale=0.4), **bn(rng, "bn1", 16)}
        return Case(make_model(nodes, X, ["y"], inits), pruned_groups=3)
    return build


def grouped_fed_by_pruned_conv(rng):
    """Only the input side: the grouped conv's own output is a graph output (protected)."""
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "wg", "bg"], "y", group=2)]
    inits = {"w1": rand(rng, 8, 3, 3, 3, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "wg": rand(rng, 6, 4, 1, 1, scale=0.4), "bg": rand(rng, 6, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits), frozen={"graph_output"})


def grouped_residual(rng):
    """``relu(bn(gconv(r)) + r)``: the stream's blocks are the grouped conv's input and output.
    Padded 3x3, so the stream's removed channels read as 0 (relu of a negative bias) for an
    exact fold."""
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "r"),
             node("Conv", ["r", "wg", "bg"], "g", group=4, pads=[1, 1, 1, 1]), bn_node("g", "gb", "bn"),
             node("Add", ["gb", "r"], "s"), node("Relu", ["s"], "sr"), node("Conv", ["sr", "w3", "b3"], "y")]
    inits = {"w1": rand(rng, 16, 3, 1, 1, scale=0.4), "b1": -np.abs(rand(rng, 16, scale=0.4)) - 0.1,
             "wg": rand(rng, 16, 4, 3, 3, scale=0.4), "bg": rand(rng, 16, scale=0.4),
             "w3": rand(rng, 4, 16, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.4), **bn(rng, "bn", 16)}
    return Case(make_model(nodes, X, ["y"], inits))


def grouped_and_dense_readers(rng):
    """``a`` is read by a grouped conv (g=4) and by a dense conv; their outputs are added, so the
    sum's group takes the grouped conv's output blocks; ``a``'s group its input blocks."""
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "wg", "bg"], "g", group=4), node("Conv", ["ar", "wd", "bd"], "d"),
             node("Add", ["g", "d"], "s"), node("Sigmoid", ["s"], "ss"), node("Conv", ["ss", "w3", "b3"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "wg": rand(rng, 12, 2, 1, 1, scale=0.4), "bg": rand(rng, 12, scale=0.4),
             "wd": rand(rng, 12, 8, 1, 1, scale=0.4), "bd": rand(rng, 12, scale=0.4),
             "w3": rand(rng, 4, 12, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits), pruned_groups=2)


def grouped_transpose(rng):
    """ConvTranspose group=2: input rows sliced, output columns sliced per block."""
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("ConvTranspose", ["ar", "wt", "bt"], "t", group=2, strides=[2, 2]), node("Relu", ["t"], "tr"),
             node("Conv", ["tr", "w3", "b3"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": -np.abs(rand(rng, 8, scale=0.4)) - 0.1,
             "wt": rand(rng, 8, 3, 2, 2, scale=0.4), "bt": rand(rng, 6, scale=0.4),
             "w3": rand(rng, 4, 6, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits), pruned_groups=2)


def grouped_across_concat(rng):
    """A grouped conv whose blocks span two producers' channels: the rule holds for the larger
    (a, 6 channels: blocks of 4 and 2), the smaller (b) is pinned."""
    nodes = [node("Conv", ["x", "wa", "ba"], "a"), node("Conv", ["x", "wb", "bb"], "b"),
             node("Concat", ["a", "b"], "c", axis=1), node("Conv", ["c", "wg", "bg"], "g", group=2),
             node("Relu", ["g"], "gr"), node("Conv", ["gr", "w3", "b3"], "y")]
    inits = {"wa": rand(rng, 6, 3, 1, 1, scale=0.4), "ba": rand(rng, 6, scale=0.4),
             "wb": rand(rng, 2, 3, 1, 1, scale=0.4), "bb": rand(rng, 2, scale=0.4),
             "wg": rand(rng, 8, 4, 1, 1, scale=0.4), "bg": rand(rng, 8, scale=0.4),
             "w3": rand(rng, 4, 8, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits), frozen={"grouped_conv"})


def se_block(rng):
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("GlobalAveragePool", ["ar"], "gap"), node("Conv", ["gap", "wsq", "bsq"], "sq"),
             node("Relu", ["sq"], "sqr"), node("Conv", ["sqr", "wex", "bex"], "ex"),
             node("HardSigmoid", ["ex"], "gate"), node("Mul", ["ar", "gate"], "m"),
             node("Conv", ["m", "w2", "b2"], "y")]
    inits = {"w1": rand(rng, 8, 3, 3, 3, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "wsq": rand(rng, 4, 8, 1, 1, scale=0.4), "bsq": rand(rng, 4, scale=0.4),
             "wex": rand(rng, 8, 4, 1, 1, scale=0.4), "bex": rand(rng, 8, scale=0.4),
             "w2": rand(rng, 4, 8, 1, 1, scale=0.4), "b2": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits), pruned_groups=2)


def flatten_gemm(rng):
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("MaxPool", ["ar"], "p", kernel_shape=[2, 2], strides=[2, 2]),
             node("Flatten", ["p"], "f"), node("Gemm", ["f", "wf", "bf"], "h", transB=1),
             node("Relu", ["h"], "hr"), node("Gemm", ["hr", "wo", "bo"], "y", alpha=0.5, beta=2.0)]
    inits = {"w1": rand(rng, 8, 3, 3, 3, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "wf": rand(rng, 12, 8 * 9, scale=0.2), "bf": rand(rng, 12, scale=0.4),
             "wo": rand(rng, 12, 5, scale=0.4), "bo": rand(rng, 5, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits), pruned_groups=2)


def reshape_matmul(rng):
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Reshape", ["ar", "shape"], "f"), node("MatMul", ["f", "wf"], "h"),
             node("Add", ["h", "bf"], "hb"), node("Relu", ["hb"], "hr"), node("MatMul", ["hr", "wo"], "y")]
    inits = {"w1": rand(rng, 8, 3, 4, 4, scale=0.2), "b1": rand(rng, 8, scale=0.4), "shape": ints(-1, 8 * 25),
             "wf": rand(rng, 8 * 25, 12, scale=0.1), "bf": rand(rng, 12, scale=0.4), "wo": rand(rng, 12, 5, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits), pruned_groups=2)


def dynamic_flatten(rng):
    """``x.view(x.size(0), -1)`` as exported: the Reshape target is computed from ``Shape``."""
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Shape", ["ar"], "shp"), node("Gather", ["shp", "zero"], "n", axis=0),
             node("Unsqueeze", ["n", "axis0"], "n1"), node("Concat", ["n1", "minus1"], "target", axis=0),
             node("Reshape", ["ar", "target"], "f"), node("Gemm", ["f", "wf", "bf"], "y", transB=1)]
    inits = {"w1": rand(rng, 8, 3, 4, 4, scale=0.2), "b1": rand(rng, 8, scale=0.4), "zero": np.asarray(0, np.int64),
             "axis0": ints(0), "minus1": ints(-1), "wf": rand(rng, 5, 8 * 25, scale=0.1), "bf": rand(rng, 5, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits))


def gap_flatten_gemm(rng):
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("GlobalAveragePool", ["ar"], "gap"), node("Squeeze", ["gap", "axes"], "sq"),
             node("Unsqueeze", ["sq", "axes"], "us"), node("Flatten", ["us"], "f"),
             node("Gemm", ["f", "wf"], "y")]
    inits = {"w1": rand(rng, 8, 3, 3, 3, scale=0.4), "b1": rand(rng, 8, scale=0.4), "axes": ints(2, 3),
             "wf": rand(rng, 8, 5, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits))


def matmul_chain(rng):
    nodes = [node("MatMul", ["x", "w1"], "h"), node("Add", ["h", "b1"], "hb"), node("Tanh", ["hb"], "ht"),
             node("MatMul", ["ht", "w2"], "y")]
    inits = {"w1": rand(rng, 16, 12, scale=0.4), "b1": rand(rng, 12, scale=0.4), "w2": rand(rng, 12, 5, scale=0.4)}
    return Case(make_model(nodes, {"x": ["N", 16]}, ["y"], inits))


def conv_transpose(rng):
    # The ConvTranspose reads channels whose constant is 0 (relu of a negative bias): exact.
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("ConvTranspose", ["ar", "wt", "bt"], "t", strides=[2, 2]), node("Relu", ["t"], "tr"),
             node("Conv", ["tr", "w3", "b3"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": -np.abs(rand(rng, 8, scale=0.4)) - 0.1,
             "wt": rand(rng, 8, 6, 2, 2, scale=0.4), "bt": rand(rng, 6, scale=0.4),
             "w3": rand(rng, 4, 6, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits), pruned_groups=2)


def depthwise_transpose(rng):
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("ConvTranspose", ["ar", "wt", "bt"], "t", group=8, strides=[2, 2]), node("Sigmoid", ["t"], "ts"),
             node("Conv", ["ts", "w3", "b3"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": -np.abs(rand(rng, 8, scale=0.4)) - 0.1,
             "wt": rand(rng, 8, 2, 2, 2, scale=0.4), "bt": rand(rng, 16, scale=0.4),
             "w3": rand(rng, 4, 16, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits))


def old_opset(rng):
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Upsample", ["ar", "scales"], "u", mode="nearest"),
             node("Slice", ["u"], "s", starts=[1, 0], ends=[7, 100], axes=[1, 3]),
             node("Pad", ["s"], "p", pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="edge"),
             node("Conv", ["p", "w2", "b2"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "scales": np.asarray([1, 1, 2, 2], np.float32),
             "w2": rand(rng, 4, 6, 1, 1, scale=0.4), "b2": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits, opset=9))


def spatial_ops(rng):
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("LeakyRelu", ["a"], "ar", alpha=0.1),
             node("MaxPool", ["ar"], "p", kernel_shape=[2, 2], strides=[2, 2]),
             node("Resize", ["p", "", "scales"], "r", mode="nearest"),
             node("Pad", ["r", "pads"], "pd", mode="edge"), node("AveragePool", ["pd"], "ap", kernel_shape=[3, 3]),
             node("Conv", ["ap", "w2", "b2"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "scales": np.asarray([1, 1, 2, 2], np.float32),
             "pads": ints(0, 0, 1, 1, 0, 0, 1, 1), "w2": rand(rng, 4, 8, 1, 1, scale=0.4),
             "b2": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, X, ["y"], inits))


def resize_sizes(rng):
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Elu", ["a"], "ar"),
             node("Resize", ["ar", "", "", "sizes"], "r", mode="nearest"), node("Conv", ["r", "w2", "b2"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4), "sizes": ints(2, 8, 12, 12),
             "w2": rand(rng, 4, 8, 1, 1, scale=0.4), "b2": rand(rng, 4, scale=0.4)}
    return Case(make_model(nodes, {"x": [2, 3, 8, 8]}, ["y"], inits))


def prelu_consts(rng):
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("PRelu", ["a", "slope"], "ar"),
             node("Mul", ["ar", "scale"], "m"), node("Add", ["shift", "m"], "s"), node("Div", ["s", "two"], "d"),
             node("Sub", ["d", "sub"], "sb"), node("Softplus", ["sb"], "sp"), node("Conv", ["sp", "w2", "b2"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "slope": rand(rng, 8, 1, 1, scale=0.4),
             "scale": rand(rng, 1, 8, 1, 1, scale=0.4) + 1.0, "shift": rand(rng, 8, 1, 1, scale=0.4),
             "two": np.float32(2.0),
             "sub": rand(rng, 1, 1, 1, 8, scale=0.4), "w2": rand(rng, 4, 8, 1, 1, scale=0.4),
             "b2": rand(rng, 4, scale=0.4)}
    inits["sub"] = np.zeros((1, 1, 1, 8), np.float32)  # broadcasts along W, never sliced
    return Case(make_model(nodes, X, ["y"], inits))


def unet_resize_to_skip(rng):
    """``interpolate(deep, size=skip.shape[2:])`` then ``cat([up, skip])``, as PyTorch exports it
    (CRAFT's U-Net): Resize sizes = Concat(Shape(deep)[0:2], Shape(skip)[2:4]), so inference
    knows neither the Resize's nor the Concat's channel count."""
    nodes = [node("Conv", ["x", "w1", "b1"], "a", pads=[1, 1, 1, 1]), node("Relu", ["a"], "skip"),
             node("MaxPool", ["skip"], "p", kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p", "w2", "b2"], "b"), node("Relu", ["b"], "deep"),
             node("Shape", ["deep"], "shd"), node("Slice", ["shd", "zero", "two", "zero"], "nc"),
             node("Shape", ["skip"], "shs"), node("Slice", ["shs", "two", "four", "zero"], "hw"),
             node("Cast", ["hw"], "hw64", to=7), node("Concat", ["nc", "hw64"], "sizes", axis=0),
             node("Resize", ["deep", "", "", "sizes"], "up", mode="linear"),
             node("Concat", ["up", "skip"], "cat", axis=1), node("Conv", ["cat", "w3", "b3"], "y")]
    inits = {"w1": rand(rng, 8, 3, 3, 3, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "w2": rand(rng, 6, 8, 1, 1, scale=0.4), "b2": rand(rng, 6, scale=0.4),
             "w3": rand(rng, 4, 14, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.4), "zero": ints(0), "two": ints(2),
             "four": ints(4)}
    return Case(make_model(nodes, X, ["y"], inits, opset=13), pruned_groups=2)


#: Name -> builder(rng) -> Case.
CASES: dict[str, Callable[[np.random.Generator], Case]] = {
    "conv_chain": conv_chain,
    "conv_bn_relu": conv_bn_relu,
    "residual_identity": residual_identity,
    "residual_projection": residual_projection,
    "concat_two": concat_two,
    "concat_cascade": concat_cascade,
    "concat_input": concat_input,
    "concat_spatial": concat_spatial,
    "split_opset12": split_case(12),
    "split_opset17": split_case(17),
    "split_opset18": split_case(18),
    "slice": slice_case,
    "depthwise_m1": depthwise(1),
    "depthwise_m2": depthwise(2),
    "grouped_g2": grouped(2),
    "grouped_g4": grouped(4),
    "grouped_fed_by_pruned_conv": grouped_fed_by_pruned_conv,
    "grouped_residual": grouped_residual,
    "grouped_and_dense_readers": grouped_and_dense_readers,
    "grouped_transpose": grouped_transpose,
    "grouped_across_concat": grouped_across_concat,
    "se_block": se_block,
    "flatten_gemm": flatten_gemm,
    "reshape_matmul": reshape_matmul,
    "gap_flatten_gemm": gap_flatten_gemm,
    "dynamic_flatten": dynamic_flatten,
    "matmul_chain": matmul_chain,
    "conv_transpose": conv_transpose,
    "depthwise_transpose": depthwise_transpose,
    "old_opset": old_opset,
    "spatial_ops": spatial_ops,
    "resize_sizes": resize_sizes,
    "prelu_consts": prelu_consts,
    "unet_resize_to_skip": unet_resize_to_skip,
}


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    """The model of ``CASES[name]`` built with a generator seeded with ``seed``."""
    return CASES[name](np.random.default_rng(seed)).model


def padded_depthwise_gemm(rng: np.random.Generator, bias_sign: float = 1.0) -> onnx.ModelProto:
    """conv → Relu → padded depthwise → GAP → Flatten → Gemm, the first conv's bias of sign
    ``bias_sign`` (|b| ≥ 0.5): with a positive bias a removed channel's constant is non-zero and not
    constant after the padded depthwise conv (border pixels); with a negative one it is 0."""
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "wd", "bd"], "d", group=8, pads=[1, 1, 1, 1]),
             node("GlobalAveragePool", ["d"], "g"), node("Flatten", ["g"], "f"),
             node("Gemm", ["f", "wf", "bf"], "y", transB=1)]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": bias_sign * (np.abs(rand(rng, 8, scale=0.4)) + 0.5),
             "wd": rand(rng, 8, 1, 3, 3, scale=0.4), "bd": rand(rng, 8, scale=0.4),
             "wf": rand(rng, 5, 8, scale=0.4), "bf": rand(rng, 5, scale=0.4)}
    return make_model(nodes, X, ["y"], inits)


def choose(analysis: Analysis, seed: int = 0, ratio: float = 0.4) -> dict[int, np.ndarray]:
    """Random channels of every prunable group (seeded), through the real selection rules."""
    rng = np.random.default_rng(seed)
    scores = {g.index: rng.random(g.size) for g in analysis.groups if g.frozen is None}
    return plan_removal(analysis, scores, Budget(ratio, round_to=1, seed=seed)).remove


def prune(model: onnx.ModelProto, remove: dict[int, np.ndarray] | None = None, *, seed: int = 0,
          **kw: Any) -> tuple[onnx.ModelProto, Analysis, dict[int, np.ndarray], ApplyReport]:
    """``model`` with channels removed (default: :func:`choose`); checked with the full checker."""
    graph = serde.to_graph(model)
    analysis = analyze(graph, **kw)
    remove = choose(analysis, seed) if remove is None else remove
    report = apply_pruning(analysis, remove)
    graph.cleanup().toposort()
    out = serde.to_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return out, analysis, remove, report


def zeroed(model: onnx.ModelProto, remove: dict[int, np.ndarray], **kw: Any) -> onnx.ModelProto:
    """The zeroed original: same graph, removed channels' producer filters set to 0."""
    graph = serde.to_graph(model)
    mask_channels(analyze(graph, **kw), remove)
    graph.cleanup().toposort()
    return serde.to_model(graph, model)


def assert_equivalent(model: onnx.ModelProto, seed: int = 0, tol: float = 1e-5, dim: int = 2, **kw: Any):
    """Prune, zero, compare in ORT (symbolic dims = ``dim``); returns ``(pruned, analysis, remove, report)``."""
    pruned, analysis, remove, report = prune(model, seed=seed, **kw)
    reference = zeroed(model, remove, **kw)
    err, scale = max_err(reference, pruned, random_feeds(model, seed=seed, dim=dim))
    assert err <= tol * max(1.0, scale), f"pruned differs from the zeroed original by {err} (scale {scale})"
    return pruned, analysis, remove, report
