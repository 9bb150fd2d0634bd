"""glibc's allocator, set for a server that reads bodies of megabytes: every allocation over 128 KiB gets pages of
its own, given back when it is freed. By default glibc raises that threshold to the size of the largest block freed
so far (up to 32 MiB), after which a 4 MiB body is carved from a thread's heap, and such heaps are rarely given back:
hostile bodies one after another grew the server by ~80 MiB that it kept (benchmarks.reliability --part hostile).
Elsewhere (macOS, musl) nothing is changed."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt's parameter numbers, from glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, kept from rising
ARENAS = 4  # heaps threads allocate from (glibc's default: 8 per core), each of which keeps what it grew to


@functools.cache
def bound_the_heap() -> bool:
    """Whether the allocator took the settings (False where it is not glibc's)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_ARENA_MAX, ARENAS))
