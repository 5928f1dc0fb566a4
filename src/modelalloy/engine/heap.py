"""Keep freed memory in the process while a merge runs (glibc only).

Every tensor a method merges allocates tensor-sized temporaries (float32 copies, task vectors,
masks). glibc serves blocks above 32 MiB with fresh ``mmap`` calls and gives them back on
``free``, so the next tensor's temporaries fault in new pages, which the kernel must zero
first: on a 1B-parameter dare_ties merge, page zeroing (``clear_page_erms``) was 39% of all
CPU samples (perf). With mmap off and no trimming, freed blocks are reused from the heap; the
peak stays what the largest tensors need (3.5 GB against 3.1 GB for that merge; mergekit
4.7 GB), and the settings and the unused heap are given back when the merge ends.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (malloc.h) and glibc's defaults for them.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None


@contextmanager
def retained_heap() -> Iterator[bool]:
    """Inside: large blocks come from the heap and stay there when freed. Yields whether the
    allocator could be tuned (glibc); elsewhere it changes nothing."""
    libc = _libc()
    tuned = bool(libc and libc.mallopt(_M_MMAP_MAX, 0) == 1
                 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)
    try:
        yield tuned
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
