"""The fused tensor-wide Breadcrumbs band (``kernels.bands``, mergekit's ``granularity:
tensor``) gives the bits of the whole-tensor torch merge (``_sparsify.band_trim_`` over the
flattened tensor, then ``ties_core`` or the weighted sum), slice after slice.

Inputs are quantized task vectors (a few distinct magnitudes), so thousands of entries tie at
each cut-off and the tie windows end inside a slice; with exact zeros, exact cancellations
between experts (the paper vote's undecided elements) and an odd length.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modelalloy
from modelalloy import kernels
from modelalloy.kernels import slices
from modelalloy.methods.orderstats import LOW_BINS, RankSelect, SlicedBand
from modelalloy.methods.registry import MergeContext, get_method
from modelalloy.methods.ties import PaperVote
from tests.kernels.test_fused import _fused_slices

N = 3 * 4096 + 1237  # odd: no slice length divides it


def _quantized(dtype: torch.dtype, seed: int = 0, n: int = N,
               low: int = -4) -> list[torch.Tensor]:
    """Base + 3 experts: task vectors in multiples of 2^-7 (``low`` .. 4 of them), a fifth of
    expert 0's entries exactly zero, expert 1 the negation of expert 0 on every third entry,
    a base of −0.0 every 101st entry; every value exact in bfloat16."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(-16, 17, (n,), generator=gen).float() * 2.0 ** -5
    base[::101] = -0.0
    steps = [torch.randint(low, 5, (n,), generator=gen).float() * 2.0 ** -7 for _ in range(3)]
    steps[0][::5] = 0.0
    steps[1][::3] = -steps[0][::3]
    inputs = [base] + [base + s for s in steps]
    assert all(torch.equal(t.to(dtype).float(), t) for t in inputs)
    return [t.to(dtype) for t in inputs]


def _whole(name: str, params: dict, inputs: list[torch.Tensor],
           out_dtype: torch.dtype) -> torch.Tensor:
    """The reference: the torch method on the whole tensor (no slices)."""
    spec = get_method(name)
    ctx = MergeContext(name="w", seed=0, streams={})
    return spec(inputs[0].float(), [t.float() for t in inputs[1:]], params, ctx).to(out_dtype)


def _fused(name: str, params: dict, inputs: list[torch.Tensor], out_dtype: torch.dtype,
           step: int) -> tuple[torch.Tensor, MergeContext]:
    """The engine's fused sliced path (the kernel's two passes, then its merge, slice by
    slice), and the context that holds its state."""
    spec = get_method(name)
    assert len(getattr(slices, spec.execution.kernel_for(params))(params).passes) == 2
    ctx = MergeContext(name="w", seed=0, streams={})
    return _fused_slices(name, params, inputs, out_dtype, step, ctx), ctx


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


CASES = [
    # the 1B race's recipe (mergekit's conventions: weighted vote)
    ("breadcrumbs_ties", {"density": 0.2, "gamma": 0.01, "weight": 0.5}),
    ("breadcrumbs_ties", {"density": 0.2, "gamma": 0.01, "vote": "paper"}),
    # density 1 keeps a model whole, density 0 zeroes it (δ·0: −0.0 for negatives), gamma 0
    # has no top cut
    ("breadcrumbs_ties", {"density": [0.3, 1.0, 0.0], "gamma": [0.05, 0.1, 0.0],
                          "weight": [1.0, 0.3, 0.5], "normalize": True, "lambda": 0.8,
                          "vote": "paper"}),
    ("breadcrumbs_ties", {"density": [0.3, 0.5, 0.2], "gamma": [0.0, 0.02, 0.3],
                          "weight": [0.5, 1.0, 0.3]}),
    # the low cut-off among the zeros; density + gamma > 1 (n_top shrinks)
    ("breadcrumbs_ties", {"density": 0.85, "gamma": 0.05, "vote": "paper"}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.6}),
    ("breadcrumbs", {"density": 0.2, "gamma": 0.01, "weight": 0.5}),
    ("breadcrumbs", {"density": [0.3, 0.85, 1.0], "gamma": [0.01, 0.0, 0.2],
                     "weight": [1.0, -0.5, 0.3], "normalize": True, "lambda": 1.3}),
]


@pytest.mark.parametrize(("name", "given"), CASES)
@pytest.mark.parametrize(("dtype", "out_dtype", "step"), [
    (torch.bfloat16, torch.bfloat16, 4096), (torch.bfloat16, torch.float32, 2500),
    (torch.float32, torch.float32, 7001), (torch.float32, torch.bfloat16, N)])
def test_tensor_band_kernel_gives_the_whole_tensor_torch_bits(name, given, dtype, out_dtype,
                                                             step):
    params = get_method(name).resolve(3, given, name)
    assert params["granularity"] == "tensor" and not params["rescale"]
    inputs = _quantized(dtype, seed=step)
    got, ctx = _fused(name, params, inputs, out_dtype, step)
    assert torch.equal(_bits(got), _bits(_whole(name, params, inputs, out_dtype)))
    if given.get("vote") == "paper" and given["density"] == 0.2:
        assert ctx.streams[PaperVote].fixes  # the cancellations went through the fix-ups


