"""The trained fixture transformers of ``models/`` (``scripts/make_transformers.py``; the hand-built
encoder for unit tests is :mod:`tests.helpers.transformer`): their ``models.json`` entries, test
and calibration samples, task accuracy in onnxruntime, and a pipeline's outcome on one of them
judged as the CLI would exit."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import onnx

from onnxcompress import api
from onnxcompress.core.errors import GateFailed, InputError
from onnxcompress.core.pass_api import Pass
from onnxcompress.pipeline.manager import registry
from tests.helpers.runs import ROOT, ort_run

__all__ = ["MODELS", "Outcome", "accuracy", "entry", "fixtures", "outcome", "path", "pipeline_for", "samples",
           "write_npz"]

MODELS = ROOT / "models"


@cache
def _manifest() -> dict[str, dict]:
    return json.loads((MODELS / "models.json").read_text()).get("transformers", {})


def fixtures() -> list[str]:
    """Names of the trained transformer fixtures (``models.json`` key ``transformers``)."""
    return sorted(_manifest())


def entry(name: str) -> dict:
    """The fixture's ``models.json`` entry."""
    return _manifest()[name]


def path(name: str) -> Path:
    """The fixture's ``.onnx`` file."""
    return MODELS / entry(name)["file"]


def samples(name: str, split: str, n: int | None = None, start: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``(feeds, labels)``: samples ``start .. start+n`` of the fixture's ``calib`` or ``test`` data."""
    stop = None if n is None else start + n
    with np.load(MODELS / entry(name)["data"][split]) as npz:
        arrays = {k: npz[k][start:stop] for k in npz.files}
    labels = arrays.pop("labels")
    return arrays, labels


def write_npz(target: Path, feeds: dict[str, np.ndarray], labels: np.ndarray | None = None) -> Path:
    """Save ``feeds`` (and ``labels``) as an ``.npz`` the library reads as data; returns ``target``."""
    np.savez(target, **feeds, **({} if labels is None else {"labels": labels}))
    return target


def accuracy(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output in onnxruntime (graph optimizations off)."""
    return float((ort_run(model, feeds)[0].argmax(axis=1) == labels).mean())


def pipeline_for(name: str) -> str:
    """``name`` preceded by the passes that write the context slots it cannot run without
    (``bias_correction`` needs ``quantize_int8``'s float reference), so every registered pass runs."""
    cls = registry()[name]
    try:
        needed = cls().required_reads()
    except InputError:  # a pass with required options: the run reports it (exit 2)
        return name
    writers = [n for n, c in registry().items() if n != name and any(s in c.writes for s in needed)]
    return ",".join([*writers[:1], name]) if needed else name


@dataclass
class Outcome:
    """How a run ended, as the CLI would exit: 0 (model), 1 (gate failed, model kept), 2 (refused)."""

    exit_code: int
    model: onnx.ModelProto | None = None
    report: api.Report | None = None
    message: str = ""
    declined: dict[str, list[str]] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return self.report is not None and any(r.result.modified for r in self.report.passes)


def outcome(model: Path, *, passes: str | list[Pass] | None = None, recipe: str | None = None, calib: Path,
            data: Path) -> Outcome:
    """Run ``optimize`` and classify the end; any other exception (exit 3) propagates to fail the test."""
    try:
        new, report = api.optimize(model, passes, recipe=recipe, calib=calib, data=data)
        code, message = 0, ""
    except GateFailed as exc:
        new, report, code, message = exc.model, exc.report, 1, str(exc)
    except InputError as exc:
        return Outcome(2, message=str(exc))
    declined = {r.name: sorted({d.code for d in r.result.declined}) for r in report.passes}
    return Outcome(code, new, report, message, declined)
