"""The fused slice kernels give the bits of the methods' torch code, slice by slice.

Parameters resolve with `conventions: paper`: the kernels serve the streamed variants (paper
vote, row-wise Breadcrumbs, DELLA without the L1 rescale), the papers' defaults; DARE's L1
rescale (mergekit's) has its own cases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelalloy import kernels
from modelalloy.errors import MethodError
from modelalloy.kernels import slices
from modelalloy.kernels._numba import sfc64_fill
from modelalloy.methods.gram import SlicedGram
from modelalloy.methods.registry import MergeContext, get_method
from modelalloy.methods.ties import PaperVote

# Three slices: two full ones and an odd remainder, so draws continue across slices and the
# last slice ends on half a 64-bit draw.
STEP = 5000
N = 2 * STEP + 1235


def _inputs(dtype: torch.dtype, n_experts: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """Base first; task vectors with exact zeros, exact cancellations and ties."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=gen)
    base[::97] = 0.0
    base[1::97] = -0.0
    deltas = [0.01 * torch.randn(N, generator=gen) for _ in range(n_experts)]
    deltas[0][::5] = 0.0
    if n_experts > 1:
        deltas[1][::3] = -deltas[0][::3]  # exact cancellations
        deltas[1][1::7] = 0.0
    return [base.to(dtype)] + [(base + d).to(dtype) for d in deltas]


def _torch_reduce(name: str, params: dict, inputs: list[torch.Tensor],
                  ctx: MergeContext) -> None:
    """The method's torch reduction passes over every slice, as the engine runs them."""
    spec = get_method(name)
    for reduce in spec.execution.passes_for(params):
        for start in range(0, N, STEP):
            wide = [t[start:start + STEP].float() for t in inputs]
            ctx.slice_start = start
            reduce(wide[0], wide[1:], params, ctx)


def _torch_slices(name: str, params: dict, inputs: list[torch.Tensor],
                  out_dtype: torch.dtype) -> torch.Tensor:
    """The engine's torch sliced path: float32 slices through the registered method."""
    spec = get_method(name)
    uses_base = spec.base != "none"
    ctx = MergeContext(name="w", seed=7, streams={})
    _torch_reduce(name, params, inputs, ctx)
    out = torch.empty(N, dtype=out_dtype)
    for start in range(0, N, STEP):
        wide = [t[start:start + STEP].float() for t in inputs]
        b, e = (wide[0], wide[1:]) if uses_base else (None, wide[1:])
        ctx.slice_start = start
        out[start:start + STEP] = spec(b, e, params, ctx).to(out_dtype)
    if spec.execution.finish is not None:
        for index, values in spec.execution.finish.run(ctx):
            out[index] = values.to(out_dtype)
    return out


def _fused_slices(name: str, params: dict, inputs: list[torch.Tensor],
                  out_dtype: torch.dtype, step: int = STEP,
                  ctx: MergeContext | None = None) -> torch.Tensor:
    """The engine's fused sliced path: the kernel's passes over every slice in order, then
    its merge slice by slice, then the method's finish step (in ``ctx``, if given)."""
    spec = get_method(name)
    kernel = getattr(slices, spec.execution.kernel_for(params))(params)
    assert kernel is not None
    sources = inputs if spec.base != "none" else inputs[1:]
    raw = torch.empty((len(sources), step), dtype=inputs[0].dtype)
    out = torch.empty(step, dtype=out_dtype)
    ctx = ctx or MergeContext(name="w", seed=7, streams={})
    n = inputs[0].numel()

    def each_slice():
        for start in range(0, n, step):
            count = min(step, n - start)
            for i, t in enumerate(sources):
                raw[i, :count] = t[start:start + count]
            ctx.slice_start = start
            yield start, count

    for reduce in slices.reduce_passes(kernel, ctx):  # the kernel's own reduce passes
        for _, count in each_slice():
            assert reduce(kernels.bits(raw), count, ctx)
    merged = torch.empty(n, dtype=out_dtype)
    for start, count in each_slice():
        assert kernel(kernels.bits(raw), count, kernels.bits(out), ctx)
        merged[start:start + count] = out[:count]
    if spec.execution.finish is not None:
        for index, values in spec.execution.finish.run(ctx):
            merged[index] = values.to(out_dtype)
    return merged