def test_the_tie_windows_end_inside_the_ties_so_chunks_split_them():
    """The cases above do exercise the element-by-element tie path: a window's first or end
    falls strictly inside the ties at its cut-off value (thousands of them)."""
    name, given = CASES[0]
    params = get_method(name).resolve(3, given, name)
    _, ctx = _fused(name, params, _quantized(torch.bfloat16), torch.bfloat16, 4096)
    band = ctx.streams[SlicedBand]
    split = []
    for t in range(3):
        windows = band.plan(t)[1][2]
        for cut in band.select.cuts(t):  # the ties at each cut-off value
            first, end, _ = windows[cut.value]
            assert cut.tied > 1000
            split.append(0 < first < cut.tied or 0 < end < cut.tied)
    assert any(split)


def test_collect_kernel_counts_the_low_bits_as_rank_select_does():
    from modelalloy.kernels.bands import band_collect_kernel

    inputs = _quantized(torch.float32)
    raw = torch.stack(inputs)
    mags = [(raw[1 + t] - raw[0]).abs() for t in range(3)]
    keys = [int(m.view(torch.int32)[7]) >> 16 for m in mags]  # bins that hold values
    bins = np.asarray([[keys[0], keys[1]], [keys[2], -1], [-1, -1]], np.int64)
    counts = np.zeros((3, 2, LOW_BINS), np.int64)
    assert band_collect_kernel(kernels.bits(raw), N, bins, counts)
    for t in range(3):
        for i in range(2):
            if bins[t, i] < 0:
                assert not counts[t, i].any()
                continue
            select = RankSelect(1)
            select.values[0][int(bins[t, i])] = None
            select.collect(0, mags[t])
            want = select.values[0][int(bins[t, i])]
            assert np.array_equal(counts[t, i], want.numpy())


def test_a_nonfinite_input_is_reported_by_the_passes_and_the_merge():
    params = get_method("breadcrumbs_ties").resolve(3, {"density": 0.2}, "breadcrumbs_ties")
    kernel = slices.breadcrumbs_ties(params)
    raw = torch.stack(_quantized(torch.bfloat16))[:, :4096].contiguous()
    raw[2, 1000] = float("nan")
    ctx = MergeContext(name="w", seed=0, streams={})
    ctx.slice_start = 0
    assert not kernel.passes[0](kernels.bits(raw), 4096, ctx)
    out = torch.empty(4096, dtype=torch.bfloat16)
    assert not kernel(kernels.bits(raw), 4096, kernels.bits(out), ctx)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("method", "vote"), [("breadcrumbs_ties", "weighted"),
                                              ("breadcrumbs_ties", "paper"), ("ties", "paper")])
@pytest.mark.parametrize("path", ["torch", "fused"])
def test_the_engine_merges_tensor_bands_on_the_kernel_with_the_whole_tensor_bits(
        monkeypatch, threads, method, vote, path):
    """Through the engine (slices of SLICE_ELEMENTS, one and two threads), on the torch slices
    and on the kernels: the whole-tensor merge's bits. The task vectors lean negative, so the
    paper vote's majority is −1 and the elements every model dropped on a base of −0.0 come
    out −0.0 (−0 + −0), as in the whole tensor: the slices' provisional +1 would give +0."""
    from unittest import mock

    from modelalloy.plan.planner import SLICE_ELEMENTS

    monkeypatch.setenv("MODELALLOY_KERNELS", "1" if path == "fused" else "0")
    n = 2 * SLICE_ELEMENTS + 4099
    shapes = {"a.weight": (n // 13, 13), "b.weight": (n // 13 - 3, 13), "c.weight": (77,)}
    models: list[dict[str, torch.Tensor]] = [{} for _ in range(4)]
    for i, (key, shape) in enumerate(shapes.items()):
        numel = int(np.prod(shape))
        for m, t in enumerate(_quantized(torch.bfloat16, seed=i, n=numel, low=-5)):
            models[m][key] = t.view(shape)
    params = {"density": 0.2, "weight": 0.5, "vote": vote}
    if method == "breadcrumbs_ties":
        params["gamma"] = 0.01
    recipe = {"merge_method": method, "base_model": "base", "parameters": params,
              "models": [{"model": f"e{i}"} for i in range(3)]}
    sources = {"base": models[0], **{f"e{i}": models[1 + i] for i in range(3)}}
    with mock.patch.object(slices, method, wraps=getattr(slices, method)) as factory:
        sliced = modelalloy.merge(recipe, sources=sources, threads=threads)
    assert factory.call_count == (2 if path == "fused" else 0)  # the two sliced tensors
    whole = modelalloy.merge_state_dicts(method, models[0], models[1:], **params)
    for key in shapes:
        assert torch.equal(_bits(sliced[key]), _bits(whole[key])), key
    if vote == "paper":
        negative_zeros = _bits(whole["a.weight"]) == _bits(torch.tensor(-0.0).bfloat16())
        assert int(negative_zeros.sum()) > 10
