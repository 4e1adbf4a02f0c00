"""Per-layer sensitivity: ranking, one calibration, report schema, CLI (table, JSON, plot)."""

from __future__ import annotations

import json
import logging
import math
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcompress import api
from onnxcompress.cli import main
from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.pipeline.sensitivity import SensitivityReport, layer_sensitivity, parse_options
from onnxcompress.quant.options import QuantConfig
from onnxcompress.quant.sensitivity import Evaluator, Quantizer, rank_layers
from onnxcompress.reporting.plots import NO_MATPLOTLIB
from onnxcompress.runtime.data import open_source
from tests.helpers.builders import make_model
from tests.helpers.quant import calibration_runs, conv_classifier
from tests.helpers.tensors import rand

X = {"x": ["N", 3, 8, 8]}
KEYS = {"kind", "model", "method", "samples", "baseline", "layers"}
LAYER_KEYS = {"node", "op_type", "macs", "sqnr_db", "cosine"}


def shared_weight(rng: np.random.Generator) -> onnx.ModelProto:
    """conv_a(x, W) + conv_b(x, W) -> Relu -> GlobalAveragePool -> Flatten: one initializer, two convs."""
    init = {"W": rand(rng, 4, 3, 3, 3, scale=0.5), "Ba": rand(rng, 4, scale=0.5), "Bb": rand(rng, 4, scale=0.5)}
    nodes = [helper.make_node("Conv", ["x", "W", "Ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W", "Bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    return make_model(nodes, X, ["y"], init)


def outlier_data(rng: np.random.Generator, n: int = 48) -> dict[str, np.ndarray]:
    """Inputs with one huge outlier: minmax calibration of conv_a's input gets a very coarse scale."""
    x = rand(rng, n, 3, 8, 8, scale=1.0)
    x[0, 0, 0, 0] = 400.0
    return {"x": x}


def test_ranking_schema_and_macs():
    rng = np.random.default_rng(0)
    model = conv_classifier(rng)
    report = layer_sensitivity(model, [outlier_data(rng)], method="minmax", prepare="")
    assert isinstance(report, SensitivityReport)
    d = report.as_dict()
    assert set(d) == KEYS and d["kind"] == "sensitivity" and d["method"] == "minmax" and d["samples"] == 48
    assert set(d["baseline"]) == {"sqnr_db", "cosine"}
    assert [set(layer) for layer in d["layers"]] == [LAYER_KEYS] * 4
    assert {layer["node"] for layer in d["layers"]} == {"conv_a", "conv_b", "gap", "fc"}
    sqnr = [layer["sqnr_db"] for layer in d["layers"]]
    assert sqnr == sorted(sqnr), "most sensitive (lowest SQNR) first"
    assert d["layers"][0]["node"] == "conv_a"  # its input range is blown up by the outlier
    assert d["baseline"]["sqnr_db"] <= sqnr[0] + 0.5  # all layers together are no better than the worst one
    macs = {layer["node"]: layer["macs"] for layer in d["layers"]}
    assert macs["conv_a"] == 4 * 8 * 8 * 3 * 9 and macs["conv_b"] == 4 * 8 * 8 * 4 * 9 and macs["gap"] == 0
    json.dumps(d, allow_nan=False)


def test_deterministic_and_calibrates_once(caplog):
    rng = np.random.default_rng(1)
    model = conv_classifier(rng)
    data = [outlier_data(rng)]
    with caplog.at_level(logging.INFO, logger="onnxcompress.quant.calibrate"):
        a = layer_sensitivity(model, data, prepare="").as_dict()
    assert calibration_runs(caplog.records) == 1, "one calibration for every layer"
    b = layer_sensitivity(model, data, prepare="").as_dict()
    assert a == b


def test_separate_evaluation_data_and_labels():
    rng = np.random.default_rng(2)
    model = conv_classifier(rng)
    calib = [outlier_data(rng)]
    data = [{"x": rand(rng, 20, 3, 8, 8, scale=1.0), "labels": rng.integers(0, 5, 20)}]
    report = layer_sensitivity(model, calib, data, prepare="", name="tiny")
    assert report.samples == 20 and report.model == "tiny"
    assert report.float_accuracy is not None and report.baseline.cand_accuracy is not None


def test_shared_weight_and_input_untouched():
    rng = np.random.default_rng(3)
    model = shared_weight(rng)
    before = model.SerializeToString()
    report = layer_sensitivity(model, [outlier_data(rng)], prepare="")
    assert model.SerializeToString() == before
    assert {s.node for s in report.layers} >= {"conv_a", "conv_b", "add"}
    assert all(0.9 < s.cosine <= 1.0 + 1e-9 for s in report.layers)


def test_non_constant_weight_is_not_a_layer():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="dyn"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "W"], ["y"], name="static")]
    model = make_model(nodes, {"x": ["N", 3, 8, 8], "w": [4, 3, 3, 3]}, ["y"], {"W": rand(rng, 2, 4, 3, 3, scale=0.5)})
    data = [{"x": rand(rng, 4, 3, 8, 8, scale=0.5), "w": rand(rng, 4, 3, 3, 3, scale=0.5)}]  # both read as 4 samples
    report = layer_sensitivity(model, data, prepare="")
    assert [s.node for s in report.layers] == ["static"]


