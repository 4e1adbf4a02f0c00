"""Tests of factorize_svd: exactness at full rank vs ORT, attributes, rank rules, declines, data-aware mode."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import Numerics, PassContext, PassResult
from onnxcompress.lowrank.factorize import (
    R_ATTRS,
    R_EXCLUDED,
    R_GROUPED,
    R_NOT_PAY,
    R_TINY,
    R_WEIGHT,
)
from onnxcompress.lowrank.linalg import energy_rank
from onnxcompress.passes._factorize import MAX_GRAM_DIM_LIMIT
from onnxcompress.passes.factorize_svd import DECLINE_REASONS, R_KXK, FactorizeSvd
from onnxcompress.pipeline.manager import get_pass, parse_spec
from onnxcompress.runtime.data import open_source
from tests.helpers.builders import conv_model, make_model
from tests.helpers.graphs import initializers, op_types
from tests.helpers.runs import ort_run, rel_err, run_checked
from tests.helpers.tensors import rand, random_feeds

Shape = Sequence[Any] | None


# ---------------------------------------------------------------- builders


def factorize(model: onnx.ModelProto, spec: str, ctx: PassContext | None = None) -> tuple[onnx.ModelProto, PassResult]:
    """Run ``spec`` through the PassManager (full checker) and check names and decline reasons."""
    new, result = run_checked(model, spec, DECLINE_REASONS, ctx)
    assert [i.name for i in new.graph.input] == [i.name for i in model.graph.input]
    return new, result


def max_diff(a: onnx.ModelProto, b: onnx.ModelProto, dim: int = 2, seed: int = 0) -> float:
    feeds = random_feeds(a, seed=seed, dim=dim)
    return max(float(np.abs(x - y).max()) for x, y in zip(ort_run(a, feeds), ort_run(b, feeds), strict=True))


def node_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    return initializers(model)[node.input[1]]


def gemm_model(rng: np.random.Generator, k: int = 32, n: int = 24, trans_b: int = 0, alpha: float = 1.0,
               beta: float = 1.0, bias: bool = True, opset: int = 17) -> onnx.ModelProto:
    w = rand(rng, n, k, scale=0.1) if trans_b else rand(rng, k, n, scale=0.1)
    inits = {"W": w} | ({"C": rand(rng, n, scale=0.1)} if bias else {})
    node = helper.make_node("Gemm", ["x", "W"] + (["C"] if bias else []), ["y"], "fc", transB=trans_b,
                            alpha=alpha, beta=beta)
    return make_model([node], {"x": ["N", k]}, ["y"], inits, opset)


FULL = "max_mac_ratio=100:round_to=1"  # force factorization at full rank


# ---------------------------------------------------------------- contract


def test_registered_and_documented() -> None:
    cls = get_pass("factorize_svd")
    assert cls is FactorizeSvd and cls.numerics == Numerics.LOSSY
    assert cls.summary().startswith("Splits") and len(cls.summary()) < 120
    for word in ("Before:", "After:", "Math:", "Fires when:", "Declines:", "Stats:"):
        assert word in cls.__doc__
    assert {"rank", "rank_ratio", "energy", "vbmf", "round_to", "max_mac_ratio", "min_channels", "exclude",
            "data_aware", "spatial"} <= set(cls.options)


def test_conflicting_rank_rules_are_input_errors() -> None:
    with pytest.raises(InputError, match="rank, energy conflict"):
        parse_spec("factorize_svd:rank=8:energy=0.9")
    with pytest.raises(InputError, match=r"energy=1.5: must be in \(0, 1\]"):
        parse_spec("factorize_svd:energy=1.5")
    with pytest.raises(InputError, match="max_mac_ratio"):
        parse_spec("factorize_svd:max_mac_ratio=0")


# ---------------------------------------------------------------- exact at full rank


@pytest.mark.parametrize("trans_b,alpha,beta,bias", [(0, 1.0, 1.0, True), (1, 0.5, 2.0, True), (1, 1.0, 1.0, False),
                                                     (0, 2.0, 0.0, True)])
def test_gemm_full_rank_is_exact(trans_b: int, alpha: float, beta: float, bias: bool) -> None:
    model = gemm_model(np.random.default_rng(0), trans_b=trans_b, alpha=alpha, beta=beta, bias=bias)
    new, result = factorize(model, f"factorize_svd:rank=24:{FULL}")
    assert result.modified and result.stats["layers_factorized"] == 1
    assert op_types(new) == ["Gemm", "Gemm"]
    first, second = new.graph.node
    assert second.output[0] == "y" and first.output[0] == second.input[0]
    assert node_weight(new, first).shape == ((24, 32) if trans_b else (32, 24))
    assert node_weight(new, second).shape == (24, 24)
    assert list(second.input[2:]) == (["C"] if bias else [])
    assert max_diff(model, new, dim=3) < 1e-5
    assert result.stats["mean_rel_weight_error"] < 1e-6


def test_gemm_before_opset_11_gets_a_zero_c() -> None:
    model = gemm_model(np.random.default_rng(1), k=32, n=32, trans_b=1, opset=9)
    new, _ = factorize(model, "factorize_svd:rank=8")
    first = new.graph.node[0]
    assert len(first.input) == 3 and not initializers(new)[first.input[2]].any()
    assert max_diff(model, new) < 1.0  # runs; lossy at rank 8


def test_matmul_nd_input_full_rank_is_exact() -> None:
    rng = np.random.default_rng(2)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], "mm")
    model = make_model([node], {"x": ["N", 5, 32]}, ["y"], {"W": rand(rng, 32, 20, scale=0.1)})
    new, result = factorize(model, f"factorize_svd:rank=20:{FULL}")
    assert op_types(new) == ["MatMul", "MatMul"] and len(new.graph.node[1].input) == 2
    assert max_diff(model, new) < 1e-5
    assert result.stats["macs_before"] == 5 * 32 * 20 and result.stats["macs_after"] == 5 * 20 * 52


@pytest.mark.parametrize("attrs", [{}, {"strides": [2, 2]}, {"pads": [1, 0, 2, 1], "strides": [2, 1]},
                                   {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, {"bias": False}])
def test_conv1x1_full_rank_is_exact(attrs: dict) -> None:
    attrs = dict(attrs)
    bias = attrs.pop("bias", True)
    rng = np.random.default_rng(3)
    model = conv_model(rand(rng, 24, 16, 1, 1, scale=0.1), ["N", 16, 7, 6], rand(rng, 24, scale=0.1) if bias else None,
                       **attrs)
    new, result = factorize(model, f"factorize_svd:rank=16:{FULL}")
    assert result.stats["layers_factorized"] == 1
    first, second = new.graph.node
    assert [op_types(new), node_weight(new, first).shape, node_weight(new, second).shape] == \
        [["Conv", "Conv"], (16, 16, 1, 1), (24, 16, 1, 1)]
    assert {a.name for a in second.attribute} == {"kernel_shape"} and (len(second.input) == 3) == bias
    assert max_diff(model, new) < 1e-5


SPATIAL_CONFIGS = [
    {"pads": [1, 1, 1, 1]},
    {"pads": [1, 0, 2, 1], "strides": [2, 1]},
    {"strides": [1, 2], "dilations": [2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [1, 2]},
    {"auto_pad": "VALID", "bias": False},
]


@pytest.mark.parametrize("attrs", SPATIAL_CONFIGS)
def test_spatial_full_rank_is_exact(attrs: dict) -> None:
    attrs = dict(attrs)
    bias = attrs.pop("bias", True)
    rng = np.random.default_rng(4)
    model = conv_model(rand(rng, 20, 16, 3, 2, scale=0.1), ["N", 16, 9, 10], rand(rng, 20, scale=0.1) if bias else None,
                       **attrs)
    new, result = factorize(model, f"factorize_svd:spatial=true:rank=40:{FULL}")
    assert result.stats["layers_factorized"] == 1
    first, second = new.graph.node
    assert node_weight(new, first).shape == (40, 16, 3, 1) and node_weight(new, second).shape == (20, 40, 1, 2)
    a1 = {a.name: helper.get_attribute_value(a) for a in first.attribute}
    a2 = {a.name: helper.get_attribute_value(a) for a in second.attribute}
    assert a1["kernel_shape"] == [3, 1] and a2["kernel_shape"] == [1, 2]
    sh, sw = attrs.get("strides", [1, 1])
    assert a1["strides"] == [sh, 1] and a2["strides"] == [1, sw]
    assert max_diff(model, new) < 1e-5
    assert result.stats["mean_rel_weight_error"] < 1e-6


def test_kxk_conv_needs_spatial() -> None:
    rng = np.random.default_rng(5)
    model = conv_model(rand(rng, 32, 32, 3, 3, scale=0.1), ["N", 32, 8, 8], rand(rng, 32, scale=0.1), pads=[1, 1, 1, 1])
    _, result = factorize(model, "factorize_svd")
    assert result.where_codes() == [("conv", R_KXK)] and not result.modified


# ---------------------------------------------------------------- rank rules


def test_error_grows_as_rank_falls() -> None:
    rng = np.random.default_rng(6)
    gemm = gemm_model(rng, k=32, n=32, trans_b=1)
    conv = conv_model(rand(rng, 24, 16, 3, 3, scale=0.1), ["N", 16, 8, 8], rand(rng, 24, scale=0.1), pads=[1, 1, 1, 1])
    for model, spec, ranks in [(gemm, "factorize_svd", (32, 24, 16, 8, 2)),
                               (conv, "factorize_svd:spatial=true", (48, 32, 16, 8, 2))]:
        feeds = random_feeds(model, seed=1, dim=4)
        errors = [rel_err(model, factorize(model, f"{spec}:rank={r}:{FULL}")[0], feeds) for r in ranks]
        assert errors[0] < 1e-5 and all(a < b for a, b in itertools.pairwise(errors)), errors


def test_rank_rules_and_rounding() -> None:
    model = gemm_model(np.random.default_rng(7), k=64, n=48)

    def rank_of(spec: str) -> int:
        new, _ = factorize(model, f"factorize_svd:{spec}:max_mac_ratio=100")
        return node_weight(new, new.graph.node[0]).shape[1]

    assert rank_of("rank=5") == 8  # round_to=8 by default
    assert rank_of("rank=5:round_to=1") == 5
    assert rank_of("rank=100") == 48  # capped at the full rank
    assert rank_of("rank_ratio=0.25:round_to=1") == 12
    s = np.linalg.svd(initializers(model)["W"].astype(np.float64), compute_uv=False)
    assert rank_of("energy=0.5:round_to=1") == energy_rank(s, 0.5)
    assert rank_of("round_to=1") == energy_rank(s, 0.9)  # the default rule
    assert rank_of("vbmf=true") == 8  # random weights: no structure above the noise, min rank rounded


# ---------------------------------------------------------------- declines


def test_does_not_pay_is_declined_with_the_ratio() -> None:
    model = gemm_model(np.random.default_rng(8), k=32, n=32)
    new, result = factorize(model, "factorize_svd:rank=16")
    (where, code, detail), = result.declined
    assert where == "fc" and code == R_NOT_PAY and detail.startswith("MAC ratio 1.00 >= 0.7, ranks")
    assert not result.modified and op_types(new) == ["Gemm"]
    assert result.stats["layers_factorized"] == 0 and result.stats["layers_skipped"] == 1


def test_declines_with_reasons() -> None:
    rng = np.random.default_rng(9)
    inits = {"Wg": rand(rng, 32, 32, 1, 1, scale=0.1), "Wt": rand(rng, 32, 32, scale=0.1),
             "Wa": rand(rng, 32, 32, scale=0.1),
             "Wd": rand(rng, 10, 32, scale=0.1), "We": rand(rng, 32, 32, scale=0.1)}
    nodes = [
        helper.make_node("Conv", ["x", "Wg"], ["g"], "grouped", group=2),  # weight [32, 16]: 32 → 32 in 2 groups
        helper.make_node("Flatten", ["g"], ["f"], "flat"),
        helper.make_node("Gemm", ["f", "Wt"], ["t"], "trans_a", transA=1),
        helper.make_node("MatMul", ["t", "t"], ["s"], "dynamic"),
        helper.make_node("Gemm", ["s", "Wd"], ["d"], "tiny", transB=1),
        helper.make_node("Gemm", ["s", "We"], ["e"], "skipped"),
    ]
    inits["Wg"] = rand(rng, 32, 16, 1, 1, scale=0.1)
    model = make_model(nodes, {"x": [32, 32, 1, 1]}, ["d", "e"], {k: v for k, v in inits.items() if k != "Wa"})
    _, result = factorize(model, "factorize_svd:rank=4:exclude=skipped")
    assert dict(result.where_codes()) == {"grouped": R_GROUPED, "trans_a": R_ATTRS, "dynamic": R_WEIGHT,
                                          "tiny": R_TINY, "skipped": R_EXCLUDED}
    assert not result.modified


def test_shared_weight_is_copied_and_the_other_user_unaffected() -> None:
    rng = np.random.default_rng(10)
    w = rand(rng, 32, 32, scale=0.1)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["a"], "fc1"), helper.make_node("Relu", ["a"], ["r"], "relu"),
             helper.make_node("Gemm", ["r", "W"], ["y"], "fc2")]
    model = make_model(nodes, {"x": ["N", 32]}, ["y", "a"], {"W": w})
    new, result = factorize(model, f"factorize_svd:rank=32:{FULL}:exclude=fc2")
    by_name = {n.name: n for n in new.graph.node}
    assert by_name["fc2"].input[1] == "W" and np.array_equal(initializers(new)["W"], w)
    assert "fc1" not in by_name and result.stats["shared_copied"] == 1
    assert max_diff(model, new) < 1e-5
    both, result = factorize(model, "factorize_svd:rank=8")
    assert "W" not in initializers(both) and result.stats["layers_factorized"] == 2


def test_graph_output_names_and_dynamic_batch() -> None:
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["h"], "fc", transB=1),
             helper.make_node("Relu", ["h"], ["out"], "relu")]
    model = make_model(nodes, {"x": ["batch", 32]}, ["h", "out"], {"W": rand(rng, 40, 32, scale=0.1), "C": rand(rng, 40, scale=0.1)})
    new, _ = factorize(model, f"factorize_svd:rank=32:{FULL}")
    producers = {o: n.name for n in new.graph.node for o in n.output}
    assert producers["h"] == "fc_svd_b" and producers["out"] == "relu"
    assert new.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 5):
        assert max_diff(model, new, dim=batch) < 1e-5


def test_no_candidates_no_change() -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"], "relu")], {"x": [2, 3]}, ["y"], {})
    new, result = factorize(model, "factorize_svd")
    assert not result.modified and result.declined == [] and op_types(new) == ["Relu"]


# ---------------------------------------------------------------- data-aware


def mixing(seed: int, k: int) -> np.ndarray:
    """Strongly anisotropic, correlated features: ``x = z · mix``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, k)) * np.geomspace(4.0, 0.02, k)[:, None]


