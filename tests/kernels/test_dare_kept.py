"""DARE's L1 pass keeps its keep masks as bits for the merge (kernels.slices._KeptMasks) when the
engine grants them (registry.KeptBits); the SFC64 draws run four streams side by side
(_numba.sfc64_fill_rows). Either way the merge gives the bits of the torch path, whose masks
come from NumPy's own SFC64 generator (MergeContext.keep_mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from modelalloy import kernels  # noqa: E402
from modelalloy.engine.budget import ByteBudget  # noqa: E402
from modelalloy.engine.execute import PlanExecutor, run_plan  # noqa: E402
from modelalloy.engine.sinks import StateDictSink  # noqa: E402
from modelalloy.engine.sources import StateDictSource  # noqa: E402
from modelalloy.kernels import slices  # noqa: E402
from modelalloy.kernels._numba import sfc64_fill  # noqa: E402
from modelalloy.methods.registry import KeptBits, MergeContext, get_method  # noqa: E402
from modelalloy.plan.planner import build_plan  # noqa: E402

STEP = 8192  # slices start on whole bytes of the kept bits, as the engine's 2^18 do
N = 2 * STEP + 1235  # the last slice ends on half a 64-bit draw and inside a byte


def _inputs(n_experts: int, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(N, generator=gen)
    deltas = [0.01 * torch.randn(N, generator=gen) for _ in range(n_experts)]
    deltas[0][::5] = 0.0
    if n_experts > 1:
        deltas[1][::3] = -deltas[0][::3]  # exact cancellations: zero sums in the vote
    return [base.to(dtype)] + [(base + d).to(dtype) for d in deltas]


def _torch_path(name: str, params: dict, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The engine's torch sliced path: the L1 pass and the merge on float32 slices."""
    spec = get_method(name)
    ctx = MergeContext(name="w", seed=5, streams={})
    for reduce in spec.execution.passes_for(params):
        for start in range(0, N, STEP):
            wide = [t[start:start + STEP].float() for t in inputs]
            ctx.slice_start = start
            reduce(wide[0], wide[1:], params, ctx)
    out = torch.empty(N, dtype=inputs[0].dtype)
    for start in range(0, N, STEP):
        wide = [t[start:start + STEP].float() for t in inputs]
        ctx.slice_start = start
        out[start:start + STEP] = spec(wide[0], wide[1:], params, ctx).to(out.dtype)
    if spec.execution.finish_for(params) is not None:
        for index, values in spec.execution.finish.run(ctx):
            out[index] = values.to(out.dtype)
    return out


def _fused_path(name: str, params: dict, inputs: list[torch.Tensor], grant: bool
                ) -> tuple[torch.Tensor, MergeContext]:
    spec = get_method(name)
    kernel = getattr(slices, spec.execution.kernel_for(params))(params)
    ctx = MergeContext(name="w", seed=5, streams={})
    if grant:
        ctx.streams[KeptBits] = KeptBits(N)
    raw = torch.empty((len(inputs), STEP), dtype=inputs[0].dtype)
    out = torch.empty(STEP, dtype=inputs[0].dtype)

    spans = [(start, min(STEP, N - start)) for start in range(0, N, STEP)]

    def load(start: int, count: int) -> np.ndarray:
        raw[:, :count] = torch.stack([t[start:start + count] for t in inputs])
        ctx.slice_start = start
        return kernels.bits(raw)

    for reduce in kernel.passes:
        assert all(reduce(load(start, count), count, ctx) for start, count in spans)
    merged = torch.empty(N, dtype=inputs[0].dtype)
    for start, count in spans:
        assert kernel(load(start, count), count, kernels.bits(out), ctx)
        merged[start:start + count] = out[:count]
    if spec.execution.finish_for(params) is not None:
        for index, values in spec.execution.finish.run(ctx):
            merged[index] = values.to(merged.dtype)
    return merged, ctx


CASES = [
    ("dare_ties", 3, {"density": 0.2, "weight": 0.5}, "mergekit"),
    ("dare_ties", 3, {"density": [0.4, 1.0, 0.0], "weight": [0.5, 1.0, 0.3],
                      "rescale_norm": "l1"}, "paper"),  # paper vote: the fix-ups
    ("dare_ties", 5, {"density": [0.3, 0.5, 0.7, 0.2, 0.9], "normalize": True}, "mergekit"),
    ("dare_ties", 1, {"density": 0.6}, "mergekit"),
    ("dare_linear", 3, {"density": [0.3, 0.6, 0.8], "weight": [0.5, 1.0, 0.3]}, "mergekit"),
]


