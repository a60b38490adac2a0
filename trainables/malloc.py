"""glibc malloc settings for a training process: keep freed tensor buffers instead of unmapping them.

glibc serves allocations above its mmap threshold (128 KiB at start) with a fresh ``mmap`` and
unmaps them on ``free``; it raises the threshold only as it sees such chunks freed, and trims the
heap top above a matching trim threshold. A training step allocates and frees many activation and
optimizer temporaries of a few hundred KiB to a few MiB, so a process whose thresholds have not
grown pays a page fault (and a zeroed page) for every 4 KiB of them, every step. A long-lived
driver process has usually grown them; a fresh Ray worker has not: over 4 epochs of the smoke job
a 1-CPU Ray worker took 735,000-815,000 minor page faults against 6,000-115,000 for the same ``fit``
in the driver, and its epochs were ~15% slower (``python -m benchmarks.ray_overhead``). Fixing both
thresholds at the start of ``fit`` brought the worker to ~72,000 faults and to the plain process's
epoch time.

The cost is memory that stays with the process instead of going back to the kernel: up to
``TRIM_THRESHOLD`` of free space at the top of the heap, and buffers below ``MMAP_THRESHOLD`` come
from the heap, where they can fragment it. Set ``ITM_MALLOC_TUNING=0`` to leave glibc's defaults.
Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 2**20  # buffers below this come from the heap (glibc's dynamic maximum is 32 MiB)
TRIM_THRESHOLD = 256 * 2**20  # free heap top kept before it is returned to the kernel

_applied = False


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once); True if they are set."""
    global _applied
    if _applied:
        return True
    if os.environ.get("ITM_MALLOC_TUNING", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
