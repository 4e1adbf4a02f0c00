"""The prune_channels pass: options, stats, declines, determinism, checker, MACs, fixture models."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcompress.core.errors import InputError, PassFailed
from onnxcompress.core.metrics import model_metrics
from onnxcompress.core.pass_api import Numerics, PassContext
from onnxcompress.passes.prune_channels import PruneChannels
from onnxcompress.pipeline.manager import get_pass, parse_spec
from onnxcompress.runtime.data import RandomSource, input_specs
from tests.helpers.builders import make_model, node
from tests.helpers.graphs import weight_shapes
from tests.helpers.pruning import CASES, bn, bn_node
from tests.helpers.runs import ort_run, run_passes
from tests.helpers.tensors import rand, random_feeds

MODELS = Path(__file__).resolve().parents[2] / "models"
X = {"x": ["N", 3, 8, 8]}


def chain(c1: int = 64, c2: int = 32, seed: int = 0, bn_gamma: np.ndarray | None = None) -> onnx.ModelProto:
    """conv(c1) -> BN -> relu -> conv(c2) -> relu -> conv(4)."""
    rng = np.random.default_rng(seed)
    nodes = [node("Conv", ["x", "w1"], "a"), bn_node("a", "an", "bn1"), node("Relu", ["an"], "ar"),
             node("Conv", ["ar", "w2", "b2"], "b"), node("Relu", ["b"], "br"), node("Conv", ["br", "w3", "b3"], "y")]
    params = {"w1": rand(rng, c1, 3, 3, 3, scale=0.4), "w2": rand(rng, c2, c1, 1, 1, scale=0.4),
              "b2": rand(rng, c2, scale=0.4), "w3": rand(rng, 4, c2, 1, 1, scale=0.4),
              "b3": rand(rng, 4, scale=0.4), **bn(rng, "bn1", c1)}
    if bn_gamma is not None:
        params["bn1_g"] = bn_gamma.astype(np.float32)
    return make_model(nodes, X, ["y"], params)


def prune(model: onnx.ModelProto, spec: str = "prune_channels", ctx: PassContext | None = None):
    new, records = run_passes(model, spec, ctx)
    onnx.checker.check_model(new, full_check=True)
    feeds = random_feeds(model, dim=2)
    outs = ort_run(new, feeds)
    assert [o.shape for o in outs] == [o.shape for o in ort_run(model, feeds)]
    return new, records[0].result


def test_registered_with_options():
    cls = get_pass("prune_channels")
    assert cls is PruneChannels and cls.numerics is Numerics.LOSSY
    assert set(cls.options) == {"ratio", "criterion", "scope", "max_group_ratio", "round_to", "exclude",
                                "protect_io", "steps", "reconstruct", "seed", "macs", "sens_samples", "dry_run",
                                "refit_steps", "se", "sensitivity", "post_act", "allocate", "refit_holdout",
                                "obs_damp", "obs_features"}
    for bad in ("ratio=1.5", "round_to=0", "steps=0", "criterion=random", "max_group_ratio=0", "macs=0",
                "macs=1.5", "sens_samples=0"):
        with pytest.raises(InputError, match=f"^pass prune_channels: option {bad.split('=')[0]}="):
            parse_spec(f"prune_channels:{bad}")


def test_ratio_is_respected_within_rounding():
    new, result = prune(chain(), "prune_channels:ratio=0.3:round_to=1")
    assert weight_shapes(new)["a"][0] == 64 - 19 and weight_shapes(new)["b"][0] == 32 - 10
    assert result.stats["groups_found"] == 3 and result.stats["groups_pruned"] == 2
    assert result.stats["channels_before"] == 100 and result.stats["channels_after"] == 100 - 29
    assert result.stats["groups_frozen_graph_output"] == 1 and result.modified


def test_round_to_keeps_multiples():
    new, result = prune(chain(), "prune_channels:ratio=0.3")  # round_to=8 by default
    shapes = weight_shapes(new)
    assert shapes["a"][0] == 48 and shapes["b"][0] == 24  # 44.8 -> 48, 22.4 -> 24
    new, result = prune(chain(64, 6), "prune_channels:ratio=0.5")
    assert weight_shapes(new)["b"][0] == 6 and result.stats["groups_skipped_small"] == 1
    assert ("b", "group_smaller_than_round_to") in result.where_codes()


def test_never_a_zero_channel_layer_and_max_group_ratio():
    new, _ = prune(chain(8, 4), "prune_channels:ratio=0.99:round_to=1:max_group_ratio=1.0")
    assert weight_shapes(new)["a"][0] == 1 and weight_shapes(new)["b"][0] == 1
    new, _ = prune(chain(), "prune_channels:ratio=0.8:round_to=1:max_group_ratio=0.5")
    assert weight_shapes(new)["a"][0] == 32 and weight_shapes(new)["b"][0] == 16


def test_exclude_freezes_the_named_groups():
    new, result = prune(chain(), "prune_channels:round_to=1:exclude=b")
    assert weight_shapes(new)["b"] == (32, 64, 1, 1)
    assert result.stats["groups_frozen_excluded"] == 2
    new, result = prune(chain(), "prune_channels:round_to=1:exclude=br")
    assert weight_shapes(new)["a"][0] == 45 and weight_shapes(new)["b"][0] == 32


def test_scope_global_moves_the_budget_to_less_important_groups():
    model = chain(32, 32)
    weights = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    weights["w2"][:16] *= 0.01  # half of group "b" is nearly dead; group "a" is uniform
    weights["w1"] = np.abs(weights["w1"]) * 0 + 0.1
    del model.graph.initializer[:]
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    local, _ = prune(model, "prune_channels:ratio=0.25:round_to=1")
    glob, _ = prune(model, "prune_channels:ratio=0.25:round_to=1:scope=global")
    assert weight_shapes(local)["a"][0] == weight_shapes(local)["b"][0] == 24
    assert weight_shapes(glob)["b"][0] == 16 and weight_shapes(glob)["a"][0] == 32


def test_steps_prune_gradually_to_the_same_budget():
    one, r1 = prune(chain(), "prune_channels:ratio=0.5:round_to=1")
    two, r2 = prune(chain(), "prune_channels:ratio=0.5:round_to=1:steps=2")
    assert weight_shapes(one)["a"][0] == weight_shapes(two)["a"][0] == 32
    assert abs(r1.stats["channels_after"] - r2.stats["channels_after"]) <= 2


def test_bn_scale_ranks_by_gamma():
    gamma = np.linspace(0.1, 2.0, 16)
    gamma = gamma[np.random.default_rng(3).permutation(16)]
    model = chain(16, 8, bn_gamma=gamma)
    new, result = prune(model, "prune_channels:ratio=0.25:round_to=1:criterion=bn_scale")
    kept = next(numpy_helper.to_array(i).tolist() for i in new.graph.initializer if i.name.startswith("bn1_g"))
    np.testing.assert_allclose(sorted(kept), np.sort(gamma.astype(np.float32))[4:], rtol=1e-6)
    assert result.stats["bn_scale_fallback_l1"] == 1  # group "b" has no BN


def test_activation_criterion_uses_calibration_data():
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"), node("Conv", ["ar", "w2"], "y")]
    w1, b1 = rand(rng, 8, 3, 1, 1, scale=0.4), np.full(8, -5.0, np.float32)
    w1[:4] *= 0.01  # small filters ...
    b1[:4] = 3.0  # ... but large activations: l1 removes them, activation keeps them
    model = make_model(nodes, X, ["y"], {"w1": w1, "b1": b1, "w2": rand(rng, 4, 8, 1, 1, scale=0.4)})
    ctx = PassContext(calib=RandomSource(input_specs(model), count=4, seed=0))
    act, _ = prune(model, "prune_channels:ratio=0.5:round_to=1:criterion=activation:reconstruct=false", ctx)
    l1, _ = prune(model, "prune_channels:ratio=0.5:round_to=1")
    kept_act = next(n for n in act.graph.initializer if n.name.startswith("b1"))
    kept_l1 = next(n for n in l1.graph.initializer if n.name.startswith("b1"))
    assert numpy_helper.to_array(kept_act).tolist() == [3.0] * 4
    assert numpy_helper.to_array(kept_l1).tolist() == [-5.0] * 4
    with pytest.raises(InputError, match="^prune_channels:criterion=activation needs calibration data"):
        run_passes(model, "prune_channels:criterion=activation")


def test_deterministic_bytes():
    model = CASES["residual_projection"](np.random.default_rng(0)).model
    spec = "prune_channels:ratio=0.4:round_to=1:scope=global"
    first, _ = run_passes(model, spec)
    second, _ = run_passes(model, spec)
    assert first.SerializeToString() == second.SerializeToString()


def test_macs_and_params_drop():
    model = chain()
    new, result = prune(model, "prune_channels:ratio=0.5")
    before, after = model_metrics(model), model_metrics(new)
    assert after.macs < 0.6 * before.macs
    assert result.stats["params_before"] == before.params and result.stats["params_after"] == after.params


def test_frozen_groups_are_declined_with_reason(caplog):
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Softmax", ["a"], "s", axis=1), node("Conv", ["s", "w2"], "y")]
    model = make_model(nodes, X, ["y"], {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4), "w2": rand(rng, 4, 8, 1, 1, scale=0.4)})
    with caplog.at_level(logging.DEBUG):
        _, result = prune(model, "prune_channels:round_to=1")
    assert ("a", "reduces_over_channels") in result.where_codes() and not result.modified
    assert result.stats["groups_frozen_reduces_over_channels"] == 1
    assert "a (Softmax)" in caplog.text or "s (Softmax)" in caplog.text


def test_reconstruction_refits_the_consumers():
    model = chain(16, 16)
    ctx = PassContext(calib=RandomSource(input_specs(model), count=16, seed=0))
    plain, _ = prune(model, "prune_channels:round_to=1:ratio=0.5:reconstruct=false", ctx)
    refit, result = prune(model, "prune_channels:round_to=1:ratio=0.5", ctx)
    assert result.stats["reconstructed_layers"] == 2  # "b" and "y" read removed channels
    assert result.stats["reconstruct_error_after"] < result.stats["reconstruct_error_before"]
    feeds = random_feeds(model, seed=5)
    ref = ort_run(model, feeds)[0]
    err = [float(np.abs(ort_run(m, feeds)[0] - ref).mean()) for m in (plain, refit)]
    assert err[1] < err[0]


def test_no_calibration_means_no_reconstruction():
    _, result = prune(chain(16, 16), "prune_channels:round_to=1")
    assert ("reconstruct", "reconstruction_needs_calibration") in result.where_codes()
    _, result = prune(chain(16, 16), "prune_channels:round_to=1:reconstruct=false")
    assert not any(d.where == "reconstruct" for d in result.declined)


def test_protect_io_off_prunes_output_channels():
    model = chain(16, 16)
    new, records = run_passes(model, "prune_channels:round_to=1:protect_io=false:ratio=0.5")
    onnx.checker.check_model(new, full_check=True)
    assert weight_shapes(new)["y"][0] == 2 and records[0].result.stats["groups_frozen"] == 0
    out = ort_run(new, random_feeds(model))[0]
    assert out.shape[1] == 2


def test_bn_scale_after_fold_bn_uses_the_kept_gammas():
    _, records = run_passes(chain(16, 16), "fold_bn,prune_channels:criterion=bn_scale:round_to=1")
    stats = records[1].result.stats
    assert stats["groups_pruned"] == 2 and stats["bn_scale_fallback_l1"] == 1  # only group "b" has no BN


def test_runs_before_fold_bn_in_a_pipeline():
    new, records = run_passes(chain(), "prune_channels:criterion=bn_scale,fold_bn")
    assert [r.name for r in records] == ["prune_channels", "fold_bn"]
    assert "BatchNormalization" not in [n.op_type for n in new.graph.node]


def tf_flatten(zero_in_second: bool = False) -> onnx.ModelProto:
    """tf2onnx's classifier tail: [N,8,1,1] -> Reshape [-1,1,1,8] (NHWC) -> Reshape [-1,8] -> MatMul."""
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "w2", "b2"], "c"), node("Relu", ["c"], "cr"),
             node("GlobalAveragePool", ["cr"], "gap"), node("Reshape", ["gap", "nhwc"], "r1"),
             node("Reshape", ["r1", "flat"], "f"), node("MatMul", ["f", "wf"], "y")]
    inits = {"w1": rand(rng, 8, 3, 3, 3, scale=0.4), "b1": rand(rng, 8, scale=0.4),
             "w2": rand(rng, 16, 8, 1, 1, scale=0.4), "b2": rand(rng, 16, scale=0.4),
             "nhwc": np.asarray([-1, 1, 1, 16]), "flat": np.asarray([0 if zero_in_second else -1, 16]),
             "wf": rand(rng, 16, 5, scale=0.4)}
    return make_model(nodes, X, ["y"], inits)


