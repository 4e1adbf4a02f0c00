"""Dependency analysis: which channels are coupled, which groups exist, which freeze and why."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.core import serde
from onnxcompress.pruning.dependency import Analysis, analyze
from onnxcompress.pruning.handlers import HANDLERS
from onnxcompress.pruning.types import FREEZE_REASONS
from tests.helpers.builders import make_model, node
from tests.helpers.pruning import X, assert_equivalent, build
from tests.helpers.tensors import rand


def groups_of(model, **kw) -> Analysis:
    return analyze(serde.to_graph(model), **kw)


def by_name(analysis: Analysis) -> dict:
    return {g.name: g for g in analysis.groups}


# ---------------------------------------------------------------- structure


def test_residual_couples_every_producer():
    a = groups_of(build("residual_projection"))
    groups = by_name(a)
    assert set(groups) == {"a", "b", "c+p", "y"}
    stream = groups["c+p"]
    assert stream.sources == ["c", "p"] and stream.size == 16 and stream.frozen is None
    assert set(stream.tensors) == {"c", "p", "s", "sr"}
    assert stream.consumers == ["y"]
    assert groups["a"].consumers == ["b", "p"]  # both branches read the first conv's channels


def test_concat_offsets_give_one_group_per_producer():
    a = groups_of(build("concat_cascade"))
    groups = by_name(a)
    assert [groups[n].size for n in ("a", "b", "c")] == [6, 4, 5]
    assert groups["a"].tensors["c2"].tolist() == list(range(6)) + [-1] * 9
    assert groups["b"].tensors["c2"].tolist() == [-1] * 6 + list(range(4)) + [-1] * 5
    assert groups["c"].tensors["c2"].tolist() == [-1] * 10 + list(range(5))


def test_concat_with_graph_input_and_constant_pins_their_channels():
    a = groups_of(build("concat_input"))
    assert [g.name for g in a.groups] == ["a", "y"]
    assert by_name(a)["a"].tensors["c"].tolist() == list(range(6)) + [-1] * 5
    outside = a.comp_group[a.components("c")[6:]]
    assert (outside == -1).all()  # input and constant channels belong to no group


def test_depthwise_multiplier_maps_each_input_to_m_outputs():
    a = groups_of(build("depthwise_m2"))
    group = by_name(a)["a"]
    assert group.size == 8
    assert group.tensors["d"].tolist() == np.repeat(np.arange(8), 2).tolist()


def test_flatten_maps_a_channel_to_its_spatial_range():
    a = groups_of(build("flatten_gemm"))
    group = by_name(a)["a"]
    assert group.tensors["f"].tolist() == np.repeat(np.arange(8), 9).tolist()
    assert group.consumers == ["h"]


def test_computed_flatten_target_is_followed():
    group = by_name(groups_of(build("dynamic_flatten")))["a"]
    assert group.frozen is None and group.tensors["f"].tolist() == np.repeat(np.arange(8), 25).tolist()


def test_squeeze_excite_gate_joins_the_gated_tensor():
    groups = by_name(groups_of(build("se_block")))
    assert groups["a+ex"].sources == ["a", "ex"]
    assert {"gap", "ex", "gate", "m"} <= set(groups["a+ex"].tensors)
    assert groups["a+ex"].consumers == ["sq", "y"]


def test_split_and_slice_shift_offsets():
    a = groups_of(build("split_opset17"))
    group = by_name(a)["c"]
    assert group.tensors["s0"].tolist() == [0, 1, 2] and group.tensors["s1"].tolist() == [3, 4, 5, 6, 7]
    a = groups_of(build("slice"))
    assert by_name(a)["c"].tensors["s"].tolist() == [2, 3, 4, 5, 6]


def test_params_list_every_constant_slice():
    group = by_name(groups_of(build("conv_bn_relu")))["a"]
    roles = sorted((p.node.name, p.index, p.axis, p.role) for p in group.params)
    assert ("an", 1, 0, "gamma") in roles and ("a", 1, 0, "w_out") in roles and ("b", 1, 1, "w_in") in roles
    assert len([r for r in roles if r[0] == "an"]) == 4


def test_symbolic_batch_and_spatial_dims_still_work():
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"), node("Conv", ["ar", "w2"], "y")]
    model = make_model(nodes, {"x": ["N", 3, "H", "W"]}, ["y"],
                       {"w1": rand(rng, 8, 3, 3, 3, scale=0.4), "b1": rand(rng, 8, scale=0.4), "w2": rand(rng, 4, 8, 1, 1, scale=0.4)})
    assert by_name(groups_of(model))["a"].frozen is None
    assert_equivalent(model, dim=7)


def test_every_handled_op_has_a_reason_table_entry():
    assert {"Conv", "Gemm", "MatMul", "Concat", "Split", "Slice", "Flatten", "Reshape", "BatchNormalization"} <= set(HANDLERS)
    assert "InstanceNormalization" not in HANDLERS and "LpNormalization" not in HANDLERS


# ---------------------------------------------------------------- freezes


def _tail(op_nodes, inits=None, x=None, **kw):
    """conv a (8 ch) -> <op_nodes reading "ar", writing "t"> -> conv y."""
    rng = np.random.default_rng(1)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"), *op_nodes,
             node("Conv", ["t", "w2"], "y")]
    base = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4),
            "w2": rand(rng, 4, 8, 1, 1, scale=0.4)}
    return make_model(nodes, x or X, ["y"], {**base, **(inits or {})}, **kw)


FROZEN = {
    "softmax_over_channels": ([node("Softmax", ["ar"], "t", axis=1)], {}, "reduces_over_channels"),
    "reduce_over_channels": ([node("ReduceMax", ["ar"], "m", axes=[1], keepdims=1), node("Mul", ["ar", "m"], "t")],
                             {}, "reduces_over_channels"),
    "lpnorm_no_handler": ([node("LpNormalization", ["ar"], "t", axis=1)], {}, "no_handler"),
    "instancenorm_no_handler": ([node("InstanceNormalization", ["ar", "s", "bb"], "t")],
                                {"s": np.ones(8, np.float32), "bb": np.zeros(8, np.float32)}, "no_handler"),
    "transpose_moves_channels": ([node("Transpose", ["ar"], "tt", perm=[0, 2, 1, 3]),
                                  node("Transpose", ["tt"], "t", perm=[0, 2, 1, 3])], {}, "channel_axis_moved"),
    # channels into the batch dim ([N, 8, 8, 8] -> [N*8, 8, 8]) and back
    "reshape_mixes_channels": ([node("Reshape", ["ar", "sh1"], "rr"), node("Reshape", ["rr", "sh2"], "t")],
                               {"sh1": np.asarray([-1, 8, 8]), "sh2": np.asarray([-1, 8, 8, 8])}, "reshape_mixes_channels"),
    # the channel count read into another entry: [N, 8, C, 8] is right only while C = 8
    "computed_reshape_reads_channels": (
        [node("Shape", ["ar"], "shp"), node("Gather", ["shp", "i"], "c", axis=0), node("Unsqueeze", ["c", "ax"], "c1"),
         node("Concat", ["zero", "eight", "c1", "eight"], "target", axis=0), node("Reshape", ["ar", "target"], "t")],
        {"i": np.asarray(1, np.int64), "ax": np.asarray([0]), "zero": np.asarray([0]), "eight": np.asarray([8])},
        "reshape_target_untraced"),
    "channel_padding": ([node("Pad", ["ar", "pads"], "pp"), node("Slice", ["pp", "st", "en", "ax"], "t")],
                        {"pads": np.asarray([0, 1, 0, 0, 0, 0, 0, 0]), "st": np.asarray([1]), "en": np.asarray([9]),
                         "ax": np.asarray([1])}, "unsupported_attributes"),
}


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_group_frozen_with_reason(name):
    nodes, inits, reason = FROZEN[name]
    model = _tail(nodes, inits)
    group = by_name(groups_of(model))["a"]
    assert group.frozen == reason
    assert reason in FREEZE_REASONS
    assert any(reason in b for b in group.blockers)
    _, _, remove, _ = assert_equivalent(model)
    assert group.index not in remove


def test_graph_output_freezes_unless_protect_io_is_off():
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"), node("Conv", ["ar", "w2"], "y")]
    model = make_model(nodes, X, ["y", "ar"], {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4), "w2": rand(rng, 4, 8, 1, 1, scale=0.4)})
    assert by_name(groups_of(model))["a"].frozen == "graph_output"
    assert by_name(groups_of(model, protect_io=False))["a"].frozen is None


def test_graph_input_channels_are_pinned():
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Add", ["a", "x"], "s"), node("Conv", ["s", "w2"], "y")]
    model = make_model(nodes, X, ["y"], {"w1": rand(rng, 3, 3, 1, 1, scale=0.4), "b1": rand(rng, 3, scale=0.4), "w2": rand(rng, 4, 3, 1, 1, scale=0.4)})
    assert by_name(groups_of(model))["a"].frozen == "graph_input"


def test_shared_initializer_across_groups_freezes_both():
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "ws"], "b"), node("Relu", ["b"], "br"), node("Conv", ["br", "ws"], "c"),
             node("Relu", ["c"], "cr"), node("Conv", ["cr", "w3"], "y")]
    model = make_model(nodes, X, ["y"], {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4), "ws": rand(rng, 8, 8, 1, 1, scale=0.4),
                                         "w3": rand(rng, 4, 8, 1, 1, scale=0.4)})
    groups = by_name(groups_of(model))
    assert groups["b"].frozen == groups["c"].frozen == groups["a"].frozen == "shared_weight"


def test_shared_initializer_within_one_group_is_fine():
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "ws", "bs"], "a"), node("Conv", ["x2", "ws", "bs"], "b"), node("Add", ["a", "b"], "s"),
             node("Conv", ["s", "w2"], "y")]
    model = make_model(nodes, {**X, "x2": ["N", 3, 8, 8]}, ["y"],
                       {"ws": rand(rng, 8, 3, 1, 1, scale=0.4), "bs": rand(rng, 8, scale=0.4), "w2": rand(rng, 4, 8, 1, 1, scale=0.4)})
    assert by_name(groups_of(model))["a+b"].frozen is None
    pruned, *_ = assert_equivalent(model)
    convs = [n for n in pruned.graph.node if n.op_type == "Conv"][:2]
    assert convs[0].input[1] == convs[1].input[1] != "ws"  # one new constant, still shared


def test_non_constant_weight_freezes():
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"), node("Conv", ["ar", "wv"], "y")]
    model = make_model(nodes, {**X, "wv": [4, 8, 1, 1]}, ["y"], {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4)})
    assert by_name(groups_of(model))["a"].frozen == "non_constant_weight"


def test_unknown_channel_dim_freezes():
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Concat", ["a", "z"], "c", axis=1), node("Relu", ["c"], "t"),
             node("ReduceMean", ["t"], "y", axes=[2, 3], keepdims=0)]
    model = make_model(nodes, {**X, "z": ["N", "C", 8, 8]}, ["y"], {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4)})
    assert by_name(groups_of(model))["a"].frozen == "unknown_channel_dim"


def test_grouped_conv_blocks_its_input_and_output_groups():
    groups = by_name(groups_of(build("grouped_g4")))
    assert groups["a"].frozen is None and groups["g"].frozen is None and groups["h"].blocks is None
    assert groups["a"].blocks.tolist() == np.repeat(np.arange(4), 4).tolist()  # 16 inputs, group=4
    assert groups["g"].blocks.tolist() == np.repeat(np.arange(4), 2).tolist()  # 8 outputs


def test_grouped_conv_spanning_two_producers_keeps_the_larger():
    """Blocks [a0..a3 | a4 a5 b0 b1]: a (6 channels) keeps the rule, b's channels are pinned."""
    groups = by_name(groups_of(build("grouped_across_concat")))
    assert groups["a"].frozen is None and groups["a"].blocks.tolist() == [0, 0, 0, 0, 1, 1]
    assert groups["b"].frozen == "grouped_conv"
    assert groups["g"].frozen is None