CASES = [
    ("linear", {"weight": [0.5, 0.3, 0.2]}),
    ("linear", {"weight": [1.0, 0.0, 2.0], "normalize": False}),
    ("task_arithmetic", {"weight": [0.5, 1.0, -0.25], "lambda": 0.7}),
    ("task_arithmetic", {"weight": [0.0, 1.0, 0.3], "normalize": True}),
    ("task_arithmetic", {"weight": [0.0, 0.0, 0.0]}),
    ("dare_linear", {"density": [0.3, 1.0, 0.0], "weight": [0.5, 1.0, 0.3]}),
    ("dare_linear", {"density": 0.5, "normalize": True, "rescale": False, "lambda": 1.5}),
    ("dare_ties", {"density": 0.2, "weight": 0.5}),
    ("dare_ties", {"density": [0.4, 0.6, 1.0], "weight": [0.5, 1.0, 0.3], "normalize": True,
                   "lambda": 1.3}),
    ("dare_ties", {"density": 0.5, "weight": [1.0, 0.2, 0.7], "vote": "weighted"}),
    ("dare_ties", {"density": 0.9, "weight": [1.0, 1.0, 1.0], "normalize": True}),
    # mergekit's L1 rescale: a torch pass gathers the L1 sums, the kernel scales by them
    ("dare_linear", {"density": [0.3, 1.0, 0.6], "rescale_norm": "l1"}),
    ("dare_ties", {"density": 0.4, "weight": [1.0, 0.2, 0.7], "vote": "weighted",
                   "rescale_norm": "l1"}),
    ("model_stock", {}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": [0.3, 1.0, 0.0], "weight": [0.5, 1.0, 0.3], "vote": "weighted",
              "lambda": 0.9}),
    ("ties", {"density": [0.05, 0.5, 0.8], "normalize": False}),
]


@pytest.mark.parametrize(("name", "given"), CASES)
@pytest.mark.parametrize(("dtype", "out_dtype"), [(torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.float32),
                                                  (torch.bfloat16, torch.float32)])
def test_fused_kernel_gives_the_torch_paths_bits(name, given, dtype, out_dtype):
    spec = get_method(name)
    params = spec.resolve(3, given, name, conventions="paper")
    inputs = _inputs(dtype)
    want = _torch_slices(name, params, inputs, out_dtype)
    got = _fused_slices(name, params, inputs, out_dtype)
    width = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(width), want.view(width))  # bits, so −0.0 ≠ +0.0 counts


@pytest.mark.parametrize(("dtype", "out_dtype"), [(torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.float32)])
def test_model_stock_kernel_with_a_shared_direction(dtype, out_dtype):
    """Deltas sharing a direction give 0 < t < 1 (the generic case above cancels to t = 0):
    the kernel multiplies by the same float32 t and gives the torch path's bits."""
    gen = torch.Generator().manual_seed(3)
    base, shared = torch.randn(N, generator=gen), 0.01 * torch.randn(N, generator=gen)
    inputs = [base.to(dtype)] + [(base + shared + 0.01 * torch.randn(N, generator=gen))
                                 .to(dtype) for _ in range(3)]
    params = get_method("model_stock").resolve(3, {}, "model_stock", conventions="paper")
    ctx = MergeContext(name="w", seed=7, streams={})
    _torch_reduce("model_stock", params, inputs, ctx)
    from modelalloy.methods.model_stock import ratio_from_gram

    assert 0.4 < ratio_from_gram(ctx.state(SlicedGram).gram) < 0.9
    fused_ctx = MergeContext(name="w", seed=7, streams={})
    kernel = slices.model_stock(params)
    for start in range(0, N, STEP):  # the fused Gram pass: the very same sums
        raw = torch.stack([t[start:start + STEP] for t in inputs])
        assert kernel.gram(kernels.bits(raw), raw.shape[1], fused_ctx)
    assert fused_ctx.state(SlicedGram).gram == ctx.state(SlicedGram).gram
    want = _torch_slices("model_stock", params, inputs, out_dtype)
    got = _fused_slices("model_stock", params, inputs, out_dtype)
    width = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(width), want.view(width))


