"""Elementwise methods merge large tensors a slice at a time, bit-identical to the whole tensor.

The recipes use `conventions: paper`: the streamed variants under test (row-wise Breadcrumbs,
DARE/DELLA without the L1 rescale, the paper vote) are the papers' defaults.
"""

from __future__ import annotations

import collections
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelalloy import merge
from modelalloy.errors import ModelAlloyError
from modelalloy.io.checkpoint import open_checkpoint
from modelalloy.plan.planner import SLICE_ELEMENTS
from tests.conftest import save_state_dict_folders
from tests.conftest import write_recipe as _write_recipe


def write_recipe(path: Path, text: str) -> Path:
    """The test's recipe with ``conventions: paper`` (see the module docstring)."""
    return _write_recipe(path, "conventions: paper\n" + text)


def paper_merge(*args, **kwargs) -> dict[str, torch.Tensor]:
    """The in-memory merge with ``conventions: paper``, as the recipes."""
    from modelalloy.api import merge_state_dicts

    return merge_state_dicts(*args, conventions="paper", **kwargs)


@pytest.fixture(autouse=True, params=["torch", "fused"])
def slice_path(request, monkeypatch) -> str:
    """Every test runs on the torch slice path and on the fused kernels (modelalloy.kernels),
    which must give the same bits."""
    monkeypatch.setenv("MODELALLOY_KERNELS", "1" if request.param == "fused" else "0")
    return request.param


# Odd sizes: more than two slices, a last slice that is not a multiple of any vector width.
BIG = (2 * SLICE_ELEMENTS + 12345) // 7 * 7
SHAPES = {"big.weight": (BIG // 7, 7), "small.weight": (33, 5),
          "exact.weight": (SLICE_ELEMENTS * 2,)}


def _models(root: Path, dtypes: list[torch.dtype]) -> list[Path]:
    gen = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    folders = []
    for i, dtype in enumerate(dtypes):
        folder = root / f"m{i}"
        folder.mkdir(parents=True)
        delta = {k: 0.01 * torch.randn(s, generator=gen) for k, s in SHAPES.items()}
        tensors = {k: (base[k] + (delta[k] if i else 0)).to(dtype) for k in SHAPES}
        save_file(tensors, str(folder / "model.safetensors"))
        folders.append(folder)
    return folders


def _load(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_get_slice_reads_the_flattened_range(tmp_path):
    (folder,) = _models(tmp_path, [torch.bfloat16])
    whole = _load(folder)["big.weight"].reshape(-1)
    with open_checkpoint(folder) as ckpt:
        buf = torch.empty(1000, dtype=torch.bfloat16)
        assert torch.equal(ckpt.get_slice("big.weight", 123_457, buf), whole[123_457:124_457])
        with pytest.raises(ValueError, match="does not fit"):
            ckpt.get_slice("big.weight", BIG - 10, buf)


def test_task_arithmetic_sliced_equals_the_formula_in_float32(tmp_path):
    base, *experts = _models(tmp_path, [torch.bfloat16, torch.bfloat16, torch.float16,
                                        torch.float32])
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: task_arithmetic\nbase_model: {base}\n"
                          "parameters: {lambda: 0.7}\nmodels:\n"
                          + "".join(f"  - model: {e}\n    parameters: {{weight: {w}}}\n"
                                    for e, w in zip(experts, (0.5, 1.0, -0.25), strict=True))
                          + "dtype: float32\nallow_negative_weights: true\n")
    out = _load(merge(recipe, tmp_path / "out", threads=2).path)
    b = {k: v.float() for k, v in _load(base).items()}
    ex = [{k: v.float() for k, v in _load(e).items()} for e in experts]
    for name in SHAPES:
        # The paper's formula, in the same float32 operation order as the whole-tensor path.
        acc = torch.sub(ex[0][name], b[name]).mul_(0.5)
        acc.add_(torch.sub(ex[1][name], b[name]))
        acc.add_(torch.sub(ex[2][name], b[name]), alpha=-0.25)
        want = acc.mul_(0.7).add_(b[name])
        assert torch.equal(out[name], want), name
        exact = b[name].double() + 0.7 * sum(
            w * (e[name].double() - b[name].double()) for e, w in zip(ex, (0.5, 1.0, -0.25),
                                                                      strict=True))
        torch.testing.assert_close(out[name].double(), exact, rtol=0, atol=1e-5)


def test_linear_sliced_is_identical_across_thread_counts_and_to_bf16_rounding(tmp_path):
    models = _models(tmp_path, [torch.bfloat16] * 3)
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in zip(models, (1, 2, 3),
                                                                            strict=True)))
    one = _load(merge(recipe, tmp_path / "t1", threads=1).path)
    four = _load(merge(recipe, tmp_path / "t4", threads=4).path)
    ins = [_load(m) for m in models]
    for name in SHAPES:
        assert torch.equal(one[name], four[name])
        assert one[name].dtype == torch.bfloat16
        want = (ins[0][name].double() + 2 * ins[1][name].double() + 3 * ins[2][name].double()) / 6
        torch.testing.assert_close(one[name].double(), want, rtol=2 ** -8, atol=0)