def test_exclude_by_node_and_tensor_name():
    model = build("conv_chain")
    groups = by_name(groups_of(model, exclude=["b"]))
    assert groups["a"].frozen == groups["b"].frozen == "excluded"  # node b: its input and output channels
    groups = by_name(groups_of(model, exclude=["br", "nope"]))
    assert groups["a"].frozen is None and groups["b"].frozen == "excluded"
    assert groups_of(model, exclude=["nope"]).unknown_excludes == ["nope"]


def test_matmul_with_3d_input_prunes_the_last_axis():
    """``[N, 4, 16] @ W`` acts on the last axis: its output columns are a group (the graph output's are not)."""
    rng = np.random.default_rng(0)
    nodes = [node("MatMul", ["x", "w1"], "h"), node("Relu", ["h"], "hr"), node("MatMul", ["hr", "w2"], "y")]
    model = make_model(nodes, {"x": ["N", 4, 16]}, ["y"], {"w1": rand(rng, 16, 12, scale=0.4), "w2": rand(rng, 12, 5, scale=0.4)})
    groups = by_name(groups_of(model))
    assert groups["h"].frozen is None and groups["h"].size == 12
    assert groups["y"].frozen == "graph_output"


def test_shape_read_of_batch_dim_is_harmless_but_channel_read_freezes():
    rng = np.random.default_rng(0)
    for index, frozen in ((0, None), (1, "shape_read")):
        nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
                 node("Shape", ["ar"], "shp"), node("Gather", ["shp", "i"], "n"),
                 node("Conv", ["ar", "w2"], "y0"), node("Cast", ["n"], "nf", to=1), node("Add", ["y0", "nf"], "y")]
        model = make_model(nodes, X, ["y"], {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4), "w2": rand(rng, 4, 8, 1, 1, scale=0.4),
                                             "i": np.asarray(index, np.int64)})
        assert by_name(groups_of(model))["a"].frozen == frozen


