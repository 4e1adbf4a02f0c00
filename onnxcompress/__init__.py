"""onnxcompress: graph-level ONNX optimization, validated against onnxruntime."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import Report, compare, inspect, optimize, sensitivity
from .calib import Batch, CalibSource, Preprocess, open_source
from .errors import GateFailed, InputError, OnnxCompressError, PassFailed
from .manager import Numerics, Option, Pass, PassContext, PassManager, PassResult, get_pass, parse_spec, register, registry

__all__ = [
    "__version__",
    "optimize",
    "inspect",
    "compare",
    "sensitivity",
    "Report",
    "Batch",
    "CalibSource",
    "Preprocess",
    "open_source",
    "GateFailed",
    "InputError",
    "OnnxCompressError",
    "PassFailed",
    "Numerics",
    "Option",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "get_pass",
    "parse_spec",
    "register",
    "registry",
]
