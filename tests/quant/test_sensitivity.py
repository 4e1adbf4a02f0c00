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
KEYS = {"kind", "model", "method", "samples", "baseline", "layers", "slices"}
LAYER_KEYS = {"node", "op_type", "macs", "sqnr_db", "cosine", "worst"}


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
    assert set(d["baseline"]) == {"sqnr_db", "cosine", "worst"}
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


def test_evaluator_with_given_float_outputs_does_not_run_the_float_model(monkeypatch):
    rng = np.random.default_rng(7)
    model = conv_classifier(rng)
    data = open_source([outlier_data(rng, 40)], model)  # 40 samples: batches of 16, 16, 8
    q = Quantizer(model, QuantConfig())
    q.calibrate(data)
    cand = q.export()
    computed = Evaluator(model, data, batch_size=16)
    outputs = {"y": np.concatenate([b[0] for b in computed._cached])}
    monkeypatch.setattr("onnxcompress.quant.sensitivity.make_session", _refuse_float(model))
    given = Evaluator(model, data, batch_size=16, outputs=outputs)
    assert given._session is None and given.samples == 40 and given.slices == computed.slices
    assert given(cand) == computed(cand)
    bad = Evaluator(model, data, batch_size=16, outputs={"y": outputs["y"] + 1.0})  # really used, not rerun
    assert bad(cand) != computed(cand)
    runs = []
    by_batch = computed.score(lambda i, batch: runs.append(i) or [given._cached[i][0]])
    assert runs == [0, 1, 2] and by_batch.sqnr_db == math.inf


def test_evaluator_with_float_outputs_run_by_run_runs_the_float_model_only_where_they_differ():
    """``runs``: the float outputs of the batches that are runs (the same first sample and sample
    count) are used as given; the others are computed: here the runs are cut 8 + 8 + 16 + 4 + 4, so
    only the third one is a batch (samples 16-31)."""
    rng = np.random.default_rng(7)
    model = conv_classifier(rng)
    data = open_source([outlier_data(rng, 40)], model)  # batches of 16, 16, 8
    computed = Evaluator(model, data, batch_size=16)
    first, second, last = computed._cached
    runs = [(8, [first[0][:8]]), (8, [first[0][8:] + 1.0]), (16, [second[0] + 1.0]), (4, [last[0][:4] + 1.0]),
            (4, [last[0][4:] + 1.0])]
    given = Evaluator(model, data, batch_size=16, runs=runs)
    assert np.array_equal(given._cached[1][0], second[0] + 1.0)  # used as given
    assert given._session is not None  # the others computed
    assert np.array_equal(given._cached[0][0], first[0]) and np.array_equal(given._cached[2][0], last[0])


def _refuse_float(model: onnx.ModelProto):
    from onnxcompress.runtime.session import make_session

    def make(candidate, **kw):
        assert candidate is not model, "the float model was run"
        return make_session(candidate, **kw)
    return make


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


# ------------------------------------------------------------------ channel slices in every ranking