def test_nonfinite_value_in_a_late_slice_is_reported_with_its_count(tmp_path):
    base, expert = _models(tmp_path, [torch.bfloat16] * 2)
    tensors = _load(expert)
    flat = tensors["big.weight"].reshape(-1)
    flat[SLICE_ELEMENTS + 5] = float("nan")
    flat[-1] = float("inf")
    save_file(tensors, str(expert / "model.safetensors"))
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: "
                                               f"{base}\nmodels:\n  - model: {expert}\n")
    with pytest.raises(ModelAlloyError, match="'big.weight' has 2 NaN/Inf"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = merge(recipe, tmp_path / "out", allow_nonfinite=True)
    assert any("'big.weight' has 2 NaN/Inf" in w for w in result.warnings)


def test_a_sliced_merge_fits_a_budget_a_whole_tensor_merge_would_not(tmp_path):
    from modelalloy.engine.run import make_plan
    from modelalloy.recipe import load_recipe

    base, *experts = _models(tmp_path, [torch.float32] * 4)
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                          + "".join(f"  - model: {e}\n" for e in experts))
    with ExitStack() as stack:
        plan = make_plan(load_recipe(recipe), stack)
        entry = next(e for e in plan.entries if e.name == "big.weight")
        assert entry.sliced
        sliced, whole = entry.working_bytes(4), entry.working_bytes(4, sliced=False)
    # Output + one slice of buffers, against four inputs and twelve float32 copies.
    assert sliced <= entry.bytes_out + 100 * SLICE_ELEMENTS
    assert whole > entry.bytes_in + 12 * 4 * entry.numel


@pytest.mark.parametrize(("method", "extra"), [("dare_linear", ""),
                                               ("dare_ties", "vote: weighted, "),
                                               ("dare_ties", "")])
def test_dare_sliced_draws_the_whole_tensors_masks(tmp_path, method, extra):

    base, *experts = _models(tmp_path, [torch.float32] * 3)
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: {method}\nbase_model: {base}\nseed: 3\n"
                          f"parameters: {{{extra}density: 0.3}}\nmodels:\n"
                          + "".join(f"  - model: {e}\n" for e in experts))
    out = _load(merge(recipe, tmp_path / "out", threads=2).path)
    params = {"density": 0.3} | ({"vote": "weighted"} if extra else {})
    whole = paper_merge(method, _load(base), [_load(e) for e in experts], seed=3, **params)
    for name in SHAPES:
        assert torch.equal(out[name], whole[name]), name
    delta = out["big.weight"] - _load(base)["big.weight"]
    # About 1 − 0.7² of the entries keep at least one expert's change.
    assert abs((delta != 0).float().mean().item() - 0.51) < 0.01


