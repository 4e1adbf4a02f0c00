"""prune_channels:macs= (a global MAC budget distributed by sensitivity) and dry_run."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest

from onnxcompress.cli import main
from onnxcompress.core.errors import InputError
from onnxcompress.core.metrics import model_metrics
from onnxcompress.core.pass_api import PassContext
from onnxcompress.pipeline.manager import parse_spec
from onnxcompress.runtime.data import RandomSource, input_specs
from tests.helpers.builders import make_model, node
from tests.helpers.runs import ort_run, run_passes
from tests.helpers.tensors import rand, random_feeds

X = {"x": [1, 8, 8, 8]}


def two_groups(a_matters: bool, seed: int = 0, c: int = 32) -> onnx.ModelProto:
    """Two parallel branches ``y = convA2(relu(convA(x))) + convB2(relu(convB(x)))``: two prunable
    groups, A and B (``c`` channels each; ``y`` is a graph output, its group frozen).

    The branch that does not "matter" reaches ``y`` through tiny weights, so removing its channels
    barely changes ``y``; the filter norms of convA and convB are alike, so only measured
    sensitivity can tell them apart."""
    rng = np.random.default_rng(seed)
    w = {k: rand(rng, c, 8, 3, 3, scale=0.3) for k in ("wa", "wb")}
    w.update({k: rand(rng, 8, c, 1, 1, scale=0.3) for k in ("wa2", "wb2")})
    w["wb2" if a_matters else "wa2"] *= 0.02
    nodes = [node("Conv", ["x", "wa", "ba"], "a", pads=[1, 1, 1, 1]), node("Relu", ["a"], "ar"),
             node("Conv", ["ar", "wa2"], "pa"),
             node("Conv", ["x", "wb", "bb"], "b", pads=[1, 1, 1, 1]), node("Relu", ["b"], "br"),
             node("Conv", ["br", "wb2"], "pb"), node("Add", ["pa", "pb"], "y")]
    return make_model(nodes, X, ["y"], {**w, "ba": rand(rng, c, scale=0.1), "bb": rand(rng, c, scale=0.1)})


def ctx_with_calib(model: onnx.ModelProto, count: int = 16) -> PassContext:
    return PassContext(calib=RandomSource(input_specs(model), count=count, seed=0))


def kept(model: onnx.ModelProto) -> dict[str, int]:
    w = {i.name: list(i.dims) for i in model.graph.initializer}
    conv = {n.output[0]: n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    return {"a": w[conv["a"]][0], "b": w[conv["b"]][0]}


def macs(model: onnx.ModelProto) -> int:
    return model_metrics(model).macs


@pytest.mark.parametrize("spec, match", [
    ("prune_channels:macs=0.5:ratio=0.3", "give ratio= .* or macs= .* not both"),
    ("prune_channels:ratio=0.3:macs=0.5", "not both"),
    ("prune_channels:macs=0.5:scope=global", "got macs and scope"),
    ("prune_channels:macs=0", "option macs="),
    ("prune_channels:macs=1.2", "option macs="),
])
def test_parse_errors(spec, match):
    with pytest.raises(InputError, match=match):
        parse_spec(spec)


def test_parse_error_exits_2_before_loading(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code = main(["optimize", str(tmp_path / "missing.onnx"), "-o", str(out), "--passes",
                 "prune_channels:macs=0.5:ratio=0.3"])
    assert code == 2 and not out.exists()
    assert "not both" in capsys.readouterr().err


def test_ratio_alone_and_macs_alone_parse():
    assert parse_spec("prune_channels:ratio=0.4")[0].opts["macs"] is None
    assert parse_spec("prune_channels:macs=0.7")[0].opts["macs"] == 0.7


@pytest.mark.parametrize("target", [0.8, 0.6, 0.4])
@pytest.mark.parametrize("calib", [False, True])
def test_budget_met_within_tolerance(target, calib):
    model = two_groups(a_matters=True)
    ctx = ctx_with_calib(model) if calib else None
    new, records = run_passes(model, f"prune_channels:macs={target}:round_to=1", ctx)
    onnx.checker.check_model(new, full_check=True)
    stats = records[0].result.stats
    achieved = macs(new) / macs(model)
    assert abs(achieved - target) <= 0.02
    assert stats["macs_ratio"] == pytest.approx(achieved, abs=1e-4)
    assert stats["macs_predicted"] == pytest.approx(achieved, abs=1e-3)  # exact MAC model for a conv chain
    assert stats["macs_target"] == target
    assert stats["sensitivity"] == ("measured" if calib else "importance")


@pytest.mark.parametrize("a_matters", [True, False])
def test_allocation_follows_measured_sensitivity(a_matters):
    """The group whose removal hurts the output more keeps more channels (and the other way round)."""
    model = two_groups(a_matters)
    new, records = run_passes(model, "prune_channels:macs=0.6:round_to=1:reconstruct=false", ctx_with_calib(model))
    k = kept(new)
    if a_matters:
        assert k["a"] > k["b"]
    else:
        assert k["b"] > k["a"]
    plan = {row["group"]: row for row in records[0].result.stats["plan"]}
    assert {row["kept"] for row in plan.values()} == set(k.values())


def test_cap_respected_and_unreachable_target_warns(caplog):
    model = two_groups(a_matters=True)
    with caplog.at_level(logging.WARNING):
        new, records = run_passes(model, "prune_channels:macs=0.1:round_to=1:max_group_ratio=0.5", ctx_with_calib(model))
    k = kept(new)
    assert k["a"] >= 16 and k["b"] >= 16
    assert records[0].result.stats["macs_ratio"] > 0.2
    assert any("target 0.100" in r.getMessage() for r in caplog.records)


def test_dry_run_changes_nothing_and_returns_the_plan():
    model = two_groups(a_matters=True)
    new, records = run_passes(model, "prune_channels:macs=0.6:round_to=1:dry_run=true", ctx_with_calib(model))
    result = records[0].result
    assert not result.modified
    assert [list(i.dims) for i in new.graph.initializer] == [list(i.dims) for i in model.graph.initializer]
    feeds = random_feeds(model)
    np.testing.assert_array_equal(ort_run(new, feeds)[0], ort_run(model, feeds)[0])
    plan = result.stats["plan"]
    assert len(plan) == 2 and result.stats["dry_run"] is True
    assert set(plan[0]) == {"group", "anchor", "kept", "total", "macs", "predicted_error"}
    assert abs(result.stats["macs_predicted"] - 0.6) <= 0.02
    # the same plan is what a real run applies
    pruned, _ = run_passes(model, "prune_channels:macs=0.6:round_to=1", ctx_with_calib(model))
    assert sorted(kept(pruned).values()) == sorted(row["kept"] for row in plan)


def test_dry_run_with_ratio_shows_the_uniform_plan():
    model = two_groups(a_matters=True)
    _, records = run_passes(model, "prune_channels:ratio=0.5:round_to=1:dry_run=true")
    assert [row["kept"] for row in records[0].result.stats["plan"]] == [16, 16]
    assert "macs_target" not in records[0].result.stats


def test_cli_dry_run_writes_no_model_and_json_has_the_plan(tmp_path, capsys):
    src, out, js = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(two_groups(a_matters=True), src)
    code = main(["optimize", str(src), "-o", str(out), "--passes", "prune_channels:macs=0.6:dry_run=true",
                 "--calib-random", "8", "--json", str(js)])
    assert code == 0 and not out.exists()
    assert "no model written" in capsys.readouterr().out
    report = json.loads(js.read_text())
    assert report["output"] is None and report["dry_run"] is True and report["validation"] is None
    assert len(report["passes"][0]["stats"]["plan"]) == 2


def test_deterministic():
    model = two_groups(a_matters=False)
    a, _ = run_passes(model, "prune_channels:macs=0.5", ctx_with_calib(model))
    b, _ = run_passes(model, "prune_channels:macs=0.5", ctx_with_calib(model))
    assert a.SerializeToString() == b.SerializeToString()


def test_without_reconstruction_the_budget_run_equals_the_zeroed_original_off_borders():
    """Numerics: macs= only chooses counts; removal is the usual exact edit (1x1 last conv)."""
    model = two_groups(a_matters=True)
    new, _ = run_passes(model, "prune_channels:macs=0.6:round_to=1:reconstruct=false")
    feeds = random_feeds(model)
    got, ref = ort_run(new, feeds)[0], ort_run(model, feeds)[0]
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.5


def test_steps_reach_the_budget_gradually():
    model = two_groups(a_matters=True)
    new, records = run_passes(model, "prune_channels:macs=0.6:steps=2:round_to=1", ctx_with_calib(model))
    achieved = macs(new) / macs(model)
    assert abs(achieved - 0.6) <= 0.03
    assert records[0].result.stats["macs_ratio"] == pytest.approx(achieved, abs=1e-4)


def test_nothing_prunable_keeps_the_model_and_warns(caplog):
    model = two_groups(a_matters=True)
    with caplog.at_level(logging.WARNING):
        new, records = run_passes(model, "prune_channels:macs=0.5:exclude=a|b")
    assert not records[0].result.modified and records[0].result.stats["macs_ratio"] == 1.0
    assert any("target 0.500" in r.getMessage() for r in caplog.records)
