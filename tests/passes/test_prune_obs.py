"""prune_channels:criterion=obs (greedy OBS channel selection from the dense readers' Gram matrices)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxcompress.core import proto, serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import PassContext
from onnxcompress.pipeline.manager import parse_spec
from onnxcompress.pruning.dependency import analyze
from onnxcompress.pruning.importance import score_groups
from onnxcompress.pruning.obs import ObsOptions, obs_scores
from onnxcompress.pruning.select import Budget, plan_removal
from onnxcompress.reconstruct.layerview import layer_view
from onnxcompress.runtime.data import RandomSource, input_specs
from onnxcompress.runtime.session import make_session
from tests.helpers.builders import make_model, node
from tests.helpers.graphs import weight_shapes
from tests.helpers.pruning import build, prune, zeroed
from tests.helpers.runs import max_err, rel_err, run_passes
from tests.helpers.tensors import rand, random_feeds

X = {"x": [1, 8, 8, 8]}
OBS = "prune_channels:round_to=1:criterion=obs"


def calib(model: onnx.ModelProto, count: int = 16, seed: int = 0) -> RandomSource:
    return RandomSource(input_specs(model), count=count, seed=seed)


def ctx(model: onnx.ModelProto, count: int = 16) -> PassContext:
    return PassContext(calib=calib(model, count))


@pytest.mark.parametrize("spec, match", [
    ("prune_channels:criterion=optimal", "option criterion="),
    ("prune_channels:obs_features=512", "obs_features/obs_damp apply to criterion=obs only"),
    ("prune_channels:criterion=l1:obs_damp=0.1", "apply to criterion=obs only"),
    ("prune_channels:criterion=obs:obs_features=0", "obs_features"),
    ("prune_channels:criterion=obs:obs_damp=0", "obs_damp"),
])
def test_parse_errors(spec, match):
    with pytest.raises(InputError, match=match):
        parse_spec(spec)


def test_needs_calibration():
    spec = parse_spec("prune_channels:criterion=obs")[0]
    assert spec.needs_calibration()
    with pytest.raises(InputError, match="criterion=obs needs calibration data"):
        run_passes(build("conv_chain"), "prune_channels:criterion=obs")


def duplicated_channels(seed: int = 0) -> onnx.ModelProto:
    """``y = conv2(relu(conv1(x)))`` with 16 channels: 0..7 small filters (low L1) that carry
    distinct information, 8..11 large ones, 12..15 exact copies of 8..11. After a refit, removing a
    copy costs nothing (its twin takes its weights); removing a small one loses its information."""
    rng = np.random.default_rng(seed)
    w1 = rand(rng, 16, 8, 3, 3, scale=0.4)
    b1 = rand(rng, 16, scale=0.1)
    w1[:8] *= 0.05
    b1[:8] *= 0.05
    w1[12:], b1[12:] = w1[8:12], b1[8:12]
    w2 = rand(rng, 6, 16, 1, 1, scale=0.4)
    w2[:, :8] *= 20.0  # the small channels matter downstream
    nodes = [node("Conv", ["x", "w1", "b1"], "a", pads=[1, 1, 1, 1]), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "w2", "b2"], "y")]
    return make_model(nodes, X, ["y"], {"w1": w1, "b1": b1, "w2": w2, "b2": rand(rng, 6, scale=0.1)})


def test_obs_removes_the_redundant_channels_l1_the_informative_ones():
    model = duplicated_channels()
    feeds = random_feeds(model, seed=7)
    errors, kept = {}, {}
    for crit in ("l1", "obs"):
        new, _ = run_passes(model, f"prune_channels:ratio=0.25:round_to=1:criterion={crit}", ctx(model, 32))
        errors[crit] = rel_err(model, new, feeds)
        w = next(i for i in new.graph.initializer if i.name.startswith("w1"))
        kept[crit] = onnx.numpy_helper.to_array(w)
    w1 = next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "w1")
    small = {tuple(np.round(w1[c].ravel()[:3], 6)) for c in range(8)}
    assert sum(tuple(np.round(f.ravel()[:3], 6)) in small for f in kept["l1"]) == 4  # l1 dropped 4 small ones
    assert sum(tuple(np.round(f.ravel()[:3], 6)) in small for f in kept["obs"]) == 8  # obs kept them all
    assert errors["obs"] < 0.02 and errors["l1"] > 10 * errors["obs"], errors


def _reader_rows(model: onnx.ModelProto, source: RandomSource) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """conv2's im2col rows on ``source`` (all rows), its weight matrix ``[F, T]`` and bias."""
    graph = serde.to_graph(model)
    conv2 = next(n for n in graph.nodes if n.outputs[0].name == "y")
    view = layer_view(conv2, conv2.inputs[1].values, conv2.inputs[2].values)
    session = make_session(proto.with_outputs(model, ["ar"]))
    rows = [view.features(session.run(["ar"], b.feeds)[0])[0] for b in source.batches(32)]
    w, b = view.to_matrix()
    return np.concatenate(rows), w[0], b[0]


