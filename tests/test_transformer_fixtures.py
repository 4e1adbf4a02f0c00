"""The trained fixture transformers (``scripts/make_transformers.py``): each scores its recorded
accuracy, has the graph style it claims, and every registered pass and every built-in recipe on it
ends as the CLI must: exit 0 with a valid model (exact passes: same outputs; lossy: accuracy kept
on held-out samples), a failed gate with a valid model (exit 1) or a one-line refusal (exit 2) —
never an internal error (exit 3), never an invalid model. Passes registered later are covered
automatically; so are the ORT-fused (``com.microsoft`` Attention, SkipLayerNormalization,
BiasGelu, EmbedLayerNormalization) and the opset-23 ``Attention`` graphs, where onnxruntime's own
``quantize_dynamic`` fails or writes an invalid model."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcompress.core.pass_api import Numerics
from onnxcompress.pipeline.manager import registry
from onnxcompress.pipeline.recipes import builtin_recipes
from tests.helpers import trained
from tests.helpers.runs import cosine, ort_run

FIXTURES = trained.fixtures()
N_CALIB, N_DATA, N_HELD_OUT = 8, 64, 96
#: Recipes are compositions of passes: they run on one export of each network and on the fused and
#: opset-23 graphs (the dynamo exports get every pass), to keep this file's time small.
RECIPE_FIXTURES = [n for n in FIXTURES if trained.entry(n)["exporter"] != "dynamo" or trained.entry(n)["style"] != "decomposed"]
#: Held-out accuracy a lossy result that passed its gate may lose (points; 1 sample = 1.04).
MAX_HELD_OUT_DROP = 3.0

pytestmark = pytest.mark.skipif(not FIXTURES, reason="no trained transformer fixtures in models/models.json")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per fixture: a small calibration ``.npz`` (fixed length) and a validation ``.npz`` with labels."""
    root = tmp_path_factory.mktemp("tfix")
    out = {}
    for name in FIXTURES:
        feeds, _ = trained.samples(name, "calib", N_CALIB)
        data, labels = trained.samples(name, "test", N_DATA)
        out[name] = (trained.write_npz(root / f"{name}_calib.npz", feeds),
                     trained.write_npz(root / f"{name}_data.npz", data, labels))
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_scores_its_recorded_accuracy(name):
    """onnxruntime (optimizations off) on the whole test split gives models.json's accuracy exactly."""
    e = trained.entry(name)
    feeds, labels = trained.samples(name, "test")
    assert len(labels) == e["n_test"]
    assert round(trained.accuracy(trained.path(name), feeds, labels) * len(labels)) == e["correct"]
    assert e["accuracy"] >= 0.95


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_has_its_graph_style(name):
    """The ops and opsets models.json records; dynamic batch (and sequence) dims."""
    e, proto = trained.entry(name), onnx.load(str(trained.path(name)))
    onnx.checker.check_model(proto, full_check=True)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    assert counts == e["ops"]
    style = e["style"]
    fused = {"com.microsoft::Attention", "com.microsoft::SkipLayerNormalization"}
    assert fused <= set(counts) if style == "ORT-fused" else not fused & set(counts)
    assert ("Attention" in counts) == (style == "opset-23 Attention")
    if style == "decomposed":
        assert counts["Softmax"] == e["layers"] and counts["MatMul"] >= 6 * e["layers"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert all(isinstance(v[0], str) for v in dims.values())
    if "input_ids" in dims:
        assert isinstance(dims["input_ids"][1], str)


def _other_shape(name: str) -> dict[str, np.ndarray]:
    """Three held-out samples at another batch and (text) a shorter sequence than calibration used."""
    feeds, _ = trained.samples(name, "test", 3, start=N_DATA)
    return {k: v[:, :16] for k, v in feeds.items()} if "input_ids" in feeds else feeds


def _check_model(name: str, original: Path, new: onnx.ModelProto, numerics: Numerics, exit_code: int) -> None:
    """Valid (full checker), runs at other shapes; exit 0: exact results equal, lossy ones keep accuracy."""
    onnx.checker.check_model(new, full_check=True)
    other = _other_shape(name)
    got = ort_run(new, other)[0]
    assert got.shape == ort_run(original, other)[0].shape and np.isfinite(got).all()
    if exit_code != 0:
        return
    feeds, labels = trained.samples(name, "test", N_HELD_OUT, start=N_DATA)
    ref, out = ort_run(original, feeds)[0], ort_run(new, feeds)[0]
    if numerics == Numerics.EXACT:
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
    elif numerics == Numerics.APPROX:
        assert cosine(out, ref) >= 0.999
    else:
        drop = 100 * (float((ref.argmax(1) == labels).mean()) - float((out.argmax(1) == labels).mean()))
        assert drop <= MAX_HELD_OUT_DROP, f"held-out accuracy drop {drop:.2f} points"


@cache
def _check(name: str, files: tuple[Path, Path], passes: str | None = None, recipe: str | None = None) -> trained.Outcome:
    """The judged outcome of one run (cached: a later test may look at the same run again)."""
    calib, data = files
    result = trained.outcome(trained.path(name), calib=calib, data=data, passes=passes, recipe=recipe)
    if result.exit_code == 2:
        assert result.message and "\n" not in result.message.strip()
        return result
    assert result.exit_code == 0 or "gate" in result.message
    _check_model(name, trained.path(name), result.model, result.report.numerics, result.exit_code)
    return result


@pytest.mark.parametrize("pass_name", sorted(registry()))
@pytest.mark.parametrize("name", FIXTURES)
def test_every_pass_is_valid_or_declines(name, pass_name, files):
    """Each registered pass (with what it needs before it) on each fixture: exit 0/1 with a valid
    model or a reasoned exit 2; an exception other than those fails the test (exit 3)."""
    _check(name, files[name], passes=trained.pipeline_for(pass_name))


@pytest.mark.parametrize("recipe", sorted(builtin_recipes()))
@pytest.mark.parametrize("name", RECIPE_FIXTURES)
def test_every_recipe_is_valid_or_declines(name, recipe, files):
    """Each built-in recipe on each fixture (but the dynamo twins), judged as above."""
    _check(name, files[name], recipe=recipe)


@pytest.mark.parametrize("name", [n for n in FIXTURES if trained.entry(n)["style"] != "decomposed"])
def test_int8_compresses_fused_and_opset23_graphs(name, files):
    """Where onnxruntime's quantize_dynamic fails (ORT-fused) or writes a model onnxruntime rejects
    (opset-23 Attention), quantize_int8 quantizes the projections and keeps the accuracy."""
    result = _check(name, files[name], passes="quantize_int8")
    assert result.exit_code == 0 and result.modified
    assert result.report.passes[0].result.stats["quantized_MatMul"] >= 2 * trained.entry(name)["layers"]
