"""Quantization settings, shared by the ``quantize_int8`` pass and the sensitivity analysis."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from onnxcompress.quant.cpu import cpu_flags, has_vnni

__all__ = ["REDUCE_RANGE_CHOICES", "QuantConfig", "resolve_reduce_range"]

#: Values of the ``reduce_range`` option: ``auto`` follows this CPU (7-bit weights without VNNI).
REDUCE_RANGE_CHOICES = ("auto", "true", "false")


def resolve_reduce_range(value: str | bool, flags: set[str] | None = None) -> bool:
    """Whether weights get 7 bits: ``auto`` is true exactly when the CPU is known to lack VNNI.

    ``flags`` are the CPU's ``/proc/cpuinfo`` flags (read from this machine when ``None``). Without
    VNNI, onnxruntime's u8s8 kernels add pairs of products in 16 bits; 8-bit weights saturate them
    (measured on an AMD EPYC: a ResNet fixture's int8 accuracy 98.9 % as fake-quant, 93.3 % as run).
    """
    if isinstance(value, bool):
        return value
    if value != "auto":
        return value == "true"
    return has_vnni(flags if flags is not None else cpu_flags()) is False


@dataclass(frozen=True)
class QuantConfig:
    """Quantization settings shared by placement and rewriting."""

    per_channel: bool = True
    symmetric_activations: bool = False
    reduce_range: bool = False
    exclude: tuple[str, ...] = ()
    weights_only: bool = False
    dynamic: bool = False
    share_concat_scales: bool = False
    float_pools: bool = False

    @property
    def weight_qmax(self) -> int:
        """127, or 64 (7-bit weights) with ``reduce_range``."""
        return 64 if self.reduce_range else 127

    @classmethod
    def from_options(cls, opts: Mapping[str, Any], flags: set[str] | None = None) -> QuantConfig:
        """The settings that parsed ``quantize_int8`` options describe, on a CPU with ``flags``
        (this machine's when ``None``; see :func:`resolve_reduce_range`)."""
        return cls(per_channel=opts["per_channel"], symmetric_activations=opts["symmetric_activations"],
                   reduce_range=resolve_reduce_range(opts["reduce_range"], flags), exclude=tuple(opts["exclude"]),
                   weights_only=opts["weights_only"], dynamic=bool(opts.get("dynamic", False)),
                   share_concat_scales=bool(opts.get("share_concat_scales", False)),
                   float_pools=bool(opts.get("float_pools", False)))
