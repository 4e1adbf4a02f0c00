"""Random integer inputs respect what they index (issue #13): token ids below the embedding table's
rows, token types below 2, masks all ones; integers of unknown meaning are refused (exit 2)."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcompress import api
from onnxcompress.cli import main
from onnxcompress.core.errors import InputError
from onnxcompress.core.index_inputs import IntegerDomain, integer_domains
from onnxcompress.runtime.bench import bench_inputs
from onnxcompress.runtime.data import open_source
from tests.helpers.builders import make_model, node
from tests.helpers.runs import ort_run
from tests.helpers.transformer import encoder


def with_token_types(model: onnx.ModelProto, types: int = 2, via: str = "direct") -> onnx.ModelProto:
    """``model`` (the helper encoder) plus a ``token_type_ids`` input gathering a ``[types, dim]``
    table added to the word + position sum; ``via``: ``direct``, ``unsqueeze`` (Unsqueeze, Reshape,
    Squeeze on the way) or ``int32`` (a Cast to int32 on the way)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    dim = next(i for i in g.initializer if i.name == "embeddings.word").dims[1]
    table = onnx.numpy_helper.from_array(np.random.default_rng(1).standard_normal((types, dim)).astype(np.float32),
                                         "embeddings.token_type")
    g.initializer.append(table)
    ids = "token_type_ids"
    extra = []
    if via == "unsqueeze":
        g.initializer.extend([onnx.numpy_helper.from_array(np.array([0], np.int64), "tt.axes"),
                              onnx.numpy_helper.from_array(np.array([0, 0, 1], np.int64), "tt.shape")])
        extra = [node("Unsqueeze", [ids, "tt.axes"], "tt/unsq"), node("Reshape", ["tt/unsq", "tt.shape"], "tt/resh"),
                 node("Squeeze", ["tt/resh", "tt.axes"], "tt/ids")]
        ids = "tt/ids"
    elif via == "int32":
        extra = [node("Cast", [ids], "tt/ids", to=TensorProto.INT32)]
        ids = "tt/ids"
    summed = next(n for n in g.node if n.output[0] == "embeddings/sum")
    summed.output[0] = summed.name = "embeddings/sum0"
    new = [*extra, node("Gather", ["embeddings.token_type", ids], "tt/emb", axis=0),
           node("Add", ["embeddings/sum0", "tt/emb"], "embeddings/sum")]
    at = list(g.node).index(summed) + 1
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes[:at] + new + nodes[at:])
    g.input.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"]))
    onnx.checker.check_model(m, full_check=True)
    return m


def test_encoder_domains():
    doms = integer_domains(encoder(vocab=50))
    assert doms["input_ids"].kind == "index" and doms["input_ids"].high == 50
    assert doms["attention_mask"].kind == "mask"


@pytest.mark.parametrize("via", ["direct", "unsqueeze", "int32"])
def test_token_types_index_a_two_row_table(via):
    doms = integer_domains(with_token_types(encoder(), 2, via))
    assert doms["token_type_ids"].kind == "index" and doms["token_type_ids"].high == 2
    assert doms["token_type_ids"].reason == "embeddings.token_type"


def test_smallest_table_wins_and_constant_derived_tables_count():
    # ids index a 7-row table and, after Cast/Mul of an int8 table (a weight-quantized embedding), a 5-row one
    inits = {"t7": np.ones((7, 3), np.float32), "q5": np.ones((5, 3), np.int8), "s": np.float32(0.5)}
    nodes = [node("Gather", ["t7", "ids"], "a", axis=0), node("Cast", ["q5"], "qf", to=TensorProto.FLOAT),
             node("Mul", ["qf", "s"], "t5"), node("Gather", ["t5", "ids"], "b", axis=0), node("Add", ["a", "b"], "y")]
    model = make_model(nodes, {"ids": ["n", 4]}, ["y"], inits, types={"ids": TensorProto.INT64})
    dom = integer_domains(model)["ids"]
    assert (dom.kind, dom.high) == ("index", 5) and dom.reason == "t5, t7"


def test_gather_axis_and_shape_reads():
    inits = {"t": np.ones((3, 9), np.float32)}
    nodes = [node("Shape", ["ids"], "shp"), node("Gather", ["t", "ids"], "y0", axis=1), node("Cast", ["shp"], "sf", to=1),
             node("ReduceSum", ["y0"], "r", keepdims=0), node("Add", ["r", "sf"], "y")]
    model = make_model(nodes, {"ids": [2]}, ["y"], inits, types={"ids": TensorProto.INT64})
    assert integer_domains(model)["ids"].high == 9  # rows along the Gather axis; Shape only reads the shape