@pytest.mark.parametrize("third", [-1.0, 1.0, 0.0])
def test_dare_ties_paper_vote_sliced_settles_zero_sums_with_the_tensor_majority(tmp_path, third):
    """Experts +d and −d cancel exactly wherever both survive; a third expert pushes the
    tensor's majority sign negative, positive, or (absent) leaves it to chance: the sliced
    merge must give the whole-tensor result everywhere, the undecided elements included."""

    n = 3 * SLICE_ELEMENTS + 101
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(n, generator=gen)}
    d = torch.randn(n, generator=gen)
    experts = [{"w": base["w"] + d}, {"w": base["w"] - d},
               {"w": base["w"] + third * d.abs()}]
    folders = save_state_dict_folders(tmp_path, [base, *experts])
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: dare_ties\nbase_model: {folders[0]}\nseed: 5\n"
                          "parameters: {density: 0.5}\nmodels:\n"
                          + "".join(f"  - model: {f}\n" for f in folders[1:]))
    out = _load(merge(recipe, tmp_path / "out").path)["w"]
    whole = paper_merge("dare_ties", base, experts, seed=5, density=0.5)["w"]
    assert torch.equal(out, whole)
    # Undecided elements exist (the two opposite experts kept, the third dropped, or zero).
    tvs = torch.stack([e["w"] - base["w"] for e in experts])
    assert int(((whole - base["w"]).abs() == tvs[0].abs() / 0.5).sum()) > 1000


@pytest.mark.parametrize("third", [-1.0, 1.0])
@pytest.mark.parametrize(("method", "params"), [
    ("della", "density: 0.5, epsilon: 0.1, vote: paper"),
    ("breadcrumbs_ties", "density: 0.5, gamma: 0.01")])
def test_row_wise_paper_vote_settles_zero_sums_with_the_tensor_majority(tmp_path, method,
                                                                        params, third):
    """As for dare_ties, in bands of whole rows: experts +d and −d cancel where both keep an
    entry, a third pushes the majority sign negative or positive; the sliced merge gives the
    whole tensor's bits, and the undecided elements did go through the fix-ups."""
    import modelalloy.methods.ties as ties

    gen = torch.Generator().manual_seed(2)
    shape = (3 * SLICE_ELEMENTS // 1000 + 7, 1000)
    base = {"w": torch.randn(shape, generator=gen)}
    d = torch.randn(shape, generator=gen)
    # the third's own magnitudes, so its row masks differ from the opposite pair's
    experts = [{"w": base["w"] + d}, {"w": base["w"] - d},
               {"w": base["w"] + third * torch.randn(shape, generator=gen).abs()}]
    folders = save_state_dict_folders(tmp_path, [base, *experts])
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: {method}\nbase_model: {folders[0]}\nseed: 5\n"
                          f"parameters: {{{params}}}\nmodels:\n"
                          + "".join(f"  - model: {f}\n" for f in folders[1:]))
    undecided = []
    record = ties.record_paper_vote_fixes

    def spy(ctx, signs, where, *rest):
        undecided.append(where.numel())
        return record(ctx, signs, where, *rest)

    with mock.patch.object(ties, "record_paper_vote_fixes", spy):
        out = _load(merge(recipe, tmp_path / "out").path)["w"]
    given = dict(kv.split(": ") for kv in params.split(", "))
    whole = paper_merge(method, base, experts, seed=5, **{
        k: v if k == "vote" else float(v) for k, v in given.items()})["w"]
    assert torch.equal(out, whole)
    assert sum(undecided) > 1000


@pytest.mark.parametrize(("method", "params", "held"), [
    ("dare_ties", "density: 0.5", True), ("dare_ties", "density: 0.5, vote: weighted", False),
    ("della", "density: 0.5, epsilon: 0.1, vote: paper", True),
    ("della", "density: 0.5, epsilon: 0.1", False)])
