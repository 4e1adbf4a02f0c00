"""The bias_correction pass: sites (Conv, depthwise, Gemm, MatMul+Add), declines, numerics, determinism."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.graph import Names
from onnxcompress.core.pass_api import Numerics, PassContext, PassResult, Slot
from onnxcompress.passes.bias_correction import R_NO_REFERENCE
from onnxcompress.pipeline.manager import get_pass, parse_spec
from onnxcompress.quant import count_unfused_qdq
from onnxcompress.quant.bias_correction import (
    FLOAT_STATISTICS,
    R_BIAS_CONST,
    R_NO_BIAS_PATH,
    R_NOT_QUANTIZED,
    R_WEIGHT,
    ChannelMoments,
    KeptValues,
    apply_correction,
    find_sites,
    sort_appended,
)
from onnxcompress.runtime.data import open_source
from tests.helpers.builders import make_model
from tests.helpers.graphs import initializers, producers
from tests.helpers.quant import compare, qdq_params, quantize
from tests.helpers.runs import ort_run, run_passes
from tests.helpers.tensors import rand

X = {"x": ["N", 3, 8, 8]}
COARSE = "quantize_int8:per_channel=false:reduce_range=true:method=minmax"


def shifted_source(model: onnx.ModelProto, n: int = 64, seed: int = 1, shape=(3, 8, 8), mean: float = 0.7):
    """Inputs with a non-zero mean, so weight rounding moves the output means."""
    rng = np.random.default_rng(seed)
    return open_source([{"x": (rng.standard_normal((n, *shape)) + mean).astype(np.float32)}], model)


def skewed(rng: np.random.Generator, *shape: int, factor: float = 20.0) -> np.ndarray:
    """A weight whose first output channel is ``factor`` times larger: per-tensor scales round the
    rest coarsely."""
    w = rand(rng, *shape, scale=0.1)
    w[0] *= factor
    return w


def conv_chain(seed: int = 0, *, bias2: bool = True, depthwise: bool = False,
               extra_output: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    init = {"W1": skewed(rng, 6, 3, 3, 3), "B1": rand(rng, 6, scale=0.1)}
    init["W2"] = skewed(rng, 6, 1, 3, 3, factor=4.0) if depthwise else skewed(rng, 5, 6, 3, 3)
    if bias2:
        init["B2"] = rand(rng, len(init["W2"]), scale=0.1)
    conv2_inputs = ["r", "W2", "B2"] if bias2 else ["r", "W2"]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu1"),
             helper.make_node("Conv", conv2_inputs, ["y"], name="conv2", pads=[1, 1, 1, 1],
                              group=6 if depthwise else 1)]
    return make_model(nodes, X, ["a", "y"] if extra_output else ["y"], init)


def channel_mean_error(ref: onnx.ModelProto, cand: onnx.ModelProto, output: int = 0, axis: int = 1,
                       seed: int = 99, shape=(3, 8, 8)) -> float:
    """Mean over channels of |E[y_cand] - E[y_ref]| on held-out shifted inputs."""
    rng = np.random.default_rng(seed)
    feeds = {"x": (rng.standard_normal((128, *shape)) + 0.7).astype(np.float32)}
    r, c = ort_run(ref, feeds)[output], ort_run(cand, feeds)[output]
    others = tuple(i for i in range(r.ndim) if i != axis % r.ndim)
    return float(np.abs(r.mean(axis=others) - c.mean(axis=others)).mean())


def output_error(ref: onnx.ModelProto, cand: onnx.ModelProto, seed: int = 99) -> float:
    """Mean squared output error on held-out shifted inputs (the calibration distribution)."""
    rng = np.random.default_rng(seed)
    feeds = {"x": (rng.standard_normal((128, 3, 8, 8)) + 0.7).astype(np.float32)}
    return float(np.mean(np.square(ort_run(ref, feeds)[0] - ort_run(cand, feeds)[0])))


def correct(model: onnx.ModelProto, quant: str = COARSE, bc: str = "bias_correction", **kw):
    """``(quantized only, quantized + corrected, bias_correction result)``."""
    q, _ = quantize(model, quant, calib=shifted_source(model, **kw))
    qc, result = quantize(model, f"{quant},{bc}", calib=shifted_source(model, **kw))
    return q, qc, result


def test_pass_contract():
    cls = get_pass("bias_correction")
    assert cls.numerics == Numerics.APPROX
    assert set(cls.options) == {"reference", "sequential", "batch_size", "samples", "check", "optimize",
                                 "measure"}
    with pytest.raises(InputError, match="expected one of"):
        parse_spec("bias_correction:reference=auto")
    with pytest.raises(InputError, match="expected one of"):
        parse_spec("bias_correction:measure=float")
    with pytest.raises(InputError):
        parse_spec("bias_correction:optimize=maybe")


def test_conv_chain_mean_error_shrinks_and_model_stays_fused():
    model = conv_chain()
    q, qc, result = correct(model)
    assert result.modified and result.stats["layers_corrected"] == 2 and result.stats["reference"] == "float"
    # one per level: the float moments come from quantize_int8's calibration run
    assert result.stats["levels"] == 2 and result.stats["runs"] == 2 and result.stats["float_statistics"] == "reused"
    assert result.stats["check_sqnr_after"] > result.stats["check_sqnr_before"]  # the check kept it
    before, after = channel_mean_error(model, q), channel_mean_error(model, qc)
    assert after < 0.5 * before, (before, after)
    assert output_error(model, qc) < output_error(model, q)
    assert count_unfused_qdq(qc) == 0  # the int32 biases still fuse into QLinearConv
    for node in (n for n in qc.graph.node if n.op_type == "Conv"):
        bq, bs, bz, _ = qdq_params(qc, node.input[2])
        assert bq.dtype == np.int32 and bz.dtype == np.int32 and not bz.any()
        s_in, s_w = float(qdq_params(qc, node.input[0])[1]), float(qdq_params(qc, node.input[1])[1])
        np.testing.assert_allclose(bs, np.float32(s_in * s_w), rtol=1e-6)


def test_layer_without_bias_gets_an_int32_bias():
    model = conv_chain(1, bias2=False)
    q, qc, result = correct(model, quant="quantize_int8:per_channel=true:method=minmax")
    assert result.stats["bias_added"] == 1
    conv2 = next(n for n in qc.graph.node if n.name == "conv2")
    bq, bs, _, axis = qdq_params(qc, conv2.input[2])
    ws = qdq_params(qc, conv2.input[1])[1].astype(np.float64)
    s_in = float(qdq_params(qc, conv2.input[0])[1])
    assert bq.dtype == np.int32 and bq.shape == (5,) and axis == 0
    np.testing.assert_allclose(bs, (s_in * ws).astype(np.float32), rtol=1e-6)
    assert channel_mean_error(model, qc) < channel_mean_error(model, q)
    assert count_unfused_qdq(qc) == 0


def test_depthwise_conv():
    model = conv_chain(2, depthwise=True)
    q, qc, result = correct(model)
    assert result.stats["layers_corrected"] == 2
    assert channel_mean_error(model, qc) < channel_mean_error(model, q)  # the output Q's rounding remains


def gemm_model(seed: int = 3, trans_b: int = 1, bias: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = skewed(rng, 10, 48) if trans_b else skewed(rng, 10, 48).T.copy()
    init = {"W1": skewed(rng, 3, 3, 1, 1), "G": w}
    gemm_in = ["f", "G", "C"] if bias else ["f", "G"]
    if bias:
        init["C"] = rand(rng, 10, scale=0.1)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2],
                                                                     strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", gemm_in, ["y"], name="gemm", transB=trans_b, beta=0.5)]
    return make_model(nodes, {"x": ["N", 3, 8, 8]}, ["y"], init)


@pytest.mark.parametrize("trans_b,bias", [(1, True), (0, False)])
def test_gemm_whose_output_is_the_graph_output(trans_b, bias):
    model = gemm_model(trans_b=trans_b, bias=bias)
    q, qc, result = correct(model)
    assert result.stats["layers_corrected"] == 2 and result.stats["bias_added"] == (1 if bias else 2)  # conv: none
    assert [o.name for o in qc.graph.output] == ["y"] and producers(qc)["y"].op_type == "Gemm"
    assert channel_mean_error(model, qc) < 0.5 * channel_mean_error(model, q)
    assert count_unfused_qdq(qc) == 0


def matmul_model(seed: int = 4, add: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    init = {"M": skewed(rng, 6, 8).T.copy(), "B": rand(rng, 6, scale=0.1)}
    nodes = [helper.make_node("MatMul", ["x", "M"], ["m"], name="matmul")]
    if add:
        nodes.append(helper.make_node("Add", ["m", "B"], ["y"], name="add"))
    else:
        del init["B"]
        nodes.append(helper.make_node("Relu", ["m"], ["y"]))
    return make_model(nodes, {"x": ["N", 4, 8]}, ["y"], init)


def test_matmul_add_bias_is_requantized():
    model = matmul_model()
    q, qc, result = correct(model, shape=(4, 8))
    assert result.stats["layers_corrected"] == 1
    add = next(n for n in qc.graph.node if n.op_type == "Add")
    slot = next(i for i, t in enumerate(add.input) if producers(qc)[t].input[0] in initializers(qc)
                and initializers(qc)[producers(qc)[t].input[0]].ndim == 1)
    values = qdq_params(qc, add.input[slot])[0]
    assert values.dtype == np.uint8 and values.shape == (6,)
    assert channel_mean_error(model, qc, axis=-1, shape=(4, 8)) < channel_mean_error(model, q, axis=-1, shape=(4, 8))
    assert count_unfused_qdq(qc) == 0


def test_matmul_without_add_is_declined():
    model = matmul_model(add=False)
    result = correct(model, shape=(4, 8))[2]
    assert ("matmul", R_NO_BIAS_PATH) in result.where_codes() and not result.modified


def test_weights_only_float_bias_shared_is_copied():
    """Two convs sharing W and B (weights_only keeps B float): each gets its own corrected copy."""
    rng = np.random.default_rng(5)
    init = {"W": skewed(rng, 3, 3, 3, 3), "B": rand(rng, 3, scale=0.1)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "W", "B"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    model = make_model(nodes, X, ["y"], init)
    before = model.SerializeToString()
    quant = "quantize_int8:weights_only=true:per_channel=false:reduce_range=true"
    q, qc, result = correct(model, quant=quant)
    assert model.SerializeToString() == before
    assert result.stats["layers_corrected"] == 2 and result.stats["bias_copied"] >= 1
    c1, c2 = (next(n for n in qc.graph.node if n.name == k) for k in ("c1", "c2"))
    assert c1.input[2] != c2.input[2] and "B" not in (c1.input[2], c2.input[2])
    assert initializers(qc)[c1.input[2]].dtype == np.float32
    assert channel_mean_error(model, qc) < channel_mean_error(model, q)


def test_needs_calibration_data():
    q, _ = quantize(conv_chain())
    with pytest.raises(InputError, match="^bias_correction:reference=dequantized needs calibration data"):
        run_passes(q, "bias_correction:reference=dequantized", PassContext())
    with pytest.raises(InputError, match="^bias_correction needs calibration data"):
        run_passes(conv_chain(), "quantize_int8:weights_only=true,bias_correction", PassContext())


def test_float_model_is_left_alone():
    model = conv_chain()
    new, records = run_passes(model, "bias_correction:reference=dequantized", PassContext(calib=shifted_source(model)))
    result = records[-1].result
    assert not result.modified and result.decline_counts() == {R_NOT_QUANTIZED: 2}
    assert new.SerializeToString() == model.SerializeToString()


def test_without_float_reference_declines_or_uses_dequantized():
    model = conv_chain()
    q, _ = quantize(model, COARSE, calib=shifted_source(model))
    message = "bias_correction reads the float reference written by quantize_int8, which does not run before it"
    with pytest.raises(InputError, match=f"^{message}$"):
        run_passes(q, "bias_correction", PassContext(calib=shifted_source(model)))
    result = get_pass("bias_correction")().run(serde.to_graph(q), PassContext(calib=shifted_source(model)))
    assert not result.modified and result.decline_counts() == {R_NO_REFERENCE: 2}
    new, records = run_passes(q, "bias_correction:reference=dequantized", PassContext(calib=shifted_source(model)))
    result = records[-1].result
    assert result.modified and result.stats["reference"] == "dequantized"
    onnx.checker.check_model(new, full_check=True)
    assert compare(model, new) > 0.95


def test_non_constant_weight_and_bias_declined():
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="dyn_w"),
             helper.make_node("Conv", ["a", "W", "b"], ["y"], name="dyn_b")]
    model = make_model(nodes, {"x": ["N", 3, 8, 8], "w": [3, 3, 1, 1], "b": [3]}, ["y"],
                       {"W": rand(rng, 3, 3, 1, 1, scale=0.5)})
    feeds = {"x": rand(rng, 16, 3, 8, 8, scale=0.5), "w": rand(rng, 3, 3, 1, 1, scale=0.5),
             "b": rand(rng, 3, scale=0.5)}
    calib = open_source([feeds], model)
    _, result = quantize(model, "quantize_int8:weights_only=true,bias_correction", calib=calib)
    assert ("dyn_w", R_WEIGHT) in result.where_codes() and ("dyn_b", R_BIAS_CONST) in result.where_codes()
    assert not result.modified


def test_intermediate_graph_output_and_dynamic_spatial_dims():
    rng = np.random.default_rng(7)
    model = conv_chain(7, extra_output=True)
    dyn = make_model(list(model.graph.node), {"x": ["N", 3, "H", "W"]}, ["a", "y"], initializers(model))
    calib = shifted_source(dyn, shape=(3, 12, 10))
    q, _ = quantize(dyn, COARSE, calib=calib)
    qc, result = quantize(dyn, f"{COARSE},bias_correction", calib=shifted_source(dyn, shape=(3, 12, 10)))
    assert result.stats["layers_corrected"] == 2
    assert [o.name for o in qc.graph.output] == ["a", "y"]
    for out in (0, 1):
        assert channel_mean_error(dyn, qc, out, shape=(3, 6, 14)) < channel_mean_error(dyn, q, out, shape=(3, 6, 14))
    (a, y) = ort_run(qc, {"x": rand(rng, 2, 3, 5, 7, scale=0.5)})
    assert a.shape == (2, 6, 5, 7) and y.shape == (2, 5, 5, 7)


def test_fixed_batch_model_with_a_sequence_first_output():
    """ddddocr's CTC head: batch fixed at 1 and the output ``[W, 1, C]`` (axis 0 is not the sample
    axis). The check must not cut quantize_int8's kept float outputs by axis 0 (it used to compare
    a ``[1, 1, C]`` slice with the ``[W, 1, C]`` output and fail the pipeline)."""
    model = conv_chain(10)
    nodes = [*model.graph.node, helper.make_node("Transpose", ["y"], ["t"], name="seq_first", perm=[3, 0, 1, 2])]
    fixed = make_model(nodes, {"x": [1, 3, 8, 8]}, ["t"], initializers(model))
    qc, result = quantize(fixed, f"{COARSE},bias_correction", calib=shifted_source(fixed))
    assert result.stats["layers_corrected"] == 2 and "check_sqnr_after" in result.stats
    assert result.stats["check_sqnr_after"] > result.stats["check_sqnr_before"]
    # the kept float outputs are used run by run (one sample a run): the same check as rerunning the float model
    with pytest.MonkeyPatch.context() as m:
        m.setattr(KeptValues, "runs", lambda self: None)
        again, rerun = quantize(fixed, f"{COARSE},bias_correction", calib=shifted_source(fixed))
    assert [result.stats[k] for k in ("check_sqnr_before", "check_sqnr_after")] == \
        [rerun.stats[k] for k in ("check_sqnr_before", "check_sqnr_after")]
    assert again.SerializeToString() == qc.SerializeToString()
    feeds = {"x": rand(np.random.default_rng(3), 1, 3, 8, 8, scale=0.5)}
    assert ort_run(qc, feeds)[0].shape == ort_run(fixed, feeds)[0].shape == (8, 1, 5, 8)


def test_sequential_beats_one_shot_and_samples_option():
    model = conv_chain(8)
    seq = correct(model)[1]
    _, one, r_one = correct(model, bc="bias_correction:sequential=false:samples=40:batch_size=16")
    assert r_one.stats["levels"] == 1 and r_one.stats["runs"] == 2 and r_one.stats["calib_samples"] == 40
    assert channel_mean_error(model, seq) <= channel_mean_error(model, one) * 1.05


def test_deterministic():
    model = conv_chain(9)
    a, b = correct(model)[1], correct(model)[1]
    assert a.SerializeToString() == b.SerializeToString()


def test_channel_moments_stream_equals_all_at_once():
    rng = np.random.default_rng(10)
    data = rng.standard_normal((20, 4, 5, 3))
    m = ChannelMoments(1)
    for chunk in np.array_split(data, 3):
        m.update(chunk)
    np.testing.assert_allclose(m.mean(), data.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(m.var(), data.var(axis=(0, 2, 3)))
    last = ChannelMoments(-1)
    last.update(data)
    np.testing.assert_allclose(last.mean(), data.mean(axis=(0, 1, 2)))


def test_weights_only_gemm_with_beta_gets_float_bias():
    """weights_only keeps Gemm's float C and beta=0.5: the correction is added as delta / beta."""
    model = gemm_model(5, trans_b=1, bias=True)
    q, qc, result = correct(model, quant="quantize_int8:weights_only=true:per_channel=false:reduce_range=true")
    gemm = next(n for n in qc.graph.node if n.op_type == "Gemm")
    assert initializers(qc)[gemm.input[2]].dtype == np.float32 and result.stats["layers_corrected"] == 2
    assert channel_mean_error(model, qc) < 0.5 * channel_mean_error(model, q)