def test_reshape_chain_is_merged_so_the_last_stage_can_be_pruned():
    from onnxcompress.core import serde
    from onnxcompress.pruning.prepare import merge_reshapes

    model = tf_flatten()
    graph = serde.to_graph(model)
    assert merge_reshapes(graph) == 1
    graph.cleanup().toposort()
    merged = serde.to_model(graph, model)
    assert [n.op_type for n in merged.graph.node].count("Reshape") == 1
    feeds = random_feeds(model)
    np.testing.assert_array_equal(ort_run(merged, feeds)[0], ort_run(model, feeds)[0])

    new, result = prune(model, "prune_channels:ratio=0.5:round_to=1")
    assert result.stats["reshapes_merged"] == 1 and result.stats["groups_frozen"] == 1  # only the output
    assert weight_shapes(new)["c"][0] == 8 and weight_shapes(new)["y"] == (8, 5)
    # a 0 in the second shape copies a dim of the middle tensor: left alone (and the group frozen)
    _, result = prune(tf_flatten(zero_in_second=True), "prune_channels:ratio=0.5:round_to=1")
    assert "reshapes_merged" not in result.stats and result.stats["groups_frozen_reshape_mixes_channels"] == 1


# ---------------------------------------------------------------- fixture models

# the digits CNNs (the trained transformers: tests/test_transformer_fixtures.py runs every pass on them)
FIXTURES = sorted(MODELS.glob("*_digits.onnx")) if MODELS.is_dir() else []


