"""The C allocator setting of a layer-wise solve (Linux, glibc): large blocks mapped on their own."""

from __future__ import annotations

import ctypes
import os
import sys


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """On glibc, serve allocations of `threshold` bytes and more from mappings of their own,
    unmapped when freed; return whether it was set. By default glibc raises that threshold to
    the size of each large block freed, after which a layer-wise solve's freed matrices stay in
    the heap: resident memory grew by hundreds of MiB over a 64 MiB model. A process-wide
    setting, so the command sets it (for --calib runs), not the library; a threshold the user
    set in MALLOC_MMAP_THRESHOLD_ is left alone."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # another C library (musl)
        return False
