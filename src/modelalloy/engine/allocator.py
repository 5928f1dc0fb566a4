"""Keep freed tensor memory from lingering in the C allocator's caches.

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), so
after the first few tensors, later ones come from heap arenas (one per thread) that are rarely
given back to the system: the resident set grows well past the bytes actually in flight.
Fixing the threshold at 1 MiB keeps every tensor-sized allocation in its own mapping, returned
on free. Measured on a 110M-parameter TIES merge with 2 threads: peak RSS 1.75 GB -> 1.3 GB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


@functools.cache
def return_large_frees_to_the_system(threshold: int = 1 << 20) -> bool:
    """Best effort, once per process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
