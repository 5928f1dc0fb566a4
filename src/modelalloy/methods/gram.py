"""Whole-tensor inner products that stream: Σ_k x_i[k]·x_j[k] for a few same-shaped tensors.

SLERP (Σv0², Σv1², Σv0·v1) and Model Stock (‖δ_i‖², ⟨δ_i, δ_j⟩) reduce each tensor to such a
small Gram matrix before an elementwise step. The sums are float64 dots over consecutive
chunks of ``SLICE_ELEMENTS`` elements, added in order, on one intra-op thread: the whole tensor
and its slices (a method's reduction pass, ``Execution.passes``) add the same numbers in the
same order, so a merge gives the same bits either way and at any thread count.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from modelalloy.methods.registry import SLICE_ELEMENTS
from modelalloy.threads import one_intra_op_thread

Gram = list[list[float]]
_scratch = threading.local()


@dataclass
class SlicedGram:
    """A sliced merge's Gram sums (SLERP, Model Stock), gathered by its first pass over the
    slices (torch or fused) and read by the merge: ``MergeContext.state(SlicedGram, ...)``."""

    gram: Gram


def new_gram(n: int) -> Gram:
    """An n × n zero Gram matrix (only the upper triangle i ≤ j is filled)."""
    return [[0.0] * n for _ in range(n)]


def thread_buffers(kind: str, count: int, dtype: torch.dtype, device: torch.device,
                   size: int = SLICE_ELEMENTS) -> list[torch.Tensor]:
    """``count`` work buffers named ``kind`` of at least ``size`` elements, this thread's own
    and reused from call to call: a fresh 1–2 MB tensor per chunk costs more in page faults
    than the arithmetic. Different kinds never share memory."""
    scratch = cast("dict[tuple[str, torch.device, torch.dtype], list[torch.Tensor]]",
                   _scratch.__dict__)
    buffers = scratch.setdefault((kind, device, dtype), [])
    while len(buffers) < count:
        buffers.append(torch.empty(size, dtype=dtype, device=device))
    for i in range(count):
        if buffers[i].numel() < size:
            buffers[i] = torch.empty(size, dtype=dtype, device=device)
    return buffers[:count]


def add_gram_(gram: Gram, vectors: Sequence[torch.Tensor],
              minus: torch.Tensor | None = None) -> Gram:
    """Add Σ_k x_i[k]·x_j[k] over these elements to ``gram[i][j]`` for every i ≤ j; with
    ``minus``, of the differences x_i − minus (float32 differences, as ``torch.sub`` makes task
    vectors, widened to float64: no tensor-sized temporaries). One float64 matrix product
    per chunk gives all the terms."""
    flat = [v.reshape(-1) for v in vectors]
    numel, device = flat[0].numel(), flat[0].device
    below = None if minus is None else minus.reshape(-1)
    with one_intra_op_thread():
        for start in range(0, numel, SLICE_ELEMENTS):
            count = min(SLICE_ELEMENTS, numel - start)
            wide = difference_rows(count, len(flat), device)
            for row, x in zip(wide, flat, strict=True):
                if below is None:
                    row.copy_(x[start:start + count])
                else:  # computed in float32 (the inputs' type), then widened into ``row``
                    torch.sub(x[start:start + count], below[start:start + count], out=row)
            add_products_(gram, wide)
    return gram


def difference_rows(count: int, rows: int, device: torch.device) -> torch.Tensor:
    """This thread's (rows × count) float64 buffer for :func:`add_products_` (the one
    :func:`add_gram_` fills, so both paths hand the matrix product the same memory)."""
    buffer = thread_buffers("gram", 1, torch.float64, device, rows * SLICE_ELEMENTS)[0]
    return buffer[:rows * count].view(rows, count)


def add_products_(gram: Gram, wide: torch.Tensor) -> None:
    """Add the products of the rows of ``wide`` (float64, one chunk of at most
    ``SLICE_ELEMENTS`` columns) to the upper triangle of ``gram``: one matrix product."""
    with one_intra_op_thread():
        products = torch.mm(wide, wide.t()).tolist()
    for i in range(len(products)):
        for j in range(i, len(products)):
            gram[i][j] += products[i][j]