def test_a_correction_that_does_not_pay_is_not_kept(monkeypatch):
    """check=true (default): corrections that move the outputs away from the float model on the
    calibration data (here: every delta applied 20x, with the wrong sign) are all undone."""
    import onnxcompress.passes.bias_correction as bc

    real = bc.apply_correction
    monkeypatch.setattr(bc, "apply_correction", lambda graph, names, site, delta, result:
                        real(graph, names, site, -20 * delta, result))
    model = conv_chain()
    q, qc, result = correct(model)
    assert not result.modified and result.stats["layers_corrected"] == 0
    assert [(d.where, d.code) for d in result.declined] == [("graph", bc.R_DOES_NOT_PAY)]
    assert result.stats["check_sqnr_after"] < result.stats["check_sqnr_before"]
    assert initializers(qc).keys() == initializers(q).keys()
    for name, value in initializers(q).items():
        np.testing.assert_array_equal(initializers(qc)[name], value)
    _, unchecked, result = correct(model, bc="bias_correction:check=false")
    assert result.modified and output_error(model, unchecked) > output_error(model, q)


def _counting_capture(monkeypatch) -> list[int]:
    """Count the float-model runs bias_correction makes itself (its ``capture`` calls)."""
    import onnxcompress.passes.bias_correction as bc

    calls: list[int] = []
    real = bc.capture

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(bc, "capture", spy)
    return calls


