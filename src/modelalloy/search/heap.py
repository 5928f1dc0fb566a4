"""Keep a search process's freed memory for its next trial (glibc's malloc).

A trial allocates and frees the same activations, merged slices and scratch tensors again and
again. glibc serves a block of 128 KB or more with its own ``mmap`` and unmaps it when freed
(the threshold then rises on its own, by fits and starts), and gives the top of its heap back
above 128 KB free: the next trial faults every page in afresh, zeroed by the kernel. On
tiny-lm (full) that was 2.6–3.8 s of system time in 96 trials and 15% of the wall time
(docs/optimize.md). :func:`keep_heap` fixes the mmap threshold at glibc's largest (32 MB) and
keeps up to 256 MB of free heap, for the life of the process: `modelalloy optimize` and its
Ray workers call it; a Python caller of ``optimize`` may (it changes the whole process).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = 256 << 20


def keep_heap() -> bool:
    """Set glibc's mmap and trim thresholds for this process (see the module docstring);
    False, and nothing changed, where the C library has no ``mallopt`` (not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
