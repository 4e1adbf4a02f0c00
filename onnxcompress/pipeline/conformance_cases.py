"""Conformance cases: onnx's node test cases and the model folders shipped in the onnx wheel
(see :mod:`onnxcompress.pipeline.conformance`), each with its inputs, reference outputs and
tolerances; a deterministic sample of them; and the outcome of one case."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcompress.pipeline.conformance_ort import RAW_TYPES

__all__ = [
    "PASS",
    "SKIP",
    "FAIL",
    "CRASH",
    "DEFAULT_RTOL",
    "DEFAULT_ATOL",
    "DATA_FOLDERS",
    "SUITES",
    "CaseResult",
    "Outcome",
    "FolderCase",
    "collect",
    "collect_cases",
    "collect_data_cases",
    "data_dir",
    "select_cases",
]

PASS, SKIP, FAIL, CRASH = "PASS", "SKIP", "FAIL", "CRASH"
#: onnx's runner uses these when a case does not say.
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7
#: Suites :func:`collect` knows.
SUITES = ("node", "data", "all")
#: The model folders of ``onnx/backend/test/data`` in the ``data`` suite.
DATA_FOLDERS = ("light", "simple", "pytorch-converted", "pytorch-operator")


@dataclass
class CaseResult:
    """The outcome of one case.

    Attributes:
        name: Test case name (``test_abs``…).
        outcome: ``PASS``, ``SKIP``, ``FAIL`` or ``CRASH``.
        reason: Category: the skip reason, ``mismatch``, or the exception type of a crash.
        detail: Free text (first line of the error, the mismatching output…).
        seconds: Wall time of the case.
    """

    name: str
    outcome: str
    reason: str = ""
    detail: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class Outcome(Exception):
    """Raised while running a case to end a case early with an outcome."""

    def __init__(self, outcome: str, reason: str, detail: str = ""):
        super().__init__(reason)
        self.outcome, self.reason, self.detail = outcome, reason, detail


def collect_cases() -> list[Any]:
    """All of onnx's node test cases, sorted by name (takes ~20 s: onnx computes the references)."""
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    return sorted(cases, key=lambda c: c.name)


def data_dir() -> Path:
    """``onnx/backend/test/data`` of the installed onnx."""
    return Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"


@dataclass
class FolderCase:
    """A model test stored on disk; the model and data are read when first used.

    Attributes:
        name: ``<folder>/<test name>`` (e.g. ``simple/test_sign_model``, ``light/light_resnet50``).
        model_path: The ``.onnx`` file.
        data_dirs: ``test_data_set_*`` folders (``input_*.pb``, ``output_*.pb``); empty for ``light``.
        light_outputs: ``light``: the reference output files, in output order.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
    """

    name: str
    model_path: Path
    data_dirs: list[Path]
    light_outputs: list[Path]
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    _model: onnx.ModelProto | None = None

    @property
    def model(self) -> onnx.ModelProto:
        """The test model (loaded once)."""
        if self._model is None:
            self._model = onnx.load(str(self.model_path))
        return self._model

    @property
    def data_sets(self) -> list[tuple[list[Any], list[Any]]]:
        """``[(inputs, reference outputs)]``, inputs in the order of the non-initializer graph inputs."""
        graph = self.model.graph
        inits = {i.name for i in graph.initializer}
        in_types = [i.type for i in graph.input if i.name not in inits]
        out_types = [o.type for o in graph.output]
        if self.light_outputs:
            inputs = [_light_input(t) for t in in_types]
            return [(inputs, [_read_proto(p, t) for p, t in zip(self.light_outputs, out_types)])]
        sets = []
        for folder in self.data_dirs:
            ins = sorted(folder.glob("input_*.pb"), key=_pb_index)
            outs = sorted(folder.glob("output_*.pb"), key=_pb_index)
            sets.append(([_read_proto(p, t) for p, t in zip(ins, in_types)],
                         [_read_proto(p, t) for p, t in zip(outs, out_types)]))
        return sets