@pytest.mark.parametrize("make, shape", [(lambda: conv_chain(extra_output=True), (3, 8, 8)),
                                         (lambda: conv_chain(bias2=False, depthwise=True), (3, 8, 8)),
                                         (lambda: gemm_model(trans_b=0), (3, 8, 8)),
                                         (matmul_model, (4, 8))])
def test_float_statistics_reused_with_the_same_bytes(monkeypatch, make, shape):
    """quantize_int8's calibration run leaves the float moments and outputs (FLOAT_STATISTICS):
    bias_correction then does not run the float model, and writes the same bytes as when it does."""
    model = make()
    calls = _counting_capture(monkeypatch)
    reused, result = quantize(model, f"{COARSE},bias_correction", calib=shifted_source(model, shape=shape))
    assert result.stats["float_statistics"] == "reused" and calls == []
    monkeypatch.setattr(PassContext, "wanted", lambda self, slot: False)  # quantize_int8 then gathers nothing
    alone, result_alone = quantize(model, f"{COARSE},bias_correction", calib=shifted_source(model, shape=shape))
    assert "float_statistics" not in result_alone.stats and calls == [1]
    assert reused.SerializeToString() == alone.SerializeToString()
    assert {k: v for k, v in result.stats.items() if k not in ("float_statistics", "runs")} == \
        {k: v for k, v in result_alone.stats.items() if k != "runs"}
    assert result.stats["runs"] == result_alone.stats["runs"] - 1