def test_dare_ties_fix_ups_are_exercised():
    """The paper vote's undecided elements (exact cancellations) go through the fix-up."""
    spec = get_method("dare_ties")
    params = spec.resolve(2, {"density": 0.7}, "dare_ties", conventions="paper")
    inputs = _inputs(torch.float32, n_experts=2)
    ctx = MergeContext(name="w", seed=7, streams={})
    kernel = slices.dare_ties(params)
    raw = torch.stack(inputs)[:, :STEP].contiguous()
    out = torch.empty(STEP)
    ctx.slice_start = 0
    assert kernel(kernels.bits(raw), STEP, kernels.bits(out), ctx)
    # Up to 0.49 · (1/3 − 1/15) ≈ 13 % of the entries cancel where both deltas survive (fewer:
    # θ_t − θ_0 in float32 does not always give back ±δ exactly).
    fixes = sum(f[0].numel() for f in ctx.streams[PaperVote].fixes)
    assert 0.05 * STEP < fixes < 0.14 * STEP


def test_sfc64_fill_continues_numpys_stream_across_calls():
    gen = np.random.Generator(np.random.SFC64(1234))
    want = gen.integers(0, 2**64 - 1, size=9, dtype=np.uint64, endpoint=True).view("<u4")
    state = np.array(np.random.SFC64(1234).state["state"]["state"], dtype=np.uint64)
    first, second = np.empty(7, np.uint32), np.empty(10, np.uint32)
    sfc64_fill(state, first)  # 7 words use 4 draws: the 8th word is skipped, as numpy does
    sfc64_fill(state, second)
    assert np.array_equal(first, want[:7])
    assert np.array_equal(second, want[8:18])


def test_bf16_rounding_matches_torch_on_ties_overflow_and_signs():
    from modelalloy.kernels.elementwise import weighted_kernel

    bits = np.arange(0, 2**16, dtype=np.uint32) << 16
    # every bf16 value, the exact halfway points above each, and one ulp either side
    values = np.concatenate([bits, bits | 0x8000, bits | 0x7FFF, bits | 0x8001]).view(np.float32)
    values = values[np.isfinite(values)]
    src = values.reshape(1, -1).copy()
    out = np.empty(values.size, np.uint16)
    one = np.asarray([1], np.int8)  # UNIT: a copy
    assert weighted_kernel(src, values.size, out, False, one, np.ones(1, np.float32),
                           np.float32(0), np.float32(1))
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(out, want)


def test_a_nonfinite_input_is_reported_not_merged():
    params = get_method("task_arithmetic").resolve(1, {}, "ta", conventions="paper")
    raw = torch.ones((2, 64), dtype=torch.bfloat16)
    raw[1, 40] = float("inf")
    out = torch.empty(64, dtype=torch.bfloat16)
    ctx = MergeContext(name="w", seed=0, streams={})
    assert not slices.task_arithmetic(params)(kernels.bits(raw), 64, kernels.bits(out), ctx)
    assert slices.task_arithmetic(params)(kernels.bits(raw), 40, kernels.bits(out), ctx)


