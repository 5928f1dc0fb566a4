"""Whole-tensor inner products that stream: Σ_k x_i[k]·x_j[k] for a few same-shaped tensors.

SLERP (Σv0², Σv1², Σv0·v1) and Model Stock (‖δ_i‖², ⟨δ_i, δ_j⟩) reduce each tensor to such a
small Gram matrix before an elementwise step. The sums are float64 dots over consecutive
chunks of ``SLICE_ELEMENTS`` elements, added in order, on one intra-op thread: the whole tensor
and its slices (the engine's ``slice_reduce`` pass) add the same numbers in the same order, so
a merge gives the same bits either way and at any thread count.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from modelalloy.plan.planner import SLICE_ELEMENTS
from modelalloy.threads import one_intra_op_thread

Gram = list[list[float]]
_scratch = threading.local()


def new_gram(n: int) -> Gram:
    """An n × n zero Gram matrix (only the upper triangle i ≤ j is filled)."""
    return [[0.0] * n for _ in range(n)]


def thread_buffers(kind: str, count: int, dtype: torch.dtype, device: torch.device,
                   size: int = SLICE_ELEMENTS) -> list[torch.Tensor]:
    """``count`` work buffers named ``kind`` of at least ``size`` elements, this thread's own
    and reused from call to call: a fresh 1–2 MB tensor per chunk costs more in page faults
    than the arithmetic. Different kinds never share memory."""
    buffers = _scratch.__dict__.setdefault((kind, device, dtype), [])
    while len(buffers) < count:
        buffers.append(torch.empty(size, dtype=dtype, device=device))
    for i in range(count):
        if buffers[i].numel() < size:
            buffers[i] = torch.empty(size, dtype=dtype, device=device)
    return buffers[:count]


def add_gram_(gram: Gram, vectors: Sequence[torch.Tensor],
              minus: torch.Tensor | None = None) -> Gram:
    """Add Σ_k x_i[k]·x_j[k] over these elements to ``gram[i][j]`` for every i ≤ j; with
    ``minus``, of the differences x_i − minus (formed in float32, as ``torch.sub`` makes task
    vectors, chunk by chunk: no tensor-sized temporaries)."""
    flat = [v.reshape(-1) for v in vectors]
    numel, device = flat[0].numel(), flat[0].device
    wide_bufs = thread_buffers("gram", len(flat), torch.float64, device)
    diff = None if minus is None else thread_buffers("gram", 1, torch.float32, device)[0]
    with one_intra_op_thread():
        for start in range(0, numel, SLICE_ELEMENTS):
            count = min(SLICE_ELEMENTS, numel - start)
            wide = []
            for buf, x in zip(wide_bufs, flat, strict=False):
                chunk = x[start:start + count]
                if minus is not None:
                    chunk = torch.sub(chunk, minus.reshape(-1)[start:start + count],
                                      out=diff[:count])
                wide.append(buf[:count].copy_(chunk))
            for i, x in enumerate(wide):
                for j in range(i, len(wide)):
                    gram[i][j] += float(torch.dot(x, wide[j]))
    return gram
