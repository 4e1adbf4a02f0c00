"""prune_channels' recovery options: per-layer refit report, refit after every round (refit_steps)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxcompress.core import proto, serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import PassContext
from onnxcompress.passes.prune_channels import activation_after
from onnxcompress.pipeline.manager import parse_spec
from onnxcompress.reconstruct.layerview import layer_view
from onnxcompress.runtime.data import RandomSource, input_specs
from tests.helpers.builders import make_model, node
from tests.helpers.pruning import bn, bn_node
from tests.helpers.runs import ort_run, run_passes
from tests.helpers.tensors import rand, random_feeds

X = {"x": ["N", 3, 8, 8]}


def chain(c1: int = 32, c2: int = 16, seed: int = 0) -> onnx.ModelProto:
    """conv(c1) -> BN -> relu -> conv(c2) -> relu -> conv(4): two prunable groups."""
    rng = np.random.default_rng(seed)
    nodes = [node("Conv", ["x", "w1"], "a", pads=[1, 1, 1, 1]), bn_node("a", "an", "bn1"), node("Relu", ["an"], "ar"),
             node("Conv", ["ar", "w2", "b2"], "b"), node("Relu", ["b"], "br"), node("Conv", ["br", "w3", "b3"], "y")]
    params = {"w1": rand(rng, c1, 3, 3, 3, scale=0.4), "w2": rand(rng, c2, c1, 1, 1, scale=0.4),
              "b2": rand(rng, c2, scale=0.4), "w3": rand(rng, 4, c2, 1, 1, scale=0.4),
              "b3": rand(rng, 4, scale=0.4), **bn(rng, "bn1", c1)}
    return make_model(nodes, X, ["y"], params)


def ctx(model: onnx.ModelProto, count: int = 32) -> PassContext:
    return PassContext(calib=RandomSource(input_specs(model), count=count, seed=0))


def output_error(model: onnx.ModelProto, new: onnx.ModelProto) -> float:
    feeds = random_feeds(model, seed=7, dim=16)
    ref, got = ort_run(model, feeds)[0], ort_run(new, feeds)[0]
    return float(np.sum((got - ref) ** 2) / np.sum(ref**2))


def test_per_layer_refit_report():
    model = chain()
    _, records = run_passes(model, "prune_channels:ratio=0.5:round_to=1", ctx(model))
    stats = records[0].result.stats
    rows = stats["reconstruct_per_layer"]
    assert [r["node"] for r in rows] == ["b", "y"] and len(rows) == stats["reconstructed_layers"]
    assert all(r["error_after"] < r["error_before"] for r in rows)
    assert rows[0]["features"] == 16 + 1 and rows[1]["features"] == 8 + 1  # kept inputs (1x1 convs) and bias
    assert all(r["rows"] >= r["features"] for r in rows)
    assert np.mean([r["error_before"] for r in rows]) == pytest.approx(stats["reconstruct_error_before"], abs=1e-5)


@pytest.mark.parametrize("spec", ["prune_channels:refit_steps=true",
                                  "prune_channels:steps=2:refit_steps=true:reconstruct=false"])
def test_refit_steps_needs_rounds_and_reconstruction(spec):
    with pytest.raises(InputError, match="refit_steps=true needs steps >= 2 and reconstruct=true"):
        parse_spec(spec)


def test_refit_steps_parses():
    assert parse_spec("prune_channels:steps=3:refit_steps=true")[0].opts["refit_steps"] is True
    assert parse_spec("prune_channels:steps=3")[0].opts["refit_steps"] is False


def test_refit_steps_refits_between_rounds():
    """Same channel budget as one refit at the end; the refitted graph is what later rounds prune, the
    result is a valid model whose output error is no worse than without reconstruction."""
    model = chain()
    spec = "prune_channels:ratio=0.5:round_to=1:steps=2"
    end, r_end = run_passes(model, spec, ctx(model))
    each, r_each = run_passes(model, spec + ":refit_steps=true", ctx(model))
    bare, _ = run_passes(model, spec + ":reconstruct=false", ctx(model))
    onnx.checker.check_model(each, full_check=True)
    s_end, s_each = r_end[0].result.stats, r_each[0].result.stats
    assert s_each["channels_after"] == s_end["channels_after"]
    assert s_each["reconstructed_layers"] == 2
    assert each.SerializeToString() != end.SerializeToString()
    assert output_error(model, each) < output_error(model, bare)


def test_refit_steps_is_deterministic():
    model = chain()
    spec = "prune_channels:macs=0.5:round_to=1:steps=2:refit_steps=true"
    a, _ = run_passes(model, spec, ctx(model))
    b, _ = run_passes(model, spec, ctx(model))
    assert a.SerializeToString() == b.SerializeToString()


# ---- se=stats: the readers of a pooled vector keep their weights, only the bias is refitted

def se_block(seed: int = 0, c: int = 16) -> onnx.ModelProto:
    """conv(c) -> relu -> SE (GAP -> conv s1 -> relu -> conv s2 -> HardSigmoid) -> Mul -> conv(4)."""
    rng = np.random.default_rng(seed)
    nodes = [node("Conv", ["x", "w1", "b1"], "a", pads=[1, 1, 1, 1]), node("Relu", ["a"], "ar"),
             node("GlobalAveragePool", ["ar"], "p"), node("Conv", ["p", "ws1", "bs1"], "s1"), node("Relu", ["s1"], "s1r"),
             node("Conv", ["s1r", "ws2", "bs2"], "s2"), node("HardSigmoid", ["s2"], "g"), node("Mul", ["ar", "g"], "m"),
             node("Conv", ["m", "w3", "b3"], "y")]
    params = {"w1": rand(rng, c, 3, 3, 3, scale=0.4), "b1": rand(rng, c, scale=0.2),
              "ws1": rand(rng, 4, c, 1, 1, scale=0.5), "bs1": rand(rng, 4, scale=0.2),
              "ws2": rand(rng, c, 4, 1, 1, scale=0.5), "bs2": rand(rng, c, scale=0.2),
              "w3": rand(rng, 4, c, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.2)}
    return make_model(nodes, X, ["y"], params)


def weights(model: onnx.ModelProto, conv_out: str) -> list[np.ndarray]:
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.output[0] == conv_out)
    return [init[name] for name in conv.input[1:]]


def test_se_option_parses():
    assert parse_spec("prune_channels")[0].opts["se"] == "refit"
    assert parse_spec("prune_channels:se=stats")[0].opts["se"] == "stats"
    with pytest.raises(InputError, match="option se="):
        parse_spec("prune_channels:se=keep")


def test_se_stats_keeps_the_pooled_readers_weights_and_matches_the_mean():
    model = se_block()
    spec = "prune_channels:ratio=0.5:round_to=8"  # the SE's own 4 channels stay (fewer than round_to)
    new, records = run_passes(model, spec + ":se=stats", ctx(model, 16))
    refit, _ = run_passes(model, spec, ctx(model, 16))
    onnx.checker.check_model(new, full_check=True)
    w_orig, b_orig = weights(model, "s1")
    (w_new, b_new), (w_refit, _) = weights(new, "s1"), weights(refit, "s1")
    kept = [i for i in range(16) if any(np.allclose(weights(new, "a")[0][j], weights(model, "a")[0][i])
                                        for j in range(8))]
    assert len(kept) == 8 and w_new.shape == (4, 8, 1, 1)
    np.testing.assert_array_equal(w_new, w_orig[:, kept])  # the original's weights on the kept channels
    assert not np.allclose(w_refit, w_orig[:, kept]) and not np.allclose(b_new, b_orig)
    # the bias makes the mean of s1 over the calibration samples equal the original's
    feeds = next(iter(ctx(model, 16).calib.batches(16))).feeds
    means = [ort_run(proto.with_outputs(m, ["s1"]), feeds)[-1].mean(axis=(0, 2, 3)) for m in (model, new)]
    np.testing.assert_allclose(means[1], means[0], rtol=1e-4, atol=1e-5)
    rows = {r["node"]: r for r in records[0].result.stats["reconstruct_per_layer"]}
    assert rows["s1"]["error_after"] <= rows["s1"]["error_before"]


def test_se_stats_without_a_pool_changes_nothing():
    model = chain()
    spec = "prune_channels:ratio=0.5:round_to=1"
    a, _ = run_passes(model, spec, ctx(model))
    b, _ = run_passes(model, spec + ":se=stats", ctx(model))
    assert a.SerializeToString() == b.SerializeToString()


# ---- sensitivity=refit

def test_sensitivity_option_parses():
    assert parse_spec("prune_channels:macs=0.5")[0].opts["sensitivity"] == "masked"
    with pytest.raises(InputError, match="option sensitivity="):
        parse_spec("prune_channels:macs=0.5:sensitivity=exact")


def test_refit_sensitivity_is_at_most_the_masked_one():
    """Each branch reaches the output through one 1x1 conv, refitted to its own output on the same
    samples: the least-squares error cannot exceed the zeroed filters' (a feasible point)."""
    from tests.passes.test_prune_budget import two_groups

    model = two_groups(a_matters=True)
    plans = {}
    for sens in ("masked", "refit"):
        _, records = run_passes(model, f"prune_channels:macs=0.6:round_to=1:dry_run=true:sensitivity={sens}",
                                ctx(model, 16))
        stats = records[0].result.stats
        assert stats["sensitivity"] == {"masked": "measured", "refit": "measured_refit"}[sens]
        plans[sens] = {r["group"]: r for r in stats["plan"]}
    errors = [(plans["refit"][g]["predicted_error"], plans["masked"][g]["predicted_error"]) for g in plans["masked"]]
    assert all(r <= m * (1 + 1e-3) + 1e-9 for r, m in errors)
    assert any(r < 0.9 * m for r, m in errors if m > 0)


