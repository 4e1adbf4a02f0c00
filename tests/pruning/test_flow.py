"""The op table read node by node (``channel_flow``): where one input's channels go, or why not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from onnxcompress.core import serde
from onnxcompress.pruning.dependency import analyze, graph_info
from onnxcompress.pruning.flow import channel_flow
from onnxcompress.pruning.types import R_LAST_AXIS, R_NO_HANDLER, R_UNSUPPORTED
from tests.helpers.builders import make_model, node
from tests.helpers.pruning import ints
from tests.helpers.tensors import rand


def graph_of(nodes, inputs, outputs, inits):
    graph = serde.to_graph(make_model(nodes, inputs, outputs, inits))
    return graph, graph_info(graph)


def flow_at(graph, info, node_name: str, tensor: str):
    n = next(n for n in graph.nodes if n.name == node_name)
    return channel_flow(n, graph.tensors()[tensor], info)


def test_concat_offsets_and_split_ranges():
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "Wa"], "a"), node("Conv", ["x", "Wb"], "b"),
             node("Concat", ["a", "b"], "cat", axis=1),
             node("Split", ["cat", "sizes"], ["s1", "s2"], axis=1)]
    inits = {"Wa": rand(rng, 2, 3, 1, 1, scale=0.4), "Wb": rand(rng, 3, 3, 1, 1, scale=0.4), "sizes": ints(4, 1)}
    graph, info = graph_of(nodes, {"x": ["N", 3, 4, 4]}, ["s1", "s2"], inits)
    cat = flow_at(graph, info, "cat", "b")
    assert cat.frozen is None and [t.name for t, _ in cat.outputs] == ["cat"]
    np.testing.assert_array_equal(cat.outputs[0][1], [-1, -1, 0, 1, 2])
    split = flow_at(graph, info, "s1", "cat")
    assert [(t.name, s.tolist()) for t, s in split.outputs] == [("s1", [0, 1, 2, 3]), ("s2", [4])]


def test_flatten_blocks():
    rng = np.random.default_rng(1)
    nodes = [node("Conv", ["x", "W"], "c"), node("Flatten", ["c"], "f"), node("Gemm", ["f", "G"], "y")]
    graph, info = graph_of(nodes, {"x": [2, 3, 2, 2]}, ["y"], {"W": rand(rng, 3, 3, 1, 1, scale=0.4), "G": rand(rng, 12, 2, scale=0.4)})
    (out, source), = flow_at(graph, info, "f", "c").outputs
    assert out.name == "f"
    np.testing.assert_array_equal(source, np.repeat(np.arange(3), 4))


def test_frozen_with_the_table_reason():
    rng = np.random.default_rng(2)
    nodes = [node("Conv", ["x", "W"], "c"), node("Sum", ["c"], "s"),
             node("Pad", ["c", "pads"], "p", mode="constant")]
    inits = {"W": rand(rng, 3, 3, 1, 1, scale=0.4), "pads": ints(0, 1, 0, 0, 0, 0, 0, 0)}
    graph, info = graph_of(nodes, {"x": [1, 3, 2, 2]}, ["s", "p"], inits)
    no_handler = flow_at(graph, info, "s", "c")
    assert no_handler.frozen == R_NO_HANDLER and not no_handler.outputs
    assert flow_at(graph, info, "p", "c").frozen == R_UNSUPPORTED  # a channel pad


def test_last_axis_follows_elementwise_ops_only():
    """A MatMul's channels are on its last axis: Relu and a broadcast constant follow them, a Concat freezes."""
    rng = np.random.default_rng(3)
    nodes = [node("MatMul", ["x", "W"], "m"), node("Add", ["m", "k"], "a"), node("Relu", ["a"], "r"),
             node("Concat", ["r", "r"], "cat", axis=-1)]
    graph, info = graph_of(nodes, {"x": [2, 7, 5]}, ["cat"], {"W": rand(rng, 5, 4, scale=0.4), "k": rand(rng, 4, scale=0.4)})
    last = replace(info, last_axis=True)
    (_, source), = flow_at(graph, last, "a", "m").outputs
    np.testing.assert_array_equal(source, np.arange(4))
    (_, source), = flow_at(graph, info, "r", "a").outputs  # axis 1 (the default): the 7 rows
    np.testing.assert_array_equal(source, np.arange(7))
    assert flow_at(graph, last, "cat", "r").frozen == R_LAST_AXIS
    assert info.shapes is last.shapes  # one set of facts


def test_analysis_unchanged_by_the_flow_view():
    """Reading the table node by node does not change the graph facts pruning builds its groups from."""
    rng = np.random.default_rng(4)
    nodes = [node("Conv", ["x", "W1"], "a"), node("Relu", ["a"], "r"), node("Conv", ["r", "W2"], "y")]
    inits = {"W1": rand(rng, 4, 3, 1, 1, scale=0.4), "W2": rand(rng, 2, 4, 1, 1, scale=0.4)}
    graph, info = graph_of(nodes, {"x": [1, 3, 4, 4]}, ["y"], inits)
    before = [(g.name, g.size, g.frozen) for g in analyze(graph).groups]
    flow_at(graph, replace(info, last_axis=True), "r", "a")
    assert [(g.name, g.size, g.frozen) for g in analyze(graph).groups] == before == [("a", 4, None), ("y", 2, "graph_output")]