def _unknown_model():
    nodes = [node("Add", ["ids", "one"], "plus"), node("Cast", ["plus"], "y", to=TensorProto.FLOAT)]
    return make_model(nodes, {"ids": ["n", 4]}, ["y"], {"one": np.array(1, np.int64)}, types={"ids": TensorProto.INT64})


def test_arithmetic_on_integers_is_unknown_and_refused():
    model = _unknown_model()
    dom = integer_domains(model)["ids"]
    assert dom.kind == "unknown" and dom.reason == "Add 'plus'"
    with pytest.raises(InputError, match=r"integer input 'ids' \(read by Add 'plus'\).*--calib"):
        open_source("random:4", model)


def test_contrib_embed_layer_norm_inputs():
    g = helper.make_graph(
        [helper.make_node("EmbedLayerNormalization", ["ids", "seg", "w", "p", "s", "gamma", "beta", "mask"],
                          ["y", "mi"], domain="com.microsoft")], "g",
        [helper.make_tensor_value_info(n, TensorProto.INT32, [1, 4]) for n in ("ids", "seg", "mask")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.zeros(s, np.float32), n)
         for n, s in (("w", (30, 8)), ("p", (16, 8)), ("s", (2, 8)), ("gamma", (8,)), ("beta", (8,)))])
    doms = integer_domains(helper.make_model(g))
    assert (doms["ids"].high, doms["seg"].high, doms["mask"].kind) == (30, 2, "mask")


def test_random_source_draws_within_the_tables():
    model = with_token_types(encoder(vocab=50), 2)
    src = open_source("random:6", model, dims={"seq": 16})
    seen = {k: np.concatenate([b.feeds[k].ravel() for b in src.batches(2)]) for k in
            ("input_ids", "attention_mask", "token_type_ids")}
    assert seen["input_ids"].max() < 50 and seen["input_ids"].max() >= 10  # the whole table, not [0, 10)
    assert set(seen["token_type_ids"].tolist()) == {0, 1}
    assert (seen["attention_mask"] == 1).all()
    feeds = bench_inputs(model, batch=2, dims={"seq": 8})
    assert feeds["token_type_ids"].max() <= 1 and (feeds["attention_mask"] == 1).all()
    np.testing.assert_array_equal(ort_run(model, feeds)[0].shape, [2, 32])


def test_calib_random_on_token_type_encoder(tmp_path, capsys):
    model = tmp_path / "enc.onnx"
    onnx.save(with_token_types(encoder(vocab=50), 2), model)
    code = main(["-q", "optimize", str(model), "--passes", "quantize_int8", "--calib-random", "8",
                 "-o", str(tmp_path / "q.onnx"), "--json", str(tmp_path / "r.json")])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["outputs"][0]["cosine"] > 0.99


def test_calib_random_refuses_unknown_integers_with_exit_2(tmp_path, capsys):
    model = tmp_path / "u.onnx"
    onnx.save(_unknown_model(), model)
    code = main(["-q", "optimize", str(model), "--passes", "quantize_int8", "--calib-random", "4",
                 "-o", str(tmp_path / "q.onnx")])
    _, err = capsys.readouterr()
    assert code == 2
    line = err.strip().splitlines()
    assert len(line) == 1 and "'ids'" in line[0] and "--calib" in line[0] and "Traceback" not in err


def test_api_validation_with_random_data_follows_domains():
    model = with_token_types(encoder(vocab=50), 2)
    _, rep = api.optimize(model, "quantize_int8", calib="random:4", dims={"seq": 8}, force=True)
    assert rep.validation is not None and rep.validation.outputs[0].samples == 4
    cmp = api.compare(model, model, dims={"seq": 8})  # default validation data: random samples
    assert cmp.outputs[0].samples == 8 and cmp.outputs[0].cosine == pytest.approx(1.0)
    with pytest.raises(InputError, match="'ids'"):
        api.compare(_unknown_model(), _unknown_model())


def test_comparisons_do_not_constrain_an_index_but_alone_are_unknown():
    inits = {"t": np.ones((6, 3), np.float32), "pad": np.array(0, np.int64)}
    nodes = [node("Gather", ["t", "ids"], "e", axis=0), node("Equal", ["ids", "pad"], "is_pad"),
             node("Cast", ["is_pad"], "padf", to=TensorProto.FLOAT), node("Unsqueeze", ["padf", "ax"], "padu"),
             node("Mul", ["e", "padu"], "y")]
    inits["ax"] = np.array([-1], np.int64)
    model = make_model(nodes, {"ids": ["n", 4]}, ["y"], inits, types={"ids": TensorProto.INT64})
    assert integer_domains(model)["ids"].high == 6
    alone = make_model(nodes[1:3], {"ids": ["n", 4]}, ["padf"], {"pad": inits["pad"]}, types={"ids": TensorProto.INT64})
    assert integer_domains(alone)["ids"] == IntegerDomain("unknown", reason="Equal 'is_pad'")