def test_refit_sensitivity_prunes_a_valid_model_to_the_budget():
    from tests.passes.test_prune_budget import two_groups

    model = two_groups(a_matters=False)
    new, records = run_passes(model, "prune_channels:macs=0.6:round_to=1:sensitivity=refit", ctx(model, 16))
    onnx.checker.check_model(new, full_check=True)
    assert abs(records[0].result.stats["macs_ratio"] - 0.6) <= 0.02


# ---- post_act=true: targets in the flat region of a following ReLU / hard-swish are relaxed

def hardswish_chain(three: float = 3.0, low: float = 0.0) -> gs.Graph:
    """x -> Conv -> (Paddle hard-swish: x * Clip(x + three, low, 6) / 6)."""
    nodes = [node("Conv", ["x", "w"], "c"), node("Add", ["c", "three"], "a"), node("Clip", ["a", "lo", "hi"], "k"),
             node("Mul", ["c", "k"], "m"), node("Div", ["m", "six"], "y")]
    params = {"w": np.ones((4, 3, 1, 1)), "three": np.float32(three), "lo": np.float32(low), "hi": np.float32(6),
              "six": np.float32(6)}
    return serde.to_graph(make_model(nodes, {"x": [1, 3, 4, 4]}, ["y"], params))


def conv_output(graph: gs.Graph) -> gs.Tensor:
    return next(n for n in graph.nodes if n.op == "Conv").outputs[0]