def two_layer_mlp(rng: np.random.Generator) -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], "fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], "fc2")]
    inits = {"W1": rand(rng, 48, 32, scale=0.3), "b1": rand(rng, 48, scale=0.1), "W2": rand(rng, 48, 32, scale=0.3)}
    return make_model(nodes, {"x": ["N", 32]}, ["y"], inits)


def test_data_aware_beats_plain_on_held_out_data() -> None:
    model = two_layer_mlp(np.random.default_rng(12))
    mix = mixing(13, 32)
    calib = np.random.default_rng(14).standard_normal((256, 32)) @ mix
    test = {"x": (np.random.default_rng(15).standard_normal((256, 32)) @ mix).astype(np.float32)}
    spec = "factorize_svd:rank=6:round_to=1:min_channels=8"
    plain, p_result = factorize(model, spec)
    ctx = PassContext(calib=open_source([{"x": calib.astype(np.float32)}], model))
    aware, a_result = factorize(model, spec, ctx)
    assert p_result.stats["data_aware"] == 0 and a_result.stats["data_aware"] == 1
    assert a_result.stats["refit_layers"] == 2
    assert a_result.stats["refit_error_after"] <= a_result.stats["refit_error_before"] + 1e-9
    assert [node_weight(aware, n).shape for n in aware.graph.node if n.op_type != "Relu"] == \
        [node_weight(plain, n).shape for n in plain.graph.node if n.op_type != "Relu"]
    plain_err, aware_err = rel_err(model, plain, test), rel_err(model, aware, test)
    assert aware_err < 0.5 * plain_err, (aware_err, plain_err)
    off, off_result = factorize(model, spec + ":data_aware=false", ctx)
    assert off_result.stats["data_aware"] == 0 and off.SerializeToString() == plain.SerializeToString()
    no_data, no_data_result = factorize(model, spec + ":data_aware=true")  # nothing to be aware of: plain
    assert no_data_result.stats["data_aware"] == 0 and no_data.SerializeToString() == plain.SerializeToString()