def _refit_error(X: np.ndarray, Y: np.ndarray, keep: np.ndarray) -> float:
    """Least squares ``‖X_keep·W + b − Y‖²`` (bias free), by brute force."""
    A = np.concatenate([X[:, keep], np.ones((len(X), 1))], axis=1)
    coef = np.linalg.lstsq(A, Y, rcond=None)[0]
    return float(np.sum((A @ coef - Y) ** 2))


def tiny_conv(seed: int = 1) -> onnx.ModelProto:
    """conv1 (6 channels, padded 3x3) -> relu -> conv2 (3x3, 4 outputs): 54 features, 16·36 rows."""
    rng = np.random.default_rng(seed)
    nodes = [node("Conv", ["x", "w1", "b1"], "a", pads=[1, 1, 1, 1]), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "w2", "b2"], "y")]
    return make_model(nodes, X, ["y"], {"w1": rand(rng, 6, 8, 3, 3, scale=0.4), "b1": rand(rng, 6, scale=0.2),
                                        "w2": rand(rng, 4, 6, 3, 3, scale=0.4), "b2": rand(rng, 4, scale=0.1)})


def test_delta_e_matches_brute_force_refits():
    """The first two greedy costs (scores are cumulative, divided by the reader's output energy)
    equal the brute-force refit errors: the cheapest single channel, then the cheapest second one
    given the first (the OBS downdate of ``W`` and ``H⁻¹``)."""
    model, source = tiny_conv(), calib(tiny_conv(), 16)
    X, W, b = _reader_rows(model, source)
    Y = X @ W + b
    energy = float(np.sum((Y - Y.mean(axis=0)) ** 2))
    blocks = [np.arange(c * 9, c * 9 + 9) for c in range(6)]
    everything = np.arange(54)
    single = [_refit_error(X, Y, np.setdiff1d(everything, blocks[c])) for c in range(6)]
    first = int(np.argmin(single))
    pair = [_refit_error(X, Y, np.setdiff1d(everything, np.concatenate([blocks[first], blocks[c]])))
            if c != first else np.inf for c in range(6)]
    second = int(np.argmin(pair))
    analysis = analyze(serde.to_graph(model))
    group = next(g for g in analysis.groups if g.frozen is None)
    report = obs_scores(analysis, [group], source, ObsOptions(damp=1e-9, max_rows=10**6))
    scores = report.values[group.index]
    order = np.argsort(scores)
    assert order[:2].tolist() == [first, second]
    np.testing.assert_allclose(scores[first], single[first] / energy, rtol=2e-3)
    np.testing.assert_allclose(scores[second], pair[second] / energy, rtol=2e-3)
    assert report.readers == 1 and report.features_max == 54 and report.rows_min == 16 * 36


def test_feature_cap_subsamples_kernel_positions():
    model, source = tiny_conv(), calib(tiny_conv(), 8)
    analysis = analyze(serde.to_graph(model))
    group = next(g for g in analysis.groups if g.frozen is None)
    report = obs_scores(analysis, [group], source, ObsOptions(max_features=20))
    assert report.subsampled == 1 and report.features_max == 18  # 3 of the 9 positions of each of 6 channels
    capped = obs_scores(analysis, [group], source, ObsOptions(max_features=5))
    assert capped.fallbacks == {group.name: "too_many_features"} and not capped.values