def test_the_output_is_held_only_when_the_paper_vote_has_fix_ups_to_make(tmp_path, method,
                                                                          params, held):
    """The weighted vote decides each element within its slice: the slices are written as
    they come (no tensor-sized buffer) and the Finish step is never called."""
    import dataclasses

    from modelalloy.methods import registry

    base, experts, recipe, _ = _row_models(tmp_path, 3, method, params, seed=1)
    spec = registry.get_method(method)
    step = spec.execution.finish
    assert step is not None
    finish = mock.Mock(wraps=step.run)
    spied = dataclasses.replace(spec, execution=dataclasses.replace(
        spec.execution, finish=dataclasses.replace(step, run=finish)))
    with mock.patch.dict(registry._REGISTRY, {method: spied}):
        merge(recipe, tmp_path / "out")
    assert finish.call_count == (len(ROW_SHAPES) if held else 0)


ROW_SHAPES = {"rows.weight": (1501, 701), "long_row": (2 * SLICE_ELEMENTS + 3,)}


def _row_models(tmp_path: Path, draw: int, method: str, params: str, seed: int = 0):
    """A base and three experts of ROW_SHAPES (random, from ``draw``), their recipe, and the
    slice unit the planner gives each tensor (0: merged whole)."""
    from modelalloy.engine.run import make_plan
    from modelalloy.recipe import load_recipe

    gen = torch.Generator().manual_seed(draw)
    base = {k: torch.randn(s, generator=gen) for k, s in ROW_SHAPES.items()}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
               for _ in range(3)]
    folders = save_state_dict_folders(tmp_path, [base, *experts])
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: {method}\nbase_model: {folders[0]}\nseed: {seed}\n"
                          f"parameters: {{{params}}}\nmodels:\n"
                          + "".join(f"  - model: {f}\n" for f in folders[1:]))
    with ExitStack() as stack:
        plan = make_plan(load_recipe(recipe), stack)
        units = {e.name: e.slice_unit for e in plan.entries}
    return base, experts, recipe, units


@pytest.mark.parametrize(("method", "extra", "threads"), [
    ("breadcrumbs", "", 2), ("breadcrumbs_ties", "", 1), ("breadcrumbs_ties", "", 3),
    ("breadcrumbs_ties", "vote: weighted, ", 2), ("breadcrumbs_ties", "vote: weighted, ", 4)])
def test_breadcrumbs_sliced_by_whole_rows_equals_the_whole_tensor(tmp_path, method, extra,
                                                                  threads):

    base, experts, recipe, units = _row_models(tmp_path, 2, method,
                                               f"{extra}density: 0.3, gamma: 0.02")
    # Per-row slicing, the paper vote's zero sums settled after the last band
    assert units == {"rows.weight": 701, "long_row": 2 * SLICE_ELEMENTS + 3}
    out = _load(merge(recipe, tmp_path / "out", threads=threads).path)
    params = {"density": 0.3, "gamma": 0.02} | ({"vote": "weighted"} if extra else {})
    whole = paper_merge(method, base, experts, **params)
    for name in ROW_SHAPES:
        assert torch.equal(out[name], whole[name]), name


@pytest.mark.parametrize(("method", "extra", "sliced"), [
    ("della", "", True), ("della_linear", "", True), ("della_linear", "normalize: true, ", True),
    ("della", "vote: paper, ", True), ("della", "rescale_norm: l1, ", False)])