@pytest.mark.parametrize("op, want", [("Relu", "relu"), ("HardSwish", "hardswish"), ("Sigmoid", None)])
def test_activation_after_single_ops(op, want):
    graph = serde.to_graph(make_model([node("Conv", ["x", "w"], "c"), node(op, ["c"], "y")], {"x": [1, 3, 4, 4]},
                                      ["y"], {"w": np.ones((4, 3, 1, 1))}))
    assert activation_after(conv_output(graph)) == want


@pytest.mark.parametrize("three, low, want", [(3.0, 0.0, "hardswish"), (2.0, 0.0, None), (3.0, -1.0, None)])
def test_activation_after_paddle_hardswish(three, low, want):
    assert activation_after(conv_output(hardswish_chain(three, low))) == want


def test_relax_keeps_active_targets_and_clips_flat_ones():
    graph = hardswish_chain()
    conv = next(n for n in graph.nodes if n.op == "Conv")
    view = layer_view(conv, np.ones((4, 3, 1, 1), np.float32), np.zeros(4, np.float32), fit_bias=True,
                      activation="relu")
    X = np.array([[[1.0, 0, 0], [-2, 0, 0], [-0.5, 0, 0], [2, 0, 0]]])  # z = X @ 1 = x0 for every target
    Y = np.array([[[0.5] * 4, [-1] * 4, [-1] * 4, [-3] * 4]])
    got = view.relax(X, Y)
    np.testing.assert_allclose(got[0, :, 0], [0.5, -1.0, -0.5, 0.0])  # active kept; flat: clip(z, y, 0)
    plain = layer_view(conv, np.ones((4, 3, 1, 1), np.float32), np.zeros(4, np.float32), fit_bias=True)
    np.testing.assert_array_equal(plain.relax(X, Y), Y)
    with pytest.raises(InputError, match="activation 'gelu'"):
        layer_view(conv, np.ones((4, 3, 1, 1), np.float32), activation="gelu")


