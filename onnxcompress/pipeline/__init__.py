"""Pipelines of passes and what is decided about their results.

* :mod:`.manager` — :func:`parse_spec`, :func:`registry` (built-in passes included) and
  :class:`PassManager` (runs passes, checks the model after each one).
* :mod:`.recipes` — TOML recipes: passes, options, gate, requirements.
* :mod:`.validate` — run the original and the optimized model, metrics and the :class:`Gate`.
* :mod:`.sensitivity` — the per-layer quantization sensitivity workflow.
* :mod:`.conformance` — onnx's backend tests through a pipeline (cases in
  :mod:`.conformance_cases`, onnxruntime runs in :mod:`.conformance_ort`, isolated workers in
  :mod:`.conformance_workers`).
"""

from __future__ import annotations

from onnxcompress.pipeline.manager import PassManager, get_pass, parse_spec, registry
from onnxcompress.pipeline.recipes import Recipe, load_recipe
from onnxcompress.pipeline.validate import Gate, ValidationReport, compare_models

__all__ = ["Gate", "PassManager", "Recipe", "ValidationReport", "compare_models", "get_pass", "load_recipe",
           "parse_spec", "registry"]