def test_della_sliced_by_whole_rows_equals_the_whole_tensor(tmp_path, method, extra, sliced):
    """DELLA ranks |δ| per row and its draws continue row after row: streamed a band of rows
    at a time it keeps the same entries and gives the same bits as the whole tensor (the
    paper vote's zero sums settled after the last band). The L1 rescale needs a whole-tensor
    norm and keeps the whole tensor."""

    base, experts, recipe, units = _row_models(tmp_path, 6, method,
                                               f"{extra}density: 0.5, epsilon: 0.1", seed=9)
    assert units == ({"rows.weight": 701, "long_row": 2 * SLICE_ELEMENTS + 3} if sliced
                     else {"rows.weight": 0, "long_row": 0})
    out = _load(merge(recipe, tmp_path / "out", threads=2).path)
    params = {"density": 0.5, "epsilon": 0.1, "seed": 9} | dict(
        kv.split(": ") for kv in extra.rstrip(", ").split(", ") if kv)
    params = {k: (v == "true" if v in ("true", "false") else v) for k, v in params.items()}
    whole = paper_merge(method, base, experts, **params)
    for name in ROW_SHAPES:
        assert torch.equal(out[name], whole[name]), name
    # about half of each expert's entries survive MagPrune
    tv = out["rows.weight"] - base["rows.weight"]
    assert 0.3 < float((tv != 0).float().mean()) < 0.99


@pytest.mark.parametrize(("method", "extra"), [
    ("dare_ties", ""), ("ties", ""), ("breadcrumbs", ""), ("breadcrumbs", ", granularity: row"),
    ("breadcrumbs_ties", ""), ("breadcrumbs_ties", ", granularity: row"),
    ("task_arithmetic", "")])
def test_the_fused_path_runs_when_numba_is_installed(tmp_path, slice_path, method, extra):
    from modelalloy.kernels import slices

    models = _models(tmp_path, [torch.bfloat16] * 3)
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: {method}\n"
                          f"base_model: {models[0]}\nparameters: {{density: 0.5{extra}}}\n"
                          "models:\n" + "".join(f"  - model: {m}\n" for m in models[1:]))
    if method == "task_arithmetic":
        recipe.write_text(recipe.read_text().replace("density", "lambda"))
    factory_of = getattr(slices, method)
    with mock.patch.object(slices, method, wraps=factory_of) as factory:
        merge(recipe, tmp_path / "out")
    # one kernel per sliced tensor (big.weight, exact.weight) on the fused path, none otherwise
    assert factory.call_count == (2 if slice_path == "fused" else 0)


