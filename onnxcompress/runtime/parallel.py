"""Numpy work spread over threads (numpy releases the GIL inside its loops)."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["CORE_THREADS", "in_threads"]

#: Threads for numpy work that runs while onnxruntime is idle (at most 4).
CORE_THREADS = min(4, os.cpu_count() or 1)


def in_threads(work: Callable[[Any], Any], items: list[Any], threads: int, name: str = "onnxcompress") -> list[Any]:
    """``[work(i) for i in items]`` in up to ``threads`` threads, results in order (one thread, or
    fewer than two items: in the caller). The first exception raised by ``work`` is raised here."""
    if threads < 2 or len(items) < 2:
        return [work(i) for i in items]
    with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix=name) as pool:
        return list(pool.map(work, items))
