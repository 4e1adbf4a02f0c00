import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.shapes import infer_graph, infer_shapes, shape_model
from tests.helpers.runs import ort_run
from tests.helpers.tensors import random_feeds

TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,{rows}] x) => (float[N,{cols}] y) {{
  y = MatMul(x, w)
}}"""


def _model(rows=4, cols=3) -> onnx.ModelProto:
    m = onnx.parser.parse_model(TEXT.format(rows=rows, cols=cols))
    w = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    m.graph.initializer.append(numpy_helper.from_array(w, "w"))
    onnx.checker.check_model(m, full_check=True)
    return m


def test_roundtrip_graph_keeps_metadata():
    m = _model()
    m.producer_name = "me"
    m.metadata_props.add(key="k", value="v")
    out = serde.to_model(serde.to_graph(m), m)
    assert out.producer_name == "me" and out.ir_version == m.ir_version
    assert [(p.key, p.value) for p in out.metadata_props] == [("k", "v")]
    feeds = random_feeds(m)
    np.testing.assert_array_equal(ort_run(m, feeds)[0], ort_run(out, feeds)[0])


def test_save_atomic_and_load(tmp_path):
    m = _model()
    path = serde.save_model(m, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert serde.load_model(path).SerializeToString() == m.SerializeToString()


def test_save_external_data_roundtrip_keeps_caller_model(tmp_path):
    m = _model(64, 64)
    before = m.SerializeToString()
    serde.save_model(m, tmp_path / "m.onnx", external=True)
    assert m.SerializeToString() == before  # the caller's model still holds its weights
    assert (tmp_path / "m.onnx.data").stat().st_size == 64 * 64 * 4
    loaded = serde.load_model(tmp_path / "m.onnx")
    feeds = random_feeds(m)
    np.testing.assert_array_equal(ort_run(m, feeds)[0], ort_run(loaded, feeds)[0])


def test_refuses_to_overwrite_input(tmp_path):
    p = serde.save_model(_model(), tmp_path / "m.onnx")
    before = p.read_bytes()
    with pytest.raises(InputError, match="output path is the input"):
        serde.save_model(_model(), p, protect=p)
    assert p.read_bytes() == before


def test_missing_output_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        serde.save_model(_model(), tmp_path / "nope" / "m.onnx")


@pytest.mark.parametrize("content, match", [
    (b"", "empty file"),
    (b"\x00\xff" * 50 + b"garbage", "not an ONNX model"),
    (onnx.TensorProto(name="t").SerializeToString(), "not an ONNX model"),
])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(InputError, match=match):
        serde.load_model(p)


def test_truncated_protobuf(tmp_path):
    data = _model(32, 32).SerializeToString()
    p = tmp_path / "t.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        serde.load_model(p)


def test_not_a_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        serde.load_model(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="is a directory"):
        serde.load_model(tmp_path)


def test_unknown_domain_and_old_opset():
    m = _model()
    m.graph.node[0].domain = "my.custom"
    m.opset_import.add(domain="my.custom", version=1)
    with pytest.raises(InputError, match="unknown operator domain 'my.custom'"):
        serde.load_model(m)
    old = _model()
    old.opset_import[0].version = 5
    with pytest.raises(InputError, match="too old"):
        serde.load_model(old)


def test_checker_failure_is_input_error():
    m = _model()
    m.graph.node[0].input[1] = "undefined_tensor"
    with pytest.raises(InputError, match="checker"):
        serde.load_model(m)


def _external_model(tmp_path: Path, location: str) -> Path:
    m = _model()
    init = m.graph.initializer[0]
    init.ClearField("raw_data")
    del init.float_data[:]
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value=location)
    p = tmp_path / "ext.onnx"
    p.write_bytes(m.SerializeToString())
    return p


@pytest.mark.parametrize("location, match", [
    ("../../etc/passwd", "outside the model's folder"),
    ("/etc/passwd", "not a relative path"),
    ("missing.bin", "not found"),
])
def test_external_data_locations_refused(tmp_path, location, match):
    with pytest.raises(InputError, match=match):
        serde.load_model(_external_model(tmp_path, location))


def test_external_data_symlink_out_of_folder_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(np.zeros(12, np.float32).tobytes())
    inner = tmp_path / "model"
    inner.mkdir()
    os.symlink(outside / "w.bin", inner / "w.bin")
    with pytest.raises(InputError, match="outside the model's folder"):
        serde.load_model(_external_model(inner, "w.bin"))


def test_infer_shapes_does_not_modify_input():
    m = _model()
    before = m.SerializeToString()
    inferred = infer_shapes(m)
    assert m.SerializeToString() == before
    assert inferred.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 3


def test_model_opset():
    assert serde.model_opset(_model()) == 17
    m = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("ai.onnx.ml", 3)])
    assert serde.model_opset(m) is None


def _shape_sig(m):
    def sig(values):
        return sorted(v.SerializeToString() for v in values)
    return (sig(m.graph.input), sig(m.graph.value_info), sig(m.graph.output),
            sorted((i.name, i.data_type, tuple(i.dims)) for i in m.graph.initializer))


@pytest.mark.parametrize("name", ["resnet_digits", "mobilenetv2_digits", "vgg_digits", "concat_digits"])
def test_infer_graph_matches_infer_shapes_without_weight_data(name):
    from pathlib import Path
    graph = serde.to_graph(serde.load_model(Path(__file__).parent.parent / "models" / f"{name}.onnx"))
    full = infer_shapes(serde.to_model(graph))
    light = infer_graph(graph)
    assert _shape_sig(light) == _shape_sig(full)
    assert all(not i.raw_data for i in light.graph.initializer if serde.tensor_nbytes(i) >= 1024)
    assert shape_model(graph).ByteSize() < full.ByteSize() / 10
    assert serde.to_model(graph).SerializeToString() == serde.to_model(serde.to_graph(serde.to_model(graph))).SerializeToString()


def test_infer_graph_keeps_reshape_shape_values():
    import onnx_graphsurgeon as gs
    big = np.ones((64, 64), np.float32)
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["m"]), onnx.helper.make_node("Reshape", ["m", "s"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", 1, [2, 64])], [onnx.helper.make_tensor_value_info("y", 1, None)],
        [numpy_helper.from_array(big, "w"), numpy_helper.from_array(np.array([16, 8], np.int64), "s")]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    graph = serde.to_graph(model)
    inferred = infer_graph(graph)
    found = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*inferred.graph.value_info, *inferred.graph.output]}
    assert found["y"] == [16, 8] and found["m"] == [2, 64]
    assert [i.name for i in inferred.graph.input] == ["x"]
    assert isinstance(graph.tensors()["w"], gs.Constant) and graph.tensors()["w"].values is not None  # graph untouched


def test_to_model_exports_loaded_weights_once():
    w = np.arange(300_000, dtype=np.float32).reshape(600, 500)
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [onnx.helper.make_tensor_value_info("x", 1, [1, 600])],
        [onnx.helper.make_tensor_value_info("y", 1, [1, 500])], [numpy_helper.from_array(w, "w")]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    graph = serde.to_graph(model)
    assert graph.tensors()["w"].values.shape == (600, 500)  # loaded: data_location DEFAULT, now an ndarray
    assert list(serde._big_constants(graph, 1 << 20, False))  # set aside (single-copy export)
    out = serde.to_model(graph)
    assert np.array_equal(numpy_helper.to_array(out.graph.initializer[0]), w)