@pytest.mark.parametrize("experts", [1, 2])
@pytest.mark.parametrize("spread", [0.01, 3.0])
def test_slerp_sliced_in_two_passes_equals_the_whole_tensor(tmp_path, experts, spread):
    """SLERP's norms and dot are gathered in a first pass over the slices, then it
    interpolates slice by slice: the same bits as the whole-tensor merge, for the lerp
    fallback (spread 0.01: near-parallel) and true SLERP (spread 3: far apart)."""

    gen = torch.Generator().manual_seed(4)
    n = 3 * SLICE_ELEMENTS + 77
    base = {"w": torch.randn(n, generator=gen)}
    others = [{"w": base["w"] + spread * torch.randn(n, generator=gen)}
              for _ in range(experts)]
    folders = save_state_dict_folders(tmp_path, [base, *others])
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: slerp\nbase_model: {folders[0]}\n"
                          "parameters: {t: 0.3}\nmodels:\n"
                          + "".join(f"  - model: {f}\n" for f in folders[1:]))
    one = _load(merge(recipe, tmp_path / "t1", threads=1).path)["w"]
    two = _load(merge(recipe, tmp_path / "t2", threads=2).path)["w"]
    whole = paper_merge("slerp", base, others, t=0.3)["w"]
    assert torch.equal(one, whole) and torch.equal(two, whole)
    # and the formula, worked out in float64 on the whole vectors
    v0, v1 = ((base["w"].double(), others[0]["w"].double()) if experts == 1 else
              (others[0]["w"].double() - base["w"].double(),
               others[1]["w"].double() - base["w"].double()))
    dot = float(v0 @ v1) / float(v0.norm() * v1.norm())
    if abs(dot) > 0.9995:
        want = 0.7 * v0 + 0.3 * v1
    else:
        omega = torch.arccos(torch.tensor(dot, dtype=torch.float64))
        want = (torch.sin(0.7 * omega) * v0 + torch.sin(0.3 * omega) * v1) / torch.sin(omega)
    if experts == 2:
        want = want + base["w"].double()
    assert (abs(dot) > 0.9995) == (spread == 0.01 and experts == 1)
    torch.testing.assert_close(one.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shared", [0.0, 1.0])
def test_model_stock_sliced_in_two_passes_equals_the_whole_tensor(tmp_path, shared):
    """Model Stock's norms and dots are gathered in a first pass over the slices, then θ is
    formed slice by slice: the same bits as the whole-tensor merge, and the paper's formula
    worked out in float64 (shared 0: nearly orthogonal deltas, t near 0; shared 1: deltas
    sharing a direction, 0 < t < 1)."""

    gen = torch.Generator().manual_seed(5)
    n = 3 * SLICE_ELEMENTS + 77
    base = {"w": torch.randn(n, generator=gen)}
    common = torch.randn(n, generator=gen)
    others = [{"w": base["w"] + 0.01 * (shared * common + torch.randn(n, generator=gen))}
              for _ in range(3)]
    folders = save_state_dict_folders(tmp_path, [base, *others])
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: model_stock\nbase_model: {folders[0]}\nmodels:\n"
                          + "".join(f"  - model: {f}\n" for f in folders[1:]))
    one = _load(merge(recipe, tmp_path / "t1", threads=1).path)["w"]
    two = _load(merge(recipe, tmp_path / "t2", threads=2).path)["w"]
    whole = paper_merge("model_stock", base, others)["w"]
    assert torch.equal(one, whole) and torch.equal(two, whole)
    deltas = [o["w"].double() - base["w"].double() for o in others]
    cos = sum(float(deltas[i] @ deltas[j]) / float(deltas[i].norm() * deltas[j].norm())
              for i, j in ((0, 1), (0, 2), (1, 2))) / 3
    t = max(0.0, 3 * cos / (1 + 2 * cos))
    assert (0.3 < t < 0.9) if shared else (t < 0.01)
    want = base["w"].double() + t * sum(deltas) / 3
    torch.testing.assert_close(one.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("density", "extra"), [(0.2, ""), (0.2, "vote: weighted, "),
                                                ([0.3, 1.0, 0.0], "normalize: false, "),
                                                (0.999, "")])
def test_ties_sliced_in_three_passes_equals_the_whole_tensor(tmp_path, density, extra):
    """TIES keeps exactly int(density·n) entries per tensor: histogram and in-bin passes over
    the slices find each model's threshold, and the trim pass keeps the ties at it in index
    order — the whole-tensor merge's entries, with many equal magnitudes (quantized deltas)
    and exact cancellations for the paper vote's zero sums."""
    from modelalloy.engine.run import make_plan
    from modelalloy.recipe import load_recipe

    gen = torch.Generator().manual_seed(6)
    n = 3 * SLICE_ELEMENTS + 999
    base = {"w": torch.randn(n, generator=gen)}
    steps = [torch.randint(-3, 4, (n,), generator=gen).float() * 2.0 ** -6 for _ in range(3)]
    steps[1][::5] = -steps[0][::5]  # cancellations
    experts = [{"w": base["w"] + s} for s in steps]
    folders = save_state_dict_folders(tmp_path, [base, *experts])
    dens = density if isinstance(density, list) else [density] * 3
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: ties\nbase_model: {folders[0]}\n"
                          f"parameters: {{{extra}lambda: 0.9}}\nmodels:\n"
                          + "".join(f"  - model: {f}\n    parameters: {{density: {d}}}\n"
                                    for f, d in zip(folders[1:], dens, strict=True)))
    with ExitStack() as stack:
        plan = make_plan(load_recipe(recipe), stack)
        assert next(e for e in plan.entries if e.name == "w").sliced
    out = _load(merge(recipe, tmp_path / "out", threads=2).path)["w"]
    params = {"density": dens, "lambda": 0.9}
    if "weighted" in extra:
        params["vote"] = "weighted"
    if "normalize" in extra:
        params["normalize"] = False
    whole = paper_merge("ties", base, experts, **params)["w"]
    assert torch.equal(out, whole)


