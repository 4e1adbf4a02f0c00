"""The shared graph helpers of ``onnxcompress.core.graph``: weight layouts, broadcasting a
per-channel vector, and the clamp of a Relu/Clip in both of Clip's forms."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxcompress.core.graph import WeightLayout, broadcast_along, clip_bounds, weight_layout


def _node(op: str, attrs: dict | None = None, inputs: list | None = None) -> gs.Node:
    x = gs.Variable("x", np.float32)
    return gs.Node(op, f"{op}_0", attrs or {}, [x, *(inputs or [])], [gs.Variable("y", np.float32)])


def _const(name: str, value) -> gs.Constant:
    return gs.Constant(name, np.asarray(value, np.float32))


# --- clip bounds --------------------------------------------------------------------------------


def test_relu_clamps_at_zero():
    assert clip_bounds(_node("Relu")) == (0.0, np.inf)


def test_clip_bounds_from_attributes_before_opset_11():
    """Before opset 11, Clip(0, 6) says so in attributes. quant.placement's copy read only the
    inputs and took such a Clip for (-inf, inf); the shared helper reads both forms."""
    assert clip_bounds(_node("Clip", {"min": 0.0, "max": 6.0})) == (0.0, 6.0)
    assert clip_bounds(_node("Clip", {"max": 6.0})) == (-np.inf, 6.0)


def test_clip_bounds_from_inputs_from_opset_11():
    assert clip_bounds(_node("Clip", inputs=[_const("lo", 0.0), _const("hi", 6.0)])) == (0.0, 6.0)
    omitted_min = _node("Clip", inputs=[gs.Variable.empty(), _const("hi", 6.0)])
    assert clip_bounds(omitted_min) == (-np.inf, 6.0)
    assert clip_bounds(_node("Clip", inputs=[_const("lo", [-1.0])])) == (-1.0, np.inf)  # shape [1] works too
    assert clip_bounds(_node("Clip")) == (-np.inf, np.inf)


def test_clip_bounds_unknown_when_not_a_constant_scalar():
    assert clip_bounds(_node("Clip", inputs=[gs.Variable("lo", np.float32)])) is None
    assert clip_bounds(_node("Clip", inputs=[_const("lo", [0.0, 1.0])])) is None
    assert clip_bounds(_node("Sigmoid")) is None


# --- broadcast along an axis --------------------------------------------------------------------


def test_broadcast_along():
    v = np.arange(3.0)
    assert broadcast_along(v, 4, 1).shape == (1, 3, 1, 1)
    assert broadcast_along(v, 2, -1).shape == (1, 3)
    assert broadcast_along(np.array([2.0]), 3, 0).shape == ()
    w = np.ones((2, 3, 4))
    np.testing.assert_array_equal((w * broadcast_along(v, 3, 1))[1, :, 2], v)


# --- weight layouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("op, attrs, shape, axes, channels", [
    ("Conv", {}, (8, 4, 3, 3), (0, 1), (8, 4)),
    ("Conv", {"group": 2}, (8, 2, 3, 3), (0, 1), (8, 4)),
    ("ConvTranspose", {}, (4, 8, 3, 3), (1, 0), (8, 4)),
    ("ConvTranspose", {"group": 2}, (4, 4, 3, 3), (1, 0), (8, 4)),
    ("Gemm", {}, (4, 8), (1, 0), (8, 4)),
    ("Gemm", {"transB": 1}, (8, 4), (0, 1), (8, 4)),
    ("MatMul", {}, (4, 8), (1, 0), (8, 4)),
])
def test_weight_layout(op, attrs, shape, axes, channels):
    layout = weight_layout(_node(op, attrs), len(shape))
    assert (layout.out_axis, layout.in_axis) == axes
    assert (layout.out_channels(shape), layout.in_channels(shape)) == channels


def test_weight_layout_of_other_ops_and_batched_matmul():
    assert weight_layout(_node("Relu")) is None
    assert weight_layout(_node("Gemm", {"transA": 1})).trans_a
    assert (weight_layout(_node("MatMul"), 3).out_axis, weight_layout(_node("MatMul"), 3).in_axis) == (2, 1)


def _channel_of(layout: WeightLayout, shape: tuple, index: tuple, side: str) -> int:
    """The output or input channel a weight element belongs to, spelled out per op."""
    g = layout.group
    if layout.op == "Conv":  # W[o, i]: input channel (o // (Cout/g)) * Cin/g + i
        return index[0] if side == "out" else (index[0] // (shape[0] // g)) * shape[1] + index[1]
    # ConvTranspose W[i, o]: output channel (i // (Cin/g)) * Cout/g + o
    return index[0] if side == "in" else (index[0] // (shape[0] // g)) * shape[1] + index[1]


@pytest.mark.parametrize("op, shape, group", [("Conv", (6, 2, 3), 3), ("ConvTranspose", (6, 2, 3), 3),
                                              ("Conv", (4, 3, 1), 1), ("ConvTranspose", (4, 3, 1), 1)])
@pytest.mark.parametrize("side", ["out", "in"])
def test_channel_array_meets_each_element_with_its_channel(op, shape, group, side):
    layout = weight_layout(_node(op, {"group": group}), len(shape))
    n = layout.out_channels(shape) if side == "out" else layout.in_channels(shape)
    vector = np.arange(n, dtype=np.float64) + 10
    got = np.broadcast_to(layout.channel_array(vector, shape, side), shape)
    for index in np.ndindex(*shape):
        assert got[index] == vector[_channel_of(layout, shape, index, side)], index
