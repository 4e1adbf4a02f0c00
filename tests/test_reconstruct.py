"""Tests of the least-squares reconstruction: accumulator, layer views (im2col vs ORT), driver."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.reconstruct.layerview import (
    channel_features,
    conv_geometry,
    im2col,
    layer_view,
    sample_rows,
)
from onnxcompress.reconstruct.lstsq import LstsqAccumulator
from onnxcompress.reconstruct.refit import LayerTarget, reconstruct_layers
from onnxcompress.runtime.data import RandomSource, input_specs
from tests.helpers.builders import make_model, small_net
from tests.helpers.runs import ort_run
from tests.helpers.tensors import he

# ---------------------------------------------------------------- builders


def as_gs(node: onnx.NodeProto) -> gs.Node:
    """The graphsurgeon node of a NodeProto (op, name, attributes), as layer views take it."""
    return gs.Node(node.op_type, node.name, {a.name: helper.get_attribute_value(a) for a in node.attribute})


def refit(student: onnx.ModelProto, *args, **kwargs) -> tuple[onnx.ModelProto, list]:
    """:func:`reconstruct_layers` on the student's graph, the refitted graph exported to a model."""
    graph, stats = reconstruct_layers(serde.to_graph(student), *args, **kwargs)
    return serde.to_model(graph), stats


