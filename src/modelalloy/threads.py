"""Torch's intra-op thread count, pinned to one for a block of code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run this thread's torch ops on one core. A slice is too small to split: with the merge
    threads already one per core, torch's intra-op team only adds wake-ups and spinning
    (a dare_ties slice loop took 15x the CPU time with 2 intra-op threads on a loaded 2-core
    machine, 1.0x when idle). Elementwise ops give the same bits at any thread count."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
