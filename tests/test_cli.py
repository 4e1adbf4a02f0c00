"""CLI behaviour: exit codes, one-line errors, no partial outputs, input never modified."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress.cli import main
from tests.helpers.runs import ROOT, python_env


def _conv_bn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 4
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "var"),
        numpy_helper.from_array(rng.standard_normal((c * 8 * 8, 5)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["logits"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", 1, ["N", 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(_conv_bn_model().SerializeToString())
    return p


def _digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_writes_validated_model_and_json(tmp_path, model_path, capsys):
    before = _digest(model_path)
    out = tmp_path / "o.onnx"
    code, stdout, err = _run(capsys, "optimize", model_path, "-o", out, "--passes", "fold_bn,simplify",
                             "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "before → after" in stdout and "gate passed" in stdout
    assert _digest(model_path) == before
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["output"] == str(out)
    assert report["before"]["op_counts"]["BatchNormalization"] == 1
    assert "BatchNormalization" not in report["after"]["op_counts"]
    assert [p["pass"] for p in report["passes"]] == ["fold_bn", "simplify"]
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(out).graph.node]


def test_default_recipe_and_default_output(tmp_path, model_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "-q", "optimize", model_path)
    assert code == 0, err
    assert (tmp_path / "m.opt.onnx").exists()


def test_output_equal_to_input_refused(model_path, capsys):
    before = _digest(model_path)
    code, _, err = _run(capsys, "optimize", model_path, "-o", model_path)
    assert code == 2 and err.startswith("error:") and "input model" in err
    assert len(err.strip().splitlines()) == 1 and _digest(model_path) == before


@pytest.mark.parametrize("args, match", [
    (["--passes", "nope"], "unknown pass 'nope'; valid passes: "),
    (["--passes", "fold_bn:bogus=1"], "unknown option 'bogus'"),
    (["--passes", "fold_bn", "--recipe", "default"], "not both"),
    (["--recipe", "nope"], "unknown recipe"),
    (["--calib", "missing.npz"], "no such file"),
])
def test_bad_usage_exit_2_no_output(tmp_path, model_path, capsys, args, match):
    out = tmp_path / "o.onnx"
    code, _, err = _run(capsys, "optimize", model_path, "-o", out, *args)
    assert code == 2 and match in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"garbage bytes", None])
def test_bad_models_exit_2(tmp_path, capsys, content):
    p = tmp_path / "bad.onnx"
    if content is not None:
        p.write_bytes(content)
    code, _, err = _run(capsys, "optimize", p, "-o", tmp_path / "o.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_failed_gate_exit_1_nothing_written(tmp_path, model_path, capsys):
    out = tmp_path / "o.onnx"
    code, stdout, err = _run(capsys, "optimize", model_path, "-o", out, "--passes", "fold_bn",
                             "--max-rel-err", "0", "--json", tmp_path / "r.json")
    assert code == 1 and "validation gate failed" in err
    assert not out.exists()
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False
    code, _, _ = _run(capsys, "optimize", model_path, "-o", out, "--passes", "fold_bn", "--max-rel-err", "0", "--force")
    assert code == 1 and out.exists()


def test_calibration_data_with_labels(tmp_path, model_path, capsys):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((20, 3, 8, 8)).astype(np.float32), labels=rng.integers(0, 5, 20))
    code, stdout, err = _run(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--data", tmp_path / "d.npz")
    assert code == 0, err
    assert "20 samples" in stdout and "→" in stdout
    np.savez(tmp_path / "bad.npz", y=np.zeros((2, 3, 8, 8), np.float32))
    code, _, err = _run(capsys, "optimize", model_path, "-o", tmp_path / "o2.onnx", "--data", tmp_path / "bad.npz")
    assert code == 2 and "unknown input name" in err and not (tmp_path / "o2.onnx").exists()


def test_optimize_json_to_stdout_is_pure_json(tmp_path, model_path, capsys):
    code, out, _ = _run(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--json", "-")
    assert code == 0 and json.loads(out)["passed"] is True


def test_inspect_json(model_path, capsys):
    code, out, _ = _run(capsys, "inspect", model_path, "--json", "-")
    data = json.loads(out)
    assert code == 0 and data["macs"] == 4 * 64 * 27 + 256 * 5 and data["op_counts"]["Conv"] == 1


def test_compare(tmp_path, model_path, capsys):
    out = tmp_path / "o.onnx"
    assert _run(capsys, "-q", "optimize", model_path, "-o", out)[0] == 0
    code, stdout, _ = _run(capsys, "compare", model_path, out, "--json", "-")
    assert code == 0 and json.loads(stdout)["outputs"][0]["cosine"] > 0.999999
    code, _, err = _run(capsys, "compare", model_path, out, "--min-sqnr", "1000")
    assert code == 1 and "SQNR" in err


def test_passes_lists_registry(capsys):
    code, out, _ = _run(capsys, "passes", "--json")
    names = [p["name"] for p in json.loads(out)["passes"]]
    assert code == 0 and {"fold_bn", "simplify"} <= set(names)
    assert "default" in json.loads(out)["recipes"]


def test_console_script_no_traceback(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"\x08\x01garbage")
    proc = subprocess.run([sys.executable, "-m", "onnxcompress", "inspect", str(p)], capture_output=True, text=True,
                          env=python_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:")


def test_pass_needing_calibration_without_calib_exits_2_one_line_nothing_written(tmp_path, model_path, capsys):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, err = _run(capsys, "optimize", model_path, "-o", out, "--passes", "quantize_int8", "--json", report)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "quantize_int8 needs calibration data" in lines[0] and "--calib" in lines[0]
    assert not out.exists() and not report.exists()


def test_pass_order_and_option_ranges_exit_2_one_line(tmp_path, model_path, capsys):
    out = tmp_path / "o.onnx"
    for spec, words in (("bias_correction,quantize_int8", "bias_correction reads the float reference written by "
                                                          "quantize_int8, which does not run before it"),
                        ("prune_channels:ratio=2", "option ratio=2.0: must be in [0, 1)")):
        code, _, err = _run(capsys, "optimize", model_path, "-o", out, "--passes", spec, "--calib-random", "4")
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and words in lines[0] and not out.exists()


def test_json_declines_carry_code_and_detail(tmp_path, model_path, capsys):
    report = tmp_path / "r.json"
    code, _, _ = _run(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--passes",
                      "factorize_svd:min_channels=0:rank=4", "--json", report, "--force")
    assert code in (0, 1)
    (record,) = json.loads(report.read_text())["passes"]
    assert record["declined"] == [
        {"where": "conv", "code": "kxk_conv_needs_spatial", "detail": ""},
        {"where": "logits", "code": "does_not_pay", "detail": "MAC ratio 1.02 >= 0.7, ranks (5,)"}]


@pytest.mark.parametrize("args, want", [
    (["optimize", "m.onnx", "-q"], ["-q", "optimize", "m.onnx"]),
    (["-v", "inspect", "m.onnx", "--debug", "--top", "3"], ["-v", "--debug", "inspect", "m.onnx", "--top", "3"]),
    (["compare", "a.onnx", "b.onnx", "--", "-q"], ["compare", "a.onnx", "b.onnx", "--", "-q"]),
    (["--help"], ["--help"]),
])
def test_global_flags_move_before_the_subcommand(args, want):
    from onnxcompress.cli import hoist_global_flags

    assert hoist_global_flags(args) == want


def test_quiet_after_the_subcommand(capsys, tmp_path):
    """README calls -q global: it works after the subcommand too (no table, only the result)."""
    out = tmp_path / "m.opt.onnx"
    code = main(["optimize", str(ROOT / "models/resnet_digits.onnx"), "--data", str(ROOT / "models/digits_test.npz"),
                 "-o", str(out), "-q"])
    captured = capsys.readouterr()
    assert code == 0 and out.exists() and captured.out == "" and "No such option" not in captured.err


def test_inspect_nodes_lists_every_node(capsys):
    """``inspect --nodes`` lists every node (the names exclude= takes) with op type and output shape."""
    model = onnx.load(str(ROOT / "models/resnet_digits.onnx"))
    code = main(["inspect", str(ROOT / "models/resnet_digits.onnx"), "--nodes", "--json", "-"])
    nodes = json.loads(capsys.readouterr().out)["nodes"]
    assert code == 0 and [n["name"] for n in nodes] == [n.name for n in model.graph.node]
    assert nodes[0]["op_type"] == "Conv" and list(nodes[0]["outputs"].values())[0] == [1, 32, 32, 32]
    assert nodes[-1]["outputs"] == {"logits": [1, 10]}


def test_preprocess_help_lists_every_key():
    import dataclasses

    from onnxcompress.cli import PREPROCESS_HELP
    from onnxcompress.runtime.preprocess import Preprocess

    for f in dataclasses.fields(Preprocess):
        assert f"{f.name}=" in PREPROCESS_HELP, f.name
    assert "(pixel * scale - mean) / std" in PREPROCESS_HELP


@pytest.fixture
def yolo_pair(tmp_path):
    from tests.helpers.builders import yolo_like

    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    ref.write_bytes(yolo_like().SerializeToString())
    cand.write_bytes(yolo_like(1.0).SerializeToString())
    return ref, cand


def test_compare_fails_on_the_worst_slice_and_names_it(yolo_pair, capsys):
    ref, cand = yolo_pair
    code, out, err = _run(capsys, "-q", "compare", ref, cand, "--min-cosine", "0.99", "--json", "-")
    data = json.loads(out)
    (o,) = data["outputs"]
    assert o["cosine"] >= 0.999 and [s["name"] for s in o["slices"]] == ["y[0:4]", "y[4:10]"]
    assert code == 1 and "y[4:10]: cosine" in err and len(err.strip().splitlines()) == 1
    assert data["passed"] is False and data["failures"][0].startswith("y[4:10]: cosine")
    code, out, _ = _run(capsys, "compare", ref, cand, "--min-sqnr", "20")
    assert code == 1 and "y[4:10]" in out and "(auto)" in out  # the table shows the worst slice
    assert _run(capsys, "compare", ref, ref, "--min-cosine", "0.99")[0] == 0


def test_compare_applies_the_lossy_gate_by_default(yolo_pair, capsys):
    """Without thresholds, compare still gates (cosine >= 0.99 on every output and slice); --no-gate
    only measures."""
    ref, cand = yolo_pair
    code, _, err = _run(capsys, "-q", "compare", ref, cand)
    assert code == 1 and err.startswith("error: y[4:10]: cosine") and "< 0.99" in err
    code, out, _ = _run(capsys, "compare", ref, cand, "--no-gate", "--json", "-")
    assert code == 0 and json.loads(out)["gate"] is None
    assert _run(capsys, "compare", ref, cand, "--no-gate", "--min-sqnr", "20")[0] == 1
    assert _run(capsys, "-q", "compare", ref, ref)[0] == 0


def test_compare_user_slices(yolo_pair, capsys):
    ref, cand = yolo_pair
    code, out, err = _run(capsys, "compare", ref, cand, "--slices", "y:0:4,0:8:", "--min-sqnr", "20", "--json", "-")
    names = [(s["name"], s["source"]) for s in json.loads(out)["outputs"][0]["slices"]]
    assert code == 1 and names == [("y[0:4]", "user"), ("y[8:10]", "user")] and "y[8:10]: SQNR" in err
    assert _run(capsys, "compare", ref, cand, "--slices", "y:0:4", "--min-sqnr", "20")[0] == 0


@pytest.mark.parametrize("spec", ["y:a", "z:0:4", "y:4:4", "y:0:11", "y:10", "2:0:1", "y:0:4,,y:4"])
def test_bad_slices_exit_2_one_line(yolo_pair, capsys, spec):
    ref, cand = yolo_pair
    code, out, err = _run(capsys, "-q", "compare", ref, cand, "--slices", spec)
    assert code == 2 and err.startswith("error: --slices") and len(err.strip().splitlines()) == 1 and not out


def test_optimize_slices_in_json(tmp_path, capsys):
    from tests.helpers.builders import yolo_like

    src = tmp_path / "y.onnx"
    src.write_bytes(yolo_like().SerializeToString())
    code, out, _ = _run(capsys, "optimize", src, "-o", tmp_path / "o.onnx", "--passes", "simplify",
                        "--slices", "y:4:", "--json", "-")
    (o,) = json.loads(out)["validation"]["outputs"]
    assert code == 0 and [s["name"] for s in o["slices"]] == ["y[4:10]"]
    code, _, err = _run(capsys, "optimize", src, "-o", tmp_path / "p.onnx", "--passes", "simplify", "--slices", "q:0")
    assert code == 2 and "--slices" in err and not (tmp_path / "p.onnx").exists()


def test_slices_documented_in_help(capsys):
    for cmd in ("compare", "optimize"):
        code, out, _ = _run(capsys, cmd, "--help")
        assert code == 0 and "OUTPUT:START:STOP" in out and "axis 1" in out
