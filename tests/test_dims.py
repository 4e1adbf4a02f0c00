"""Symbolic input dims come from one resolver: ``--dim`` > the data's first batch > defaults (warned).

Every consumer uses it: ``inspect`` (``--calib``/``--data``), ``bench``, the optimize report and
the per-pass MACs, factorize's MAC estimate, pruning's shape tracing, ``latency_aware``'s timings.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper
from PIL import Image

from onnxcompress import api
from onnxcompress.cli import main
from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import PassContext
from onnxcompress.core.shapes import BATCH, DEFAULT, GIVEN, resolve_dims
from onnxcompress.passes.quantize_int8 import LATENCY_TIMER, MODEL_TIMER
from onnxcompress.pipeline.manager import PassManager, parse_spec
from onnxcompress.runtime.data import data_dims, open_source
from tests.helpers.builders import make_model
from tests.helpers.tensors import rand

H, W = 20, 24  # the data's spatial size (the guess would be 32x32)


def conv_hw(c: int = 16) -> onnx.ModelProto:
    """x [N, 3, H, W] -> conv1 (3->c, 3x3, pad 1) -> Relu -> conv2 (c->c, 3x3, pad 1): MACs 9·(3c + c²)·H·W."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return make_model(nodes, {"x": ["N", 3, "H", "W"]}, ["y"],
                      {"W1": rand(rng, c, 3, 3, 3, scale=0.5), "W2": rand(rng, c, c, 3, 3, scale=0.2)})


def conv_macs(h: int, w: int, c: int = 16) -> int:
    return 9 * (3 * c + c * c) * h * w