def _yolo_source(model: onnx.ModelProto, n: int = 32):
    from onnxcompress.runtime.data import IterableSource, input_specs

    x = rand(np.random.default_rng(3), n, 3, 64, scale=1.0)
    return IterableSource([{"x": x[: n // 2]}, {"x": x[n // 2:]}], input_specs(model))


def test_evaluator_judges_every_candidate_on_slices_fixed_from_the_reference():
    from onnxcompress.pipeline.validate import compare_models
    from tests.helpers.builders import yolo_like

    ref, cand = yolo_like(), yolo_like(score_noise=1.0)
    source = _yolo_source(ref)
    evaluate = Evaluator(ref, source, batch_size=16)
    assert evaluate.slices == {"y": ([(0, 4), (4, 10)], "auto")}
    fid = evaluate(cand)
    whole = compare_models(ref, cand, source, batch_size=16).outputs[0]
    score = whole.worst_slices(1)[0]
    assert fid.worst == "y[4:10]" and fid.sqnr_db == pytest.approx(score.sqnr_db, rel=1e-9)
    assert fid.sqnr_db < whole.sqnr_db - 10 and fid.cosine == pytest.approx(score.cosine, rel=1e-9)
    # given slices replace the automatic ones: the box rows alone are exact, the whole output is worst
    boxes = Evaluator(ref, source, batch_size=16, slices={"y": [(0, 4)]})
    assert boxes.slices == {"y": ([(0, 4)], "user")}
    assert boxes(cand).worst == "y" and boxes(cand).sqnr_db == pytest.approx(whole.sqnr_db, rel=1e-9)


def test_mixed_precision_targets_hold_on_the_worst_slice():
    """One int8 scale on the box+score Concat crushes the score rows (whole output: cosine 0.9999);
    min_cosine and min_sqnr see the score slice and keep that Concat float."""
    from onnxcompress.pipeline.validate import compare_models
    from tests.helpers.builders import yolo_split_head
    from tests.helpers.quant import quantize

    ref = yolo_split_head()
    source = _yolo_source(ref)

    def score_sqnr(model):
        (o,) = compare_models(ref, model, source).outputs
        return o.sqnr_db, o.slices[1].sqnr_db

    from onnxcompress.core.pass_api import PassContext
    from onnxcompress.passes.quantize_int8 import CPU_FLAGS
    from onnxcompress.pipeline.manager import PassManager, parse_spec
    from tests.helpers.quant import NO_VNNI

    cpu = {CPU_FLAGS: NO_VNNI}  # judged as deployed: 7-bit weights run exactly on any CPU
    plain, _ = quantize(ref, calib=source, values=cpu)
    whole, score = score_sqnr(plain)
    assert whole > 30 and score < 20
    for spec in ("quantize_int8:min_cosine=0.999", "quantize_int8:min_sqnr=25"):
        mixed, res = quantize(ref, spec, calib=source, values=cpu)
        assert score_sqnr(mixed)[1] > 30, spec
        assert res.stats["fallback_layers"] == 1 and res.stats["exclude_spec"] == "exclude=head"
        assert res.stats["mixed_worst"] == "y[0:4]" and res.stats["mixed_sqnr"] >= 25
    # the user's slices decide what is judged: with only the box rows named, nothing is kept float
    ctx = PassContext(calib=source, slices={"y": [(0, 4)]}, values={CPU_FLAGS: NO_VNNI})
    _, records = PassManager(parse_spec("quantize_int8:min_sqnr=25"), ctx).run(ref)
    assert records[-1].result.stats["fallback_layers"] == 0


def test_sensitivity_ranks_by_the_worst_slice(tmp_path):
    from tests.helpers.builders import yolo_split_head

    model = yolo_split_head()
    source = _yolo_source(model)
    report = layer_sensitivity(model, source, method="minmax", prepare="")
    top = report.layers[0]
    assert top.node == "head" and top.worst == "y[4:10]" and top.sqnr_db < 20
    d = report.as_dict()
    assert d["slices"] == {"y": [[0, 4], [4, 10]]} and d["layers"][0]["worst"] == "y[4:10]"
    given = layer_sensitivity(model, source, method="minmax", prepare="", slices="y:0:4")
    assert given.as_dict()["slices"] == {"y": [[0, 4]]}
    assert next(s for s in given.layers if s.node == "head").sqnr_db > top.sqnr_db + 10


def test_cli_slices_column_and_bad_slice(tmp_path, capsys):
    from tests.helpers.builders import yolo_split_head

    path, calib = tmp_path / "y.onnx", tmp_path / "x.npz"
    onnx.save(yolo_split_head(), path)
    np.savez(calib, x=rand(np.random.default_rng(3), 16, 3, 64, scale=1.0))
    args = ["sensitivity", str(path), "--calib", str(calib), "--method", "minmax", "--prepare", ""]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "worst" in out and "y[4:10]" in out and "channel slices (y [0:4], [4:10])" in out
    assert main([*args, "--slices", "y:0:4", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["slices"] == {"y": [[0, 4]]}
    assert main([*args, "--slices", "y:3:2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty slice" in err[0]


def test_jobs_two_gives_the_same_ranking_as_one(caplog):
    data = np.load("models/digits_calib.npz")
    calib = [{k: data[k][:16] for k in data.files if k not in ("labels", "label")}]
    with caplog.at_level(logging.INFO, logger="onnxcompress.quant.calibrate"):
        one = layer_sensitivity("models/resnet_digits.onnx", calib, jobs=1).as_dict()
    two = layer_sensitivity("models/resnet_digits.onnx", calib, jobs=2).as_dict()
    assert calibration_runs(caplog.records) == 1
    assert len(one["layers"]) > 5 and one == two


def test_jobs_option_on_the_cli(tmp_path):
    out = tmp_path / "s.json"
    assert main(["-q", "sensitivity", "models/resnet_digits.onnx", "--calib", "models/digits_calib.npz",
                 "--samples", "8", "--jobs", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["layers"]
    assert main(["-q", "sensitivity", "models/resnet_digits.onnx", "--calib", "models/digits_calib.npz",
                 "--jobs", "-1"]) == 2