def test_control_flow_freezes_what_it_reads_and_writes():
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    branches = {
        key: helper.make_graph([helper.make_node(op, ["ar"], [out])], key, [],
                               [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
        for key, op, out in (("then_branch", "Identity", "o1"), ("else_branch", "Neg", "o2"))
    }
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"), node("Conv", ["ar", "w2"], "y0"),
             helper.make_node("If", ["cond"], ["t"], name="if", **branches), node("Add", ["y0", "t"], "y")]
    model = make_model(nodes, {**X, "cond": []}, ["y"], {"w1": rand(rng, 4, 3, 1, 1, scale=0.4), "b1": rand(rng, 4, scale=0.4),
                                                         "w2": rand(rng, 4, 4, 1, 1, scale=0.4)}, types={"cond": TensorProto.BOOL})
    groups = by_name(groups_of(model))
    assert groups["a"].frozen == "control_flow"  # read inside the branches
    assert "if (If): control_flow" in groups["y0"].blockers


def _resize_to(sizes_nodes, inits):
    """conv a (8) -> relu "skip"; maxpool -> conv b (6) -> relu "deep"; Resize(deep, sizes) -> conv y."""
    rng = np.random.default_rng(2)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "skip"),
             node("MaxPool", ["skip"], "p", kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p", "w2", "b2"], "b"), node("Relu", ["b"], "deep"), *sizes_nodes,
             node("Resize", ["deep", "", "", "sizes"], "up", mode="nearest"), node("Conv", ["up", "w3"], "y0"),
             node("Conv", ["skip", "w4"], "y1"), node("Add", ["y0", "y1"], "y")]
    base = {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4),
            "w2": rand(rng, 6, 8, 1, 1, scale=0.4), "b2": rand(rng, 6, scale=0.4),
            "w3": rand(rng, 4, 6, 1, 1, scale=0.4), "w4": rand(rng, 4, 8, 1, 1, scale=0.4), "zero": np.asarray([0]),
            "one": np.asarray([1]),
            "two": np.asarray([2]), "four": np.asarray([4])}
    return make_model(nodes, X, ["y"], {**base, **inits}, opset=13)


