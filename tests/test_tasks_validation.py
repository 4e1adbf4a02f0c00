"""Task metrics in validation: compare_models, the gate's task thresholds, the CLI and API options."""

import json

import numpy as np
import pytest

from onnxcompress import api
from onnxcompress.cli import main
from onnxcompress.core.errors import InputError
from onnxcompress.pipeline.recipes import load_recipe
from onnxcompress.pipeline.validate import Gate, compare_models
from onnxcompress.runtime.data import IterableSource, RandomSource, input_specs
from onnxcompress.runtime.detection import decode
from onnxcompress.runtime.tasks import TaskSpec
from tests.helpers.builders import small_net, yolo_like


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def int8_like_pair(tmp_path):
    """The YOLO-like head and a candidate whose scores are rounded to steps of 0.1 (an int8 scale
    too coarse for [0, 1] scores): whole-output cosine > 0.9999, score-slice cosine > 0.998,
    detection F1 ~0.85."""
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    ref.write_bytes(yolo_like().SerializeToString())
    cand.write_bytes(yolo_like(score_step=0.1).SerializeToString())
    return ref, cand


def _ort(model, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_compare_models_detection_metrics_match_decoding_the_ort_outputs():
    ref, cand = yolo_like(), yolo_like(score_step=0.1)
    x = np.random.default_rng(5).standard_normal((11, 3, 64)).astype(np.float32)
    rep = compare_models(ref, cand, IterableSource([{"x": x[:4]}, {"x": x[4:]}], input_specs(ref)))
    (o,) = rep.outputs
    assert o.cosine > 0.9999 and o.task is not None and o.task.task == "detection" and o.task.inferred
    r, c = decode(_ort(ref, x)), decode(_ort(cand, x))
    assert o.task.values["ref_detections"] == sum(map(len, r)) and o.task.values["cand_detections"] == sum(map(len, c))
    assert 0.5 < o.task.values["f1"] < 0.95 and o.task.values["images"] == 11
    assert rep.task_note and "detection for output 'y' [N, 10, 64]" in rep.task_note
    fails = Gate(min_det_f1=0.95).check(rep)
    assert fails == [f"y: detection F1 {o.task.values['f1']:.4f} < 0.95"]
    assert Gate(min_det_f1=0.5).check(rep) == []
    d = rep.as_dict()
    assert d["outputs"][0]["task"]["values"]["f1"] == o.task.values["f1"] and d["task_note"] == rep.task_note


def test_task_none_and_task_thresholds_without_their_task():
    ref = yolo_like()
    rep = compare_models(ref, ref, RandomSource(input_specs(ref), 4, seed=1), task=TaskSpec("none"))
    assert rep.outputs[0].task is None and rep.task_note is None and "task" not in rep.as_dict()["outputs"][0]
    fails = Gate(min_det_f1=0.5, min_seg_miou=0.5).check(rep)
    assert fails == ["min_det_f1 0.5: no output was evaluated as detection (set the task: --task detection)",
                     "min_seg_miou 0.5: no output was evaluated as segmentation (set the task: --task segmentation)"]


def test_explicit_task_that_fits_no_output_is_input_error():
    ref = yolo_like()
    with pytest.raises(InputError, match=r"--task segmentation: no output fits .* y \[N, 10, 64\]"):
        compare_models(ref, ref, RandomSource(input_specs(ref), 2), task=TaskSpec("segmentation"))


def test_api_compare_embedding_and_classification(tmp_path):
    net = small_net()
    rep = api.compare(net, net, samples=6, task="embedding", gate=Gate(min_emb_cosine=0.999))
    (o,) = rep.outputs
    assert o.task.task == "embedding" and not o.task.inferred and rep.passed and rep.task_note is None
    assert o.task.values["cosine_min"] == pytest.approx(1.0) and o.task.values["nn_agreement"] == 1.0
    auto = api.compare(net, net, samples=6)
    assert auto.outputs[0].task.task == "classification" and auto.outputs[0].top1_agreement == 1.0
    assert auto.outputs[0].task.values == {"top5_agreement": 1.0}
    assert "classification for output 'out' [N, 10]" in auto.task_note


def test_cli_compare_fails_the_int8_like_detector_on_f1(int8_like_pair, capsys):
    ref, cand = int8_like_pair
    code, out, err = _run(capsys, "-q", "compare", ref, cand, "--min-det-f1", "0.9", "--min-cosine", "0.99",
                          "--json", "-")
    data = json.loads(out)
    (o,) = data["outputs"]
    f1 = o["task"]["values"]["f1"]
    assert o["cosine"] > 0.9999 and f1 < 0.9 and o["task"]["task"] == "detection"
    assert code == 1 and err.strip() == f"error: y: detection F1 {f1:.4f} < 0.9"
    assert data["failures"] == [f"y: detection F1 {f1:.4f} < 0.9"] and data["gate"]["min_det_f1"] == 0.9
    code, out, _ = _run(capsys, "compare", ref, cand, "--min-det-f1", "0.9")
    assert code == 1 and "task y: detection (inferred) F1" in out
    lines = [line for line in out.splitlines() if line.startswith("task inferred")]
    assert lines == ["task inferred from the output layout: detection for output 'y' [N, 10, 64] "
                     "(override with --task NAME, or --task none)"]
    assert _run(capsys, "compare", ref, cand, "--min-det-f1", "0.5")[0] == 0
    code, out, _ = _run(capsys, "compare", ref, cand, "--min-det-f1", "0.9", "--det-conf", "0.6", "--json", "-")
    assert json.loads(out)["outputs"][0]["task"]["settings"]["conf"] == 0.6


def test_cli_task_none_with_a_det_gate_fails(int8_like_pair, capsys):
    ref, cand = int8_like_pair
    code, out, err = _run(capsys, "compare", ref, cand, "--task", "none", "--min-det-f1", "0.5")
    assert code == 1 and "no output was evaluated as detection" in err and "task inferred" not in out


@pytest.mark.parametrize("args, message", [
    (("--det-conf", "2"), "error: --det-conf 2.0: must be a number in [0, 1]"),
    (("--det-iou", "-1"), "error: --det-iou -1.0: must be a number in [0, 1]"),
    (("--min-det-f1", "2"), "error: --min-det-f1 2: must be in [0, 1]"),
    (("--min-seg-miou", "-0.5"), "error: --min-seg-miou -0.5: must be in [0, 1]"),
    (("--min-cosine", "1.5"), "error: --min-cosine 1.5: must be in [-1, 1]"),
    (("--task", "segmentation"), "error: --task segmentation: no output fits"),
    (("--task", "boxes"), "error: Invalid value for '--task'"),
    (("--det-layout", "yolox"), "error: Invalid value for '--det-layout'")])
def test_cli_bad_task_values_exit_2_one_line(int8_like_pair, capsys, args, message):
    ref, cand = int8_like_pair
    code, out, err = _run(capsys, "-q", "compare", ref, cand, *args)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1 and not out


def test_cli_optimize_with_explicit_task(tmp_path, capsys):
    src = tmp_path / "y.onnx"
    src.write_bytes(yolo_like().SerializeToString())
    code, out, _ = _run(capsys, "optimize", src, "-o", tmp_path / "o.onnx", "--passes", "simplify",
                        "--task", "detection", "--det-iou", "0.6", "--min-det-f1", "0.99", "--json", "-")
    v = json.loads(out)["validation"]
    task = v["outputs"][0]["task"]
    assert code == 0 and task["task"] == "detection" and task["inferred"] is False and task["values"]["f1"] == 1.0
    assert task["settings"]["iou"] == 0.6 and "task_note" not in v and v["gate"]["min_det_f1"] == 0.99
    code, _, err = _run(capsys, "optimize", src, "-o", tmp_path / "p.onnx", "--passes", "simplify", "--det-conf", "-1")
    assert code == 2 and err.startswith("error: --det-conf") and not (tmp_path / "p.onnx").exists()


def test_task_options_documented_in_help(capsys):
    for cmd in ("compare", "optimize"):
        code, out, _ = _run(capsys, cmd, "--help")
        for option in ("--task", "--det-conf", "--det-iou", "--det-layout", "--min-det-f1", "--min-seg-miou",
                       "--min-emb-cosine"):
            assert option in out, (cmd, option)


def test_recipe_gate_takes_task_thresholds(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[gate]\nmin_det_f1 = 0.9\nmin_seg_miou = 0.8\n[[pass]]\nname = "fold_bn"\n')
    assert load_recipe(path).gate == {"min_det_f1": 0.9, "min_seg_miou": 0.8}
    path.write_text('[gate]\nmin_det_f1 = 1.5\n[[pass]]\nname = "fold_bn"\n')
    with pytest.raises(InputError, match=r"min_det_f1 = 1.5: must be in \[0, 1\]"):
        load_recipe(path)


def test_explicit_task_no_output_can_fit_fails_before_any_pass(tmp_path, capsys, monkeypatch):
    from onnxcompress.pipeline import manager

    src = tmp_path / "y.onnx"
    src.write_bytes(yolo_like().SerializeToString())
    monkeypatch.setattr(manager.PassManager, "run", lambda *a, **k: pytest.fail("a pass ran"))
    code, _, err = _run(capsys, "optimize", src, "-o", tmp_path / "o.onnx", "--passes", "simplify",
                        "--task", "classification")
    assert code == 2 and err.strip() == ("error: --task classification: no output fits (needs a float output "
                                         "[N, C] with C > 1); outputs: y (rank 3)")
    with pytest.raises(InputError, match=r"--task segmentation: .* y \(rank 3\)"):
        api.compare(src, src, task="segmentation")
