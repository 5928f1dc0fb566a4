"""Torch's intra-op thread count, pinned to one for a block of code; an ordered thread map."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


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


def ordered_map(work: Callable[[T], R], items: Iterable[T], threads: int | None = None
                ) -> Iterator[tuple[T, R]]:
    """``(item, work(item))`` in order, computed on ``threads`` threads (default: up to 4)
    with one intra-op thread each: whole-tensor work (an SVD, a tensor's statistics) took
    several times the CPU with torch's team spinning on a busy machine (an SVD 7x with two).
    At most one finished result per thread waits to be taken, so memory stays bounded."""
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    window: deque[tuple[T, Future]] = deque()
    with one_intra_op_thread(), ThreadPoolExecutor(threads) as pool:
        for item in items:
            window.append((item, pool.submit(work, item)))
            if len(window) > threads:
                done, future = window.popleft()
                yield done, future.result()
        while window:
            done, future = window.popleft()
            yield done, future.result()