def test_post_act_option_and_equivalence_without_activations():
    assert parse_spec("prune_channels")[0].opts["post_act"] is False
    with pytest.raises(InputError, match="option post_act="):
        parse_spec("prune_channels:post_act=maybe")
    model = two_layers_linear()
    spec = "prune_channels:ratio=0.5:round_to=1"
    a, _ = run_passes(model, spec, ctx(model))
    b, _ = run_passes(model, spec + ":post_act=true", ctx(model))
    assert a.SerializeToString() == b.SerializeToString()


def two_layers_linear(seed: int = 0) -> onnx.ModelProto:
    """conv(16) -> relu -> conv(8): the refitted conv's output is a graph output, no activation after it."""
    rng = np.random.default_rng(seed)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"), node("Conv", ["ar", "w2", "b2"], "y")]
    return make_model(nodes, X, ["y"], {"w1": rand(rng, 16, 3, 1, 1, scale=0.4), "b1": rand(rng, 16, scale=0.2),
                                        "w2": rand(rng, 8, 16, 1, 1, scale=0.4), "b2": rand(rng, 8, scale=0.2)})


def test_post_act_lowers_the_error_after_the_activation():
    """``b`` feeds a ReLU: relaxing its flat targets leaves the post-ReLU error on the calibration data no
    larger than the plain refit's (the relaxed problem's solution only frees the flat region)."""
    model = chain()
    spec = "prune_channels:ratio=0.5:round_to=1:exclude=br"  # b's 16 outputs stay, its inputs go
    plain, _ = run_passes(model, spec, ctx(model))
    post, records = run_passes(model, spec + ":post_act=true", ctx(model))
    onnx.checker.check_model(post, full_check=True)
    assert plain.SerializeToString() != post.SerializeToString()
    feeds = next(iter(ctx(model).calib.batches(32))).feeds
    ref = ort_run(proto.with_outputs(model, ["br"]), feeds)[-1]
    err = [float(np.sum((ort_run(proto.with_outputs(m, ["br"]), feeds)[-1] - ref) ** 2)) for m in (plain, post)]
    assert err[1] <= err[0] * 1.01


# ---- refit_holdout: each refit's ridge chosen on held-out rows, a refit that does not beat the pruned weights rejected

def wide(seed: int = 0, c1: int = 64) -> onnx.ModelProto:
    """conv(c1) -> relu -> 3x3 conv(16) -> relu -> conv(4): the 3x3 conv's refit has c1/2 * 9 + 1 features,
    more than the rows of a few 8x8 samples (6x6 positions each)."""
    rng = np.random.default_rng(seed)
    nodes = [node("Conv", ["x", "w1", "b1"], "a", pads=[1, 1, 1, 1]), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "w2", "b2"], "b"), node("Relu", ["b"], "br"), node("Conv", ["br", "w3", "b3"], "y")]
    params = {"w1": rand(rng, c1, 3, 3, 3, scale=0.4), "b1": rand(rng, c1, scale=0.2),
              "w2": rand(rng, 16, c1, 3, 3, scale=0.2), "b2": rand(rng, 16, scale=0.2),
              "w3": rand(rng, 4, 16, 1, 1, scale=0.4), "b3": rand(rng, 4, scale=0.2)}
    return make_model(nodes, X, ["y"], params)