def test_l1_rescale_adds_a_pass_and_other_dtypes_are_not_supported():
    params = get_method("dare_ties").resolve(2, {"rescale_norm": "l1", "density": 0.5}, "d",
                                             conventions="paper")
    assert len(slices.dare_ties(params).passes) == 1
    wide = get_method("breadcrumbs").resolve(2, {"density": 0.5}, "b")  # mergekit's band
    assert len(slices.breadcrumbs(wide).passes) == 2  # its two counting passes
    assert not kernels.supports([torch.float16, torch.float16], torch.bfloat16)
    assert not kernels.supports([torch.bfloat16, torch.float32], torch.bfloat16)
    assert kernels.supports([torch.bfloat16] * 3, torch.float32)


def test_kernels_switch_off_with_the_environment(monkeypatch):
    monkeypatch.setenv("MODELALLOY_KERNELS", "0")
    assert not kernels.available()
    monkeypatch.setenv("MODELALLOY_KERNELS", "1")
    assert kernels.available()


def _band_by_sorting(delta: torch.Tensor, n_top: int, hi: int) -> torch.Tensor:
    """Independent reference: rank every row by (|δ| descending, index ascending) with a
    stable sort and keep ranks n_top+1 .. hi."""
    keep = torch.zeros_like(delta, dtype=torch.bool)
    for r in range(delta.shape[0]):
        order = sorted(range(delta.shape[1]), key=lambda j: (-abs(float(delta[r, j])), j))
        keep[r, order[n_top:hi]] = True
    return delta * keep


@pytest.mark.parametrize(("density", "gamma"), [(0.3, 0.05), (0.5, 0.0), (1.0, 0.1),
                                                (0.0, 0.2), (0.9, 0.2)])
def test_band_trim_ranks_ties_by_index_like_a_stable_sort(density, gamma):
    from modelalloy.methods._sparsify import band_trim_

    gen = torch.Generator().manual_seed(3)
    # few distinct magnitudes: most entries tie with others
    delta = torch.randint(-4, 5, (6, 41), generator=gen).float() * 0.25
    n = delta.shape[1]
    n_top = int(gamma * n)
    hi = min(n, n_top + int(density * n))
    got = band_trim_(delta.clone(), density, gamma)
    assert torch.equal(got, _band_by_sorting(delta, n_top, hi))


@pytest.mark.parametrize("given", [{"density": 0.2, "gamma": 0.01, "weight": 0.5},
                                   {"density": [0.3, 0.1, 1.0], "gamma": [0.05, 0.0, 0.1],
                                    "weight": [1.0, 0.3, 0.5], "normalize": True,
                                    "lambda": 0.8},
                                   {"density": 0.5, "gamma": 0.6}])
@pytest.mark.parametrize("width", [701, 2048])
def test_breadcrumbs_kernel_gives_the_torch_paths_bits_row_by_row(given, width):
    spec = get_method("breadcrumbs")
    params = spec.resolve(3, given, "breadcrumbs", conventions="paper")
    rows = 9
    gen = torch.Generator().manual_seed(width)
    base = (0.02 * torch.randn(rows, width, generator=gen)).bfloat16()
    # bf16 experts close to the base: quantized deltas, so many equal magnitudes in a row
    experts = [(base.float() + 1e-3 * torch.randn(rows, width, generator=gen)).bfloat16()
               for _ in range(3)]
    inputs = [base, *experts]
    ctx = MergeContext(name="w", seed=0, streams={})
    want = spec(inputs[0].float(), [e.float() for e in experts], params, ctx).bfloat16()
    raw = torch.stack([t.reshape(-1) for t in inputs])
    out = torch.empty(rows * width, dtype=torch.bfloat16)
    kernel = slices.breadcrumbs(params)
    # two calls: the first four rows, then the rest (slices are whole rows)
    for start, stop in ((0, 4 * width), (4 * width, rows * width)):
        part = raw[:, start:stop].contiguous()
        view = out[start:stop]
        assert kernel(kernels.bits(part), stop - start, kernels.bits(view), ctx, width)
    assert torch.equal(out.view(torch.int16), want.reshape(-1).view(torch.int16))