def _pb_index(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def _light_input(type_proto: onnx.TypeProto) -> np.ndarray:
    """The input onnx's backend runner feeds a ``light`` model: ``arange(n) / n`` in float32."""
    tt = type_proto.tensor_type
    if tt.elem_type != onnx.TensorProto.FLOAT:
        raise Outcome(SKIP, "no input generator for this type", f"element type {tt.elem_type}")
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def _read_proto(path: Path, type_proto: onnx.TypeProto) -> Any:
    """A stored input or output: a tensor, a sequence or an optional, as onnx's runner reads it."""
    from onnx import numpy_helper

    data = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    if type_proto.HasField("tensor_type"):
        tensor = onnx.TensorProto()
        tensor.ParseFromString(data)
        return tensor if tensor.data_type in RAW_TYPES else numpy_helper.to_array(tensor)
    raise Outcome(SKIP, "unsupported value type", f"{path.name}: {type_proto.WhichOneof('value')}")


def collect_data_cases(folders: Sequence[str] = DATA_FOLDERS, root: Path | None = None) -> list[FolderCase]:
    """The model tests of ``folders`` under ``root`` (default: the onnx wheel's data), sorted by name."""
    root = root or data_dir()
    cases: list[FolderCase] = []
    for folder in folders:
        base = root / folder
        if folder == "light":
            cases += [_light_case(root, path) for path in sorted(base.glob("light_*.onnx"))]
            continue
        for case_dir in sorted(p for p in base.iterdir() if (p / "model.onnx").is_file()):
            rtol, atol = _tolerances(case_dir / "data.json")
            cases.append(FolderCase(f"{folder}/{case_dir.name}", case_dir / "model.onnx",
                                    sorted(case_dir.glob("test_data_set_*")), [], rtol, atol))
    return sorted(cases, key=lambda c: c.name)


def _light_case(root: Path, path: Path) -> FolderCase:
    stem = path.stem  # light_<model>
    outputs = sorted(path.parent.glob(f"{stem}_output_*.pb"), key=_pb_index)
    rtol, atol = _tolerances(root / "real" / f"test_{stem[len('light_'):]}" / "data.json")
    return FolderCase(f"light/{stem}", path, [], outputs, rtol, atol)


def _tolerances(path: Path) -> tuple[float, float]:
    """``rtol``/``atol`` of a case's ``data.json`` (onnx's defaults without one)."""
    if not path.is_file():
        return DEFAULT_RTOL, DEFAULT_ATOL
    import json

    data = json.loads(path.read_text())
    return float(data.get("rtol", DEFAULT_RTOL)), float(data.get("atol", DEFAULT_ATOL))


def collect(suite: str = "node") -> list[Any]:
    """The cases of ``suite`` (``node``, ``data`` or ``all``), sorted by name within each suite.

    Raises:
        ValueError: Unknown suite.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
    cases: list[Any] = []
    if suite in ("node", "all"):
        cases += collect_cases()
    if suite in ("data", "all"):
        cases += collect_data_cases()
    return cases


def select_cases(cases: Sequence[Any], *, sample: int | None = None, seed: int = 0, filter: str | None = None,
                 include: Iterable[str] = ()) -> list[Any]:
    """A deterministic subset of ``cases`` (in name order).

    Args:
        cases: Cases sorted by name.
        sample: Keep this many, drawn with ``seed`` (``None``: all).
        seed: Seed of the draw.
        filter: Keep only names containing this substring (applied before sampling).
        include: Substrings of names always kept (in addition to the sample).
    """
    pool = [c for c in cases if not filter or filter in c.name]
    chosen = {c.name for c in pool}
    if sample is not None and sample < len(pool):
        chosen = {c.name for c in random.Random(seed).sample(pool, sample)}
    extra = tuple(include)
    chosen |= {c.name for c in pool if any(s in c.name for s in extra)}
    return [c for c in pool if c.name in chosen]