def test_depthwise_on_the_way_is_scored_at_the_dense_reader_grouped_falls_back():
    dw = build("depthwise_m2")
    _, records = run_passes(dw, OBS + ":ratio=0.4", ctx(dw))
    stats = records[0].result.stats
    assert stats["criterion_obs"] == 1 and stats["obs_fallback"] == 0
    grouped = build("grouped_g2")
    obs, records = run_passes(grouped, OBS + ":ratio=0.4:reconstruct=false", ctx(grouped))
    stats = records[0].result.stats
    assert stats["obs_fallback"] == stats["obs_fallback_grouped_conv"] == 2 and stats["criterion_obs"] == 1
    assert stats["criterion_bn_scale"] == stats["criterion_l1"] == 1  # the default criterion, as auto scores them
    auto, _ = run_passes(grouped, "prune_channels:round_to=1:ratio=0.4:reconstruct=false", ctx(grouped))
    shapes_obs, shapes_auto = weight_shapes(obs), weight_shapes(auto)
    assert shapes_obs["g"] == shapes_auto["g"]  # the grouped conv's blocks: the same default choice
    transpose = build("conv_transpose")
    _, records = run_passes(transpose, OBS + ":ratio=0.4", ctx(transpose))
    assert records[0].result.stats["obs_fallback_reader_not_dense"] == 1


@pytest.mark.parametrize("name", ["conv_chain", "residual_projection", "concat_cascade", "depthwise_m2",
                                  "flatten_gemm", "se_block", "matmul_chain", "unet_resize_to_skip"])
def test_pruned_equals_masked_original(name):
    model = build(name)
    graph = serde.to_graph(model)
    analysis = analyze(graph)
    scores = score_groups(analysis, "obs", calib=calib(model))
    assert scores.used.get("obs", 0) >= 1
    remove = plan_removal(analysis, scores.values, Budget(0.4, round_to=1)).remove
    assert remove
    pruned, *_ = prune(model, remove)
    err, scale = max_err(zeroed(model, remove), pruned, random_feeds(model, seed=3, dim=2))
    assert err <= 1e-5 * max(1.0, scale)


def test_deterministic_and_the_input_model_untouched():
    model = build("residual_projection")
    before = model.SerializeToString()
    spec = OBS + ":ratio=0.4"
    one, _ = run_passes(model, spec, ctx(model))
    two, _ = run_passes(model, spec, ctx(model))
    assert one.SerializeToString() == two.SerializeToString()
    assert model.SerializeToString() == before


def shared_weight_model(seed: int = 0) -> onnx.ModelProto:
    """Two convs read ``ar`` with the same initializer ``w2`` (a shared weight)."""
    rng = np.random.default_rng(seed)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "w2"], "p"), node("Conv", ["ar", "w2"], "q"), node("Add", ["p", "q"], "s"),
             node("Relu", ["s"], "sr"), node("Conv", ["sr", "w3", "b3"], "y")]
    return make_model(nodes, X, ["y"], {"w1": rand(rng, 8, 8, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.1),
                                        "w2": rand(rng, 12, 8, 1, 1, scale=0.4),
                                        "w3": rand(rng, 4, 12, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.1)})


def test_shared_initializer_untouched():
    """The group read through a shared weight falls back (not a dense reader of its own); the
    pass works on copies, so the given model's initializer keeps its values."""
    model = shared_weight_model()
    before = model.SerializeToString()
    new, records = run_passes(model, OBS + ":ratio=0.4", ctx(model))
    stats = records[0].result.stats
    assert stats["obs_fallback_reader_not_dense"] == 1 and stats["criterion_obs"] == 1
    assert stats["channels_removed"] > 0 and not any(i.name == "w2" for i in new.graph.initializer)
    assert model.SerializeToString() == before


def test_cooperates_with_the_budget():
    """round_to, allocate=sensitivity and steps decide the counts; obs the channels."""
    model = build("residual_projection")
    new, _ = run_passes(model, "prune_channels:ratio=0.5:round_to=4:criterion=obs", ctx(model))
    assert all(s[0] % 4 == 0 for k, s in weight_shapes(new).items() if k in ("w1", "w2", "w3"))
    for extra in (":allocate=sensitivity", ":steps=2", ":scope=global"):
        _, records = run_passes(model, OBS + ":ratio=0.4" + extra, ctx(model))
        stats = records[0].result.stats
        assert stats["channels_removed"] > 0 and stats["criterion_obs"] >= 1
