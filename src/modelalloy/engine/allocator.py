"""Keep freed tensor memory from staying with the process under ``--memory-budget``.

glibc's malloc serves a request of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap``,
returned to the kernel by ``free``. But by default the threshold is dynamic: freeing such a
block raises it to that block's size (up to 32 MB), so the next tensors of that size come from
the heap arenas, where freed memory stays resident when it is not at the top of a heap (one
arena per worker thread). A merge of whole tensors (TIES with ``scope: global``: its
whole-model pass and whole-tensor merge; 8 MB tensors, 4 inputs, 2 threads) was measured at
850-955 MB of peak RSS against a 500 MB budget its byte count held, and at 461 MB with the
threshold fixed: the bytes were freed, the allocator kept them.

Fixing the threshold (which also stops the dynamic adjustment) makes every block of at least
:data:`MMAP_THRESHOLD` go back to the kernel when freed. The sliced paths' buffers (256K
float32, 1 MB) stay below it, on the heap, where they are reused: fixing it costs them nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_applied: list[int] = []


def return_freed_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` for this process; True when it applied
    (glibc on Linux; elsewhere nothing to do, False)."""
    if _applied and _applied[-1] == threshold:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, no dynamic threshold
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        return False
    _applied.append(threshold)
    return True
