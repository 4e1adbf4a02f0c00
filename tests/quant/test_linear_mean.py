"""A quantized layer's output channel means from sums of its input (quant.linear_mean) equal the
means of the layer's output computed by onnxruntime (graph optimizations off)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxcompress.core import proto
from onnxcompress.core.pass_api import PassResult
from onnxcompress.quant.bias_correction import find_sites
from onnxcompress.quant.linear_mean import ConvSums, RowSums, linear_sums
from tests.helpers.builders import make_model, node
from tests.helpers.runs import ort_run

RNG = np.random.default_rng(11)
S_X, Z_X = np.float32(0.03), np.uint8(120)


def _quantized_layer(op: str, x_shape, w: np.ndarray, bias: np.ndarray | None, *, after: str = "", **attrs):
    """``x -> Q -> DQ -> op(., DQ(int8 w)[, bias]) -> y`` (``after="add"``: a MatMul and its bias Add;
    ``after="qdq_add"``: the MatMul output goes through Q/DQ before the Add)."""
    w_scale = (np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 127).astype(np.float32) if op != "MatMul" else \
        np.float32(np.abs(w).max() / 127)
    w_q = np.round(w / (w_scale.reshape(-1, *[1] * (w.ndim - 1)) if op != "MatMul" else w_scale)).astype(np.int8)
    inits = {"s": S_X, "z": Z_X, "wq": w_q, "ws": w_scale}
    nodes = [node("QuantizeLinear", ["x", "s", "z"], "q"), node("DequantizeLinear", ["q", "s", "z"], "d")]
    nodes.append(node("DequantizeLinear", ["wq", "ws"], "w", **({"axis": 0} if op != "MatMul" else {})))
    ins = ["d", "w"] + (["b"] if bias is not None and not after else [])
    if bias is not None:
        inits["b"] = bias
    nodes.append(node(op, ins, "m" if after else "y", **attrs))
    if after == "add":
        nodes.append(node("Add", ["m", "b"], "y"))
    elif after == "qdq_add":
        inits |= {"s2": np.float32(0.05), "z2": np.uint8(128)}
        nodes += [node("QuantizeLinear", ["m", "s2", "z2"], "mq"), node("DequantizeLinear", ["mq", "s2", "z2"], "md"),
                  node("Add", ["md", "b"], "y")]
    return make_model(nodes, {"x": x_shape}, ["y"], inits)


def _site(model):
    graph = gs.import_onnx(model)
    sites = find_sites(graph, PassResult())
    assert len(sites) == 1
    return sites[0]


def _run(model, x, names):
    """``names`` of ``model`` on input ``x`` (intermediate tensors made outputs)."""
    return ort_run(proto.with_outputs(model, names), {"x": x}, names)


def _names(model):
    return {o for n in model.graph.node for o in n.output}


def _sums_mean(model, batches, read_int: bool = True):
    site = _site(model)
    names = _names(model)
    want = "q" if read_int and "q" in names else "d"
    sums = linear_sums(site, lambda t: want if t.name in ("d", "md") else t.name)
    assert sums is not None
    outs = ["y", want]
    ref_total, count = 0.0, 0
    for x in batches:
        y, src = _run(model, x, outs)
        sums.update(src)
        moved = np.moveaxis(y.astype(np.float64), site.axis, -1)
        ref_total = ref_total + moved.reshape(-1, moved.shape[-1]).sum(axis=0)
        count += moved.size // moved.shape[-1]
    return sums, sums.mean(), ref_total / count


def _x(*shape):
    return (RNG.standard_normal(shape) * 1.5 + 0.4).astype(np.float32)


CONVS = [
    ("plain 3x3", (2, 4, 9, 9), (6, 4, 3, 3), {}),
    ("stride pads", (3, 4, 11, 8), (6, 4, 3, 3), {"strides": [2, 2], "pads": [1, 0, 2, 1]}),
    ("dilation", (2, 4, 12, 12), (5, 4, 3, 2), {"dilations": [2, 3], "pads": [2, 1, 0, 1]}),
    ("same upper", (2, 4, 10, 7), (6, 4, 4, 3), {"auto_pad": "SAME_UPPER", "strides": [3, 2]}),
    ("same lower", (2, 4, 10, 7), (6, 4, 4, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ("valid", (2, 4, 10, 7), (6, 4, 3, 3), {"auto_pad": "VALID", "strides": [2, 1]}),
    ("groups", (2, 6, 8, 8), (4, 3, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    ("depthwise", (2, 6, 8, 8), (6, 1, 5, 5), {"group": 6, "pads": [2, 2, 2, 2], "strides": [2, 2]}),
    ("1d", (3, 4, 17), (6, 4, 5), {"pads": [2, 1], "strides": [3]}),
    ("3d", (2, 3, 5, 6, 4), (4, 3, 3, 2, 2), {"pads": [1, 0, 1, 1, 0, 0]}),
]


@pytest.mark.parametrize("read_int", [True, False], ids=["int8-input", "float-input"])
@pytest.mark.parametrize("name,x_shape,w_shape,attrs", CONVS, ids=[c[0] for c in CONVS])
def test_conv_means_from_input_sums_equal_onnxruntime(name, x_shape, w_shape, attrs, read_int):
    model = _quantized_layer("Conv", ["N", *x_shape[1:]], RNG.standard_normal(w_shape).astype(np.float32),
                             RNG.standard_normal(w_shape[0]).astype(np.float32), **attrs)
    sums, got, want = _sums_mean(model, [_x(*x_shape), _x(1, *x_shape[1:])], read_int)
    assert isinstance(sums, ConvSums)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5 * np.abs(want).max())


def test_conv_without_bias_and_with_changing_spatial_sizes():
    """No bias yet (the site creates one): zeros; batches of other sizes are summed apart."""
    model = _quantized_layer("Conv", ["N", 4, "H", "W"], RNG.standard_normal((5, 4, 3, 3)).astype(np.float32), None,
                             strides=[2, 2], pads=[1, 1, 1, 1])
    _, got, want = _sums_mean(model, [_x(2, 4, 9, 9), _x(3, 4, 6, 13), _x(1, 4, 9, 9)])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("attrs", [{}, {"transA": 1}, {"transB": 1}, {"alpha": 0.5, "beta": 2.0, "transB": 1}])
def test_gemm_means_equal_onnxruntime(attrs):
    n, k, m = 7, 12, 5
    w = RNG.standard_normal((m, k) if attrs.get("transB") else (k, m)).astype(np.float32)
    model = _quantized_layer("Gemm", [k, "N"] if attrs.get("transA") else ["N", k], w,
                             RNG.standard_normal(m).astype(np.float32), **attrs)
    x = [_x(k, n), _x(k, 3)] if attrs.get("transA") else [_x(n, k), _x(3, k)]
    sums, got, want = _sums_mean(model, x)
    assert isinstance(sums, RowSums)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("after", ["add", "qdq_add"])
def test_matmul_bias_add_means_equal_onnxruntime(after):
    """A MatMul's bias Add: the mean of its other input (the MatMul output, or its Q/DQ) plus the bias."""
    model = _quantized_layer("MatMul", ["N", 6, 10], RNG.standard_normal((10, 4)).astype(np.float32),
                             RNG.standard_normal(4).astype(np.float32), after=after)
    site = _site(model)
    source = "mq" if after == "qdq_add" else "m"
    sums = linear_sums(site, lambda t: source if t.name in ("m", "md") else t.name)
    assert isinstance(sums, RowSums)
    ref_total, count = 0.0, 0
    for x in (_x(2, 6, 10), _x(3, 6, 10)):
        y, src = _run(model, x, ["y", source])
        sums.update(src)
        ref_total, count = ref_total + y.astype(np.float64).reshape(-1, 4).sum(axis=0), count + y.size // 4
    np.testing.assert_allclose(sums.mean(), ref_total / count, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("cuts", [[(0, 5)], [(0, 1), (1, 3), (3, 5)]])
def test_sums_do_not_depend_on_how_samples_are_batched(cuts):
    model = _quantized_layer("Conv", ["N", 4, 7, 7], RNG.standard_normal((3, 4, 3, 3)).astype(np.float32),
                             RNG.standard_normal(3).astype(np.float32), pads=[1, 1, 1, 1])
    x = _x(5, 4, 7, 7)
    q, d = _run(model, x, ["q", "d"])
    means = []
    for source, values in (("q", q), ("d", d)):
        parts = linear_sums(_site(model), lambda t, s=source: s if t.name == "d" else t.name)
        for a, b in cuts:
            parts.update(values[a:b])
        means.append(parts.mean())
    reference = linear_sums(_site(model), lambda t: "q" if t.name == "d" else t.name)
    reference.update(q)
    assert np.array_equal(means[0], reference.mean())
    np.testing.assert_allclose(means[1], means[0], rtol=1e-6)


def test_declines_what_it_cannot_sum():
    """ConvTranspose; an input read under an unrelated name; a per-channel activation scale."""
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    convt = _quantized_layer("ConvTranspose", ["N", 4, 6, 6], w, RNG.standard_normal(3).astype(np.float32))
    assert linear_sums(_site(convt), lambda t: "q" if t.name == "d" else t.name) is None
    conv = _quantized_layer("Conv", ["N", 4, 6, 6], w.transpose(1, 0, 2, 3).copy(), np.ones(3, np.float32))
    assert linear_sums(_site(conv), lambda t: "elsewhere") is None
    graph = gs.import_onnx(conv)
    dq = next(n for n in graph.nodes if n.outputs[0].name == "d")
    dq.inputs[1] = gs.Constant("s_per_channel", np.full(4, 0.03, np.float32))
    dq.attrs["axis"] = 1
    site = find_sites(graph, PassResult())[0]
    assert linear_sums(site, lambda t: "q" if t.name == "d" else t.name) is None
    assert linear_sums(site, lambda t: t.name) is not None  # read as floats: no scale to apply
