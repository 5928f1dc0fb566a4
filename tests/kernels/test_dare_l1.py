"""DARE's fused L1 pass (kernels.elementwise.dare_l1_kernel) gives the exact L1 bins of the
torch pass (dare.gather_l1_sums), on chunks summed in float64 and on chunks too wide for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelalloy import kernels
from modelalloy.kernels import slices
from modelalloy.methods.dare import L1Sums, gather_l1_sums
from modelalloy.methods.registry import MergeContext, get_method

STEP = 3000  # slices of the engine's sliced path
N = 2 * STEP + 777


def _inputs(dtype: torch.dtype, wide: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(N, generator=gen)
    deltas = [1e-3 * torch.randn(N, generator=gen) for _ in range(3)]
    deltas[0][::4] = 0.0
    if wide:  # magnitudes 2^30 apart in one chunk: the element-by-element bins (a zero base
        base[::9] = 0.0  # keeps the tiny deltas exact)
        deltas[1][::9] *= 1e-9
        deltas[2][9] = 1e-41
    return [base.to(dtype)] + [(base + d).to(dtype) for d in deltas]


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_l1_pass_gathers_the_torch_passs_norms(wide, dtype):
    spec = get_method("dare_ties")
    params = spec.resolve(3, {"density": [0.3, 0.5, 1.0]}, "dare_ties")
    assert params["rescale_norm"] == "l1"  # mergekit's default
    inputs = _inputs(dtype, wide)
    torch_ctx = MergeContext(name="w", seed=7, streams={})
    fused_ctx = MergeContext(name="w", seed=7, streams={})
    kernel = slices.dare_ties(params)
    (gather,) = kernel.passes
    raw = torch.empty((4, STEP), dtype=dtype)
    for start in range(0, N, STEP):
        count = min(STEP, N - start)
        wide_rows = [t[start:start + count].float() for t in inputs]
        torch_ctx.slice_start = fused_ctx.slice_start = start
        gather_l1_sums(wide_rows[0], wide_rows[1:], params, torch_ctx)
        for i, t in enumerate(inputs):
            raw[i, :count] = t[start:start + count]
        assert gather(kernels.bits(raw), count, fused_ctx)
    if wide:
        first = (inputs[2][:2048].float() - inputs[0][:2048].float()).abs()
        assert first.max() > 2.0 ** 20 * first[first > 0].min()
    want, got = torch_ctx.streams[L1Sums], fused_ctx.streams[L1Sums]
    for model in range(3):
        assert got.norms(model) == want.norms(model)
    # the unrounded sums agree too: the kept ones are the drawn masks' exact norms
    delta = inputs[1].float() - inputs[0].float()
    keep = MergeContext(name="w", seed=7, streams={}).keep_mask(delta, 0.3, 0)
    exact = [float(sum(map(np.float64, delta.abs().tolist()))),  # close, not exact: a check
             float(sum(map(np.float64, (delta * keep).abs().tolist())))]
    assert got.norms(0) == pytest.approx(tuple(exact), rel=1e-12)
    assert got.norms(2) == (0.0, 0.0)  # density 1: nothing dropped, nothing gathered