def test_huge_inputs_are_not_whitened() -> None:
    model = two_layer_mlp(np.random.default_rng(20))
    ctx = PassContext(calib=open_source([{"x": np.ones((8, 32), np.float32)}], model),
                      values={MAX_GRAM_DIM_LIMIT: 40})  # fc1 has 32 input features, fc2 48
    _, result = factorize(model, "factorize_svd:rank=6:round_to=1:min_channels=8", ctx)
    assert result.stats["whitening_skipped"] == 1 and result.stats["refit_layers"] == 2


def test_data_aware_spatial_and_deterministic() -> None:
    rng = np.random.default_rng(16)
    model = conv_model(rand(rng, 24, 16, 3, 3, scale=0.1), ["N", 16, 8, 8], rand(rng, 24, scale=0.1), pads=[1, 1, 1, 1],
                       strides=[1, 2])
    mix = mixing(17, 16)

    def images(seed: int, n: int) -> np.ndarray:
        z = np.random.default_rng(seed).standard_normal((n, 8, 8, 16)) @ mix
        return z.transpose(0, 3, 1, 2).astype(np.float32)

    spec = "factorize_svd:spatial=true:rank=8:round_to=1"
    ctx = PassContext(calib=open_source([{"x": images(18, 64)}], model), seed=3)
    first, result = factorize(model, spec, ctx)
    second, _ = factorize(model, spec, ctx)
    assert first.SerializeToString() == second.SerializeToString()
    plain, _ = factorize(model, spec)
    test = {"x": images(19, 32)}
    assert rel_err(model, first, test) < 0.7 * rel_err(model, plain, test)
    assert result.stats["macs_after"] < 0.7 * result.stats["macs_before"]


