"""TIES' sampled bracket (kernels.topk) finds the exact cut-off that torch.topk gives, and when
its sample misleads it, the exact passes run and the merge's bits do not change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelalloy import kernels
from modelalloy.kernels import slices
from modelalloy.kernels.topk import SampledTopK, ties_bracket_kernel
from modelalloy.methods.registry import MergeContext, get_method

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")

N = 5 * 65536 + 12345  # five full slices and an odd remainder
STEP = 65536


def _bf16_like_llm(seed: int) -> list[torch.Tensor]:
    """Base + 3 experts as benchmarks/merge_speed.py makes them (rows of different scales,
    a shared low-rank part), in bf16: |τ| takes few distinct values, with large tie groups."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = N // 512, 512
    n = rows * cols
    base = 0.02 * torch.randn(n, generator=gen)
    experts = []
    for _ in range(3):
        scale = torch.exp(0.5 * torch.randn(rows, 1, generator=gen))
        delta = (torch.randn(rows, cols, generator=gen) * scale * 6e-4).reshape(-1)
        experts.append(base + delta)
    return [t.to(torch.bfloat16) for t in [base, *experts]]


def _f32_columns(seed: int) -> list[torch.Tensor]:
    """float32 task vectors whose columns have very different scales (every 64th column 30×,
    as activation outliers do), one expert equal to the base on every other element."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=gen)
    col_scale = torch.ones(N)
    col_scale[::64] = 30.0
    deltas = [0.01 * torch.randn(N, generator=gen) * col_scale for _ in range(3)]
    deltas[2][torch.rand(N, generator=gen) < 0.5] = 0.0
    return [base, *[base + d for d in deltas]]


def _reference_plan(inputs: list[torch.Tensor], density: float) -> tuple[int, float, int]:
    """(k, cut-off, ties to keep) of each expert by torch.topk over the whole tensor."""
    plans = []
    for expert in inputs[1:]:
        mag = (expert.float() - inputs[0].float()).abs()
        k = int(density * mag.numel())
        v = float(torch.topk(mag, k).values[-1])
        plans.append((k, v, k - int((mag > v).sum())))
    return plans


def _run_passes(kernel, inputs: list[torch.Tensor], ctx: MergeContext) -> list:
    """The kernel's counting passes over the slices in order, as the engine runs them; returns
    the passes that ran."""
    raw = torch.empty((len(inputs), STEP), dtype=inputs[0].dtype)
    ran = []
    for reduce in slices.reduce_passes(kernel, ctx):
        ran.append(reduce.__name__)
        for start in range(0, inputs[0].numel(), STEP):
            count = min(STEP, inputs[0].numel() - start)
            for i, t in enumerate(inputs):
                raw[i, :count] = t[start:start + count]
            ctx.slice_start = start
            assert reduce(kernels.bits(raw), count, ctx, 1)
    return ran


def _params(density) -> dict:
    return get_method("ties").resolve(3, {"density": density}, "ties", conventions="paper")


@pytest.mark.parametrize("make", [_bf16_like_llm, _f32_columns])
@pytest.mark.parametrize("density", [0.2, 0.03, 0.7])
def test_the_bracket_gives_torch_topks_cut_off_in_two_passes(make, density):
    inputs = make(1)
    kernel = slices.ties(_params(density))
    ctx = MergeContext(name="w", streams={})
    assert _run_passes(kernel, inputs, ctx) == ["sample", "bracket"]
    sampled = ctx.state(SampledTopK)
    assert sampled.check()
    for t, (k, v, left) in enumerate(_reference_plan(inputs, density)):
        if v == 0.0:  # fewer than k nonzero: every nonzero entry is kept either way
            assert sampled.plan(t)[1] == 0.0
        else:
            assert sampled.plan(t) == (k, v, left)


def test_a_misleading_sample_runs_the_exact_passes_with_the_same_bits():
    """Every 61st element (the sampled ones) is far larger than the rest, so the sample puts
    the bracket well above the true cut-off: the walk finds no cut-off in it, the two exact
    passes run, and the merged bits equal the whole-tensor torch path's."""
    inputs = _f32_columns(2)
    for e in inputs[1:]:
        e[::61] += 5.0
    params = _params(0.2)
    kernel = slices.ties(params)
    ctx = MergeContext(name="w", streams={})
    assert _run_passes(kernel, inputs, ctx) == ["sample", "bracket", "count", "collect"]
    assert not ctx.state(SampledTopK).check()
    assert torch.equal(_fused_merge(kernel, inputs, ctx), _whole(params, inputs))


@pytest.mark.parametrize("make", [_bf16_like_llm, _f32_columns])
@pytest.mark.parametrize("given", [{"density": 0.2},
                                   {"density": [0.1, 1.0, 0.0], "vote": "weighted",
                                    "weight": [0.5, 1.0, 0.3]}])
def test_the_bracketed_merge_gives_the_whole_tensor_torch_bits(make, given):
    inputs = make(3)
    params = get_method("ties").resolve(3, given, "ties", conventions="paper")
    kernel = slices.ties(params)
    ctx = MergeContext(name="w", streams={})
    assert _run_passes(kernel, inputs, ctx)[:2] == ["sample", "bracket"]
    assert ctx.state(SampledTopK).check()
    got = _fused_merge(kernel, inputs, ctx)
    want = _whole(params, inputs)
    bits = torch.int16 if got.dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(bits), want.view(bits))


def _fused_merge(kernel, inputs: list[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
    """The kernel's merge slice by slice after its passes, then the paper vote's finish."""
    n, dtype = inputs[0].numel(), inputs[0].dtype
    raw, out = torch.empty((len(inputs), STEP), dtype=dtype), torch.empty(STEP, dtype=dtype)
    merged = torch.empty(n, dtype=dtype)
    for start in range(0, n, STEP):
        count = min(STEP, n - start)
        for i, t in enumerate(inputs):
            raw[i, :count] = t[start:start + count]
        ctx.slice_start = start
        assert kernel(kernels.bits(raw), count, kernels.bits(out), ctx, 1)
        merged[start:start + count] = out[:count]
    finish = get_method("ties").execution.finish
    if finish is not None:
        for index, values in finish.run(ctx):
            merged[index] = values.to(dtype)
    return merged


def _whole(params: dict, inputs: list[torch.Tensor]) -> torch.Tensor:
    wide = [t.float() for t in inputs]
    out = get_method("ties")(wide[0], wide[1:], params, MergeContext(name="w"))
    return out.to(inputs[0].dtype)


@pytest.mark.parametrize("bad_row", [0, 1, 3])
@pytest.mark.parametrize("nbins", [[0, 0, 0], [4, 0, 4]])
def test_the_bracket_pass_reports_a_nonfinite_input_in_any_row(bad_row, nbins):
    raw = torch.randn(4, 5000)
    lo, width = np.full(3, 15000, np.int64), np.asarray(nbins, np.int64)
    slots = np.full((3, 4), -1, np.int64)
    slots[:, 1] = 0
    above, coarse = np.zeros(3, np.int64), np.zeros((3, 4), np.int64)
    exact = np.zeros((3, 1, 1 << 16), np.int32)
    args = (lo, width, slots, above, coarse, exact)
    assert ties_bracket_kernel(kernels.bits(raw), 5000, *args)
    raw[bad_row, 4321] = float("nan")
    assert not ties_bracket_kernel(kernels.bits(raw), 5000, *args)
    raw[bad_row, 4321] = float("-inf")
    assert not ties_bracket_kernel(kernels.bits(raw), 5000, *args)
