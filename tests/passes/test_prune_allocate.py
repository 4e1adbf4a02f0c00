"""prune_channels:ratio=R:allocate=sensitivity (a channel budget spread over groups by sensitivity),
its ChannelModel, and the slice-aware sensitivity error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxcompress.cli import main
from onnxcompress.core.errors import InputError
from onnxcompress.pipeline.manager import parse_spec
from onnxcompress.pruning.budget import ChannelModel, allocate
from onnxcompress.pruning.sensitivity import _relative_error
from tests.helpers.runs import ort_run, run_passes
from tests.helpers.tensors import random_feeds
from tests.passes.test_prune_budget import ctx_with_calib, kept, two_groups

SENS = "prune_channels:ratio=0.5:allocate=sensitivity:round_to=1"


@pytest.mark.parametrize("spec, match", [
    ("prune_channels:allocate=greedy", "option allocate="),
    ("prune_channels:allocate=sensitivity:scope=global", "scope= applies to allocate=uniform"),
    ("prune_channels:macs=0.5:allocate=uniform", "got macs and allocate"),
    ("prune_channels:macs=0.5:allocate=sensitivity", "got macs and allocate"),
])
def test_parse_errors(spec, match):
    with pytest.raises(InputError, match=match):
        parse_spec(spec)


def test_parse_error_exits_2_before_loading(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code = main(["optimize", str(tmp_path / "missing.onnx"), "-o", str(out), "--passes",
                 "prune_channels:allocate=sensitivity:scope=global"])
    assert code == 2 and not out.exists()
    assert "allocate=sensitivity" in capsys.readouterr().err


def test_default_is_uniform():
    assert parse_spec("prune_channels:ratio=0.3")[0].opts["allocate"] == "uniform"


@pytest.mark.parametrize("a_matters", [True, False])
def test_the_budget_goes_where_the_measured_error_is_small(a_matters):
    """Half of all channels go, mostly from the branch that barely reaches the output."""
    model = two_groups(a_matters)
    new, records = run_passes(model, SENS + ":reconstruct=false", ctx_with_calib(model))
    k = kept(new)
    assert k["a"] + k["b"] == 32
    assert (k["a"] > k["b"]) == a_matters
    stats = records[0].result.stats
    assert stats["sensitivity"] == "measured" and "macs_target" not in stats
    assert {row["kept"] for row in stats["plan"]} == set(k.values())


def test_uniform_keeps_todays_plan():
    model = two_groups(a_matters=True)
    new, _ = run_passes(model, "prune_channels:ratio=0.5:allocate=uniform:round_to=1", ctx_with_calib(model))
    assert kept(new) == {"a": 16, "b": 16}


def test_cap_respected():
    model = two_groups(a_matters=True)
    new, _ = run_passes(model, SENS + ":max_group_ratio=0.6", ctx_with_calib(model))
    k = kept(new)
    assert min(k.values()) >= 32 - int(0.6 * 32) and k["a"] + k["b"] == 32


def test_without_calibration_importance_spreads_the_same_total():
    model = two_groups(a_matters=True)
    new, records = run_passes(model, SENS)
    assert sum(kept(new).values()) == 32
    assert records[0].result.stats["sensitivity"] == "importance"


def test_dry_run_plan_is_what_the_run_applies():
    model = two_groups(a_matters=False)
    same, records = run_passes(model, SENS + ":dry_run=true", ctx_with_calib(model))
    assert not records[0].result.modified
    plan = sorted(row["kept"] for row in records[0].result.stats["plan"])
    pruned, _ = run_passes(model, SENS, ctx_with_calib(model))
    assert sorted(kept(pruned).values()) == plan
    assert plan[0] < plan[1]


def test_deterministic():
    model = two_groups(a_matters=False)
    a, _ = run_passes(model, SENS, ctx_with_calib(model))
    b, _ = run_passes(model, SENS, ctx_with_calib(model))
    assert a.SerializeToString() == b.SerializeToString()


def test_numerics_equal_the_zeroed_original():
    """Without reconstruction the pruned model is the original with the removed filters zeroed
    (their constant relu(bias) folded exactly into the 1x1 readers' bias), vs onnxruntime."""
    model = two_groups(a_matters=True)
    new, _ = run_passes(model, SENS + ":reconstruct=false", ctx_with_calib(model))
    old = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in new.graph.initializer}
    weight_of = {n.output[0]: n.input[1] for n in new.graph.node if n.op_type == "Conv"}
    got = {"wa": arrays[weight_of["a"]], "wb": arrays[weight_of["b"]]}
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for init in zeroed.graph.initializer:
        if init.name in ("wa", "wb"):
            w = old[init.name].copy()
            keep = [any(np.array_equal(row, g) for g in got[init.name]) for row in w]
            w[~np.asarray(keep)] = 0.0
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    feeds = random_feeds(model)
    np.testing.assert_allclose(ort_run(new, feeds)[0], ort_run(zeroed, feeds)[0], rtol=1e-4, atol=1e-5)


def test_channel_model_allocates_by_error_per_channel():
    """Unit: a cheap group (error 0.01 per level) goes before a costly one (1.0 per level)."""

    class G:
        def __init__(self, index, name):
            self.index, self.name, self.size, self.sources = index, name, 10, []

    groups = [G(0, "cheap"), G(1, "costly")]
    lv = {0: list(range(10)), 1: list(range(10))}
    errors = {0: np.arange(10) * 0.01, 1: np.arange(10) * 1.0}
    model = ChannelModel(groups)
    assert model.total == 20 and model.macs({0: 0.5}) == 15 and model.neighbours(0) == set()
    plan = allocate(groups, lv, errors, model, 1 - 0.3, "measured")
    assert plan.counts == {0: 6}
    plan = allocate(groups, lv, errors, model, 1 - 0.6, "measured")  # the cheap group capped at 9
    assert plan.counts == {0: 9, 1: 3}


def test_relative_error_sees_a_small_scale_slice():
    """A YOLO-like output [N, 4+2, A]: boxes ~100, scores ~0.01. An error in the scores alone is
    invisible to the whole-output error but not to the score slice's."""
    rng = np.random.default_rng(0)
    ref = rng.random((2, 6, 50)).astype(np.float32)
    ref[:, :4] *= 100.0
    ref[:, 4:] *= 0.01
    got = ref.copy()
    got[:, 4:] = 0.0
    whole = float(np.sum((got - ref) ** 2) / np.sum(ref ** 2))
    assert whole < 1e-6
    assert _relative_error([[ref]], [[got]]) == pytest.approx(1.0)
    # one scale: no slices, the whole-output error
    flat = rng.random((2, 6, 50)).astype(np.float32)
    assert _relative_error([[flat]], [[flat * 0.9]]) == pytest.approx(0.01, rel=1e-6)
    # rank 2 (a classifier): unchanged definition
    logits = rng.random((4, 10))
    assert _relative_error([[logits]], [[logits * 1.1]]) == pytest.approx(0.01, rel=1e-6)