@pytest.mark.parametrize(("name", "n_experts", "given", "conventions"), CASES)
def test_kept_masks_give_the_torch_paths_bits(name, n_experts, given, conventions):
    spec = get_method(name)
    params = spec.resolve(n_experts, given, name, conventions=conventions)
    assert params["rescale_norm"] == "l1"
    inputs = _inputs(n_experts)
    want = _torch_path(name, params, inputs)
    drawn, drawn_ctx = _fused_path(name, params, inputs, grant=False)
    kept, kept_ctx = _fused_path(name, params, inputs, grant=True)
    assert torch.equal(drawn.view(torch.int16), want.view(torch.int16))
    assert torch.equal(kept.view(torch.int16), want.view(torch.int16))
    assert drawn_ctx.state_if_any(slices._KeptMasks) is None
    # the kept bits are NumPy's SFC64 masks of the whole tensor, one row per random model
    bits = kept_ctx.state(slices._KeptMasks).bits
    random = [i for i, p in enumerate(params["density"]) if 0.0 < p < 1.0]
    assert bits.shape == (len(random), -(-N // 64) * 8)
    for row, model in enumerate(random):
        reference = MergeContext(name="w", seed=5).keep_mask(
            torch.empty(N), params["density"][model], model).numpy()
        assert np.array_equal(np.unpackbits(bits[row], count=N, bitorder="little"),
                              reference.astype(np.uint8))


@pytest.mark.parametrize("streams", [1, 3, 4, 6])
@pytest.mark.parametrize("n", [2048, 777])
def test_side_by_side_draws_continue_each_stream(streams, n):
    from numba import njit

    from modelalloy.kernels._numba import sfc64_fill_rows

    @njit
    def fill(states, models, words, n, lanes, rows):
        sfc64_fill_rows(states, models, words, n, lanes, rows)

    ctx = MergeContext(name="s", seed=2)
    states = np.stack([ctx.sfc64_state(i) for i in range(streams + 1)])
    models = np.arange(1, streams + 1)  # model 0 is not drawn: its state stays
    untouched = states[0].copy()
    words = np.full((streams + 2, 2048), 7, np.uint32)
    lanes, rows = np.empty((4, 4), np.uint64), np.empty(4, np.int64)
    for _ in range(2):  # two calls: the states continue
        fill(states, models, words, n, lanes, rows)
    assert np.array_equal(states[0], untouched) and (words[0] == 7).all()
    for m in models:
        numpy_stream = np.random.Generator(np.random.SFC64(ctx._seed(int(m))))
        draws = numpy_stream.integers(0, 2**64 - 1, size=2 * ((n + 1) // 2), dtype=np.uint64,
                                      endpoint=True)
        second = draws[(n + 1) // 2:].view("<u4")[:n]
        assert np.array_equal(words[m, :n], second)
        reference = ctx.sfc64_state(int(m))
        scratch = np.empty(2 * ((n + 1) // 2) * 2, np.uint32)
        sfc64_fill(reference, scratch)
        assert np.array_equal(states[m], reference)


# -- the engine: the grant, counted in the working bytes, and its fallback ----------------

SHAPE = (1024, 600)  # 614,400 elements: two 2^18 slices and a remainder


def _models(n_experts: int = 3) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(SHAPE, generator=gen).bfloat16(),
            "small": torch.randn(64, generator=gen).bfloat16()}
    experts = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).bfloat16()
                for k, v in base.items()} for _ in range(n_experts)]
    return base, experts


def _plan(params: dict, n_experts: int = 3):
    spec = get_method("dare_ties")
    resolved = spec.resolve(n_experts, params, "dare_ties")
    base, experts = _models(n_experts)
    return build_plan(None, spec, StateDictSource("base", base),
                      [StateDictSource(f"e{i}", e) for i, e in enumerate(experts)], None,
                      resolve_params=lambda name, layer, count: resolved)


class _Counting(slices._KeptMasks):
    made = 0

    def __init__(self, bits):
        super().__init__(bits)
        type(self).made += 1


def _merge(plan, threads: int, budget: int | None, slicing: bool = True) -> dict:
    layout = [(e.name, e.shape, e.out_dtype) for e in plan.entries]
    sink = StateDictSink(layout, {e.name: torch.device("cpu") for e in plan.entries}, set())
    run_plan(plan, sink, device=torch.device("cpu"), seed=3, threads=threads,
             budget=ByteBudget(budget), slicing=slicing)
    return sink.result()


def test_the_planner_counts_the_kept_bits():
    plan = _plan({"density": [0.2, 1.0, 0.5]})  # two models drop at random: two bits
    entry = next(e for e in plan.entries if e.name == "w")
    small = next(e for e in plan.entries if e.name == "small")
    numel = SHAPE[0] * SHAPE[1]
    assert entry.sliced and entry.kept_bits == 2 and not small.sliced and small.kept_bits == 0
    assert entry.kept_bytes == 2 * (numel // 64) * 8 == 153_600
    assert entry.working_bytes(4, kept=True) - entry.working_bytes(4) == entry.kept_bytes
    # the paper's 1/density rescale has no L1 pass: nothing to keep
    plain = next(e for e in _plan({"density": 0.2, "rescale_norm": "density"}).entries
                 if e.name == "w")
    assert plain.kept_bits == 0 and plain.kept_bytes == 0
    # the executor counts them when it grants them, and only then
    for threads, budget, granted in ((1, None, True), (2, None, True),
                                     (2, 2 * entry.working_bytes(4, kept=True), True),
                                     (2, 2 * entry.working_bytes(4, kept=True) - 1, False)):
        executor = PlanExecutor(plan, device=torch.device("cpu"), seed=0, threads=threads,
                                budget=ByteBudget(budget), allow_nonfinite=False)
        assert executor.keeps_bits(entry) is (granted and kernels.available())
        assert executor.working_bytes(entry) == entry.working_bytes(
            4, sliced=True, kept=executor.keeps_bits(entry))


@pytest.mark.parametrize("threads", [1, 2])
def test_the_engine_keeps_the_masks_and_merges_the_whole_tensors_bits(threads, monkeypatch):
    monkeypatch.setattr(slices, "_KeptMasks", _Counting)
    _Counting.made = 0
    plan = _plan({"density": 0.3, "weight": 0.5})
    whole = _merge(plan, 1, None, slicing=False)
    assert _Counting.made == 0
    sliced = _merge(plan, threads, None)
    assert _Counting.made == 1  # "w": the small tensor is merged whole
    for name in whole:
        assert torch.equal(sliced[name].view(torch.int16), whole[name].view(torch.int16))


def test_a_budget_without_room_for_the_bits_redraws_the_masks(monkeypatch):
    monkeypatch.setattr(slices, "_KeptMasks", _Counting)
    plan = _plan({"density": 0.3, "weight": 0.5})
    entry = next(e for e in plan.entries if e.name == "w")
    whole = _merge(plan, 1, None, slicing=False)
    _Counting.made = 0
    # room for the tensor's slices, not for its bits: the fallback, same bits
    tight = _merge(plan, 1, entry.working_bytes(4, kept=True) - 1)
    assert _Counting.made == 0
    # room for both: kept
    roomy = _merge(plan, 1, entry.working_bytes(4, kept=True))
    assert _Counting.made == 1
    for name in whole:
        assert torch.equal(tight[name].view(torch.int16), whole[name].view(torch.int16))
        assert torch.equal(roomy[name].view(torch.int16), whole[name].view(torch.int16))


def test_kept_bits_are_capped_whatever_the_model_size(monkeypatch):
    import modelalloy.engine.execute as execute

    monkeypatch.setattr(slices, "_KeptMasks", _Counting)
    plan = _plan({"density": 0.3})
    entry = next(e for e in plan.entries if e.name == "w")
    # the cap holds for all threads together: two threads may keep half of it each
    monkeypatch.setattr(execute, "KEPT_BYTES_MAX", 2 * entry.kept_bytes - 1)
    _Counting.made = 0
    whole = _merge(plan, 1, None, slicing=False)
    two = _merge(plan, 2, None)
    assert _Counting.made == 0
    one = _merge(plan, 1, None)
    assert _Counting.made == 1
    for name in whole:
        assert torch.equal(two[name].view(torch.int16), whole[name].view(torch.int16))
        assert torch.equal(one[name].view(torch.int16), whole[name].view(torch.int16))


def test_the_plans_peak_estimate_counts_the_kept_bits():
    plan = _plan({"density": 0.3})
    entry = next(e for e in plan.entries if e.name == "w")
    assert plan.largest_kept_bytes(2) == entry.kept_bytes == 3 * (entry.numel // 64) * 8
    assert plan.estimated_peak_bytes(2, None) == 2 * (plan.largest_working_bytes()
                                                      + entry.kept_bytes)
    plain = _plan({"density": 0.3, "rescale_norm": "density"})
    assert plain.estimated_peak_bytes(2, None) == 2 * plain.largest_working_bytes()
