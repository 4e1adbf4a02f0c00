"""int8 quantization: observers (calibration ranges), cache, QDQ placement, fusion checks.

* :mod:`.observers` — streaming histogram collectors and the minmax / percentile / entropy / mse
  range rules.
* :mod:`.cache` — calibration statistics saved to ``.npz``, keyed by model, data and settings.
* :mod:`.calibrate` — runs the float model on calibration data into the collectors.
* :mod:`.params` — scales and zero points, int8 weights, int32 biases.
* :mod:`.options` — :class:`QuantConfig`, the settings the pass and the sensitivity analysis share.
* :mod:`.placement` — where Q/DQ nodes go (following onnxruntime's CPU fusions).
* :mod:`.rewrite` — inserting them: Q/DQ nodes, int8 weights, int32 biases.
* :mod:`.sensitivity` — one-layer-at-a-time quantization and fidelity (mixed precision, ranking).
* :mod:`.latency` — int8 vs float timing per layer (``latency_aware``).
* :mod:`.bias_correction` — streamed channel means and the bias rewrite of ``bias_correction``.
* :mod:`.fusion` — what onnxruntime actually fuses: :func:`count_unfused_qdq`.
* :mod:`.cpu` — VNNI detection.

The pass itself is :class:`onnxcompress.passes.quantize_int8.QuantizeInt8`.
"""

from __future__ import annotations

from onnxcompress.quant.cache import cache_key, data_fingerprint, load_cache, save_cache
from onnxcompress.quant.calibrate import Calibration, collect_statistics
from onnxcompress.quant.cpu import cpu_flags, has_vnni
from onnxcompress.quant.fusion import (
    UnfusedQdq,
    count_unfused_qdq,
    integer_op_counts,
    ort_optimized_model,
    unfused_qdq,
)
from onnxcompress.quant.histogram import DEFAULT_BINS, HistogramCollector
from onnxcompress.quant.observers import (
    METHODS,
    EntropyObserver,
    MinMaxObserver,
    MseObserver,
    Observer,
    PercentileObserver,
    compute_range,
    make_observer,
)
from onnxcompress.quant.options import QuantConfig
from onnxcompress.quant.params import QParams, activation_params, quantize_bias, quantize_weight
from onnxcompress.quant.placement import QdqPlan, plan_placement
from onnxcompress.quant.rewrite import apply_plan

__all__ = [
    "DEFAULT_BINS",
    "METHODS",
    "HistogramCollector",
    "Observer",
    "MinMaxObserver",
    "PercentileObserver",
    "EntropyObserver",
    "MseObserver",
    "make_observer",
    "compute_range",
    "cache_key",
    "data_fingerprint",
    "load_cache",
    "save_cache",
    "Calibration",
    "collect_statistics",
    "QParams",
    "activation_params",
    "quantize_weight",
    "quantize_bias",
    "QuantConfig",
    "QdqPlan",
    "plan_placement",
    "apply_plan",
    "UnfusedQdq",
    "ort_optimized_model",
    "unfused_qdq",
    "count_unfused_qdq",
    "integer_op_counts",
    "cpu_flags",
    "has_vnni",
]
