"""prune_channels' recovery options: per-layer refit report, refit after every round (refit_steps)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import PassContext
from onnxcompress.pipeline.manager import parse_spec
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