@pytest.mark.skipif(not FIXTURES, reason="no fixture models in models/")
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_models(path):
    model = onnx.load(str(path))
    try:
        new, records = run_passes(model, "prune_channels:ratio=0.3")
    except PassFailed as exc:  # pragma: no cover - reported with the model's name
        pytest.fail(f"{path.name}: {exc}")
    onnx.checker.check_model(new, full_check=True)
    stats = records[0].result.stats
    data = MODELS / "digits_test.npz"
    feeds, labels = None, None
    if data.exists():
        with np.load(data) as npz:
            feeds = {model.graph.input[0].name: npz["input"][:200]}
            labels = npz["labels"][:200] if "labels" in npz.files else None
    feeds = feeds or random_feeds(model)
    ref, got = ort_run(model, feeds)[0], ort_run(new, feeds)[0]
    assert got.shape == ref.shape and np.isfinite(got).all()
    acc = ""
    if labels is not None:
        acc = f" accuracy {np.mean(ref.argmax(1) == labels):.3f} -> {np.mean(got.argmax(1) == labels):.3f}"
    print(f"{path.stem}: groups {stats['groups_found']} pruned {stats['groups_pruned']} frozen {stats['groups_frozen']} "
          f"{ {k: v for k, v in stats.items() if k.startswith('groups_frozen_')} } params "
          f"{stats['params_before']} -> {stats['params_after']}{acc}")


