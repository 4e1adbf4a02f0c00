"""The sensitivity workflow: prepare the model, calibrate once, quantize one layer at a time and
rank the layers by the output fidelity they cost (``onnxcompress sensitivity``; the math is in
:mod:`onnxcompress.quant.sensitivity`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.metrics import model_metrics
from onnxcompress.core.pass_api import PassContext
from onnxcompress.core.shapes import Dims
from onnxcompress.pipeline.manager import PassManager, parse_spec
from onnxcompress.pipeline.validate import parse_slices
from onnxcompress.quant.options import QuantConfig
from onnxcompress.quant.sensitivity import Evaluator, Fidelity, Quantizer, rank_layers
from onnxcompress.runtime.data import CalibSource, data_dims, open_source

__all__ = ["LayerScore", "SensitivityReport", "layer_sensitivity", "parse_options"]


def _num(v: float) -> float | str:
    """JSON-safe float (infinities as strings, as validation reports do)."""
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")


@dataclass
class LayerScore:
    """One layer quantized alone: its cost in output fidelity."""

    node: str
    op_type: str
    macs: int
    sqnr_db: float
    cosine: float
    worst: str = ""


@dataclass
class SensitivityReport:
    """What :func:`layer_sensitivity` measured.

    Attributes:
        model: The model's name (its path, or ``"model"``).
        method: Calibration method.
        samples: Samples the fidelity was measured on.
        baseline: Every layer quantized.
        layers: Most sensitive first.
        float_accuracy: Float model accuracy (labelled data), else ``None``.
        slices: The channel slices every score includes, ``{output: [[start, stop], ...]}``.
    """

    model: str
    method: str
    samples: int
    baseline: Fidelity
    layers: list[LayerScore] = field(default_factory=list)
    float_accuracy: float | None = None
    slices: dict[str, list[list[int | None]]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``kind, model, method, samples, baseline{sqnr_db, cosine, worst}, slices,
        layers[...]``."""
        return {
            "kind": "sensitivity",
            "model": self.model,
            "method": self.method,
            "samples": self.samples,
            "baseline": {"sqnr_db": _num(self.baseline.sqnr_db), "cosine": _num(self.baseline.cosine),
                         "worst": self.baseline.worst},
            "slices": self.slices,
            "layers": [{"node": s.node, "op_type": s.op_type, "macs": int(s.macs), "sqnr_db": _num(s.sqnr_db),
                        "cosine": _num(s.cosine), "worst": s.worst} for s in self.layers],
        }


def _prepare(model: onnx.ModelProto, prepare: str, calib: CalibSource, seed: int, dims: Dims) -> onnx.ModelProto:
    """Run the ``prepare`` passes (default ``fold_bn``), normalise, reach opset 13."""
    from onnxcompress.core.normalize import normalize, upgrade_opset

    if prepare.strip():
        model, _ = PassManager(parse_spec(prepare), PassContext(calib=calib, seed=seed, dims=dims)).run(model)
    return upgrade_opset(normalize(model), 13)


def layer_sensitivity(model: serde.ModelSource, calib: Any, data: Any = None, *, method: str = "mse",
                      options: dict[str, Any] | None = None, prepare: str = "fold_bn", batch_size: int = 32,
                      samples: int | None = None, seed: int = 0, dims: dict[str, int] | None = None,
                      preprocess: Any = None, progress: bool = False, name: str | None = None,
                      slices: str | None = None, jobs: int = 1) -> SensitivityReport:
    """Rank the layers of ``model`` by the output SQNR they cost when quantized alone.

    The model is first run through ``prepare`` (``fold_bn`` by default, as in the usual
    ``fold_bn,quantize_int8`` pipeline, so layer names match), then calibrated once on ``calib``
    (histograms of every tensor any variant needs); each layer is then quantized alone,
    everything else float, and compared with the float model on ``data`` (default: ``calib``).
    A layer's score is the worst over the outputs and their channel slices (automatic, fixed
    once from the float outputs, or ``slices``), so a detector's score rows count on their own.

    Args:
        model: Path, bytes or ``ModelProto`` (not modified).
        calib: Calibration data (see :func:`onnxcompress.runtime.data.open_source`).
        data: Evaluation data (default ``calib``); labels add accuracy to the baseline.
        method: Calibration method (as ``quantize_int8:method``).
        options: Other ``quantize_int8`` options (``per_channel``, ``symmetric_activations``,
            ``reduce_range``, ``exclude``, ``percentile``).
        prepare: Pass spec run before (``""``: none).
        batch_size: Batch size of calibration and evaluation runs.
        samples: Use at most this many evaluation samples.
        seed: Seed for random data.
        dims: Symbolic input dims (they win over the data's shapes; random data, MAC counts).
        preprocess: Image-folder preprocessing.
        progress: Progress bars.
        name: Model name for the report (default: the path, else ``"model"``).
        slices: ``--slices`` spec (``OUTPUT:START[:STOP],...``) replacing automatic slices.
        jobs: Worker processes scoring layers (0: one per core); the ranking does not depend on it.

    Raises:
        InputError: Bad model, data or options.
    """
    from onnxcompress.passes.quantize_int8 import QuantizeInt8  # the pass imports this module

    qpass = QuantizeInt8(method=method, **(options or {}))
    original = serde.load_model(model)
    calib_src = open_source(calib, original, preprocess=preprocess, seed=seed, dims=dims)
    data_src = open_source(data if data is not None else calib, original, preprocess=preprocess, limit=samples,
                           seed=seed, dims=dims)
    run_dims = data_dims(original, dims, ("--calib", calib, calib_src), ("--data", data, data_src))
    prepared = _prepare(original, prepare, calib_src, seed, run_dims)
    quantizer = Quantizer(prepared, QuantConfig.from_options(qpass.opts), method=method, percentile=qpass.opts["percentile"])
    if not quantizer.layers:
        raise InputError("no quantizable layer in this model")
    quantizer.calibrate(calib_src, batch_size=batch_size, progress=progress)
    spec = parse_slices(slices, [o.name for o in prepared.graph.output]) if slices else None
    evaluate = Evaluator(prepared, data_src, batch_size=batch_size, slices=spec)
    baseline = evaluate(quantizer.export())
    ranked = rank_layers(quantizer, evaluate, progress=progress, jobs=jobs or os.cpu_count() or 1)
    macs = {n.name: n.macs for n in model_metrics(prepared, run_dims).per_node}
    layers = [LayerScore(layer, quantizer.ops[layer], macs.get(layer, 0), fid.sqnr_db, fid.cosine, fid.worst)
              for layer, fid in ranked]
    label = name or (str(model) if isinstance(model, (str, os.PathLike)) else "model")
    used = {out: [[a, b] for a, b in cuts] for out, (cuts, _) in evaluate.slices.items()}
    return SensitivityReport(label, method, evaluate.samples, baseline, layers, baseline.ref_accuracy, used)


def parse_options(text: str | None) -> dict[str, str]:
    """``"per_channel=false:reduce_range=true"`` as a dict (values parsed later by the pass).

    Raises:
        InputError: A part is not ``key=value``.
    """
    out: dict[str, str] = {}
    for pair in [p for p in (text or "").split(":") if p.strip()]:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"quantize_int8 options: expected key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out