def with_weight(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` with initializer ``name`` replaced by ``array``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, init in enumerate(out.graph.initializer):
        if init.name == name:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    return out


def weight(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    init = next(i for i in model.graph.initializer if i.name == node.input[index])
    return numpy_helper.to_array(init)


def output_error(student: onnx.ModelProto, teacher: onnx.ModelProto, seed: int = 99, n: int = 64) -> float:
    """Relative error of the student's output vs the teacher's on held-out random data."""
    x = np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)
    ys, yt = ort_run(student, {"x": x})[0], ort_run(teacher, {"x": x})[0]
    return float(np.linalg.norm(ys - yt) / np.linalg.norm(yt))


def calib(model: onnx.ModelProto, count: int = 256, seed: int = 1) -> RandomSource:
    return RandomSource(input_specs(model), count, seed=seed)


# ---------------------------------------------------------------- accumulator


def _lstsq_ref(X: np.ndarray, Y: np.ndarray, bias: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    A = np.c_[X, np.ones(len(X))] if bias else X
    sol = np.linalg.lstsq(A, Y, rcond=None)[0]
    return (sol[:-1], sol[-1]) if bias else (sol, None)


def test_accumulator_streaming_equals_lstsq() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 7)) * [1, 2, 3, 0.5, 5, 1, 1] + 3.0
    Y = X @ rng.standard_normal((7, 4)) + rng.standard_normal((500, 4)) + 2.0
    streamed, once = LstsqAccumulator(7, 4), LstsqAccumulator(7, 4)
    for a, b in [(0, 13), (13, 321), (321, 500)]:
        streamed.add(X[a:b], Y[a:b])
    once.add(X, Y)
    W_ref, b_ref = _lstsq_ref(X, Y)
    for acc in (streamed, once):
        W, b = acc.solve(ridge=0.0)
        np.testing.assert_allclose(W, W_ref, atol=1e-8)
        np.testing.assert_allclose(b, b_ref, atol=1e-8)
        assert acc.n_samples == 500 and acc.last_solver == "cholesky"
    resid = np.linalg.norm(X @ W_ref + b_ref - Y) / np.linalg.norm(Y)
    assert streamed.relative_error(W_ref, b_ref) == pytest.approx(resid, rel=1e-8)


def test_accumulator_without_bias_and_vector_target() -> None:
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((200, 5)), rng.standard_normal(200)
    acc = LstsqAccumulator(5, 1, fit_bias=False)
    acc.add(X[:50], y[:50])
    acc.add(X[50:], y[50:])
    W, b = acc.solve(ridge=0.0)
    assert b is None
    np.testing.assert_allclose(W[:, 0], _lstsq_ref(X, y, bias=False)[0], atol=1e-10)
    with pytest.raises(ValueError, match="expected X"):
        acc.add(X[:, :4], y)


def test_ridge_shrinks() -> None:
    rng = np.random.default_rng(2)
    X = rng.standard_normal((100, 6))
    acc = LstsqAccumulator(6, 2)
    acc.add(X, X @ rng.standard_normal((6, 2)) + 0.1 * rng.standard_normal((100, 2)))
    norms = [np.linalg.norm(acc.solve(ridge=r)[0]) for r in (0.0, 1e-4, 1e-1, 1.0, 10.0)]
    assert all(a > b for a, b in itertools.pairwise(norms))
    errors = [acc.relative_error(*acc.solve(ridge=r)) for r in (0.0, 1.0)]
    assert errors[0] < errors[1]


def test_zero_and_duplicate_columns() -> None:
    rng = np.random.default_rng(3)
    X = rng.standard_normal((80, 5))
    X[:, 2] = 0.0
    Y = X @ rng.standard_normal((5, 3)) + 1.0
    for ridge in (0.0, 1e-4):
        acc = LstsqAccumulator(5, 3)
        acc.add(X, Y)
        W, b = acc.solve(ridge=ridge)
        assert np.all(np.isfinite(W)) and np.all(W[2] == 0)
        assert acc.relative_error(W, b) < 1e-3
    X[:, 2] = X[:, 0]  # exactly collinear: Cholesky refuses, the fallback still fits
    acc = LstsqAccumulator(5, 3, fit_bias=False)
    acc.add(X, X @ np.ones((5, 3)))
    W, _ = acc.solve(ridge=0.0)
    assert acc.last_solver in ("lstsq", "pinv") and acc.relative_error(W) < 1e-8
    empty = LstsqAccumulator(2, 1)
    empty.add(np.zeros((4, 2)), np.full(4, 3.0))
    W, b = empty.solve()
    assert np.all(W == 0) and b == pytest.approx([3.0]) and empty.last_solver == "none"


def test_keep_subset_equals_reduced_problem() -> None:
    rng = np.random.default_rng(4)
    X = rng.standard_normal((300, 9)) + 1.0
    Y = X @ rng.standard_normal((9, 3))
    acc = LstsqAccumulator(9, 3)
    acc.add(X[:100], Y[:100])
    acc.add(X[100:], Y[100:])
    keep = [0, 3, 4, 8]
    reduced = LstsqAccumulator(4, 3)
    reduced.add(X[:, keep], Y)
    for ridge in (0.0, 1e-2):
        W, b = acc.solve(ridge=ridge, keep=keep)
        W2, b2 = reduced.solve(ridge=ridge)
        np.testing.assert_allclose(W, W2, atol=1e-9)
        np.testing.assert_allclose(b, b2, atol=1e-9)
    W_ref, b_ref = _lstsq_ref(X[:, keep], Y)
    np.testing.assert_allclose(acc.solve(ridge=0.0, keep=keep)[0], W_ref, atol=1e-8)
    assert acc.relative_error(W_ref, b_ref, keep=keep) == pytest.approx(
        np.linalg.norm(X[:, keep] @ W_ref + b_ref - Y) / np.linalg.norm(Y), rel=1e-6)
    with pytest.raises(ValueError, match="keep"):
        acc.solve(keep=[9])


def test_grouped_accumulator_equals_separate_problems() -> None:
    rng = np.random.default_rng(5)
    X, Y = rng.standard_normal((3, 60, 4)), rng.standard_normal((3, 60, 2))
    acc = LstsqAccumulator(4, 2, groups=3)
    acc.add(X, Y)
    for g in range(3):
        W, b = acc.solve(ridge=0.0, group=g)
        W_ref, b_ref = _lstsq_ref(X[g], Y[g])
        np.testing.assert_allclose(W, W_ref, atol=1e-10)
        np.testing.assert_allclose(b, b_ref, atol=1e-10)


def test_sample_rows_and_channel_features() -> None:
    rows = sample_rows(100, 10, np.random.default_rng(0))
    assert len(rows) == 10 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, sample_rows(100, 10, np.random.default_rng(0)))
    np.testing.assert_array_equal(sample_rows(5, 10, np.random.default_rng(0)), np.arange(5))
    np.testing.assert_array_equal(channel_features([0, 2], 3), [0, 1, 2, 6, 7, 8])


# ---------------------------------------------------------------- conv im2col vs ORT

CONV_CASES = {
    "stride2_pads": {"cin": 4, "cout": 6, "k": (3, 3), "strides": [2, 2], "pads": [1, 1, 1, 1]},
    "asym_pads": {"cin": 3, "cout": 4, "k": (3, 3), "pads": [0, 1, 2, 1]},
    "dilation2": {"cin": 3, "cout": 5, "k": (3, 3), "dilations": [2, 2], "pads": [2, 2, 2, 2]},
    "group2": {"cin": 4, "cout": 6, "k": (3, 3), "group": 2, "pads": [1, 1, 1, 1]},
    "depthwise": {"cin": 5, "cout": 10, "k": (3, 3), "group": 5, "strides": [2, 1], "pads": [1, 1, 1, 1]},
    "pointwise": {"cin": 6, "cout": 3, "k": (1, 1)},
    "nonsquare": {"cin": 3, "cout": 4, "k": (2, 3), "strides": [1, 2], "pads": [1, 0, 0, 1]},
    "same_upper": {"cin": 2, "cout": 3, "k": (4, 3), "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    "same_lower": {"cin": 2, "cout": 3, "k": (4, 3), "strides": [2, 3], "auto_pad": "SAME_LOWER"},
    "valid": {"cin": 2, "cout": 3, "k": (3, 2), "auto_pad": "VALID", "dilations": [1, 2]},
    "conv1d": {"cin": 3, "cout": 4, "k": (5,), "strides": [2], "pads": [2, 1]},
    "conv3d": {"cin": 2, "cout": 3, "k": (2, 3, 2), "pads": [1, 0, 1, 0, 1, 1], "group": 1},
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_im2col_matches_ort_conv(case: str) -> None:
    cfg = dict(CONV_CASES[case])
    cin, cout, k = cfg.pop("cin"), cfg.pop("cout"), cfg.pop("k")
    group = cfg.get("group", 1)
    rng = np.random.default_rng(6)
    spatial = {1: [11], 2: [9, 10], 3: [5, 6, 7]}[len(k)]
    x = rng.standard_normal([2, cin] + spatial).astype(np.float32)
    w = rng.standard_normal((cout, cin // group) + k).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], "conv", **cfg)
    model = make_model([node], {"x": list(x.shape)}, ["y"], {"w": w, "b": b})
    y = ort_run(model, {"x": x})[0]
    view = layer_view(as_gs(node), w, b)
    X, Y = view.features(x), view.targets(y, x)
    W, bias = view.to_matrix()
    np.testing.assert_allclose(X @ W + bias[:, None, :], Y, atol=1e-5)
    back_w, back_b = view.from_matrix(W, bias)
    np.testing.assert_array_equal(back_w, w)
    np.testing.assert_array_equal(back_b, b)
    rows = sample_rows(view.n_rows(x), 7, np.random.default_rng(0))
    chunks = list(view.pairs(x, y, rows, chunk_bytes=8 * 3 * group * (view.n_features + view.n_targets)))
    assert len(chunks) == 3
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks], axis=1), X[:, rows])
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks], axis=1), Y[:, rows])
    drawn = list(view.pairs(x, y, max_positions=7, rng=np.random.default_rng(0)))
    np.testing.assert_array_equal(np.concatenate([c[0] for c in drawn], axis=1), X[:, rows])


def test_im2col_columns_follow_weight_layout() -> None:
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    geom = conv_geometry({}, (2, 2), (4, 4))
    cols = im2col(x, geom, np.array([0, 9 + 2 * 3 + 1]))  # rows: sample 0 at (0,0); sample 1 at (2,1)
    np.testing.assert_array_equal(cols[0], x[0, :, 0:2, 0:2].reshape(-1))
    np.testing.assert_array_equal(cols[1], x[1, :, 2:4, 1:3].reshape(-1))


def test_gemm_and_matmul_views_match_ort() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    wt, c = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((1, 4)).astype(np.float32)
    gemm = helper.make_node("Gemm", ["x", "w", "c"], ["y"], "fc", transB=1, alpha=0.5, beta=2.0)
    y = ort_run(make_model([gemm], {"x": [5, 6]}, ["y"], {"w": wt, "c": c}), {"x": x})[0]
    view = layer_view(as_gs(gemm), wt, c)
    W, b = view.to_matrix()
    np.testing.assert_allclose(view.features(x) @ W + b[:, None], view.targets(y, x), atol=1e-5)
    back_w, back_b = view.from_matrix(W, b)
    np.testing.assert_allclose(back_w, wt, rtol=1e-6)
    np.testing.assert_allclose(back_b, c.reshape(-1), rtol=1e-6)
    x3 = rng.standard_normal((2, 3, 6)).astype(np.float32)
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], "mm")
    w = wt.T.copy()
    y3 = ort_run(make_model([mm], {"x": [2, 3, 6]}, ["y"], {"w": w}), {"x": x3})[0]
    view = layer_view(as_gs(mm), w)
    assert not view.fit_bias and view.n_rows(x3) == 6
    np.testing.assert_allclose(view.features(x3) @ view.to_matrix()[0], view.targets(y3, x3), atol=1e-5)
    with pytest.raises(InputError, match="no bias"):
        layer_view(as_gs(mm), w, fit_bias=True)
    with pytest.raises(InputError, match="cannot reconstruct"):
        layer_view(as_gs(helper.make_node("Relu", ["x"], ["y"])), w)


def test_out_keep_selects_target_channels() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], "c")
    view = layer_view(as_gs(node), np.zeros((2, 3, 1, 1), np.float32), out_keep=[1, 3])
    x = np.zeros((1, 3, 2, 2), np.float32)
    y = np.arange(16, dtype=np.float32).reshape(1, 4, 2, 2)
    np.testing.assert_array_equal(view.targets(y, x)[0], y[0, [1, 3]].reshape(2, 4).T)
    with pytest.raises(InputError, match="channels"):
        layer_view(as_gs(node), np.zeros((3, 3, 1, 1), np.float32), out_keep=[1, 3]).targets(y, x)


# ---------------------------------------------------------------- driver


def test_refit_recovers_noisy_layers() -> None:
    teacher = small_net()
    w2 = weight(teacher, "conv2")
    noise = np.random.default_rng(8).standard_normal(w2.shape) * 0.5 * w2.std()
    student = with_weight(teacher, "w2", w2 + noise)
    layers = [LayerTarget("conv2", "c2"), LayerTarget("fc", "out")]
    fixed, stats = refit(student, teacher, layers, calib(teacher), batch_size=64, ridge=1e-6)
    onnx.checker.check_model(fixed, full_check=True)
    before, after = output_error(student, teacher), output_error(fixed, teacher)
    assert after < before / 20
    assert [s.node for s in stats] == ["conv2", "fc"]
    assert stats[0].error_after < stats[0].error_before / 20 and stats[0].samples == 256
    assert stats[0].positions == 256 * 16 and stats[0].solver == "cholesky"
    np.testing.assert_array_equal(weight(student, "conv2"), (w2 + noise).astype(np.float32))  # input untouched
    assert "w2" not in {i.name for i in fixed.graph.initializer}  # replaced, old one dropped


def redundant_net() -> onnx.ModelProto:
    """:func:`small_net` whose conv1 channels 4..7 nearly repeat channels 0..3 (scaled, plus noise):
    the kind of redundancy that makes channels prunable."""
    teacher = small_net()
    rng = np.random.default_rng(5)
    w1, b1 = weight(teacher, "conv1").copy(), weight(teacher, "conv1", 2).copy()
    w1[4:] = 1.5 * w1[:4] + 0.3 * w1.std() * rng.standard_normal(w1[4:].shape)
    b1[4:] = 1.5 * b1[:4]
    return with_weight(with_weight(teacher, "w1", w1), "b1", b1)


def test_refit_after_pruning_input_channels() -> None:
    teacher = redundant_net()
    dropped, kept = [4, 5, 6, 7], [0, 1, 2, 3]
    w2 = weight(teacher, "conv2").copy()
    w2[:, dropped] = 0
    student = with_weight(teacher, "w2", w2)
    layers = [LayerTarget("conv2", "c2", in_keep=kept), LayerTarget("fc", "out")]
    fixed, stats = refit(student, teacher, layers, calib(teacher), batch_size=64,
                                      max_positions=512, seed=3)
    assert output_error(fixed, teacher) < output_error(student, teacher) / 3
    new_w2 = weight(fixed, "conv2")
    assert np.all(new_w2[:, dropped] == 0) and not np.array_equal(new_w2[:, kept], w2[:, kept])
    assert stats[0].kept_features == 4 * 9 and stats[0].features == 8 * 9
    assert stats[0].positions == 4 * 512 and stats[1].positions == 256
    assert stats[0].error_after < stats[0].error_before / 3


def test_refit_of_unperturbed_layers_returns_the_weights() -> None:
    teacher = small_net()
    layers = [LayerTarget("conv1", "c1"), LayerTarget("conv2", "c2"), LayerTarget("fc", "out")]
    # float64 products: with float32 ones the residuals computed from the statistics carry ~1e-4 of
    # cancellation noise (the weights are still within 1e-4), too much for this exact-fit check
    fixed, stats = refit(teacher, teacher, layers, calib(teacher), batch_size=128, ridge=1e-10, precision="float64")
    for name in ("conv1", "conv2", "fc"):
        for index in (1, 2):
            old, new = weight(teacher, name, index), weight(fixed, name, index)
            assert np.linalg.norm(new - old) <= 1e-4 * np.linalg.norm(old), name
    assert all(s.error_before < 1e-5 and s.error_after < 1e-5 for s in stats)


def test_deterministic_and_grouping_does_not_change_the_result() -> None:
    teacher = small_net()
    rng = np.random.default_rng(9)
    student = with_weight(teacher, "w1", weight(teacher, "conv1") + 0.1 * rng.standard_normal((8, 3, 3, 3)))
    student = with_weight(student, "wg", weight(teacher, "fc") * 1.1)
    layers = [LayerTarget("conv1", "c1"), LayerTarget("conv2", "c2"), LayerTarget("fc", "out")]
    kw = {"batch_size": 64, "max_positions": 200, "seed": 5}
    a, _ = refit(student, teacher, layers, calib(teacher, 128), **kw)
    b, _ = refit(student, teacher, layers, calib(teacher, 128), **kw)
    c, _ = refit(student, teacher, layers, calib(teacher, 128), group_independent=False, **kw)
    assert a.SerializeToString() == b.SerializeToString() == c.SerializeToString()


def test_independent_layers_share_a_run(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(10)
    inits = {"wa": he(rng, 4, 3, 1, 1), "wb": he(rng, 5, 3, 3, 3), "wc": he(rng, 2, 4, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], "ca"),
        helper.make_node("Conv", ["x", "wb"], ["b"], "cb", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "wc"], ["c"], "cc"),
    ]
    teacher = make_model(nodes, {"x": ["N", 3, 8, 8]}, ["b", "c"], inits)
    student = with_weight(teacher, "wb", inits["wb"] * 0.5)
    layers = [LayerTarget("cc", "c"), LayerTarget("cb", "b"), LayerTarget("ca", "a")]
    with caplog.at_level("DEBUG", logger="onnxcompress.reconstruct.refit"):
        _fixed, stats = refit(student, teacher, layers, calib(teacher, 32), batch_size=16)
    runs = [r.getMessage() for r in caplog.records if "in one round" in r.getMessage()]
    assert runs == ["refitting ['ca', 'cb'] in one round", "refitting ['cc'] in one round"]
    assert [s.node for s in stats] == ["ca", "cb", "cc"] and stats[1].error_after < 1e-3


def test_shared_weight_is_copied_not_edited() -> None:
    rng = np.random.default_rng(11)
    w = he(rng, 3, 3, 3, 3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], "ca", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], "relu"),
        helper.make_node("Conv", ["r", "w"], ["y"], "cb", pads=[1, 1, 1, 1]),
    ]
    teacher = make_model(nodes, {"x": ["N", 3, 6, 6]}, ["y"], {"w": w})
    student = with_weight(teacher, "w", w * 0.8)
    fixed, stats = refit(student, teacher, [LayerTarget("cb", "y")], calib(teacher, 32))
    by_node = {n.name: n for n in fixed.graph.node}
    assert by_node["ca"].input[1] == "w" and by_node["cb"].input[1] != "w"
    np.testing.assert_array_equal(weight(fixed, "ca"), (w * 0.8).astype(np.float32))
    assert len(by_node["cb"].input) == 3 and stats[0].bias == by_node["cb"].input[2]  # bias added
    onnx.checker.check_model(fixed, full_check=True)


def test_pruned_outputs_and_matmul() -> None:
    rng = np.random.default_rng(12)
    w = he(rng, 6, 5)  # K=6, M=5
    teacher = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], "mm")], {"x": ["N", 4, 6]}, ["y"], {"w": w})
    keep = [0, 2, 3]
    student = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], "mm")], {"x": ["N", 4, 6]}, ["y"],
                         {"w": (w[:, keep] + 0.3).astype(np.float32)})
    fixed, stats = refit(student, teacher, [LayerTarget("mm", "y", out_keep=keep)],
                                      calib(teacher, 16), ridge=0.0)
    np.testing.assert_allclose(weight(fixed, "mm"), w[:, keep], atol=1e-5)
    assert stats[0].positions == 16 * 4 and len(fixed.graph.node[0].input) == 2


def test_gemm_without_bias_and_beta_zero_gets_a_bias() -> None:
    rng = np.random.default_rng(13)
    w, c = he(rng, 5, 4), rng.standard_normal(4).astype(np.float32)
    teacher = make_model([helper.make_node("Gemm", ["x", "w", "c"], ["y"], "fc")], {"x": ["N", 5]}, ["y"],
                         {"w": w, "c": c})
    student = make_model([helper.make_node("Gemm", ["x", "w", "c"], ["y"], "fc", beta=0.0)], {"x": ["N", 5]},
                         ["y"], {"w": w, "c": c})
    fixed, _ = refit(student, teacher, [LayerTarget("fc", "y")], calib(teacher, 64), ridge=0.0)
    assert output_like(fixed, teacher, {"x": [5]}) < 1e-5


def output_like(a: onnx.ModelProto, b: onnx.ModelProto, shapes: dict[str, list[int]]) -> float:
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal([8] + v).astype(np.float32) for k, v in shapes.items()}
    ya, yb = ort_run(a, feeds)[0], ort_run(b, feeds)[0]
    return float(np.linalg.norm(ya - yb) / np.linalg.norm(yb))


def test_unnamed_node_and_fixed_bias() -> None:
    rng = np.random.default_rng(14)
    w, b = he(rng, 4, 3, 3, 3), rng.standard_normal(4).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])
    teacher = make_model([node], {"x": ["N", 3, 6, 6]}, ["y"], {"w": w, "b": b})
    student = with_weight(teacher, "w", w + 0.2)
    fixed, stats = refit(student, teacher, [LayerTarget("y", "y", fit_bias=False)],
                                      calib(teacher, 16), ridge=0.0)
    assert fixed.graph.node[0].input[2] == "b" and stats[0].bias is None and stats[0].node == "y"
    new_w = {i.name: i for i in fixed.graph.initializer}[fixed.graph.node[0].input[1]]
    np.testing.assert_allclose(numpy_helper.to_array(new_w), w, atol=1e-5)


def test_driver_errors() -> None:
    teacher = small_net()
    data = calib(teacher, 4)
    with pytest.raises(InputError, match="no node"):
        refit(teacher, teacher, [LayerTarget("nope", "c2")], data)
    with pytest.raises(InputError, match="cannot reconstruct Relu"):
        refit(teacher, teacher, [LayerTarget("relu1", "r1")], data)
    with pytest.raises(InputError, match="teacher has no tensor"):
        refit(teacher, teacher, [LayerTarget("conv2", "missing")], data)
    with pytest.raises(InputError, match="listed twice"):
        refit(teacher, teacher, [LayerTarget("conv2", "c2"), LayerTarget("c2", "c2")], data)
    with pytest.raises(InputError, match="target shape"):
        refit(teacher, teacher, [LayerTarget("conv2", "c1", out_keep=[0, 1, 2, 3])], data)
    with pytest.raises(InputError, match="kept channels"):
        refit(teacher, teacher, [LayerTarget("conv2", "c2", in_keep=[8])], data)


def test_matmul_on_token_rows_refits_the_bias_of_its_add():
    """``[N, S, 12] @ W + b`` (a transformer linear layer): rows are N·S tokens; with ``fit_bias``
    the bias in the Add after the MatMul is solved and written there, the target is the Add's output."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"]),
             helper.make_node("Relu", ["y"], ["z"])]
    w, b = rng.standard_normal((12, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    teacher = make_model(nodes, {"x": ["N", "S", 12]}, ["z"], {"w": w, "b": b})
    student = make_model(nodes, {"x": ["N", "S", 12]}, ["z"], {"w": 0.5 * w, "b": 0 * b})
    data = RandomSource(input_specs(teacher), count=8, seed=0, dims={"N": 2, "S": 5})
    graph, stats = reconstruct_layers(serde.to_graph(student), teacher, [LayerTarget("h", "y", fit_bias=True)], data)
    assert stats[0].error_after < 1e-3 < 0.1 < stats[0].error_before
    fixed = {t.name: t.values for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    assert np.allclose(fixed[stats[0].weight], w, atol=1e-2) and np.allclose(fixed[stats[0].bias], b, atol=1e-2)
    plain = make_model([nodes[0], helper.make_node("Relu", ["h"], ["z"])], {"x": ["N", "S", 12]}, ["z"], {"w": w})
    with pytest.raises(InputError, match="no bias input"):
        reconstruct_layers(serde.to_graph(plain), plain, [LayerTarget("h", "h", fit_bias=True)], data)