def test_resize_to_a_computed_size_keeps_its_own_channels():
    groups = by_name(groups_of(build("unet_resize_to_skip")))
    assert groups["a"].frozen is None and groups["b"].frozen is None
    assert groups["b"].tensors["up"].tolist() == list(range(6)) and "cat" in groups["b"].tensors
    # the same through Gather + Unsqueeze instead of Slice
    nodes = [node("Shape", ["deep"], "shd"), node("Gather", ["shd", "idx"], "nc"),
             node("Shape", ["skip"], "shs"), node("Slice", ["shs", "two", "four", "zero"], "hw"),
             node("Concat", ["nc", "hw"], "sizes", axis=0)]
    model = _resize_to(nodes, {"idx": np.asarray([0, 1])})
    assert by_name(groups_of(model))["b"].frozen is None
    assert_equivalent(model)


def test_resize_whose_size_reads_the_channel_count_elsewhere_freezes():
    # spatial size = the channel count (Shape(deep)[1] twice): reading it changes the output
    nodes = [node("Shape", ["deep"], "shd"), node("Gather", ["shd", "idx"], "dims"),
             node("Concat", ["dims"], "sizes", axis=0)]
    model = _resize_to(nodes, {"idx": np.asarray([0, 1, 1, 1])})
    group = by_name(groups_of(model))["b"]
    assert group.frozen is not None and any("shape_read" in b for b in group.blockers)
    # the channel entry comes from another tensor (skip, 8 channels): not the Resize's own
    nodes = [node("Shape", ["skip"], "shs"), node("Slice", ["shs", "zero", "two", "zero"], "nc"),
             node("Shape", ["deep"], "shd"), node("Slice", ["shd", "two", "four", "zero"], "hw"),
             node("Concat", ["nc", "hw"], "sizes", axis=0)]
    rng = np.random.default_rng(3)
    model = _resize_to(nodes, {"w3": rand(rng, 4, 8, 1, 1, scale=0.4)})
    groups = by_name(groups_of(model))
    assert groups["a"].frozen is not None and groups["b"].frozen is not None


