"""glibc's allocator settings for large-tensor work on the CPU (inference windows and training steps).

By default glibc serves every allocation above its dynamic mmap threshold (at most 32 MiB) with a fresh mmap and
unmaps it on free, so each large activation or gradient of every window or step is page-faulted and zero-filled by
the kernel again. `tune_malloc` keeps such blocks in the heap for reuse. Set GMIM_MALLOC_TUNING=0 to leave glibc's
defaults (the process then returns freed memory to the system sooner).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_malloc_tuned = False


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Make glibc serve allocations below `mmap_threshold` bytes from its heap and keep up to `trim_threshold`
    bytes of freed memory instead of returning it to the kernel, so that the large activations of each window
    reuse pages that are already mapped instead of page-faulting fresh zeroed ones.

    Process-wide and irreversible (it is an allocator setting, not a torch one): the process keeps its peak heap
    (one window's activations, ~2.5 GB for feature_size 48 at 96^3) after inference. Returns whether it applied
    (False on non-glibc systems). Idempotent."""
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    _malloc_tuned = ok
    if ok:
        logger.info("glibc malloc tuned: mmap threshold %d, trim threshold %d bytes",
                    mmap_threshold, trim_threshold)
    return ok


def tune_malloc_unless_disabled() -> bool:
    """`tune_malloc()` unless the environment variable GMIM_MALLOC_TUNING is "0" (then glibc keeps its defaults)."""
    if os.environ.get("GMIM_MALLOC_TUNING", "1").strip() == "0":
        logger.info("GMIM_MALLOC_TUNING=0: glibc malloc left at its defaults")
        return False
    return tune_malloc()
