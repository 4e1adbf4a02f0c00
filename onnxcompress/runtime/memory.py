"""The C allocator's policy for large blocks, set once by an entry point.

glibc's ``malloc`` serves a block above its *mmap threshold* with its own mapping, returned to the
system on ``free``; smaller blocks come from heaps that give memory back only from their top. The
threshold is dynamic: freeing a mapped block raises it to that block's size (up to 32 MB), so after
the first large tensor is freed, every tensor below 32 MB (a batch's activations, from onnxruntime's
threads and from numpy) is carved from the heaps, and what freed blocks leave in between stays
resident. Over the hundreds of runs of a reconstruction this grew with the number of batches
(opennsfw, 512 calibration crops: 758 MB peak and ~500 MB held between rounds; with the threshold
fixed at 1 MB, 526 MB and ~290 MB; same outputs). :func:`return_large_blocks` fixes the threshold
(and the heap's trim threshold) so large blocks are always mapped and given back when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["LARGE_BLOCK_BYTES", "return_large_blocks"]

log = logging.getLogger(__name__)

#: Blocks of at least this many bytes get their own mapping (and free memory above this much at
#: the heap's top is given back).
LARGE_BLOCK_BYTES = 1 << 20

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def return_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Make glibc map every block of ``threshold`` bytes or more and trim free heap tops above it
    (process-wide; the dynamic threshold is then off). Whether it was set (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p  # glibc only (musl has no such symbol)
        gnu = libc.gnu_get_libc_version().decode()
        done = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError, TypeError):
        return False
    log.debug("glibc %s: blocks of %d bytes or more mapped on their own: %s", gnu, threshold, done)
    return done