@pytest.mark.parametrize(("name", "given"), [
    ("della", {"density": 0.5, "epsilon": 0.1, "weight": [0.5, 1.0, 0.3]}),
    ("della", {"density": [0.3, 1.0, 0.7], "epsilon": 0.05, "weight": 1.0,
               "normalize": False, "lambda": 1.1}),
    ("della", {"density": 0.6, "epsilon": 0.2, "rescale": False}),
    ("della", {"density": 0.5, "epsilon": 0.1, "vote": "paper"}),
    ("della_linear", {"density": 0.5, "epsilon": 0.1, "weight": [0.5, 1.0, 0.3]}),
    ("della_linear", {"density": [0.3, 1.0, 0.7], "epsilon": 0.05, "normalize": True,
                      "lambda": 1.1})])
@pytest.mark.parametrize(("width", "dtype"), [(701, torch.bfloat16), (2048, torch.bfloat16),
                                              (1, torch.float32), (3000, torch.float32)])
def test_della_kernels_give_the_torch_paths_bits_row_by_row(name, given, width, dtype):
    """MagPrune's ranks (equal magnitudes by index: bf16 deltas tie often), keep draws
    continuing across calls, 1/π, then TIES or the sum: the whole tensor's bits."""
    spec = get_method(name)
    params = spec.resolve(3, given, name, conventions="paper")
    rows = 9
    gen = torch.Generator().manual_seed(width)
    base = (0.02 * torch.randn(rows, width, generator=gen)).to(dtype)
    experts = [(base.float() + 1e-3 * torch.randn(rows, width, generator=gen)).to(dtype)
               for _ in range(3)]
    inputs = [base, *experts]
    want_ctx = MergeContext(name="w", seed=4, streams={})
    want = spec(base.float(), [e.float() for e in experts], params, want_ctx).to(dtype)
    raw = torch.stack([t.reshape(-1) for t in inputs])
    out = torch.empty(rows * width, dtype=dtype)
    kernel = getattr(slices, name)(params)
    ctx = MergeContext(name="w", seed=4, streams={})
    for start, stop in ((0, 4 * width), (4 * width, rows * width)):  # whole rows per call
        part = raw[:, start:stop].contiguous()
        ctx.slice_start = start
        assert kernel(kernels.bits(part), stop - start, kernels.bits(out[start:stop]), ctx,
                      width)
    if spec.execution.finish is not None:  # the paper vote's zero sums, after the last band
        for index, values in spec.execution.finish.run(ctx):
            out[index] = values.to(dtype)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(out.view(bits), want.reshape(-1).view(bits))


def test_della_with_the_l1_rescale_is_not_sliced_so_no_kernel_runs():
    """The whole-tensor L1 norm keeps DELLA whole: its sliced shape (the one place the rule
    is written) says so, and the kernel factories do not repeat it."""
    for name in ("della", "della_linear"):
        spec = get_method(name)
        params = spec.resolve(2, {"density": 0.5, "rescale_norm": "l1"}, name,
                              conventions="paper")
        assert spec.execution.shape_for(params) == "whole"
        assert spec.execution.shape_for(
            spec.resolve(2, {"density": 0.5}, name, conventions="paper")) == "rowwise"
    spec = get_method("della")
    with pytest.raises(MethodError, match="epsilon"):
        slices.della(spec.resolve(2, {"density": 0.1, "epsilon": 0.2}, "della",
                                  conventions="paper"))


def test_plain_widen_and_narrow_agree_with_torch():
    from modelalloy.kernels._numba import narrow, widen

    values = torch.tensor([1.0, -2.5, 3.0e38, 1e-40, 0.1, -0.0, 1.00390625, float("inf")])
    bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    for v, b in zip(values.tolist(), bits, strict=True):
        assert narrow(np.float32(v), np.uint16(0)) == b
        assert widen(np.uint16(b)) == np.float32(torch.tensor([int(b)], dtype=torch.int32)
                                                 .to(torch.int16).view(torch.bfloat16).float())
    assert narrow(np.float32(0.5), np.float32(0)) == np.float32(0.5)


