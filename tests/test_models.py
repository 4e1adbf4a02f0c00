"""Checks on the fixture models in models/ (built by scripts/make_models.py)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers.graphs import op_types
from tests.helpers.runs import ort_run

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
NAMES = ["resnet", "mobilenetv2", "vgg", "concat"]


@cache
def manifest() -> dict:
    """Parsed ``models/models.json``."""
    return json.loads((MODELS_DIR / "models.json").read_text())


@cache
def load(name: str) -> onnx.ModelProto:
    """Load a fixture model by its ``models.json`` key."""
    return onnx.load(str(MODELS_DIR / manifest()["models"][name]["file"]))


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """Shape of a graph input/output: ints, or the symbolic name."""
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def ort_accuracy(path: Path, data: dict[str, np.ndarray]) -> float:
    """Accuracy of the model at ``path`` (ORT, optimizations off, 1 thread)."""
    logits = ort_run(path, {"input": data["input"]}, ["logits"])[0]
    return float((logits.argmax(axis=1) == data["labels"]).mean())


def test_manifest_lists_every_model():
    assert sorted(manifest()["models"]) == sorted(NAMES)


@pytest.mark.parametrize("split,n", [("calib", 256), ("test", 360)])
def test_data_files(split, n):
    with np.load(MODELS_DIR / f"digits_{split}.npz") as data:
        assert sorted(data.files) == ["input", "labels"]
        x, y = data["input"], data["labels"]
    assert x.dtype == np.float32 and x.shape == (n, 1, 32, 32)
    assert y.dtype == np.int64 and y.shape == (n,)
    assert set(np.unique(y)) == set(range(10))


@pytest.mark.parametrize("name", NAMES)
def test_model_structure(name):
    model = load(name)
    onnx.checker.check_model(model, full_check=True)
    opset = {o.domain: o.version for o in model.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == 17
    assert "BatchNormalization" in op_types(model)
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            assert len(node.output) == 1  # inference form
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    assert [i.name for i in inputs] == ["input"]
    assert dims(inputs[0]) == ["batch", 1, 32, 32]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert dims(model.graph.output[0]) == ["batch", 10]


@pytest.mark.parametrize("name", NAMES)
def test_model_metadata(name):
    entry = manifest()["models"][name]
    path = MODELS_DIR / entry["file"]
    assert entry["size_bytes"] == path.stat().st_size
    assert path.stat().st_size <= 3_200_000
    params = sum(int(np.prod(t.dims)) for t in load(name).graph.initializer)
    assert entry["params"] == params
    assert entry["macs"] > 1_000_000


@pytest.mark.parametrize("name", NAMES)
def test_model_accuracy(name):
    entry = manifest()["models"][name]
    with np.load(MODELS_DIR / "digits_test.npz") as data:
        acc = ort_accuracy(MODELS_DIR / entry["file"], dict(data))
    assert acc == pytest.approx(entry["accuracy"], abs=1e-9)
    assert acc >= 0.95


def test_mobilenet_clip_and_depthwise():
    model = load("mobilenetv2")
    assert "Clip" in op_types(model)
    assert "Add" in op_types(model)
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    depthwise = [
        n
        for n in model.graph.node
        if n.op_type == "Conv"
        and any(
            a.name == "group" and a.i > 1 and a.i == weights[n.input[1]][0] for a in n.attribute
        )
        and weights[n.input[1]][1] == 1
    ]
    assert depthwise


def test_resnet_has_residual_add():
    assert "Add" in op_types(load("resnet"))


def test_vgg_flatten_into_gemm_with_spatial_extent():
    model = load("vgg")
    assert op_types(model).count("Gemm") == 2
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")
    gemm = next(
        n for n in model.graph.node if n.op_type == "Gemm" and n.input[0] == flatten.output[0]
    )
    k = weights[gemm.input[1]][1]  # torch exports Linear as Gemm(transB=1)
    assert k > 128  # channels * H * W with H * W > 1


def test_concat_has_concat_and_split():
    model = load("concat")
    assert "Concat" in op_types(model)
    assert "Split" in op_types(model)
    for node in model.graph.node:
        if node.op_type in ("Concat", "Split"):
            axis = next(a.i for a in node.attribute if a.name == "axis")
            assert axis == 1
