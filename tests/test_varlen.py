"""Variable-length calibration data (issue #13): one tokenized sentence per .npz, different sequence
lengths. Only same-shape samples share a batch, and every consumer (quantization calibration, bias
correction, reconstruction capture, sensitivity, validation, task metrics) copes with batches whose
shapes differ."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress import api
from onnxcompress.cli import main
from onnxcompress.runtime.data import open_source
from onnxcompress.runtime.tasks import TaskSpec, start_task
from tests.helpers.runs import cosine, ort_run
from tests.helpers.transformer import encoder, token_feeds

LENGTHS = [5, 5, 9, 12, 12, 12, 7, 16, 16, 5, 20, 9]


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    """A folder of one-sentence .npz files of the LENGTHS above, and the encoder (with its hidden state)."""
    root = tmp_path_factory.mktemp("varlen")
    calib = root / "calib"
    calib.mkdir()
    for i, seq in enumerate(LENGTHS):
        np.savez(calib / f"s{i:03d}.npz", **token_feeds(1, seq, seed=i))
    model = root / "enc.onnx"
    onnx.save(encoder(hidden=True), model)
    return model, calib


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_batches_break_at_shape_changes(sentences):
    _, calib = sentences
    src = open_source(calib, encoder())
    batches = list(src.batches(2))
    sizes = [(len(b), b.feeds["input_ids"].shape[1]) for b in batches]
    assert sizes == [(2, 5), (1, 9), (2, 12), (1, 12), (1, 7), (2, 16), (1, 5), (1, 20), (1, 9)]
    for b in batches:
        assert b.feeds["attention_mask"].shape == b.feeds["input_ids"].shape
    assert sum(len(b) for b in batches) == len(LENGTHS) == src.count()
    # the samples come out in file order, unchanged
    first = np.load(calib / "s003.npz")["input_ids"]
    assert np.array_equal(batches[2].feeds["input_ids"][:1], first)


def test_limit_counts_samples_across_shape_breaks(sentences):
    _, calib = sentences
    src = open_source(calib, encoder(), limit=4)
    assert [len(b) for b in src.batches(8)] == [2, 1, 1]


@pytest.mark.parametrize("how", [("--passes", "quantize_int8"), ("--recipe", "int8"),
                                 ("--passes", "quantize_int8,bias_correction")])
def test_quantize_with_variable_length_calibration(sentences, tmp_path, capsys, how):
    model, calib = sentences
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    code, _, err = _run(capsys, "-q", "optimize", model, *how, "--calib", calib, "-o", out, "--json", rep)
    assert code == 0, err
    report = json.loads(rep.read_text())
    emb = next(o for o in report["validation"]["outputs"] if o["name"] == "embedding")
    assert emb["samples"] == len(LENGTHS) and emb["cosine"] > 0.995
    feeds = token_feeds(1, 11, seed=99)  # a length not in the calibration set
    ref, got = ort_run(model, feeds)[0], ort_run(out, feeds)[0]
    assert cosine(ref, got) > 0.99


def test_compare_and_sensitivity_on_variable_lengths(sentences, tmp_path, capsys):
    model, calib = sentences
    q = tmp_path / "q.onnx"
    assert _run(capsys, "-q", "optimize", model, "--passes", "quantize_int8", "--calib", calib, "-o", q)[0] == 0
    rep = tmp_path / "c.json"
    code, _, err = _run(capsys, "-q", "compare", model, q, "--data", calib, "--task", "embedding", "--json", rep)
    assert code == 0, err
    outputs = {o["name"]: o for o in json.loads(rep.read_text())["outputs"]}
    task = outputs["embedding"]["task"]["values"]
    assert 0.99 < task["cosine_min"] <= task["cosine_mean"] <= 1.0
    assert task["nn_samples"] == len(LENGTHS) and task["spearman"] > 0.9
    hidden = outputs["layer1.ffn.output/LN"]["task"]["values"]  # [1, seq, dim]: flattened sizes differ
    assert hidden["nn_samples"] == LENGTHS.count(LENGTHS[0]) and hidden["cosine_min"] > 0.99
    code, _, err = _run(capsys, "-q", "sensitivity", model, "--calib", calib, "--json", tmp_path / "s.json")
    assert code == 0, err
    layers = json.loads((tmp_path / "s.json").read_text())["layers"]
    assert layers and all(np.isfinite(float(r["cosine"])) for r in layers)


def _conv1d(tmp_path):
    """Conv1d -> Relu -> Conv1d over a symbolic length L (prunable, with reconstruction)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 4, 3)), ("b1", (16,)), ("w2", (8, 16, 3)), ("b2", (8,)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 4, "L"])],
                          [helper.make_tensor_value_info("y", 1, ["N", 8, "L"])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    calib = tmp_path / "c1"
    calib.mkdir()
    for i in range(16):
        np.savez(calib / f"s{i:03d}.npz", x=rng.standard_normal((1, 4, 6 + i % 5)).astype(np.float32))
    return model, calib


def test_prune_with_reconstruction_on_variable_lengths(tmp_path):
    model, calib = _conv1d(tmp_path)
    pruned, rep = api.optimize(model, "prune_channels:ratio=0.25:round_to=1", calib=str(calib), force=True)
    stats = rep.passes[0].result.stats
    assert stats["groups_pruned"] == 1 and stats["reconstructed_layers"] == 1
    assert stats["reconstruct_error_after"] < stats["reconstruct_error_before"]
    assert rep.validation.outputs[0].samples == 16
    feeds = {"x": np.random.default_rng(5).standard_normal((1, 4, 13)).astype(np.float32)}
    assert np.isfinite(ort_run(pruned, feeds)[0]).all()


def test_transformer_prune_channels_runs_on_variable_lengths(sentences):
    model, calib = sentences
    _, rep = api.optimize(str(model), "prune_channels:ratio=0.25", calib=str(calib), force=True)
    assert rep.validation is not None and rep.validation.outputs[0].samples == len(LENGTHS)


def test_embedding_task_keeps_pairs_of_the_first_width_only():
    acc = start_task(np.zeros((1, 4, 3), np.float32), TaskSpec("embedding"))
    rng = np.random.default_rng(0)
    for seq in (4, 4, 6, 4):
        ref = rng.standard_normal((2, seq, 3)).astype(np.float32)
        acc.add(ref, ref + 0.01)
    values = acc.result().values
    assert values["nn_samples"] == 6 and values["spearman"] > 0.99 and values["cosine_min"] > 0.99


def test_report_shows_embedding_min_cosine_and_spearman(sentences, tmp_path, capsys):
    model, calib = sentences
    rep = tmp_path / "o.json"
    code, _, err = _run(capsys, "-q", "optimize", model, "--passes", "quantize_int8", "--calib", calib,
                        "--task", "embedding", "-o", tmp_path / "q.onnx", "--json", rep)
    assert code == 0, err
    values = next(o for o in json.loads(rep.read_text())["validation"]["outputs"]
                  if o["name"] == "embedding")["task"]["values"]
    code, _, err = _run(capsys, "report", rep, "-o", tmp_path / "r.md", "--no-plots")
    assert code == 0, err
    md = (tmp_path / "r.md").read_text()
    assert f"min cosine {values['cosine_min']:.3f}" in md and f"Spearman {values['spearman']:.3f}" in md
