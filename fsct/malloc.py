"""Keep freed memory in the process: glibc hands large blocks (activations, tensors of a few MB and up)
back to the kernel on free by default, and every training step then faults them in again. On the 2-core
machines measured here that was 20 s of system time in a 33 s run (docs/PERFORMANCE.md); raising the mmap
and trim thresholds makes glibc reuse those blocks (1 s). Memory then stays at the step's high-water mark."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # bytes; glibc caps the mmap threshold itself where it must


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds; False where there is no glibc (macOS, musl) or it refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
