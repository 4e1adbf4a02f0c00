import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress.core import serde
from onnxcompress.core.metrics import model_bytes, model_metrics
from tests.helpers.runs import ROOT

MODELS = ROOT / "models"


def _conv_model(group=1, transpose=False):
    cin, cout, k = 4, 8, 3
    if transpose:
        w = np.zeros((cin, cout // group, k, k), np.float32)
        node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], group=group, strides=[2, 2])
    else:
        w = np.zeros((cout, cin // group, k, k), np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[1, 1, 1, 1])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, ["N", cin, 10, 10])],
                          [helper.make_tensor_value_info("y", 1, None)], [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_macs_grouped():
    m = model_metrics(_conv_model(group=2))
    assert m.macs == 8 * 10 * 10 * (4 // 2) * 9
    assert m.params == 8 * 2 * 9
    assert m.op_counts == {"Conv": 1} and m.inputs == {"x": [1, 4, 10, 10]}


def test_conv_macs_batch_dim():
    assert model_metrics(_conv_model(), dims={"N": 4}).macs == 4 * 8 * 100 * 4 * 9


def test_conv_transpose_macs():
    m = model_metrics(_conv_model(transpose=True))
    assert m.macs == 4 * 10 * 10 * 8 * 9  # each input pixel scatters a Cout×k×k kernel


def test_gemm_and_matmul():
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("MatMul", ["h", "v"], ["y"])],
        "g", [helper.make_tensor_value_info("x", 1, ["N", 16])], [helper.make_tensor_value_info("y", 1, None)],
        [numpy_helper.from_array(np.zeros((32, 16), np.float32), "w"),
         numpy_helper.from_array(np.zeros((32, 5), np.float32), "v")])
    m = model_metrics(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.macs for n in m.per_node] == [32 * 16, 5 * 32]
    assert m.macs == 32 * 16 + 5 * 32 and m.params == 32 * 16 + 32 * 5
    assert m.outputs == {"y": [1, 5]}
    assert m.file_bytes > 4 * (32 * 16 + 32 * 5)


def _gives_up_off_the_mac_path():
    """A Conv, and a NonZero whose data-dependent shape onnx's inference gives up on (read by
    nothing the MAC count needs: its Shape has a known shape)."""
    w = np.zeros((4, 3, 3, 3), np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("NonZero", ["x"], ["nz"]),
             helper.make_node("Shape", ["nz"], ["s"]), helper.make_node("Cast", ["s"], ["z"], to=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", 1, None), helper.make_tensor_value_info("z", 1, None)],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_symbolic_inference_only_when_the_mac_count_reads_a_shape_onnx_gave_up_on(monkeypatch):
    """onnxruntime's symbolic inference (a sympy import: seconds) runs for the MAC count only when a
    tensor it reads is among those onnx's inference gave up on; ``node_list`` (every shape) still asks."""
    from onnxcompress.core import shapes
    from onnxcompress.core.metrics import node_list

    model = _gives_up_off_the_mac_path()
    assert any(shapes._gave_up(vi) for vi in shapes.infer_shapes(model).graph.value_info)
    calls = []
    real = shapes._symbolic
    monkeypatch.setattr(shapes, "_symbolic", lambda m: calls.append(1) or real(m))
    metrics = model_metrics(model)
    assert not calls
    assert metrics.macs == 4 * 6 * 6 * 3 * 3 * 3 and metrics.outputs == {"y": [1, 4, 6, 6], "z": [2]}
    node_list(model)
    assert calls


@pytest.mark.parametrize("raw_bytes", [0, 1, 100, 127, 128, 200, 16383, 16384, 70000])
def test_model_bytes_is_the_serialized_size(raw_bytes):
    """Weights counted by their length (not serialized): every length-prefix size, raw and typed data,
    a weight without data (external), and a model without a graph."""
    w = numpy_helper.from_array(np.arange(raw_bytes, dtype=np.uint8), "w")
    w.doc_string = "d" * raw_bytes  # the header grows too
    typed = helper.make_tensor("t", onnx.TensorProto.FLOAT, [raw_bytes // 4], np.ones(raw_bytes // 4).tolist())
    stub = onnx.TensorProto(name="e", data_type=onnx.TensorProto.FLOAT, dims=[4], data_location=onnx.TensorProto.EXTERNAL)
    stub.external_data.add(key="location", value="e.bin")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g" * raw_bytes,
                              [helper.make_tensor_value_info("x", 1, [1])], [helper.make_tensor_value_info("y", 1, [1])],
                              [w, typed, stub])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert model_bytes(model) == model.ByteSize() == len(model.SerializeToString())
    del model.graph.initializer[:]
    assert model_bytes(model) == model.ByteSize()
    model.ClearField("graph")
    assert model_bytes(model) == model.ByteSize()


def test_model_bytes_of_the_fixtures_and_above_2gb(monkeypatch):
    for name in ("resnet_digits", "mobilenetv2_digits"):
        model = serde.load_model(MODELS / f"{name}.onnx")
        assert model_bytes(model) == model.ByteSize() == (MODELS / f"{name}.onnx").stat().st_size
    monkeypatch.setattr(serde, "EXTERNAL_THRESHOLD", 1000)  # above it: the weights' size, an estimate
    assert model_bytes(model) == serde.weights_nbytes(model)