def flatten_gemm() -> onnx.ModelProto:
    """x [N, 3, H, W] -> conv (3->8) -> Relu -> Flatten -> Gemm (8·4·4 -> 5): runs only at 4x4, which
    only the data says (the symbolic dims leave Flatten's size unknown)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "Wc", "Bc"], ["a"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "Wg", "Bg"], ["y"], name="fc", transB=1)]
    return make_model(nodes, {"x": ["N", 3, "H", "W"]}, ["y"],
                      {"Wc": rand(rng, 8, 3, 3, 3, scale=0.5), "Bc": rand(rng, 8, scale=0.5),
                       "Wg": rand(rng, 5, 8 * 16, scale=0.2), "Bg": rand(rng, 5, scale=0.1)})


def _save(tmp_path, model: onnx.ModelProto, name: str = "m.onnx"):
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def _npz(tmp_path, h: int = H, w: int = W, n: int = 4, name: str = "d.npz", **arrays):
    path = tmp_path / name
    rng = np.random.default_rng(2)
    np.savez(path, **(arrays or {"x": rng.standard_normal((n, 3, h, w)).astype(np.float32)}))
    return path


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------ inspect


def test_inspect_with_calib_counts_the_macs_of_the_data_shape(tmp_path, capsys):
    model, data = _save(tmp_path, conv_hw()), _npz(tmp_path)
    code, out, err = _cli(capsys, "inspect", model, "--calib", data, "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["macs"] == conv_macs(H, W) and report["inputs"] == {"x": [1, 3, H, W]}
    assert report["dims"] == {"H": {"value": H, "source": f"--calib {data}"},
                              "W": {"value": W, "source": f"--calib {data}"},
                              "N": {"value": 1, "source": BATCH}}
    assert "not set" not in err  # nothing guessed, nothing warned
    code, out, err = _cli(capsys, "inspect", model, "--data", data)  # --data does the same; the table says so
    assert code == 0 and f"{conv_macs(H, W):,}" in out and f"H={H}, W={W} (from --data {data})" in out


def test_inspect_without_data_warns_and_names_the_guessed_dims(tmp_path, capsys):
    code, out, err = _cli(capsys, "inspect", _save(tmp_path, conv_hw()), "--json", "-")
    assert code == 0
    report = json.loads(out)
    assert report["macs"] == conv_macs(32, 32) and report["dims"]["H"] == {"value": 32, "source": DEFAULT}
    warning = [line for line in err.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "H, W not set: guessing H=32, W=32" in warning[0] and "--dim H=N" in warning[0]


def test_dim_overrides_the_data(tmp_path, capsys):
    model, data = _save(tmp_path, conv_hw()), _npz(tmp_path)
    code, out, err = _cli(capsys, "inspect", model, "--calib", data, "--dim", "H=10", "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["macs"] == conv_macs(10, W)
    assert report["dims"]["H"] == {"value": 10, "source": GIVEN}
    assert report["dims"]["W"] == {"value": W, "source": f"--calib {data}"}
    assert "--dim H=10 differs from the 20" in err
    metrics = api.inspect(conv_hw(), {"H": 8, "W": 8})  # the API, without data
    assert metrics.macs == conv_macs(8, 8) and metrics.inputs == {"x": [1, 3, 8, 8]}


def test_inputs_sharing_a_dim_name_must_agree(tmp_path, capsys):
    model = make_model([helper.make_node("Add", ["a", "b"], ["y"], name="add")],
                       {"a": ["N", 4, "L"], "b": ["N", 4, "L"]}, ["y"], {})
    data = _npz(tmp_path, a=np.zeros((2, 4, 8), np.float32), b=np.zeros((2, 4, 6), np.float32))
    code, out, err = _cli(capsys, "inspect", _save(tmp_path, model), "--calib", data)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "symbolic dim 'L' is 8 in input 'a' but 6 in input 'b'" in err
    same = _npz(tmp_path, name="same.npz", a=np.zeros((2, 4, 8), np.float32), b=np.zeros((2, 4, 8), np.float32))
    assert _cli(capsys, "inspect", _save(tmp_path, model), "--calib", same)[0] == 0


def test_unknown_dim_name_is_refused(tmp_path, capsys):
    code, _, err = _cli(capsys, "inspect", _save(tmp_path, conv_hw()), "--dim", "height=320")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no symbolic input dim 'height' (its symbolic dims: N, H, W)" in err


def test_image_folder_takes_its_size_from_dim(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    model = _save(tmp_path, conv_hw())
    code, _, err = _cli(capsys, "inspect", model, "--calib", folder)
    assert code == 2 and "give --preprocess size=HxW (or --dim" in err
    code, out, err = _cli(capsys, "inspect", model, "--calib", folder, "--dim", "H=8", "--dim", "W=6", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["macs"] == conv_macs(8, 6) and "not set" not in err


# ------------------------------------------------------------------------------------ bench


def test_bench_without_data_prints_the_guessed_dims(tmp_path, capsys):
    model = _save(tmp_path, conv_hw(c=4))
    code, out, err = _cli(capsys, "bench", model, "--runs", "2", "--warmup", "0")
    assert code == 0, err
    assert "symbolic input dims: H=32, W=32 (guessed); N=1 (batch: per sample)" in out
    assert "H, W not set: guessing H=32, W=32" in err
    code, out, err = _cli(capsys, "bench", model, "--runs", "2", "--warmup", "0", "--data", _npz(tmp_path), "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["inputs"]["x"]["shape"] == [1, 3, H, W]
    assert report["dims"]["H"]["source"].startswith("--data ") and report["dims"]["W"]["value"] == W
    assert "not set" not in err


# ------------------------------------------------------------------------------------ optimize


def test_factorize_macs_use_the_data_shape(tmp_path, capsys):
    model, data = _save(tmp_path, conv_hw()), _npz(tmp_path)
    report_path = tmp_path / "r.json"
    code, out, err = _cli(capsys, "optimize", model, "--passes", "factorize_tucker:rank=4", "--calib", data,
                          "--force", "--json", report_path, "-o", tmp_path / "out.onnx")
    assert code in (0, 1), err
    report = json.loads(report_path.read_text())
    stats = report["passes"][0]["stats"]
    assert stats["layers_factorized"] == 1 and stats["macs_before"] == 9 * 16 * 16 * H * W  # conv2 at the data's size
    assert report["before"]["macs"] == conv_macs(H, W) == report["passes"][0]["macs_before"]
    assert report["passes"][0]["macs_after"] == report["after"]["macs"] < report["before"]["macs"]
    assert report["before"]["dims"]["H"] == {"value": H, "source": f"--calib {data}"}
    assert f"MACs at x [1, 3, {H}, {W}]" in out  # the before/after table says which shapes
    _, given = api.optimize(conv_hw(), "factorize_tucker:rank=4", dims={"H": 8, "W": 10}, validate=False)
    assert given.passes[0].result.stats["macs_before"] == 9 * 16 * 16 * 8 * 10


def test_prune_traces_shapes_and_counts_macs_at_the_data_shape(tmp_path):
    data = _npz(tmp_path, h=4, w=4)
    _, without = api.optimize(flatten_gemm(), "prune_channels:ratio=0.5:round_to=1", validate=False)
    # Flatten's size is unknown at symbolic dims (pruning does not trace at guessed ones): conv's group freezes
    assert ("conv", "unknown_channel_dim") in without.passes[0].result.where_codes()
    assert without.passes[0].result.stats.get("channels_removed", 0) == 0
    _, report = api.optimize(flatten_gemm(), "prune_channels:ratio=0.5:round_to=1", calib=str(data), force=True)
    record = report.passes[0]
    assert record.result.where_codes() == [("fc", "graph_output")] and record.result.stats["channels_removed"] == 4
    assert record.macs_before == report.before.macs == 8 * 3 * 9 * 16 + 5 * 128
    assert record.macs_after == report.after.macs == 4 * 3 * 9 * 16 + 5 * 64
    assert report.before.inputs == {"x": [1, 3, 4, 4]}


def test_latency_aware_times_layers_at_the_resolved_shapes():
    model = conv_hw(c=4)
    calib = [{"x": rand(np.random.default_rng(3), 4, 3, H, W, scale=0.5)}]

    def run(ctx: PassContext) -> list:
        seen: list = []
        ctx.put(LATENCY_TIMER, lambda layer, pair: seen.append((layer, pair.float_feeds["x" if layer == "conv1"
                                                                                         else "r"].shape)) or 1.0)
        ctx.put(MODEL_TIMER, lambda models: [1.0, 0.8, 0.7][:len(models)])
        PassManager(parse_spec("quantize_int8:latency_aware=true"), ctx).run(model)
        return seen

    from_data = run(PassContext(calib=open_source(calib, model)))  # the manager resolves the dims from calib
    assert from_data == [("conv1", (1, 3, H, W)), ("conv2", (1, 4, H, W))]
    given = run(PassContext(calib=open_source(calib, model), dims=resolve_dims(model, {"H": 6, "W": 10})))
    assert given == [("conv1", (1, 3, 6, 10)), ("conv2", (1, 4, 6, 10))]


# ------------------------------------------------------------------------------------ the resolver


def test_peeking_at_a_one_shot_iterator_loses_no_sample():
    model = conv_hw(c=4)
    rng = np.random.default_rng(4)
    samples = [{"x": rand(rng, 1, 3, H, W, scale=1.0)} for _ in range(3)]
    source = open_source(iter(samples), model)
    dims = data_dims(model, None, ("--calib", iter(()), source))
    assert dims.values == {"N": 1, "H": H, "W": W} and source.count() == 3
    assert np.array_equal(next(iter(source.batches(1))).feeds["x"], samples[0]["x"])


def test_random_data_takes_the_resolved_dims():
    model = conv_hw(c=4)
    source = open_source("random:2", model)
    dims = data_dims(model, {"W": 7}, ("--data", "random", source))
    assert dims.sources == {"N": BATCH, "H": DEFAULT, "W": GIVEN}
    assert next(iter(source.batches(2))).feeds["x"].shape == (2, 3, 32, 7)


def test_a_dim_seen_twice_in_one_input_must_agree():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], {"x": ["N", 3, "S", "S"]}, ["y"], {})
    with pytest.raises(InputError, match="'S' is 5 in input 'x' but 4 in input 'x'"):
        resolve_dims(model, None, {"x": (1, 3, 5, 4)}, "--calib d.npz")
    assert resolve_dims(model, None, {"x": (1, 3, 5, 5)}, "--calib d.npz").values["S"] == 5


def test_symbolic_shape_inference_loads_without_torch():
    """onnxruntime's symbolic shape inference (MAC counts where onnx gives up) is loaded from its
    file: the ``onnxruntime.tools`` package ``__init__`` imports torch when installed (seconds)."""
    import subprocess
    import sys

    code = ("import sys; from onnxcompress.core import shapes; c = shapes._symbolic_inference(); "
            "assert c is not None and c.__name__ == 'SymbolicShapeInference', c; "
            "assert 'torch' not in sys.modules and 'onnxruntime.tools' not in sys.modules; "
            "from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference as S; assert S is c")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _computed_reshape(extra: list[onnx.NodeProto] = ()) -> onnx.ModelProto:
    """``x`` reshaped to ``[2 * x.shape[0], -1]``: at opset 13 onnx's inference does not propagate
    these shape values (at 17 it does), so the Reshape output ``r`` gets a type and no shape."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             helper.make_node("Mul", ["d0", "two"], ["d2"]),
             helper.make_node("Unsqueeze", ["d2", "axes"], ["u"]),
             helper.make_node("Concat", ["u", "m1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"]), *extra]
    consts = [onnx.numpy_helper.from_array(np.array(0, np.int64), "i0"),
              onnx.numpy_helper.from_array(np.array(2, np.int64), "two"),
              onnx.numpy_helper.from_array(np.array([0], np.int64), "axes"),
              onnx.numpy_helper.from_array(np.array([-1], np.int64), "m1")]
    outputs = [helper.make_tensor_value_info(n.output[0], 0, None) for n in [nodes[6], *extra[-1:]]]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [4, 3, 8])], outputs, consts)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])


def test_types_only_inference_skips_the_symbolic_fallback_where_onnx_typed_every_tensor(monkeypatch):
    from onnxcompress.core import shapes

    calls = []
    real = shapes._symbolic
    monkeypatch.setattr(shapes, "_symbolic", lambda m: calls.append(1) or real(m))
    typed = shapes.infer_shapes(_computed_reshape(), types_only=True)
    assert not calls and {o.name: o.type.tensor_type.elem_type for o in typed.graph.output} == {"y": 1}
    shapes.infer_shapes(_computed_reshape())  # shapes wanted: symbolic inference finds r's
    assert calls == [1]
    # an op onnx has no schema for leaves its output untyped: the fallback runs for types too
    untyped = _computed_reshape([helper.make_node("Gelu", ["y"], ["g"], domain="com.microsoft"),
                                 helper.make_node("Relu", ["g"], ["z"])])
    typed = shapes.infer_shapes(untyped, types_only=True)
    assert calls == [1, 1]
    assert {o.name: o.type.tensor_type.elem_type for o in typed.graph.output} == {"y": 1, "z": 1}
