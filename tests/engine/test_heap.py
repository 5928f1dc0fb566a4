"""The merge's allocator setting is on inside the block and undone after it."""

from __future__ import annotations

import sys

import pytest
import torch

from modelalloy.engine.heap import retained_heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_heap_tunes_glibc_and_tensors_still_work():
    with retained_heap() as tuned:
        assert tuned
        big = [torch.ones(10_000_000) for _ in range(3)]  # 40 MB each: above mmap's threshold
        assert sum(float(t.sum()) for t in big) == 30_000_000
        del big
        again = torch.zeros(10_000_000)
        assert float(again.abs().sum()) == 0.0  # reused heap memory is still zeroed by torch