WIDE_SPEC = "prune_channels:ratio=0.5:round_to=1"


def test_refit_holdout_parses():
    assert parse_spec("prune_channels")[0].opts["refit_holdout"] == 0.2
    assert parse_spec("prune_channels:refit_holdout=0")[0].opts["refit_holdout"] == 0.0
    for bad in ("1", "-0.1", "x"):
        with pytest.raises(InputError, match="refit_holdout"):
            parse_spec(f"prune_channels:refit_holdout={bad}")


def test_refit_holdout_defaults_to_a_fifth_and_zero_turns_it_off():
    model = wide()
    a, ra = run_passes(model, WIDE_SPEC, ctx(model, 4))
    b, _ = run_passes(model, WIDE_SPEC + ":refit_holdout=0.2", ctx(model, 4))
    c, rc = run_passes(model, WIDE_SPEC + ":refit_holdout=0", ctx(model, 4))
    assert a.SerializeToString() == b.SerializeToString()
    assert all("ridge" in r for r in ra[0].result.stats["reconstruct_per_layer"])
    assert a.SerializeToString() != c.SerializeToString()
    assert "reconstruct_rejected" not in rc[0].result.stats
    assert all("ridge" not in r for r in rc[0].result.stats["reconstruct_per_layer"])


def test_refit_holdout_regularises_an_underdetermined_refit():
    """4 samples give 144 rows for the 3x3 conv's 289 features: the plain refit fits them; held-out rows
    choose a larger ridge, and the pruned model is closer to the original on other inputs."""
    model = wide()
    plain, _ = run_passes(model, WIDE_SPEC + ":refit_holdout=0", ctx(model, 4))
    held, records = run_passes(model, WIDE_SPEC + ":refit_holdout=0.25", ctx(model, 4))
    onnx.checker.check_model(held, full_check=True)
    stats = records[0].result.stats
    rows = {r["node"]: r for r in stats["reconstruct_per_layer"]}
    assert rows["b"]["rows"] < rows["b"]["features"] and rows["b"]["ridge"] > 1e-4
    assert stats["reconstruct_rejected"] == 0 and not rows["b"]["rejected"]
    assert rows["b"]["holdout_after"] < rows["b"]["holdout_before"]
    assert output_error(model, held) < 0.95 * output_error(model, plain)


def test_refit_holdout_rejected_refit_keeps_the_pruned_weights():
    """With 2 samples no ridge beats the pruned weights of ``b`` on its held-out rows: ``b`` keeps the
    weights plain pruning gives it (bias compensation included), ``y`` is still refitted."""
    model = wide()
    held, records = run_passes(model, WIDE_SPEC + ":refit_holdout=0.25", ctx(model, 2))
    bare, _ = run_passes(model, WIDE_SPEC + ":reconstruct=false", ctx(model, 2))
    stats = records[0].result.stats
    rows = {r["node"]: r for r in stats["reconstruct_per_layer"]}
    assert rows["b"]["rejected"] and not rows["y"]["rejected"] and stats["reconstruct_rejected"] == 1
    for got, want in zip(weights(held, "b"), weights(bare, "b"), strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(weights(held, "y")[0], weights(bare, "y")[0])
    assert output_error(model, held) < output_error(model, bare)


def test_refit_holdout_is_deterministic():
    model = wide()
    spec = WIDE_SPEC + ":refit_holdout=0.25"
    a, _ = run_passes(model, spec, ctx(model, 4))
    b, _ = run_passes(model, spec, ctx(model, 4))
    assert a.SerializeToString() == b.SerializeToString()
