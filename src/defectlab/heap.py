"""Hand the C heap's freed pages back to the operating system (glibc's ``malloc_trim``).

torch allocates CPU tensors with ``malloc``. Between batches of the test pass the search frees
megabyte-sized buffers; glibc keeps them on its heap (its dynamic mmap threshold moves large
allocations there after the first ones are freed) and, with smaller blocks still in use between
them, cannot shrink the heap: the resident set grew by up to 260 MB over ELPV mono's 18 test
batches in some runs and not in others (`python train.py`, peak RSS 1173-1465 MB over eight
runs of one commit). ``malloc_trim(0)`` releases every free page inside the heap, not only at its
top; with it after each test batch the peak was 1182-1213 MB in ten runs, for 12-13 ms per
32-image batch (docs/benchmarks/search.md, "Peak memory of the test pass").
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library is not glibc (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def can_release_freed_memory() -> bool:
    """Whether :func:`release_freed_memory` can do anything in this process (glibc on Linux)."""
    return _malloc_trim() is not None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS; False where the C library offers no way to.

    Live allocations are untouched: only pages that hold no allocated byte are released (and
    are zero-filled again by the kernel if the heap reuses them).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
