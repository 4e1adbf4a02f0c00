"""onnxcompress: graph-level ONNX optimization, validated against onnxruntime."""

from __future__ import annotations

from .errors import GateFailed, InputError, OnnxCompressError, PassFailed
from .manager import Numerics, Option, Pass, PassContext, PassManager, PassResult, get_pass, parse_spec, register, registry

__version__ = "0.1.0"

__all__ = [
    "__version__",
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
