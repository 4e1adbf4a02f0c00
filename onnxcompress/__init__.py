"""onnxcompress: graph-level ONNX optimization, validated against onnxruntime."""

from __future__ import annotations

from onnxcompress._version import __version__
from onnxcompress.api import Report, auto, compare, inspect, optimize, sensitivity
from onnxcompress.core.errors import GateFailed, InputError, OnnxCompressError, PassFailed
from onnxcompress.core.pass_api import Numerics, Option, Pass, PassContext, PassResult, Slot, register
from onnxcompress.pipeline.auto import AutoResult
from onnxcompress.pipeline.manager import PassManager, get_pass, parse_spec, registry
from onnxcompress.runtime.batching import Batch
from onnxcompress.runtime.data import CalibSource, open_source
from onnxcompress.runtime.preprocess import Preprocess

__all__ = [
    "__version__",
    "optimize",
    "inspect",
    "compare",
    "sensitivity",
    "auto",
    "AutoResult",
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
    "Slot",
    "get_pass",
    "parse_spec",
    "register",
    "registry",
]
