"""What an ``optimize`` run read, recorded in its JSON so that reports can trace it: the input and
reference model files (path, sha256 of the bytes, size, external data file names), the
calibration source and its sample count, and the image preprocessing used.

A run's ``input_model.sha256`` equal to another run's ``output_model.sha256`` makes a chain
(``optimize A -> B``, then ``optimize B -> C``); ``reference`` says which model the run's metrics
compare with (the input unless ``--reference`` named the true original of the chain).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import onnx

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.fileio import FileRecord
from onnxcompress.runtime.data import CalibSource, ImageFolderSource

__all__ = ["load_with_record", "load_reference", "check_same_io", "data_record", "preprocess_text"]


def load_with_record(source: serde.ModelSource) -> tuple[onnx.ModelProto, dict | None]:
    """A model and its file record (``path``, ``sha256``, ``bytes``, ``external_data``): for a path
    the hash of the bytes read to load it, for bytes their hash (no path), for a ``ModelProto`` None."""
    if isinstance(source, (str, os.PathLike)):
        model, record = serde.load_model_file(source)
        return model, record.as_dict()
    model = serde.load_model(source)
    if isinstance(source, (bytes, bytearray)):
        return model, FileRecord(None, hashlib.sha256(source).hexdigest(), len(source)).as_dict()
    return model, None


def load_reference(source: serde.ModelSource, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The ``reference`` model to validate against instead of the input ``model``, and its record
    (``given: true``).

    Raises:
        InputError: It cannot be loaded, or its inputs/outputs differ from ``model``'s.
    """
    reference, record = load_with_record(source)
    name = str(source) if isinstance(source, (str, os.PathLike)) else "the reference model"
    check_same_io(reference, model, name)
    return reference, {**(record or {"path": None, "sha256": None}), "given": True}


def _io(model: onnx.ModelProto, kind: str) -> list[tuple[str, int, tuple[int | None, ...] | None]]:
    """``(name, element type, dims)`` of the graph's inputs (initializers excluded) or outputs, by name."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    values = [v for v in graph.input if v.name not in inits] if kind == "input" else list(graph.output)
    out = []
    for v in values:
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim) \
            if tt.HasField("shape") else None
        out.append((v.name, tt.elem_type, dims))
    return sorted(out, key=lambda x: x[0])


def _compatible(a: tuple, b: tuple) -> bool:
    (name_a, type_a, dims_a), (name_b, type_b, dims_b) = a, b
    if name_a != name_b or type_a != type_b:
        return False
    if dims_a is None or dims_b is None:
        return True
    return len(dims_a) == len(dims_b) and all(x is None or y is None or x == y for x, y in zip(dims_a, dims_b))


def _fmt(values: list[tuple]) -> str:
    def one(v: tuple) -> str:
        name, elem, dims = v
        dtype = onnx.helper.tensor_dtype_to_string(elem).removeprefix("TensorProto.").lower() if elem else "?"
        shape = "" if dims is None else "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"
        return f"{name} {dtype}{shape}"
    return ", ".join(one(v) for v in values) or "(none)"


def check_same_io(reference: onnx.ModelProto, model: onnx.ModelProto, name: str) -> None:
    """Raise :class:`InputError` (one line) unless ``reference`` has ``model``'s inputs and outputs:
    the same names and element types, and the same static dims where both have one."""
    for kind in ("input", "output"):
        ref, mine = _io(reference, kind), _io(model, kind)
        if len(ref) != len(mine) or not all(_compatible(a, b) for a, b in zip(ref, mine)):
            raise InputError(f"--reference {name}: its {kind}s ({_fmt(ref)}) differ from the model's ({_fmt(mine)}); "
                             "a reference needs the same inputs and outputs")


def _count(source: CalibSource) -> int:
    """Samples in ``source``: an image folder's files (no image is read), else one pass over it."""
    if isinstance(source, ImageFolderSource):
        return len(source.files) if source.limit is None else min(len(source.files), source.limit)
    return source.count()


def preprocess_text(source: Any) -> str | None:
    """The complete preprocessing of an image-folder source (defaults filled in), else None."""
    if not isinstance(source, ImageFolderSource):
        return None
    pre, (height, width) = source.pre, source.size

    def nums(values: tuple[float, ...]) -> str:
        return "/".join(f"{v:g}" for v in values)
    return (f"size={height}x{width},resize={pre.resize},order={pre.order},scale={pre.scale:g},"
            f"mean={nums(pre.mean)},std={nums(pre.std)},layout={pre.layout}")


def data_record(calib: CalibSource | None, validation: CalibSource | None) -> dict[str, Any]:
    """``calibration`` (``source`` description and ``samples``, or None without calibration data)
    and ``preprocess`` (:func:`preprocess_text` of the calibration, else the validation source)."""
    record = {"source": calib.description, "samples": _count(calib)} if calib is not None else None
    return {"calibration": record, "preprocess": preprocess_text(calib) or preprocess_text(validation)}
