"""Exception types that map onto the CLI's exit codes.

* :class:`InputError` — the user's input (model, data, pass spec, path) is bad: exit 2.
* :class:`GateFailed` — the optimized model failed its validation gate: exit 1.
* :class:`PassFailed` — a pass raised; nothing was written: exit 3.
"""

from __future__ import annotations

__all__ = ["OnnxCompressError", "InputError", "GateFailed", "PassFailed"]


class OnnxCompressError(Exception):
    """Base class of every error onnxcompress raises on purpose."""

    exit_code = 3


class InputError(OnnxCompressError):
    """Bad input or usage: a missing file, a malformed model, an unknown pass or option."""

    exit_code = 2


class GateFailed(OnnxCompressError):
    """The optimized model does not meet the validation gate."""

    exit_code = 1

    def __init__(self, message: str, report=None, model=None):
        super().__init__(message)
        self.report = report
        self.model = model


class PassFailed(OnnxCompressError):
    """A pass raised an exception or produced an invalid model."""

    exit_code = 3