# ---------------------------------------------------------------- latency_aware


def _matmul_pair_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Two MatMuls on ``x [N, 6, 64]``: ``64 -> 64`` and ``64 -> 128`` (low rank enough to pay in MACs)."""
    w1 = (rand(rng, 64, 8, scale=0.3) @ rand(rng, 8, 64, scale=0.3)).astype(np.float32)
    w2 = (rand(rng, 64, 8, scale=0.3) @ rand(rng, 8, 128, scale=0.3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], "mm1"), helper.make_node("MatMul", ["h", "W2"], ["y"], "mm2")]
    return make_model(nodes, {"x": ["N", 6, 64]}, ["y"], {"W1": w1, "W2": w2})


def test_latency_aware_declines_factors_that_are_not_faster() -> None:
    from onnxcompress.passes.factorize_svd import LATENCY_TIMER, R_NOT_FASTER

    model = _matmul_pair_model(np.random.default_rng(3))
    seen = []

    def timer(pair):
        k, n = pair.float_model.graph.initializer[0].dims
        seen.append((pair.float_feeds["x"].shape, k, n, [tuple(i.dims) for i in pair.int8_model.graph.initializer]))
        assert op_types(pair.int8_model) == ["MatMul", "MatMul"] and op_types(pair.float_model) == ["MatMul"]
        return 1.1 if n == 128 else 0.6

    new, result = factorize(model, "factorize_svd:rank=8:latency_aware=true", PassContext(values={LATENCY_TIMER: timer}))
    assert seen == [((6, 64), 64, 64, [(64, 8), (8, 64)]), ((6, 64), 64, 128, [(64, 8), (8, 128)])]
    assert result.where_codes() == [("mm2", R_NOT_FASTER)]
    assert result.declined[0].detail == "1.10× the layer's time at rank 8 (6 rows, 64→128)"
    assert result.stats["layers_factorized"] == 1 and op_types(new) == ["MatMul", "MatMul", "MatMul"]
    assert max_diff(model, new) < 1e-3  # rank 8 is the weights' rank: exact up to rounding


def test_latency_aware_off_or_faster_keeps_every_factorization() -> None:
    from onnxcompress.passes.factorize_svd import LATENCY_TIMER

    model = _matmul_pair_model(np.random.default_rng(3))
    calls = []
    ctx = PassContext(values={LATENCY_TIMER: lambda pair: calls.append(pair) or 0.5})
    _, result = factorize(model, "factorize_svd:rank=8:latency_aware=true", ctx)
    assert result.stats["layers_factorized"] == 2 and len(calls) == 2
    _, result = factorize(model, "factorize_svd:rank=8", ctx)  # off: never timed
    assert result.stats["layers_factorized"] == 2 and len(calls) == 2
