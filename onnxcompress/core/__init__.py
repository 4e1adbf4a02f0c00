"""The bottom layer: what every other layer stands on, with no onnxruntime session in sight.

* :mod:`.errors` — the exception types and the exit codes they map to.
* :mod:`.serde` — the only protobuf boundary: load (with checks), full check, atomic save with
  external data, conversion to and from onnx-graphsurgeon graphs.
* :mod:`.proto` — the few protobuf views and edits the layers above need (extra outputs for
  capture, sub-models, feed names): nothing outside ``core`` builds or edits protobuf.
* :mod:`.shapes` — every shape-inference entry point (whole models, weight-free copies, graphs,
  concrete shapes once symbolic input dims are fixed).
* :mod:`.normalize` — exporter clean-up before any pass; opset upgrade.
* :mod:`.fold` — subgraphs computed from constants alone (exact ops) folded into initializers,
  size-bounded; run by :mod:`.normalize`, so every pass sees them as constants.
* :mod:`.graph` — small graph helpers: constant values, node labels, optional inputs, fresh names.
* :mod:`.metrics` — size, parameters, MACs per node, op counts.
* :mod:`.pass_api` — the pass contract: :class:`Pass`, :class:`Option`, :class:`Numerics`,
  :class:`PassContext`, :class:`PassResult`, :class:`PassRecord`, :func:`register`.
* :mod:`.fileio` — atomic writes of non-model files; TOML reading.
"""

from __future__ import annotations

from onnxcompress.core.errors import GateFailed, InputError, OnnxCompressError, PassFailed
from onnxcompress.core.pass_api import Numerics, Option, Pass, PassContext, PassRecord, PassResult, register

__all__ = [
    "GateFailed",
    "InputError",
    "Numerics",
    "OnnxCompressError",
    "Option",
    "Pass",
    "PassContext",
    "PassFailed",
    "PassRecord",
    "PassResult",
    "register",
]
