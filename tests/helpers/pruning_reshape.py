"""Tiny graphs of the Reshape patterns of real exports, for the pruning oracle (see :mod:`tests.helpers.pruning`).

Paddle-style squeeze-and-excite with computed reshape targets, ``x.view(x.size(0), x.size(1), -1)``,
a computed target shared by two reshapes (YOLOv8's ``[b, no, -1]``), channels split into blocks
(YOLOv8's DFL ``[b, 4*16, n] -> [b, 4, 16, n]``) and ShuffleNet's channel shuffle after and before
grouped convolutions. Removed channels' constants are 0 where a padded conv would make them
border-dependent (negative biases before a ReLU), so every case is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tests.helpers.builders import make_model, node
from tests.helpers.pruning import Case, X, bn, bn_node, ints
from tests.helpers.tensors import rand

__all__ = ["RESHAPE_CASES", "batch_of", "shuffle_unit"]


def batch_of(t: str, out: str) -> list:
    """``out = Shape(t)[0:1]`` (how exporters take the batch size)."""
    return [node("Shape", [t], f"{out}_shape"), node("Slice", [f"{out}_shape", "i0", "i1", "i0"], out)]


SHAPE_CONSTS = {"i0": ints(0), "i1": ints(1), "minus1": ints(-1)}


def paddle_se(literal: bool) -> Callable[[np.random.Generator], Case]:
    """conv -> GAP -> Reshape [N, C] (target ``Concat(Shape[0:1], [-1])``) -> MatMul squeeze/excite ->
    HardSigmoid -> Reshape [N, C, 1, 1] (``[0, -1, 1, 1]``, or with ``literal`` the computed
    ``Concat(Shape[0:1], [C], [1, 1])`` whose C is rewritten) -> Mul -> conv."""
    def build(rng: np.random.Generator) -> Case:
        back = [node("Concat", ["n", "c8", "ones"], "t2", axis=0)] if literal else []
        nodes = [node("Conv", ["x", "w1", "b1"], "a", pads=[1, 1, 1, 1]), node("Relu", ["a"], "ar"),
                 node("GlobalAveragePool", ["ar"], "gap"), *batch_of("gap", "n"),
                 node("Concat", ["n", "minus1"], "t1", axis=0), node("Reshape", ["gap", "t1"], "v"),
                 node("MatMul", ["v", "wsq"], "s"), node("Add", ["s", "bsq"], "sb"), node("Relu", ["sb"], "sr"),
                 node("MatMul", ["sr", "wex"], "e"), node("Add", ["e", "bex"], "eb"),
                 node("HardSigmoid", ["eb"], "gate"), *back, node("Reshape", ["gate", "t2"], "g4"),
                 node("Mul", ["ar", "g4"], "m"), node("Conv", ["m", "w2", "b2"], "y")]
        inits = {"w1": rand(rng, 8, 3, 3, 3, scale=0.4), "b1": rand(rng, 8, scale=0.4),
                 "wsq": rand(rng, 8, 4, scale=0.4), "bsq": rand(rng, 4, scale=0.4),
                 "wex": rand(rng, 4, 8, scale=0.4), "bex": rand(rng, 8, scale=0.4),
                 "w2": rand(rng, 4, 8, 1, 1, scale=0.4), "b2": rand(rng, 4, scale=0.4), **SHAPE_CONSTS}
        inits.update({"c8": ints(8), "ones": ints(1, 1)} if literal else {"t2": ints(0, -1, 1, 1)})
        return Case(make_model(nodes, X, ["y"], inits), pruned_groups=2)

    return build


def view_own_channels(rng: np.random.Generator) -> Case:
    """``x.view(x.size(0), x.size(1), -1)`` into a 1-D conv: the target carries the channel count
    from the tensor itself (``Shape(x)[1]``), nothing to rewrite."""
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"), node("Shape", ["ar"], "shp"),
             node("Gather", ["shp", "zero"], "n0", axis=0), node("Gather", ["shp", "one"], "c0", axis=0),
             node("Unsqueeze", ["n0", "i0"], "n"), node("Unsqueeze", ["c0", "i0"], "c"),
             node("Concat", ["n", "c", "minus1"], "t", axis=0), node("Reshape", ["ar", "t"], "v"),
             node("Conv", ["v", "w2", "b2"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "w2": rand(rng, 4, 8, 1, scale=0.4), "b2": rand(rng, 4, scale=0.4),
             "zero": np.asarray(0, np.int64), "one": np.asarray(1, np.int64), **SHAPE_CONSTS}
    return Case(make_model(nodes, X, ["y"], inits))


def shared_target(rng: np.random.Generator) -> Case:
    """Two levels reshaped with one computed target ``[Shape(a)[0], 6, -1]`` and concatenated along
    the positions (YOLOv8's head): one group; the 6 is rewritten in one copy of the Concat. (Removed
    channels are 0 in both levels, so their constant survives the Concat along the positions.)"""
    nodes = [node("Conv", ["x", "wa", "ba"], "a"), node("Relu", ["a"], "ar"),
             node("Conv", ["x", "wb", "bb"], "b", strides=[2, 2]), node("Relu", ["b"], "br"),
             *batch_of("ar", "n"), node("Concat", ["n", "c6", "minus1"], "t", axis=0),
             node("Reshape", ["ar", "t"], "va"), node("Reshape", ["br", "t"], "vb"),
             node("Concat", ["va", "vb"], "v", axis=2), node("Conv", ["v", "w2", "b2"], "y")]
    inits = {"wa": rand(rng, 6, 3, 1, 1, scale=0.4), "ba": -np.abs(rand(rng, 6, scale=0.4)) - 0.1,
             "wb": rand(rng, 6, 3, 1, 1, scale=0.4), "bb": -np.abs(rand(rng, 6, scale=0.4)) - 0.1,
             "c6": ints(6), "w2": rand(rng, 4, 6, 1, scale=0.4), "b2": rand(rng, 4, scale=0.4), **SHAPE_CONSTS}
    return Case(make_model(nodes, X, ["y"], inits))


def dfl_blocks(rng: np.random.Generator) -> Case:
    """conv (12 channels) -> ReLU -> Reshape ``[N, 3, 4, 64]`` (computed, literal 3) -> Sigmoid per bin
    -> Reshape ``[0, 12, 8, 8]`` -> conv: three blocks of 4 channels, pruned whole; both 3 and 12
    rewritten. (A removed block is 0 everywhere: its constant is one per block.)"""
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"), *batch_of("ar", "n"),
             node("Concat", ["n", "blocks", "minus1"], "t", axis=0), node("Reshape", ["ar", "t"], "d"),
             node("Sigmoid", ["d"], "ds"), node("Reshape", ["ds", "back"], "f"), node("Conv", ["f", "w2", "b2"], "y")]
    inits = {"w1": rand(rng, 12, 3, 1, 1, scale=0.4), "b1": -np.abs(rand(rng, 12, scale=0.4)) - 0.1,
             "blocks": ints(3, 4), "back": ints(0, 12, 8, 8),
             "w2": rand(rng, 4, 12, 1, 1, scale=0.4), "b2": rand(rng, 4, scale=0.4), **SHAPE_CONSTS}
    return Case(make_model(nodes, X, ["y"], inits))


def shuffle_unit(per: int, *, grouped_producer: bool = True, reader_groups: int = 2) -> Callable[[np.random.Generator], Case]:
    """A ShuffleNet unit: (grouped) 1x1 conv ``a`` (``2*per`` channels, negative bias) -> ReLU ->
    shuffle (2 groups of ``per``) -> padded depthwise 3x3 -> BN -> grouped 1x1 conv (``reader_groups``)
    -> ReLU -> conv."""
    c = 2 * per

    def build(rng: np.random.Generator) -> Case:
        if grouped_producer:
            head = [node("Conv", ["x", "w0", "b0"], "p"), node("Relu", ["p"], "pr"),
                    node("Conv", ["pr", "w1", "b1"], "a", group=2)]
            weights = {"w0": rand(rng, 4, 3, 1, 1, scale=0.4), "b0": rand(rng, 4, scale=0.4),
                       "w1": rand(rng, c, 2, 1, 1, scale=0.4)}
        else:
            head = [node("Conv", ["x", "w1", "b1"], "a")]
            weights = {"w1": rand(rng, c, 3, 1, 1, scale=0.4)}
        nodes = [*head, node("Relu", ["a"], "ar"), node("Reshape", ["ar", "s1"], "r1"),
                 node("Transpose", ["r1"], "tr", perm=[0, 2, 1, 3, 4]), node("Reshape", ["tr", "s2"], "sh"),
                 node("Conv", ["sh", "wd", "bd"], "d", group=c, pads=[1, 1, 1, 1]), bn_node("d", "dn", "bnd"),
                 node("Conv", ["dn", "wg", "bg"], "g", group=reader_groups), node("Relu", ["g"], "gr"),
                 node("Conv", ["gr", "w3", "b3"], "y")]
        inits = {**weights, "b1": -np.abs(rand(rng, c, scale=0.4)) - 0.1,
                 "s1": ints(0, 2, per, 8, 8), "s2": ints(0, c, 8, 8),
                 "wd": rand(rng, c, 1, 3, 3, scale=0.4), "bd": rand(rng, c, scale=0.4), **bn(rng, "bnd", c),
                 "wg": rand(rng, 8, c // reader_groups, 1, 1, scale=0.4), "bg": rand(rng, 8, scale=0.4),
                 "w3": rand(rng, 4, 8, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.4)}
        return Case(make_model(nodes, X, ["y"], inits), pruned_groups=2)

    return build


#: Name -> builder(rng) -> Case.
RESHAPE_CASES: dict[str, Callable[[np.random.Generator], Case]] = {
    "paddle_se_minus1": paddle_se(literal=False),
    "paddle_se_literal": paddle_se(literal=True),
    "view_own_channels": view_own_channels,
    "shared_target": shared_target,
    "dfl_blocks": dfl_blocks,
    "shuffle_grouped_producer": shuffle_unit(6),
    "shuffle_dense_producer": shuffle_unit(6, grouped_producer=False),
    "shuffle_uniform_pair": shuffle_unit(5),  # pair {2, 7} has one channel in each block of the reader
    "shuffle_straddling_pairs": shuffle_unit(6, reader_groups=4),  # pairs {1, 7}, {4, 10} span 2 of 4 blocks
}
