"""Quantization settings, shared by the ``quantize_int8`` pass and the sensitivity analysis."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["QuantConfig"]


@dataclass(frozen=True)
class QuantConfig:
    """Quantization settings shared by placement and rewriting."""

    per_channel: bool = True
    symmetric_activations: bool = False
    reduce_range: bool = False
    exclude: tuple[str, ...] = ()
    weights_only: bool = False
    dynamic: bool = False

    @property
    def weight_qmax(self) -> int:
        """127, or 64 (7-bit weights) with ``reduce_range``."""
        return 64 if self.reduce_range else 127

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> QuantConfig:
        """The settings that parsed ``quantize_int8`` options describe."""
        return cls(per_channel=opts["per_channel"], symmetric_activations=opts["symmetric_activations"],
                   reduce_range=opts["reduce_range"], exclude=tuple(opts["exclude"]),
                   weights_only=opts["weights_only"], dynamic=bool(opts.get("dynamic", False)))
