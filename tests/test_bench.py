"""`bench`: interleaved rounds, paired ratios, report structure, bad inputs. No timing is asserted."""

import json
import math
import re

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress.cli import main
from onnxcompress.core.errors import InputError
from onnxcompress.runtime import bench as B

FAST = ["--warmup", "1", "--runs", "3"]


def _mlp(hidden: int, features: int = 8, input_name: str = "x", batch="N", seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((features, hidden)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((hidden, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", [input_name, "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info(input_name, 1, [batch, features])],
                              [helper.make_tensor_value_info("y", 1, [batch, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _save(tmp_path, name: str, model: onnx.ModelProto) -> str:
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return str(path)


@pytest.fixture
def pair(tmp_path):
    return _save(tmp_path, "a.onnx", _mlp(32)), _save(tmp_path, "b.onnx", _mlp(4))


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- pure helpers -------------------------------------------------------------------------------


def test_paired_ratio_is_the_median_of_per_round_ratios():
    ref = [1.0, 10.0, 10.0]
    cand = [3.0, 11.0, 12.0]
    assert B.paired_ratios(cand, ref) == [3.0, 1.1, 1.2]
    assert B.paired_ratio(cand, ref) == pytest.approx(1.2)
    # a ratio of medians would say 1.1: the pairing is what the helper computes
    assert np.median(cand) / np.median(ref) == pytest.approx(1.1)


def test_paired_ratio_cancels_drift_shared_by_a_round():
    drift = [1.0, 5.0, 2.0, 9.0, 3.0]
    ref = [2.0 * d for d in drift]
    cand = [1.0 * d for d in drift]
    assert B.paired_ratio(cand, ref) == 0.5


def test_paired_ratio_of_a_series_to_itself_is_exactly_one():
    times = [0.1234, 5.0, 0.3, 7.77]
    assert B.paired_ratio(times, times) == 1.0


def test_paired_ratio_edge_cases():
    assert B.paired_ratios([1.0, 2.0], [0.0, 1.0]) == [2.0]
    assert math.isnan(B.paired_ratio([1.0], [0.0]))
    with pytest.raises(ValueError):
        B.paired_ratios([1.0, 2.0], [1.0])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_round_order_is_balanced_and_seeded(n):
    order = B.round_order(n, 6 * n, seed=7)
    assert len(order) == 6 * n
    assert all(sorted(r) == list(range(n)) for r in order)
    for start in range(0, len(order), n):  # per block: every model once in every position
        block = order[start:start + n]
        for pos in range(n):
            assert sorted(r[pos] for r in block) == list(range(n))
    assert order == B.round_order(n, 6 * n, seed=7)


def test_round_order_alternates_two_models():
    order = B.round_order(2, 10, seed=0)
    for start in range(0, 10, 2):
        assert order[start] == order[start + 1][::-1]
    assert any(B.round_order(2, 10, seed=s) != order for s in range(1, 6))


def test_latency_stats():
    stats = B.latency_stats([1.0, 2.0, 3.0, 4.0, 10.0])
    assert stats["median_ms"] == 3.0 and stats["min_ms"] == 1.0 and stats["mean_ms"] == 4.0
    assert stats["p90_ms"] == pytest.approx(7.6)
    assert stats["std_ms"] == pytest.approx(np.std([1, 2, 3, 4, 10], ddof=1))
    assert B.latency_stats([2.5])["std_ms"] == 0.0


def test_resolve_provider():
    assert B.resolve_provider("cpu") == "CPUExecutionProvider"
    assert B.resolve_provider("CPUExecutionProvider") == "CPUExecutionProvider"
    with pytest.raises(InputError, match="available: .*CPUExecutionProvider"):
        B.resolve_provider("NoSuchExecutionProvider")


def test_machine_info_line():
    info = B.machine_info("CPUExecutionProvider", 2, True)
    assert info.cores >= 1 and info.cpu
    line = info.line()
    assert "onnxruntime" in line and "CPUExecutionProvider" in line and "threads: 2" in line


# --- inputs -------------------------------------------------------------------------------------


def test_inputs_are_deterministic_with_the_seed():
    model = _mlp(4)
    a = B.bench_inputs(model, seed=3)["x"]
    assert np.array_equal(a, B.bench_inputs(model, seed=3)["x"])
    assert not np.array_equal(a, B.bench_inputs(model, seed=4)["x"])


def test_batch_sets_the_leading_dynamic_dim():
    assert B.bench_inputs(_mlp(4), batch=4)["x"].shape == (4, 8)
    assert B.bench_inputs(_mlp(4))["x"].shape == (1, 8)


def test_fixed_batch_dim_wins_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        feeds = B.bench_inputs(_mlp(4, batch=2), batch=4)
    assert feeds["x"].shape == (2, 8)
    assert "fixed batch" in caplog.text


def test_dim_naming_the_batch_is_refused():
    with pytest.raises(InputError, match="use --batch"):
        B.bench_inputs(_mlp(4), batch=1, dims={"N": 4})


def test_data_gives_the_first_batch(tmp_path):
    x = np.arange(5 * 8, dtype=np.float32).reshape(5, 8)
    np.savez(tmp_path / "d.npz", x=x)
    feeds = B.bench_inputs(_mlp(4), batch=2, data=str(tmp_path / "d.npz"))
    assert np.array_equal(feeds["x"], x[:2])


# --- library ------------------------------------------------------------------------------------


def test_bench_report_structure(pair):
    report = B.bench(list(pair), warmup=1, runs=3, seed=5)
    assert [m.name for m in report.models] == list(pair)
    assert report.order == B.round_order(2, 3, seed=5)
    first, second = report.models
    assert first.ratio_vs_first == 1.0  # exactly: every per-round ratio is t / t
    assert second.ratio_vs_first == B.paired_ratio(second.times_ms, first.times_ms)
    for m in report.models:
        assert len(m.times_ms) == 3 and all(t > 0 for t in m.times_ms)
        assert m.min_ms <= m.median_ms <= m.p90_ms
        assert m.session_ms > 0 and m.first_run_ms > 0
        assert m.providers[0] == "CPUExecutionProvider"
        assert m.rss_delta_bytes is None or isinstance(m.rss_delta_bytes, int)
    assert first.params == 8 * 32 + 32 * 3 and second.params == 8 * 4 + 4 * 3
    assert first.macs == 8 * 32 + 32 * 3  # batch 1
    assert report.inputs == {"x": {"shape": [1, 8], "dtype": "float32"}}
    json.dumps(report.as_dict())


def test_bench_accepts_protos_and_a_single_model():
    report = B.bench([_mlp(4)], warmup=0, runs=2, optimize=False)
    assert report.models[0].name == "model[0]" and report.models[0].ratio_vs_first == 1.0
    assert report.machine.ort_optimization is False
    assert report.order == [[0], [0]]


def test_bench_rejects_bad_settings(pair):
    with pytest.raises(InputError, match="runs"):
        B.bench(list(pair), runs=0)
    with pytest.raises(InputError, match="at least one model"):
        B.bench([])


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_json_schema(pair, capsys):
    code, out, err = _cli(capsys, "bench", *pair, *FAST, "--json", "-")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"machine", "settings", "inputs", "dims", "models", "order"}
    assert {"cpu", "cores", "usable_cores", "onnxruntime", "provider", "threads", "ort_optimization",
            "load_average", "python", "platform"} <= set(data["machine"])
    assert data["machine"]["provider"] == "CPUExecutionProvider" and data["machine"]["ort_optimization"] is True
    assert data["settings"]["runs"] == 3 and data["settings"]["warmup"] == 1 and data["settings"]["data"] == "random"
    keys = {"name", "file_bytes", "params", "macs", "session_ms", "first_run_ms", "rss_delta_bytes",
            "peak_rss_delta_bytes", "median_ms", "p90_ms", "min_ms", "mean_ms", "std_ms", "ratio_vs_first",
            "ratio_p10", "ratio_p90", "providers", "times_ms"}
    for m in data["models"]:
        assert keys <= set(m)
        assert len(m["times_ms"]) == 3
    assert data["models"][0]["ratio_vs_first"] == 1.0
    assert len(data["order"]) == 3 and all(sorted(r) == [0, 1] for r in data["order"])


def test_cli_table_machine_line_and_json_file(pair, tmp_path, capsys):
    target = tmp_path / "bench.json"
    code, out, err = _cli(capsys, "bench", *pair, *FAST, "--threads", "1", "--json", target)
    assert code == 0, err
    assert "onnxruntime" in out and "intra-op threads: 1" in out
    assert "a.onnx" in out and "b.onnx" in out and "vs first" in out and "1.000×" in out
    assert json.loads(target.read_text())["machine"]["threads"] == 1


def test_cli_quiet(pair, capsys):
    code, out, err = _cli(capsys, "-q", "bench", *pair, *FAST)
    assert code == 0, err
    assert out == ""


def test_cli_batch_changes_inputs_and_macs(pair, capsys):
    code, out, _ = _cli(capsys, "bench", pair[0], *FAST, "--batch", "4", "--no-ort-opt", "--json", "-")
    assert code == 0
    data = json.loads(out)
    assert data["inputs"]["x"]["shape"] == [4, 8]
    assert data["models"][0]["macs"] == 4 * (8 * 32 + 32 * 3)
    assert data["machine"]["ort_optimization"] is False


def test_cli_seed_changes_round_order(pair, capsys):
    orders = []
    for seed in ("0", "1", "2", "3"):
        code, out, _ = _cli(capsys, "bench", *pair, "--warmup", "0", "--runs", "4", "--seed", seed, "--json", "-")
        assert code == 0
        orders.append(json.loads(out)["order"])
        assert orders[-1] == B.round_order(2, 4, seed=int(seed))
    assert len({json.dumps(o) for o in orders}) > 1


def test_cli_missing_file(pair, tmp_path, capsys):
    code, _, err = _cli(capsys, "bench", pair[0], tmp_path / "nope.onnx", *FAST)
    assert code == 2
    assert err.startswith("error: ") and "nope.onnx" in err and len(err.strip().splitlines()) == 1


def test_cli_not_an_onnx_file(pair, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    code, _, err = _cli(capsys, "bench", pair[0], bad, *FAST)
    assert code == 2 and "bad.onnx" in err


@pytest.mark.parametrize("other, match", [
    ({"hidden": 4, "features": 5}, "input 'x' expects shape"),
    ({"hidden": 4, "input_name": "z"}, "inputs \\['z'\\] differ"),
])
def test_cli_mismatched_inputs(pair, tmp_path, capsys, other, match):
    path = _save(tmp_path, "other.onnx", _mlp(**other))
    code, _, err = _cli(capsys, "bench", pair[0], path, *FAST)
    assert code == 2
    assert "other.onnx" in err
    assert re.search(match, err), err


def test_cli_unknown_provider_lists_available(pair, capsys):
    code, _, err = _cli(capsys, "bench", *pair, *FAST, "--provider", "NoSuchExecutionProvider")
    assert code == 2
    assert "not available" in err and "CPUExecutionProvider" in err


def test_cli_model_that_fails_to_run(pair, tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", 1, ["N", 8])],
                              [helper.make_tensor_value_info("y", 1, [7, 3])],
                              [numpy_helper.from_array(np.array([7, 3], np.int64), "s")])
    path = _save(tmp_path, "broken.onnx", helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    code, _, err = _cli(capsys, "bench", pair[0], path, *FAST)
    assert code == 2
    assert "broken.onnx: onnxruntime failed to run the model" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_bad_counts(pair, capsys):
    code, _, err = _cli(capsys, "bench", *pair, "--runs", "0")
    assert code == 2 and "--runs" in err


def test_dim_sets_other_symbolic_dims():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", 1, ["N", "L"])],
                              [helper.make_tensor_value_info("y", 1, ["N", "L"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert B.bench_inputs(model, batch=2, dims={"L": 5})["x"].shape == (2, 5)
    assert B.bench_inputs(model)["x"].shape == (1, 32)