def test_kernel_cache_folder_is_named_after_the_kernel_sources(tmp_path, monkeypatch):
    import hashlib
    import sys
    from pathlib import Path

    import modelalloy.kernels as k

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "numba", None)  # as if numba were not imported yet
    monkeypatch.delitem(sys.modules, "numba")
    k.use_versioned_cache.cache_clear()
    k.use_versioned_cache()
    digest = hashlib.sha256()
    for source in sorted(Path(k.__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    import os

    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "modelalloy" / "numba"
                                                / digest.hexdigest()[:16])
    k.use_versioned_cache.cache_clear()


def test_kernel_modules_take_numba_through_the_module_that_picks_the_cache_folder():
    """A kernel module imported first must not import numba itself: numba would read its
    cache folder before ``use_versioned_cache`` picks it, and cache next to the sources,
    keyed by the kernel's own file only (stale code after an edit to an inlined helper)."""
    import ast
    from pathlib import Path

    import modelalloy.kernels as k

    for source in Path(k.__file__).parent.glob("*.py"):
        if source.name in ("_numba.py", "__init__.py"):
            continue
        tree = ast.parse(source.read_text())
        imported = {alias.name.split(".")[0] for node in tree.body
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in tree.body
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert "numba" not in imported and "llvmlite" not in imported, source.name


def test_a_numba_that_does_not_import_leaves_the_torch_path(monkeypatch):
    import builtins

    import modelalloy.kernels as k

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "numba":
            raise ImportError("numba built for another NumPy")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    k._numba_installed.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="does not import"):
            assert not k.available()
    finally:
        monkeypatch.undo()
        k._numba_installed.cache_clear()
    assert k.available()


def _quantized_rows(rows: int, width: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Base + 3 experts whose task vectors are small multiples of 2^-7: many equal
    magnitudes in a row (ties at the band's edges), exact zeros, whole zero rows, negative
    values and exact cancellations between experts 1 and 2 (the paper vote's zero sums)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(-16, 17, (rows, width), generator=gen).float() * 2.0 ** -5
    steps = [torch.randint(-4, 5, (rows, width), generator=gen).float() * 2.0 ** -7
             for _ in range(3)]
    steps[0][:, ::5] = 0.0
    steps[1][:, ::3] = -steps[0][:, ::3]
    steps[2][1] = 0.0  # a row where one expert did not move
    inputs = [base] + [base + s for s in steps]
    assert all(torch.equal(t.to(dtype).float(), t) for t in inputs)  # exact in bf16 too
    return [t.to(dtype) for t in inputs]


@pytest.mark.parametrize("given", [
    {"density": 0.2, "gamma": 0.01},
    {"density": 0.2, "gamma": 0.01, "vote": "weighted", "weight": [0.5, 1.0, 0.3]},
    {"density": [0.3, 0.1, 1.0], "gamma": [0.05, 0.0, 0.1], "weight": [1.0, 0.3, 0.5],
     "normalize": True, "lambda": 0.8},
    {"density": [0.3, 0.1, 1.0], "gamma": [0.05, 0.0, 0.1], "weight": [1.0, 0.3, 0.5],
     "normalize": True, "vote": "weighted"},
    {"density": 0.5, "gamma": 0.6},
    {"density": 0.9, "gamma": 0.0, "normalize": True}])
@pytest.mark.parametrize(("width", "dtype", "out_dtype"), [
    (701, torch.bfloat16, torch.bfloat16), (2048, torch.bfloat16, torch.float32),
    (701, torch.float32, torch.float32), (1, torch.float32, torch.bfloat16)])
def test_breadcrumbs_ties_kernel_gives_the_torch_paths_bits(given, width, dtype, out_dtype):
    """Row bands with ties at both edges, then TIES' election (paper or weighted vote) and
    disjoint merge: the kernel, called on bands of whole rows with the paper vote's zero sums
    settled after the last band, gives the whole-tensor torch merge's bits."""
    spec = get_method("breadcrumbs_ties")
    params = spec.resolve(3, given, "breadcrumbs_ties", conventions="paper")
    rows = 9
    inputs = _quantized_rows(rows, width, dtype, seed=width)
    want = spec(inputs[0].float(), [e.float() for e in inputs[1:]], params,
                MergeContext(name="w", seed=0, streams={})).to(out_dtype)
    raw = torch.stack([t.reshape(-1) for t in inputs])
    out = torch.empty(rows * width, dtype=out_dtype)
    kernel = slices.breadcrumbs_ties(params)
    ctx = MergeContext(name="w", seed=0, streams={})
    for start, stop in ((0, 4 * width), (4 * width, rows * width)):  # whole rows per call
        ctx.slice_start = start
        assert kernel(kernels.bits(raw[:, start:stop].contiguous()), stop - start,
                      kernels.bits(out[start:stop]), ctx, width)
    for index, values in spec.execution.finish.run(ctx):
        out[index] = values.to(out_dtype)
    bits = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
    assert torch.equal(out.view(bits), want.reshape(-1).view(bits))
    if params["vote"] == "paper" and width > 1 and given.get("gamma") != 0.6:
        assert ctx.streams[PaperVote].fixes  # the cancellations went through fix-ups


def test_breadcrumbs_ties_kernel_serves_both_sliced_bands():
    """The rule is the method's (its FusedKernel's ``when``): row bands and the tensor-wide
    band (``kernels.bands``, tests/kernels/test_tensor_bands.py) get the kernel; the rescale
    keeps the tensor whole, with no kernel."""
    spec = get_method("breadcrumbs_ties")
    execution = spec.execution
    paper = spec.resolve(2, {"rescale": True}, "b", conventions="paper")
    assert execution.shape_for(paper) == "whole" and execution.kernel_for(paper) is None
    assert execution.kernel_for(spec.resolve(2, {}, "b", conventions="paper")) == \
        "breadcrumbs_ties"
    wide = spec.resolve(2, {"granularity": "tensor"}, "b")
    assert execution.shape_for(wide) == "elementwise"
    assert execution.kernel_for(wide) == "breadcrumbs_ties"
    raw = torch.ones((3, 64), dtype=torch.bfloat16)
    raw[2, 40] = float("nan")
    out = torch.empty(64, dtype=torch.bfloat16)
    ctx = MergeContext(name="w", seed=0, streams={})
    ctx.slice_start = 0
    assert not slices.breadcrumbs_ties(spec.resolve(2, {}, "b", conventions="paper"))(
        kernels.bits(raw), 64, kernels.bits(out), ctx, 64)


@pytest.mark.parametrize("trims", [[True, True, True], [True, False, True], [False, False, True],
                                   [True, True, False]])
@pytest.mark.parametrize("bad_row", [0, 1, 2, 3])
def test_ties_count_pass_reports_a_nonfinite_input_in_any_row(trims, bad_row):
    """The count pass checks every row as it counts (trimmed rows) or on its own (the base,
    untrimmed rows): a NaN/Inf anywhere is reported, and without one the histograms are
    those of |θ_t − θ_0|'s upper 16 bits."""
    from modelalloy.kernels.elementwise import NBINS, ties_count_kernel

    inputs = _inputs(torch.float32)
    raw = torch.stack(inputs)[:, :777].contiguous()
    hist = np.zeros((3, NBINS), np.int64)
    assert ties_count_kernel(kernels.bits(raw), 777, np.asarray(trims), hist)
    for t in range(3):
        keys = ((raw[1 + t] - raw[0]).abs().view(torch.int32) >> 16).numpy()
        want = np.bincount(keys, minlength=NBINS) if trims[t] else np.zeros(NBINS, np.int64)
        assert np.array_equal(hist[t], want)
    raw[bad_row, 500] = float("inf") if bad_row % 2 else float("nan")
    assert not ties_count_kernel(kernels.bits(raw), 777, np.asarray(trims), hist)