def test_float_statistics_only_for_the_same_data_and_batch(monkeypatch):
    """Other samples or another batch size than quantize_int8's: bias_correction runs the float model."""
    model = conv_chain()
    calls = _counting_capture(monkeypatch)
    for bc in ("bias_correction:samples=40", "bias_correction:batch_size=16"):
        result = quantize(model, f"{COARSE},{bc}", calib=shifted_source(model))[1]
        assert "float_statistics" not in result.stats and result.stats["layers_corrected"] == 2
    assert len(calls) == 2


def test_float_statistics_gathered_only_when_a_later_pass_reads_them():
    model = conv_chain()
    for spec, gathered in ((COARSE, False), (f"{COARSE},bias_correction", True),
                           (f"{COARSE},bias_correction:reference=dequantized", True)):
        ctx = PassContext(calib=shifted_source(model))
        run_passes(model, spec, ctx)
        assert (FLOAT_STATISTICS in ctx.provided()) is gathered, spec
    other = Slot("other", int, "another slot")
    ctx = PassContext()
    assert not ctx.wanted(FLOAT_STATISTICS) and not ctx.wanted(other)  # outside a pipeline: nothing is wanted


@pytest.mark.parametrize("make", [conv_chain, lambda: conv_chain(bias2=False), lambda: gemm_model(bias=False)])
def test_sort_appended_gives_the_toposort_order(make):
    """After corrections append their bias DequantizeLinears, sort_appended orders the nodes exactly
    as onnx-graphsurgeon's toposort (the exported bytes depend on it); an appended node reading a
    computed tensor falls back to toposort."""
    model = make()
    q, _ = quantize(model, COARSE, calib=shifted_source(model))
    for reverse in (False, True):
        graph = serde.to_graph(q).toposort()
        names, sites = Names(graph), find_sites(graph, PassResult())
        start = len(graph.nodes)
        for site in (list(reversed(sites)) if reverse else sites):
            apply_correction(graph, names, site, np.full(site.channels, 0.01), PassResult())
        assert len(graph.nodes) > start + 1  # int32 biases: new DQs, appended
        expected = [n.name for n in graph.copy().toposort().nodes]
        sort_appended(graph, start)
        assert [n.name for n in graph.nodes] == expected
    graph = serde.to_graph(q).toposort()
    start, tensor = len(graph.nodes), graph.nodes[-1].outputs[0]
    late = gs.Variable("late", dtype=np.float32)
    graph.nodes.append(gs.Node("Identity", "late_identity", inputs=[tensor], outputs=[late]))
    graph.outputs.append(late)
    expected = [n.name for n in graph.copy().toposort().nodes]
    sort_appended(graph, start)
    assert [n.name for n in graph.nodes] == expected