def test_a_conv_added_to_a_concat_splits_between_two_groups():
    """p's output is added to concat(q, s): its channels 0-3 go with q, 4-5 with s (two groups; p
    sorts first among the sources, so each group must not take all of p's channels)."""
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "wq", "bq"], "q"), node("Conv", ["x", "ws", "bs"], "s"),
             node("Concat", ["q", "s"], "c", axis=1), node("Relu", ["c"], "cr"), node("Conv", ["cr", "wp", "bp"], "p"),
             node("Add", ["p", "cr"], "t"), node("Relu", ["t"], "tr"), node("Conv", ["tr", "w3", "b3"], "y")]
    inits = {"wq": rand(rng, 4, 3, 1, 1, scale=0.4), "bq": rand(rng, 4, scale=0.4),
             "ws": rand(rng, 2, 3, 1, 1, scale=0.4), "bs": rand(rng, 2, scale=0.4),
             "wp": rand(rng, 6, 6, 1, 1, scale=0.4), "bp": rand(rng, 6, scale=0.4),
             "w3": rand(rng, 4, 6, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.4)}
    model = make_model(nodes, X, ["y"], inits)
    groups = by_name(groups_of(model))
    assert groups["p+q"].size == 4 and groups["p+s"].size == 2
    assert groups["p+q"].tensors["p"].tolist() == [0, 1, 2, 3, -1, -1]
    assert_equivalent(model)
