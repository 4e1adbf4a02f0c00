"""Malformed graphs through the CLI: exit 2, one ``error:`` line, no output file, input unchanged.

The file-level cases (empty, random bytes, truncated, external data escaping the folder, ...) are
in ``test_serde.py`` and ``test_cli.py``; these are models that parse but are not valid graphs.
"""

import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.cli import main


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, shape=(1, 4)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape) if shape is not None else None)


def _duplicate_names() -> onnx.ModelProto:
    """Two nodes write the same tensor (not single static assignment)."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="a"), helper.make_node("Neg", ["x"], ["y"], name="b")]
    return _model(nodes, [_vi("x")], [_vi("y")])


def _cycle() -> onnx.ModelProto:
    """``a`` reads ``b``'s output and ``b`` reads ``a``'s."""
    nodes = [helper.make_node("Add", ["x", "t2"], ["t1"], name="a"), helper.make_node("Relu", ["t1"], ["t2"], name="b")]
    return _model(nodes, [_vi("x")], [_vi("t2")])


def _undefined_input() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="a")]
    return _model(nodes, [_vi("x")], [_vi("y")])


def _duplicate_initializer() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return _model(nodes, [_vi("x")], [_vi("y")], [w, w])


@pytest.mark.parametrize("build", [_duplicate_names, _cycle, _undefined_input, _duplicate_initializer],
                         ids=lambda f: f.__name__.strip("_"))
def test_invalid_graph_refused(tmp_path, capsys, build):
    src = tmp_path / "m.onnx"
    src.write_bytes(build().SerializeToString())
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before


def _unknown_rank_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    return _model(nodes, [_vi("x", None)], [_vi("y", None)])


@pytest.mark.parametrize("where", ["input", "output"])
def test_unknown_rank_refused_naming_it(tmp_path, capsys, where):
    """ONNX's checker requires a shape on graph inputs/outputs; the error names the tensor."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    shapes = {"input": (None, (1, 4)), "output": ((1, 4), None)}[where]
    src = tmp_path / "m.onnx"
    src.write_bytes(_model(nodes, [_vi("x", shapes[0])], [_vi("y", shapes[1])]).SerializeToString())
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(src), "-o", str(out)])
    err = capsys.readouterr().err
    name = "x" if where == "input" else "y"
    assert code == 2 and err.strip().splitlines() == [f"error: graph {where} '{name}' has unknown rank (no shape); "
                                                      "give it one (e.g. onnx.tools.update_model_dims) or "
                                                      "re-export the model"]
    assert not out.exists()


def _good_model(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_vi("x")], [_vi("y")])
                    .SerializeToString())
    return src


def test_output_folder_is_a_file(tmp_path, capsys):
    src = _good_model(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["optimize", str(src), "-o", str(blocker / "out.onnx"), "--no-validate"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_output_folder_not_writable(tmp_path, capsys):
    src = _good_model(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = main(["optimize", str(src), "-o", str(locked / "out.onnx"), "--no-validate"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
