"""CPU feature detection for the int8 kernels onnxruntime will pick."""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["VNNI_FLAGS", "cpu_flags", "has_vnni"]

log = logging.getLogger(__name__)

#: ``/proc/cpuinfo`` flags of the x86 instructions that multiply u8 by s8 into 32-bit sums.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(path: str | os.PathLike = "/proc/cpuinfo") -> set[str] | None:
    """The flags of the first processor in ``path``, or ``None`` where it cannot be read."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def has_vnni(flags: set[str] | None) -> bool | None:
    """Whether the CPU has a VNNI-class u8s8 dot product; ``None`` when unknown (no flags)."""
    if flags is None:
        return None
    return any(f in flags for f in VNNI_FLAGS)
