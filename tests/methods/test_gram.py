"""The streaming Gram of SLERP and Model Stock: float64 products of float32 differences, the
same numbers whether a tensor comes whole or in slices."""

from __future__ import annotations

import torch

from modelalloy.methods.gram import add_gram_, new_gram
from modelalloy.plan.planner import SLICE_ELEMENTS


def _vectors(n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    base = 100 * torch.randn(n, generator=gen)
    return [base + torch.randn(n, generator=gen) for _ in range(3)], base


def test_gram_of_differences_is_the_float64_products_of_float32_differences():
    n = 2 * SLICE_ELEMENTS + 999
    xs, base = _vectors(n)
    gram = add_gram_(new_gram(3), xs, minus=base)
    deltas = [(x - base).double() for x in xs]  # the float32 differences, widened
    for i in range(3):
        for j in range(3):
            want = float(deltas[i] @ deltas[j])
            if j >= i:
                assert abs(gram[i][j] - want) <= 1e-12 * abs(float(deltas[i].norm() ** 2))
            else:
                assert gram[i][j] == 0.0  # only the upper triangle is filled
    # the differences, not the inputs: ‖x‖² would be about 10^4 times larger
    assert gram[0][0] < 2 * n


def test_slices_on_chunk_boundaries_add_the_same_numbers_as_the_whole():
    n = 3 * SLICE_ELEMENTS + 77
    xs, base = _vectors(n)
    whole = add_gram_(new_gram(3), xs, minus=base)
    parts = new_gram(3)
    for start in range(0, n, SLICE_ELEMENTS):
        stop = start + SLICE_ELEMENTS
        add_gram_(parts, [x[start:stop] for x in xs], minus=base[start:stop])
    assert parts == whole
