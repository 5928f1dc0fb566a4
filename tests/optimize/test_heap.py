"""A search process keeps its freed memory for the next trial (search/heap.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, ctypes.util, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def probe():
    # (a 16 MB block was mmapped, the heap kept it after it was freed)
    p = libc.malloc(16 << 20)
    ctypes.memset(p, 1, 16 << 20)
    mapped = libc.mallinfo2().hblks
    libc.free(p)
    return mapped > before_maps, libc.mallinfo2().arena >= (16 << 20)

before_maps = libc.mallinfo2().hblks
if sys.argv[1] == "keep":
    from modelalloy.search.heap import keep_heap
    assert keep_heap()
print(*probe())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize(("mode", "want"), [("default", "True False"), ("keep", "False True")])
def test_keep_heap_serves_large_blocks_from_the_heap_and_keeps_them(mode, want):
    """By default glibc maps a 16 MB block on its own and unmaps it when freed; after
    keep_heap the heap serves it and keeps the memory for the next allocation."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == want


def test_the_command_keeps_the_heap(template, tmp_path, run_cli, heap_calls):
    r = run_cli("optimize", "evolve", template(), "--objective",
                "python:tests.optimize.synthetic:quadratic", "--out", tmp_path / "o",
                "--budget", "4")
    assert r.code == 0, r.err
    assert heap_calls == [1]
