"""Reshape and friends: channels through computed / 0 / -1 targets, blocks, channel shuffles."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcompress.core import serde
from onnxcompress.pruning.apply import apply_pruning, mask_inputs
from onnxcompress.pruning.dependency import analyze, graph_info
from onnxcompress.pruning.flow import channel_flow
from onnxcompress.pruning.handlers_reshape import reshape_kind
from tests.helpers.builders import make_model, node
from tests.helpers.pruning import X, assert_equivalent, choose, ints
from tests.helpers.pruning_reshape import RESHAPE_CASES, SHAPE_CONSTS, batch_of, shuffle_unit
from tests.helpers.runs import max_err
from tests.helpers.tensors import rand, random_feeds


def groups_of(model: onnx.ModelProto, **kw):
    return {g.name: g for g in analyze(serde.to_graph(model), **kw).groups}


def consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


# ---------------------------------------------------------------- the oracle on every pattern


@pytest.mark.parametrize("name", sorted(RESHAPE_CASES))
def test_pruned_equals_zeroed_original(name):
    case = RESHAPE_CASES[name](np.random.default_rng(0))
    pruned, analysis, remove, report = assert_equivalent(case.model)
    assert len([gi for gi, ch in remove.items() if len(ch)]) >= case.pruned_groups
    assert report.removed == sum(len(ch) for ch in remove.values()) > 0


@pytest.mark.parametrize("name", sorted(RESHAPE_CASES))
@pytest.mark.parametrize("seed", [1, 2])
def test_uncompensated_pruning_equals_unread_channels(name, seed):
    model = RESHAPE_CASES[name](np.random.default_rng(seed)).model
    graph = serde.to_graph(model)
    analysis = analyze(graph)
    remove = choose(analysis, seed)
    apply_pruning(analysis, remove, compensate=False)
    graph.cleanup().toposort()
    pruned = serde.to_model(graph, model)
    onnx.checker.check_model(pruned, full_check=True)
    reference = serde.to_graph(model)
    mask_inputs(analyze(reference), remove)
    reference = serde.to_model(reference.cleanup().toposort(), model)
    err, scale = max_err(reference, pruned, random_feeds(model, seed=seed))
    assert err <= 1e-5 * max(1.0, scale)


# ---------------------------------------------------------------- kinds and rewrites


@pytest.mark.parametrize(("xs", "ys", "kind"), [
    ([2, 8, 4, 4], [2, 8, 16], ("same", 1)),
    ([2, 8, 4, 4], [2, 32, 4], ("merge", 4)),
    ([2, 8, 4, 4], [2, 128], ("merge", 16)),
    ([2, 64, 10], [2, 4, 16, 10], ("split", 16)),
    ([2, 8, 4, 4], [16, 4, 4], ("mix", 0)),  # channels into the batch dim
    ([2, 8, 4, 4], [2, 1, 128], ("mix", 0)),  # one block of everything
    ([2, 6, 4, 4], [2, 4, 24], ("mix", 0)),  # neither divides
])
def test_reshape_kind(xs, ys, kind):
    assert reshape_kind([(d, ()) for d in xs], [(d, ()) for d in ys]) == kind


def test_reshape_kind_with_symbolic_dims():
    n, a = (1, ("N",)), (1, ("A",))
    assert reshape_kind([n, (64, ()), a], [n, (4, ()), (16, ()), a]) == ("split", 16)
    assert reshape_kind([n, (64, ()), a], [n, (4, ()), (16, ()), (1, ("B",))]) == ("unknown", 0)


def test_literal_in_computed_target_is_rewritten_in_a_copy():
    model = RESHAPE_CASES["paddle_se_literal"](np.random.default_rng(0)).model
    pruned, analysis, remove, _ = assert_equivalent(model)
    kept = 8 - len(remove[analysis.group("a+e").index])
    targets = [n for n in pruned.graph.node if n.op_type == "Concat" and "t2" in n.output[0]]
    assert len(targets) == 1 and targets[0].output[0] != "t2" and targets[0].input[1] != "c8"  # copies
    assert consts(pruned)[targets[0].input[1]].tolist() == [kept]


def test_shared_computed_target_is_copied_once():
    model = RESHAPE_CASES["shared_target"](np.random.default_rng(0)).model
    pruned, analysis, remove, _ = assert_equivalent(model)
    assert [g.name for g in analysis.groups] == ["a+b", "y"]
    reshapes = [n for n in pruned.graph.node if n.op_type == "Reshape"]
    assert len({n.input[1] for n in reshapes}) == 1 and reshapes[0].input[1] != "t"
    assert len([n for n in pruned.graph.node if n.op_type == "Concat" and n.output[0].startswith("t")]) == 1


def test_blocks_are_pruned_whole_and_both_targets_rewritten():
    model = RESHAPE_CASES["dfl_blocks"](np.random.default_rng(0)).model
    pruned, analysis, remove, _ = assert_equivalent(model)
    group = analysis.group("a")
    assert group.size == 3 and len(remove[group.index]) == 1  # 3 blocks of 4 channels
    assert consts(pruned)["w1_pruned"].shape[0] == 8
    assert consts(pruned)["back_pruned"].tolist() == [0, 8, 8, 8]


def test_channel_count_read_into_another_entry_freezes():
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), *batch_of("a", "n"), node("Shape", ["a"], "s"),
             node("Slice", ["s", "i1", "i2", "i0"], "c"), node("Concat", ["n", "c8", "c", "minus1"], "t", axis=0),
             node("Reshape", ["a", "t"], "v"), node("ReduceMean", ["v"], "y", axes=[2, 3], keepdims=0)]
    inits = {"w1": rand(np.random.default_rng(0), 8, 3, 1, 1, scale=0.4), "b1": np.zeros(8, np.float32),
             "c8": ints(8), "i2": ints(2), **SHAPE_CONSTS}
    model = make_model(nodes, X, ["y"], inits)
    assert groups_of(model)["a"].frozen in ("reshape_target_untraced", "shape_read")


def test_yolov8_dfl_freezes_at_the_transpose():
    """[b, 4*16, n] -> [b, 4, 16, n] -> Transpose(0, 2, 1, 3) -> Softmax over the 16 bins: blocks flow
    through the Reshape; the Transpose moves them off axis 1."""
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Reshape", ["a", "s"], "d"),
             node("Transpose", ["d"], "t", perm=[0, 2, 1, 3]), node("Softmax", ["t"], "p", axis=1),
             node("Conv", ["p", "w2"], "y")]
    inits = {"w1": rand(np.random.default_rng(0), 64, 3, 1, 1, scale=0.4), "b1": np.zeros(64, np.float32),
             "s": ints(0, 4, 16, 64), "w2": np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1)}
    group = groups_of(make_model(nodes, X, ["y"], inits))["a"]
    assert group.frozen == "channel_axis_moved" and group.size == 4


# ---------------------------------------------------------------- channel shuffle


def test_shuffle_couples_one_channel_of_each_group():
    model = RESHAPE_CASES["shuffle_grouped_producer"](np.random.default_rng(0)).model
    pruned, analysis, remove, _ = assert_equivalent(model)
    group = analysis.group("a")
    assert group.size == 6 and group.frozen is None  # 12 channels, coupled in pairs {j, 6 + j}
    slots = group.tensors["ar"]
    assert (slots[:6] == slots[6:]).all()
    assert group.tensors["sh"].tolist() == np.repeat(slots[:6], 2).tolist()
    assert group.blocks.tolist() == [0, 0, 0, 1, 1, 1]  # the group-2 conv after the shuffle
    kept = 2 * (6 - len(remove[group.index]))
    values = consts(pruned)
    targets = [values[n.input[1]].tolist() for n in pruned.graph.node if n.op_type == "Reshape"]
    assert targets == [[0, 2, kept // 2, 8, 8], [0, kept, 8, 8]]


def test_shuffle_pairs_and_the_blocks_of_a_grouped_reader():
    """Shuffled output channel 2j + i is pair j: with a group-2 reader of blocks of 5, pair 2 has one
    channel in each block (free: it keeps the blocks equal); with a group-4 reader of blocks of 3,
    pairs 1 and 4 lie in two of the four blocks: pinned."""
    group = groups_of(shuffle_unit(5)(np.random.default_rng(0)).model)["a"]
    assert group.frozen is None and group.size == 5 and group.removable.all()
    assert group.blocks.tolist() == [0, 0, -1, 1, 1]
    group = groups_of(shuffle_unit(6, reader_groups=4)(np.random.default_rng(0)).model)["a"]
    assert group.frozen is None and group.reasons == {"grouped_conv": 2}
    assert group.removable.tolist() == [True, False, True, True, False, True]
    assert group.blocks.tolist() == [0, -1, 1, 2, -1, 3]


def test_equalize_does_not_walk_through_a_shuffle_or_blocks():
    graph = serde.to_graph(RESHAPE_CASES["shuffle_dense_producer"](np.random.default_rng(0)).model)
    info = graph_info(graph)
    first = next(n for n in graph.nodes if n.name == "r1")
    assert channel_flow(first, first.inputs[0], info).frozen == "reshape_mixes_channels"
    graph = serde.to_graph(RESHAPE_CASES["dfl_blocks"](np.random.default_rng(0)).model)
    info = graph_info(graph)
    split = next(n for n in graph.nodes if n.name == "d")
    assert channel_flow(split, split.inputs[0], info).frozen == "reshape_mixes_channels"


def test_shuffle_with_a_computed_group_size_freezes():
    """PyTorch's ``x.view(b, 2, c // 2, h, w)``: the ``c // 2`` is not traced (a Div), so the shuffle
    cannot be rewritten: frozen, with the reason."""
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Shape", ["a"], "s"), node("Slice", ["s", "i0", "i1", "i0"], "n"),
             node("Slice", ["s", "i1", "i2", "i0"], "c"), node("Div", ["c", "two"], "per"),
             node("Slice", ["s", "i2", "i4", "i0"], "hw"), node("Concat", ["n", "two", "per", "hw"], "t1", axis=0),
             node("Reshape", ["a", "t1"], "r1"), node("Transpose", ["r1"], "tr", perm=[0, 2, 1, 3, 4]),
             node("Reshape", ["tr", "t2"], "sh"), node("Conv", ["sh", "w2", "b2"], "y")]
    inits = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4), "two": ints(2), "i2": ints(2),
             "i4": ints(4), "t2": ints(0, 8, 8, 8), "w2": rand(rng, 4, 8, 1, 1, scale=0.4), "b2": rand(rng, 4, scale=0.4),
             **SHAPE_CONSTS}
    group = groups_of(make_model(nodes, X, ["y"], inits))["a"]
    assert group.frozen in ("reshape_target_untraced", "shape_read")
    assert any("r1 (Reshape): reshape_target_untraced" in b for b in group.blockers), (group.frozen, group.blockers)