def test_tensors_too_small_to_slice_merge_on_one_intra_op_thread(tmp_path):
    """A tensor below two slices is merged whole, on one intra-op thread (the merge threads
    are already one per core; torch's team would only spin), and the process's setting is
    back afterwards; a large non-elementwise merge keeps torch's threads."""
    from modelalloy.methods import registry

    models = _models(tmp_path, [torch.float32] * 3)
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: ties\nbase_model: {models[0]}\n"
                          "parameters: {density: 0.5, scope: global}\nmodels:\n"
                          + "".join(f"  - model: {m}\n" for m in models[1:]))
    spec = registry.get_method("ties")
    seen: dict[str, int] = {}

    def spy(base, experts, params, ctx):
        seen[ctx.name] = torch.get_num_threads()
        return spec.fn(base, experts, params, ctx)

    import dataclasses

    before = torch.get_num_threads()
    with mock.patch.dict(registry._REGISTRY, {"ties": dataclasses.replace(spec, fn=spy)}):
        merge(recipe, tmp_path / "out", threads=1)
    assert seen["small.weight"] == 1
    assert seen["big.weight"] == before  # scope: global merges whole, not sliced
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("method", "params", "passes"), [
    ("ties", "density: 0.3", 3), ("slerp", "t: 0.4", 2), ("model_stock", "", 2)])
def test_multi_pass_methods_reread_a_tensor_only_within_its_own_task(tmp_path, method, params,
                                                                     passes):
    """Order of work, from an access log of every slice read: all the passes over a tensor
    run back to back in one task on one thread, and no thread goes back to a tensor it left.
    So a pass rereads bytes read moments ago by the same task (in the page cache), never
    bytes read a whole model ago (which, for models larger than RAM, come from the disk)."""
    import threading

    from modelalloy.io.checkpoint import Checkpoint

    gen = torch.Generator().manual_seed(4)
    shapes = {f"t{i}.weight": (5 * SLICE_ELEMENTS // 2 // 64 + i, 64) for i in range(6)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    n_models = 2 if method == "slerp" else 4
    folders = save_state_dict_folders(tmp_path, [base] + [
        {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(n_models - 1)])
    models = "".join(f"  - model: {f}\n" for f in (folders if method == "slerp"
                                                    else folders[1:]))
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: {method}\n"
                          f"base_model: {folders[0]}\nparameters: {{{params}}}\n"
                          f"models:\n{models}")
    log: list[tuple[int, str, int, str]] = []
    real = Checkpoint.get_slice

    def logged(self, name, start, out):
        log.append((threading.get_ident(), name, start, str(self.path)))
        return real(self, name, start, out)

    with mock.patch.object(Checkpoint, "get_slice", logged):
        merge(recipe, tmp_path / "out", threads=2)
    assert {name for _, name, _, _ in log} == set(shapes)  # every tensor went in slices
    threads_of: dict[str, set[int]] = {}
    order: dict[int, list[str]] = {}
    for thread, name, _, _ in log:
        threads_of.setdefault(name, set()).add(thread)
        seen = order.setdefault(thread, [])
        if not seen or seen[-1] != name:
            seen.append(name)
    assert all(len(t) == 1 for t in threads_of.values())  # one task per tensor
    for names in order.values():
        assert len(names) == len(set(names))  # never back to a tensor once left
    reads = collections.Counter((name, start, path) for _, name, start, path in log)
    assert set(reads.values()) == {passes}  # each slice of each input: once per pass
