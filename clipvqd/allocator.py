"""The process's memory allocator policy (no torch import: the CLI sets it first)."""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back.

    By default glibc returns every block above a threshold (128 KiB, rising to
    at most 32 MiB) to the kernel when it is freed and trims the top of its
    heap, so many a new tensor lands on fresh pages that the kernel must fault
    in and zero. On the 2-core CPU this project measures on, that cost more
    than the arithmetic: `clipvqd eval`'s sampling ran 1.1-1.7x faster with it,
    round by round, 1.4x best against best (SPEED.md, "Fresh pages"). The
    price: the process keeps its peak memory until it exits. The CLI calls
    this once at start; it does nothing off glibc, or where the user has set
    malloc tunables of their own (``MALLOC_*`` or ``GLIBC_TUNABLES``).
    Returns whether it changed anything.
    """
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ:
        return False
    if any(k.startswith("MALLOC_") for k in os.environ):  # glibc's own, or jemalloc's MALLOC_CONF
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
