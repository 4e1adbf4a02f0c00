"""ShuffleNet v1 units: grouped 1x1 conv -> channel shuffle -> depthwise 3x3 -> grouped 1x1, joined
to the stage stream by a Concat (with an AveragePool of the input) or a residual Add.

The stage stream holds channels of several producers (the stem, the Concat's conv, the residual
convs) in the blocks of the grouped convs that read and write it: no producer can keep the
"same count per block" rule alone, so they share one budget (a joined group). Every case is
checked with the equivalence oracle (pruned == zeroed original in onnxruntime).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxcompress.core import serde
from onnxcompress.pruning.dependency import analyze
from tests.helpers.builders import make_model, node
from tests.helpers.pruning import X, assert_equivalent, ints
from tests.helpers.tensors import rand

G = 2  # conv groups = shuffle groups


def _unit(prefix: str, inp: str, c_in: int, mid: int, c_out: int, rng) -> tuple[list, dict, str]:
    """``inp`` -> grouped 1x1 (c_in -> mid) -> Relu -> shuffle -> depthwise 3x3 -> grouped 1x1 (mid -> c_out).

    The first conv has no bias: a removed channel is then 0 before the padded depthwise conv, whose
    output is its bias everywhere, so the bias compensation (and the oracle) is exact.
    """
    p = prefix
    nodes = [node("Conv", [inp, f"{p}_w1"], f"{p}_g1", group=G), node("Relu", [f"{p}_g1"], f"{p}_r1"),
             node("Reshape", [f"{p}_r1", f"{p}_s1"], f"{p}_m"),
             node("Transpose", [f"{p}_m"], f"{p}_t", perm=[0, 2, 1, 3, 4]),
             node("Reshape", [f"{p}_t", f"{p}_s2"], f"{p}_sh"),
             node("Conv", [f"{p}_sh", f"{p}_wd", f"{p}_bd"], f"{p}_dw", group=mid, pads=[1, 1, 1, 1]),
             node("Conv", [f"{p}_dw", f"{p}_w2", f"{p}_b2"], f"{p}_g2", group=G)]
    inits = {f"{p}_w1": rand(rng, mid, c_in // G, 1, 1, scale=0.4),
             f"{p}_s1": ints(0, G, mid // G, 8, 8), f"{p}_s2": ints(0, mid, 8, 8),
             f"{p}_wd": rand(rng, mid, 1, 3, 3, scale=0.4), f"{p}_bd": rand(rng, mid, scale=0.4),
             f"{p}_w2": rand(rng, c_out, mid // G, 1, 1, scale=0.4), f"{p}_b2": rand(rng, c_out, scale=0.4)}
    return nodes, inits, f"{p}_g2"


def shufflenet_stage(seed: int = 0, stream_output: bool = False, softmax_stream: bool = False) -> onnx.ModelProto:
    """stem (8) -> unit 1 (Concat with AveragePool(stem): 16) -> unit 2 (residual Add) -> 1x1 conv.

    ``stream_output``: the stage stream is also a graph output; ``softmax_stream``: a Softmax over
    the channels of the stream is an output (both freeze the joined group).
    """
    rng = np.random.default_rng(seed)
    nodes = [node("Conv", ["x", "ws", "bs"], "s", pads=[1, 1, 1, 1]), node("Relu", ["s"], "sr")]
    inits = {"ws": rand(rng, 8, 3, 3, 3, scale=0.4), "bs": rand(rng, 8, scale=0.4),
             "wy": rand(rng, 4, 16, 1, 1, scale=0.4), "by": rand(rng, 4, scale=0.4)}
    n1, i1, o1 = _unit("u1", "sr", 8, 8, 8, rng)
    n2, i2, o2 = _unit("u2", "t1", 16, 8, 16, rng)
    nodes += n1 + [node("AveragePool", ["sr"], "ap", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                   node("Concat", [o1, "ap"], "c1", axis=1), node("Relu", ["c1"], "t1")]
    nodes += n2 + [node("Add", [o2, "t1"], "a2"), node("Relu", ["a2"], "t2"), node("Conv", ["t2", "wy", "by"], "y")]
    outputs = ["y"]
    if stream_output:
        outputs.append("t2")
    if softmax_stream:
        nodes.append(node("Softmax", ["t2"], "sm", axis=1))
        outputs.append("sm")
    return make_model(nodes, X, outputs, {**inits, **i1, **i2})


def _groups(model):
    return {g.name: g for g in analyze(serde.to_graph(model)).groups}


STREAM = "s+u1_g2+u2_g2"


def test_stage_stream_is_one_joined_group_and_everything_prunes():
    groups = _groups(shufflenet_stage())
    assert sorted(groups) == sorted([STREAM, "u1_g1", "u2_g1", "y"])
    stream = groups[STREAM]
    assert stream.frozen is None and stream.removable.all() and stream.size == 16
    assert stream.blocks is not None
    assert all(groups[n].frozen is None for n in ("u1_g1", "u2_g1"))  # the shuffled branches


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_shufflenet_stage_equals_the_masked_original(seed):
    model = shufflenet_stage(seed)
    pruned, analysis, remove, _ = assert_equivalent(model, seed=seed)
    stream = analysis.group(STREAM)
    assert len(remove[stream.index]) > 0
    # every grouped conv keeps its group and equal blocks (the full checker ran; here: the weights)
    weights = {i.name: i for i in pruned.graph.initializer}
    for n in pruned.graph.node:
        if n.op_type == "Conv" and n.name.endswith(("_g1", "_g2")):
            group = next(a.i for a in n.attribute if a.name == "group")
            assert group == G and weights[n.input[1]].dims[0] % G == 0


def test_stream_lose_the_same_count_in_every_block_of_each_grouped_conv():
    model = shufflenet_stage()
    _, analysis, remove, _ = assert_equivalent(model)
    group = analysis.group(STREAM)
    for tensor in ("t1", "u2_g2"):  # read by u2_g1 (group 2), written by u2_g2 (group 2)
        local = group.tensors[tensor]
        gone = np.flatnonzero(np.isin(local, remove[group.index]))
        counts = np.bincount(gone // (len(local) // G), minlength=G)
        assert len(set(counts.tolist())) == 1 and counts[0] > 0, (tensor, counts)


def test_stream_as_graph_output_freezes_only_the_stream():
    groups = _groups(shufflenet_stage(stream_output=True))
    assert groups[STREAM].frozen == "graph_output"
    assert groups["u1_g1"].frozen is None and groups["u2_g1"].frozen is None
    assert_equivalent(shufflenet_stage(stream_output=True))


def test_softmax_over_the_stream_freezes_it_with_the_reason():
    groups = _groups(shufflenet_stage(softmax_stream=True))
    assert groups[STREAM].frozen in ("reduces_over_channels", "graph_output")
    assert "reduces_over_channels" in groups[STREAM].reasons or "graph_output" in groups[STREAM].reasons
    assert groups["u2_g1"].frozen is None


def test_a_group_that_prunes_alone_is_not_joined():
    """Joining is only for groups that would all be frozen alone: grouped_across_concat keeps
    today's rule (the larger producer prunes, the smaller is pinned)."""
    from tests.helpers.pruning import build

    groups = _groups(build("grouped_across_concat"))
    assert "a" in groups and "b" in groups and groups["b"].frozen == "grouped_conv"