# ---------------------------------------------------------------- grouped convs


def resnext(seed: int = 0, group: int = 4) -> onnx.ModelProto:
    """A ResNeXt bottleneck: 1x1 (32) -> BN -> relu -> 3x3 grouped (32) -> BN -> relu -> 1x1 (16), plus
    a 1x1 projection of the block input, added, relu, 1x1 head."""
    rng = np.random.default_rng(seed)
    nodes = [node("Conv", ["x", "w0", "b0"], "stem"), node("Relu", ["stem"], "sr"),
             node("Conv", ["sr", "w1"], "a"), bn_node("a", "an", "bn1"), node("Relu", ["an"], "ar"),
             node("Conv", ["ar", "wg"], "g", group=group, pads=[1, 1, 1, 1]), bn_node("g", "gn", "bn2"),
             node("Relu", ["gn"], "gr"), node("Conv", ["gr", "w3"], "c"), bn_node("c", "cn", "bn3"),
             node("Conv", ["sr", "wp", "bp"], "p"), node("Add", ["cn", "p"], "s"), node("Relu", ["s"], "so"),
             node("Conv", ["so", "wh", "bh"], "y")]
    inits = {"w0": rand(rng, 16, 3, 3, 3, scale=0.4), "b0": rand(rng, 16, scale=0.4),
             "w1": rand(rng, 32, 16, 1, 1, scale=0.4), "wg": rand(rng, 32, 32 // group, 3, 3, scale=0.4),
             "w3": rand(rng, 16, 32, 1, 1, scale=0.4), "wp": rand(rng, 16, 16, 1, 1, scale=0.4),
             "bp": rand(rng, 16, scale=0.4), "wh": rand(rng, 4, 16, 1, 1, scale=0.4),
             "bh": rand(rng, 4, scale=0.4), **bn(rng, "bn1", 32), **bn(rng, "bn2", 32), **bn(rng, "bn3", 16)}
    return make_model(nodes, X, ["y"], inits)


def conv_group(model: onnx.ModelProto, name: str) -> tuple[tuple[int, ...], int]:
    n = next(n for n in model.graph.node if n.name == name)
    return weight_shapes(model)[name], next((a.i for a in n.attribute if a.name == "group"), 1)


def test_grouped_conv_pruned_with_round_to_and_reconstructed():
    model = resnext()
    ctx = PassContext(calib=RandomSource(input_specs(model), count=16, seed=0))
    new, result = prune(model, "prune_channels:ratio=0.5", ctx)  # round_to=8: 4 blocks of 8 keep 4 each
    assert conv_group(new, "g") == ((16, 4, 3, 3), 4)
    assert result.stats["groups_frozen"] == 1 and "groups_round_to_relaxed" not in result.stats
    assert result.stats["criterion_bn_scale"] >= 2  # auto: every group here has a BN but the head
    assert result.stats["reconstructed_layers"] >= 3  # g, c and the head read removed channels
    assert result.stats["reconstruct_error_after"] < result.stats["reconstruct_error_before"]
    again, _ = prune(model, "prune_channels:ratio=0.5", ctx)
    assert again.SerializeToString() == new.SerializeToString()


def test_grouped_round_to_relaxed_is_reported():
    new, result = prune(resnext(group=8), "prune_channels:ratio=0.5:round_to=10:reconstruct=false")
    # a and g: 8 blocks of 4 keep 24, 16 or 8 (< 10): no multiple of 10, relaxed to 2 per block
    assert result.stats["groups_round_to_relaxed"] == 2
    shape, group = conv_group(new, "g")
    assert group == 8 and shape[1] == 2 and shape[0] % 8 == 0


def test_grouped_conv_with_non_constant_weight_freezes():
    rng = np.random.default_rng(0)
    nodes = [node("Conv", ["x", "w1", "b1"], "a"), node("Relu", ["a"], "ar"), node("Conv", ["ar", "wg"], "y", group=2)]
    model = make_model(nodes, {**X, "wg": [8, 4, 1, 1]}, ["y"], {"w1": rand(rng, 8, 3, 1, 1, scale=0.4), "b1": rand(rng, 8, scale=0.4)})
    _, result = prune(model, "prune_channels:round_to=1")
    assert ("a", "non_constant_weight") in result.where_codes() and not result.modified
