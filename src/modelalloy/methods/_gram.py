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


def _float64_buffers(count: int, device: torch.device) -> list[torch.Tensor]:
    # reused per thread: a fresh 2 MB tensor per chunk costs more in page faults than the dots
    buffers = _scratch.__dict__.setdefault(device, [])
    while len(buffers) < count:
        buffers.append(torch.empty(SLICE_ELEMENTS, dtype=torch.float64, device=device))
    return buffers


def add_gram_(gram: Gram, vectors: Sequence[torch.Tensor]) -> Gram:
    """Add Σ_k x_i[k]·x_j[k] over these elements to ``gram[i][j]`` for every i ≤ j."""
    flat = [v.reshape(-1) for v in vectors]
    numel = flat[0].numel()
    buffers = _float64_buffers(len(flat), flat[0].device)
    with one_intra_op_thread():
        for start in range(0, numel, SLICE_ELEMENTS):
            count = min(SLICE_ELEMENTS, numel - start)
            wide = [buf[:count].copy_(x[start:start + count]) for buf, x in zip(
                buffers, flat, strict=False)]
            for i, x in enumerate(wide):
                for j in range(i, len(wide)):
                    gram[i][j] += float(torch.dot(x, wide[j]))
    return gram