def test_intermediate_graph_output_is_compared_too():
    rng = np.random.default_rng(5)
    model = conv_classifier(rng)
    model = make_model(list(model.graph.node), X, ["ra", "y"], {i.name: onnx.numpy_helper.to_array(i)
                                                                for i in model.graph.initializer})
    report = layer_sensitivity(model, [outlier_data(rng)], prepare="")
    assert len(report.layers) == 4 and math.isfinite(report.baseline.sqnr_db)


def test_no_quantizable_layer():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], X, ["y"], {})
    with pytest.raises(InputError, match="no quantizable layer"):
        layer_sensitivity(model, [{"x": np.ones((2, 3, 8, 8), np.float32)}], prepare="")


def test_bad_options():
    model = conv_classifier(np.random.default_rng(6))
    with pytest.raises(InputError, match="expected one of"):
        layer_sensitivity(model, "random:4", method="kl")
    with pytest.raises(InputError, match="unknown option"):
        layer_sensitivity(model, "random:4", options={"nope": "1"})
    with pytest.raises(InputError, match="key=value"):
        parse_options("per_channel")


def test_evaluator_recomputes_when_over_budget():
    rng = np.random.default_rng(7)
    model = conv_classifier(rng)
    data = open_source([outlier_data(rng)], model)
    q = Quantizer(model, QuantConfig())
    q.calibrate(data)
    kept, rerun = Evaluator(model, data), Evaluator(model, data, budget=0)
    assert rerun._cached is None and kept._cached is not None
    cand = q.export()
    assert kept(cand) == rerun(cand)
    ranked = rank_layers(q, kept)
    assert ranked[0][0] == "conv_a"


@pytest.fixture()
def fixture_files(tmp_path):
    rng = np.random.default_rng(8)
    model = conv_classifier(rng)
    path = tmp_path / "m.onnx"
    serde.save_model(model, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **outlier_data(rng))
    return path, calib


def test_cli_json_table_and_plot(fixture_files, tmp_path, capsys):
    path, calib = fixture_files
    assert main(["sensitivity", str(path), "--calib", str(calib), "--method", "minmax", "--prepare", "",
                 "--json", "-"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) == KEYS and d["layers"][0]["node"] == "conv_a"
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    assert main(["sensitivity", str(path), "--calib", str(calib), "--top", "2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "conv_a" in out and "SQNR" in out and "more layers" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_without_matplotlib(fixture_files, tmp_path, capsys, monkeypatch):
    path, calib = fixture_files
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert main(["sensitivity", str(path), "--calib", str(calib), "--plot", str(tmp_path / "s.png")]) == 2
    assert NO_MATPLOTLIB in capsys.readouterr().err


def test_api_export():
    assert api.sensitivity.__name__ == "sensitivity" and "sensitivity" in api.__all__
