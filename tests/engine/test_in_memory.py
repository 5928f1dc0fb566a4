"""The in-memory recipe path: ``modelalloy.merge(recipe, sources=..., into=...)`` runs the same
engine as ``modelalloy merge`` and gives the same bits, for every registered method."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelalloy
from modelalloy.errors import ModelAlloyError, NonFiniteError, PlanError
from modelalloy.methods import list_methods
from modelalloy.plan.planner import SLICE_ELEMENTS
from tests.conftest import save_state_dict_folders

# Small tensors for every method (two 2-D layers, a norm, an embedding, an integer buffer),
# and one large enough to be merged in slices by the methods that can be.
SMALL = {"model.embed_tokens.weight": (10, 6), "model.layers.0.mlp.weight": (8, 6),
         "model.layers.1.mlp.weight": (8, 6), "model.layers.1.norm.weight": (6,),
         "lm_head.weight": (10, 6)}
BIG_NAME, BIG = "model.layers.2.mlp.weight", (1024, 520)
assert BIG[0] * BIG[1] >= 2 * SLICE_ELEMENTS
INT_NAME = "model.position_ids"

# (number of experts, recipe parameters) per method. Methods with a whole-model pass take
# uniform parameters (they check it); the others get per-tensor ones: a layer gradient and a
# name filter, resolved by the planner for each tensor.
PER_TENSOR: dict[str, Any] = {"weight": [{"filter": "mlp", "value": [0.6, 1.0]}, {"value": 0.8}]}
METHODS: dict[str, tuple[int, dict[str, Any]]] = {
    "aim": (1, {"omega": 0.4, "input_dim": "last"}),
    "arcee_fusion": (1, {}),
    "breadcrumbs": (2, {**PER_TENSOR, "density": [0.9, 0.7], "gamma": 0.05}),
    "breadcrumbs_ties": (2, {**PER_TENSOR, "density": 0.8, "gamma": 0.05}),
    "chunk_task_arithmetic": (2, {}),
    "task_arithmetic_chunks": (2, {"chunks": [{"filter": "mlp", "value": "0.5 1.5 0.25"},
                                              {"value": ""}]}),
    "consensus": (3, {"k": 2, "lambda": 1.0}),
    "dare_linear": (2, {**PER_TENSOR, "density": [0.7, 0.4]}),
    "dare_ties": (3, {**PER_TENSOR, "density": 0.5}),
    "della": (2, {**PER_TENSOR, "density": 0.6, "epsilon": 0.1}),
    "della_linear": (2, {"density": [0.8, 0.5], "epsilon": 0.1}),
    "karcher": (2, {"max_iter": 5}),
    "doge": (2, {"steps": 3, "lr": 1e-3}),
    "ffg": (1, {"density": 0.5}),
    "fisher": (2, {"weight": [1.0, 0.5]}),
    "linear": (3, {**PER_TENSOR}),
    "lines": (2, {}),
    "model_stock": (2, {}),
    "multislerp": (2, {"weight": [0.7, 0.3]}),
    "nearswap": (1, {"t": 0.01}),
    "nuslerp": (2, {"weight": [0.6, 0.4]}),
    "opcm": (3, {"alpha": 0.5}),
    "optmerge": (2, {"steps": 3}),
    "ota": (2, {"weight": [{"filter": "norm", "value": 0.5}, {"value": 1.0}]}),
    "passthrough": (1, {"scale": [{"filter": "norm", "value": 0.5}, {"value": 1.0}]}),
    "pcb": (2, {"keep_ratio": 0.3}),
    "ram": (2, {}),
    "ramplus_tl": (2, {"r": 0.05}),
    "regmean": (2, {"alpha": 0.9, "weight": [1.0, 0.5]}),
    "regmean_pp": (2, {"alpha": 0.9}),
    "resm": (2, {}),
    "sce": (2, {"select_topk": 0.5}),
    "slerp": (1, {"t": [0.2, 0.7]}),
    "tall_masks": (2, {"task": 1}),
    "task_arithmetic": (3, {**PER_TENSOR, "lambda": [1.0, 0.5]}),
    "ties": (3, {**PER_TENSOR, "density": [0.4, 0.8]}),
    "tsv_m": (2, {}),
    "widen": (2, {}),
}
SLICED = {s.name for s in list_methods() if s.execution.shape != "whole"}  # fixed or by params


def test_every_registered_method_is_covered():
    assert {s.name for s in list_methods()} == set(METHODS)


def _models(n_experts: int, big: bool, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A base and ``n_experts`` experts (base + small deltas), bfloat16 as stored models are."""
    g = torch.Generator().manual_seed(seed)
    shapes = SMALL | ({BIG_NAME: BIG} if big else {})
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    out = []
    for i in range(n_experts + 1):
        sd = {k: (v + (0.05 * torch.randn(v.shape, generator=g) if i else 0)).bfloat16()
              for k, v in base.items()}
        sd[INT_NAME] = torch.arange(7)
        out.append(sd)
    return out


def _stats(kind: str, model: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Statistics of ``kind`` for ``model``, shaped as the collectors write them."""
    g = torch.Generator().manual_seed(seed)
    two_d = [k for k, v in model.items() if v.dim() == 2 and k != BIG_NAME]
    if kind in ("gram", "gram_pp"):
        out = {}
        for k in two_d:
            x = torch.randn(12, model[k].shape[1], generator=g)
            out[k] = x.T @ x
        return out
    if kind == "activations":
        return {k: torch.rand(model[k].shape[1], generator=g) + 0.1 for k in two_d}
    if kind == "merge_coeffs":
        return {k: torch.rand(3, generator=g) for k in two_d}
    # fisher, exp_avg_sq: one positive value per weight
    return {k: torch.rand(v.shape, generator=g) + 0.01 for k, v in model.items()
            if v.is_floating_point()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.is_floating_point() else t


def _assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(_bits(got[name]), _bits(tensor)), name


CASES = [(m, "whole") for m in sorted(set(METHODS) - SLICED)] + [
    (m, path) for m in sorted(SLICED) for path in ("torch", "fused")]


@pytest.mark.parametrize(("method", "path"), CASES)
def test_in_memory_merge_has_the_bits_of_the_merge_on_disk(tmp_path, monkeypatch, method, path):
    """Sliced methods run on the torch slices and on the fused kernels (MODELALLOY_KERNELS)."""
    monkeypatch.setenv("MODELALLOY_KERNELS", "0" if path == "torch" else "1")
    n_experts, params = METHODS[method]
    spec = modelalloy.methods.get_method(method)
    models = _models(n_experts, big=method in SLICED)
    refs = [str(f) for f in save_state_dict_folders(tmp_path, models)]
    uses_base = spec.base != "none"
    recipe = {"merge_method": method, "seed": 7, "parameters": params,
              "models": [{"model": r} for r in refs[1:]]}
    if uses_base:
        recipe["base_model"] = refs[0]
    owners = ([0] if spec.stats_from == "base" else list(range(1, n_experts + 1)))
    stats: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for kind in spec.stats:
        stats[kind] = {}
        for i in owners:
            stats[kind][refs[i]] = _stats(kind, models[i], seed=10 * i + len(kind))
            (tmp_path / f"m{i}" / "stats").mkdir(exist_ok=True)
            save_file(stats[kind][refs[i]],
                      str(tmp_path / f"m{i}" / "stats" / f"{kind}.safetensors"),
                      metadata={"format": "modelalloy.stats", "version": "1", "kind": kind})

    modelalloy.merge(recipe, tmp_path / "out", threads=2)
    on_disk = load_file(str(tmp_path / "out" / "model.safetensors"))
    sources = {r: m for r, m in zip(refs, models, strict=True) if uses_base or r != refs[0]}
    # in memory: one thread, in the calling thread (the default for a small model)
    in_memory = modelalloy.merge(recipe, sources=sources, stats=stats or None)
    _assert_same_bits(in_memory, {name: on_disk[name] for name in models[0]})
    # no sources: the recipe's checkpoints (and their statistics files) read into a state dict
    from_disk = modelalloy.merge(recipe)  # in the checkpoint's storage order
    assert set(from_disk) == set(in_memory)
    _assert_same_bits({name: from_disk[name] for name in in_memory}, in_memory)
    # the merge changed something (the comparison is not between two copies of a base)
    merged = [n for n in SMALL if not torch.equal(in_memory[n], models[0][n])]
    assert merged, method
    # inputs untouched, outputs not sharing their storage
    assert all(in_memory[n].data_ptr() != models[0][n].data_ptr() for n in in_memory)


def _small_recipe(method: str = "task_arithmetic", **params: Any) -> dict[str, Any]:
    return {"merge_method": method, "base_model": "base", "parameters": params,
            "models": [{"model": "a"}, {"model": "b"}]}


def _module(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose state dict has exactly ``sd``'s names (parameters; the ints a buffer)."""
    module = torch.nn.Module()
    for name, tensor in sd.items():
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if tensor.is_floating_point():
            owner.register_parameter(leaf, torch.nn.Parameter(tensor.clone()))
        else:
            owner.register_buffer(leaf, tensor.clone())
    return module


def test_sliced_tensors_really_go_through_the_slice_path(monkeypatch):
    """The big tensor of the method test is merged a slice at a time in memory too."""
    from modelalloy.engine import execute

    seen = []
    original = execute.PlanExecutor._merge_sliced

    def spy(self, entry, writer):
        seen.append(entry.name)
        return original(self, entry, writer)

    monkeypatch.setattr(execute.PlanExecutor, "_merge_sliced", spy)
    base, a, b = _models(2, big=True)
    modelalloy.merge(_small_recipe(), sources={"base": base, "a": a, "b": b})
    assert seen == [BIG_NAME]


@pytest.mark.parametrize("method", sorted(SLICED & {"dare_ties", "ties", "breadcrumbs",
                                                    "slerp", "linear"}))
def test_strided_and_module_sources_give_the_same_bits(method):
    """A source given as a live module, and one whose tensors are strided views, read the same
    as plain contiguous state dicts (whole tensors and slices)."""
    n_experts, params = METHODS[method]
    models = _models(n_experts, big=True)
    refs = ["base"] + [f"e{i}" for i in range(n_experts)]
    recipe = {"merge_method": method, "seed": 3, "parameters": params,
              "models": [{"model": r} for r in refs[1:]]}
    if modelalloy.methods.get_method(method).base != "none":
        recipe["base_model"] = "base"
    else:
        refs, models = refs[1:], models[1:]
    plain = modelalloy.merge(recipe, sources=dict(zip(refs, models, strict=True)))
    strided = [{k: v.T.contiguous().T if v.dim() == 2 else v for k, v in m.items()}
               for m in models]
    assert not strided[0][BIG_NAME].is_contiguous()
    sources = dict(zip(refs, strided, strict=True))
    sources[refs[-1]] = _module(models[-1])
    _assert_same_bits(modelalloy.merge(recipe, sources=sources, threads=3), plain)


def test_into_fills_a_live_module_in_place_and_keeps_its_storage_and_dtype():
    base, a, b = _models(2, big=True)
    recipe = _small_recipe(**{"lambda": 0.5})
    want = modelalloy.merge(recipe, sources={"base": base, "a": a, "b": b})
    live = _module({k: v.float() if v.is_floating_point() else v for k, v in base.items()})
    before = {n: (id(t), t.data_ptr(), t.dtype) for n, t in live.state_dict(keep_vars=True).items()}
    for threads in (1, 3):  # merged again into the same module: same objects, same storage
        got = modelalloy.merge(recipe, sources={"base": base, "a": a, "b": b}, into=live,
                               threads=threads)
        assert got is live
        after = live.state_dict(keep_vars=True)
        assert {n: (id(t), t.data_ptr(), t.dtype) for n, t in after.items()} == before
        for name, tensor in want.items():  # the bf16 merge, held in the module's float32
            assert torch.equal(after[name].detach(), tensor.to(after[name].dtype)), name
    assert all(p.requires_grad for p in live.parameters())


def test_into_fills_a_tied_lm_head_through_the_embedding_it_shares():
    """Checkpoints of a tied model store the embedding once; the live model's state dict
    names it twice (one Parameter). The merge fills it once and both names see it; an
    untied extra tensor is still refused."""
    base, a, b = _models(2, big=False)
    sources = {name: {k: v for k, v in sd.items() if k != "lm_head.weight"}
               for name, sd in (("base", base), ("a", a), ("b", b))}
    want = modelalloy.merge(_small_recipe(), sources=sources)
    live = _module({k: v.float() if v.is_floating_point() else v
                    for k, v in sources["base"].items()})
    live.add_module("lm_head", torch.nn.Module())
    live.lm_head.weight = live.model.embed_tokens.weight  # tied, as tie_word_embeddings
    got = modelalloy.merge(_small_recipe(), sources=sources, into=live)
    merged = want["model.embed_tokens.weight"].float()
    assert torch.equal(got.model.embed_tokens.weight.detach(), merged)
    assert got.lm_head.weight is got.model.embed_tokens.weight
    live.lm_head.weight = torch.nn.Parameter(torch.zeros(10, 6))  # untied: not the merge's
    _one_line_error(PlanError, "into: .* has 1 tensor\\(s\\) the merge does not make, e.g. "
                    "'lm_head.weight'", sources=sources, into=live)


def test_recipe_may_be_yaml_text_or_a_recipe_object(tmp_path):
    from modelalloy.recipe import recipe_from_dict

    base, a, b = _models(2, big=False)
    sources = {"base": base, "a": a, "b": b}
    want = modelalloy.merge(_small_recipe(), sources=sources)
    text = "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: a\n" \
           "  - model: b\n"
    _assert_same_bits(modelalloy.merge(text, sources=sources), want)
    _assert_same_bits(modelalloy.merge(recipe_from_dict(_small_recipe()), sources=sources), want)
    (tmp_path / "r.yaml").write_text(text)
    _assert_same_bits(modelalloy.merge(tmp_path / "r.yaml", sources=sources), want)


def _one_line_error(kind: type[Exception], match: str, **kwargs: Any) -> str:
    with pytest.raises(kind, match=match) as info:
        modelalloy.merge(_small_recipe(), **kwargs)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ModelAlloyError)
    return message


def test_bad_sources_are_one_line_errors_naming_the_model_and_tensor():
    base, a, b = _models(2, big=False)
    _one_line_error(PlanError, "model 'b' is not in sources", sources={"base": base, "a": a})
    _one_line_error(PlanError, "sources\\['c'\\]: the recipe names no such model",
                    sources={"base": base, "a": a, "b": b, "c": b})
    wrong = dict(b, **{"model.layers.0.mlp.weight": torch.zeros(8, 5, dtype=torch.bfloat16)})
    message = _one_line_error(PlanError, "tensor 'model.layers.0.mlp.weight': shape \\[8, 5\\]",
                              sources={"base": base, "a": a, "b": wrong})
    assert "in-memory model 'b'" in message
    short = {k: v for k, v in b.items() if k != "lm_head.weight"}
    _one_line_error(PlanError, "in-memory model 'b': missing 1 tensor.*'lm_head.weight'",
                    sources={"base": base, "a": a, "b": short})
    bad = dict(a, **{"model.layers.1.norm.weight": a["model.layers.1.norm.weight"].clone()})
    bad["model.layers.1.norm.weight"][2] = float("nan")
    _one_line_error(NonFiniteError,
                    "in-memory model 'a': tensor 'model.layers.1.norm.weight' has 1 NaN/Inf",
                    sources={"base": base, "a": bad, "b": b})
    live = _module(dict(base, extra=torch.zeros(3)))
    _one_line_error(PlanError, "into: .* has 1 tensor\\(s\\) the merge does not make, e.g. "
                    "'extra'", sources={"base": base, "a": a, "b": b}, into=live)
    _one_line_error(PlanError, "give out_dir .* or sources/into", sources={"base": base},
                    out_dir="x")
    live = _module(base)
    _one_line_error(PlanError, "into: tensor '.*' shares its storage with in-memory model "
                    "'base'", sources={"base": live, "a": a, "b": b}, into=live)


def test_nonfinite_inputs_may_be_allowed_in_memory_as_on_disk():
    base, a, b = _models(2, big=True)
    a[BIG_NAME][3, 4] = float("inf")
    merged = modelalloy.merge(_small_recipe(), sources={"base": base, "a": a, "b": b},
                              allow_nonfinite=True)
    assert not torch.isfinite(merged[BIG_NAME][3, 4])
    assert torch.isfinite(merged[BIG_NAME]).sum() == merged[BIG_NAME].numel() - 1


def test_data_informed_method_names_the_missing_statistics():
    base, a, b = _models(2, big=False)
    with pytest.raises(PlanError, match="method 'regmean' needs statistics \\['gram'\\]"):
        modelalloy.merge({"merge_method": "regmean", "models": [{"model": "a"}, {"model": "b"}]},
                         sources={"a": a, "b": b})
    with pytest.raises(PlanError, match="stats\\['gram'\\] has nothing for model 'b'"):
        modelalloy.merge({"merge_method": "regmean", "models": [{"model": "a"}, {"model": "b"}]},
                         sources={"a": a, "b": b}, stats={"gram": {"a": {}}})


UNIFORM = {"breadcrumbs": {"density": 0.8, "gamma": 0.05},
           "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05, "vote": "weighted"},
           "dare_linear": {"density": 0.5}, "dare_ties": {"density": 0.5},
           "della": {"density": 0.6, "epsilon": 0.1}, "della_linear": {"density": 0.6,
                                                                        "epsilon": 0.1},
           "linear": {"weight": [1.0, 2.0, 0.5]}, "model_stock": {}, "slerp": {"t": 0.3},
           "task_arithmetic": {"lambda": 0.7}, "ties": {"density": 0.3},
           "nearswap": {"t": 0.01}, "passthrough": {"scale": 0.5}}


def test_uniform_table_covers_the_sliced_methods():
    assert set(UNIFORM) == SLICED


@pytest.mark.parametrize("path", ["torch", "fused"])
@pytest.mark.parametrize("method", sorted(SLICED))
def test_merge_state_dicts_whole_tensors_equal_the_sliced_recipe_merge(monkeypatch, method,
                                                                       path):
    """merge_state_dicts merges every tensor whole; the recipe path slices the large one (on
    the torch slices or the fused kernels): the same bits."""
    monkeypatch.setenv("MODELALLOY_KERNELS", "0" if path == "torch" else "1")
    n_experts, _ = METHODS[method]
    base, *experts = _models(n_experts, big=True, seed=4)
    refs = [f"e{i}" for i in range(n_experts)]
    with_base = modelalloy.methods.get_method(method).base != "none"
    # a list at the top level of a recipe is a layer gradient: per-model lists go per model
    top = {k: v for k, v in UNIFORM[method].items() if not isinstance(v, list)}
    own = [{k: v[i] for k, v in UNIFORM[method].items() if isinstance(v, list)}
           for i in range(n_experts)]
    recipe = {"merge_method": method, "seed": 5, "parameters": top,
              "models": [{"model": r, "parameters": p} for r, p in zip(refs, own, strict=True)]}
    sources: dict[str, Any] = dict(zip(refs, experts, strict=True))
    if with_base:
        recipe["base_model"] = "base"
        sources["base"] = base
    sliced = modelalloy.merge(recipe, sources=sources)
    whole = modelalloy.merge_state_dicts(method, base if with_base else None, experts, seed=5,
                                         **UNIFORM[method])
    _assert_same_bits(whole, sliced)


def test_merge_state_dicts_has_the_engine_checks():
    base, a, b = _models(2, big=False)
    bad = dict(a, **{"lm_head.weight": a["lm_head.weight"].clone()})
    bad["lm_head.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="in-memory model 'expert 0': tensor "
                                             "'lm_head.weight' has 1 NaN/Inf"):
        modelalloy.merge_state_dicts("task_arithmetic", base, [bad, b])
    merged = modelalloy.merge_state_dicts("task_arithmetic", base, [bad, b],
                                          allow_nonfinite=True)
    assert torch.isnan(merged["lm_head.weight"][0, 0])
    with pytest.raises(PlanError, match="tensor 'model.layers.1.norm.weight': shape \\[5\\]"):
        modelalloy.merge_state_dicts("linear", None, [a, dict(b, **{
            "model.layers.1.norm.weight": torch.zeros(5)})])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sources_merge_on_the_gpu_and_fill_a_gpu_module_in_place():
    base, a, b = _models(2, big=True)
    on_cpu = modelalloy.merge(_small_recipe(), sources={"base": base, "a": a, "b": b})
    gpu = {k: {n: t.cuda() for n, t in sd.items()} for k, sd in
           {"base": base, "a": a, "b": b}.items()}
    merged = modelalloy.merge(_small_recipe(), sources=gpu)  # device: where the base is
    assert all(t.device.type == "cuda" for t in merged.values())
    live = _module(base).cuda()
    ptrs = [p.data_ptr() for p in live.parameters()]
    modelalloy.merge(_small_recipe(), sources=gpu, into=live)
    assert [p.data_ptr() for p in live.parameters()] == ptrs
    for got in (merged, {k: v.detach() for k, v in live.state_dict().items()}):
        for name, want in on_cpu.items():  # the GPU may fuse differently: within rounding
            torch.testing.assert_close(got[name].cpu().float(), want.float(), rtol=1e-2,
                                       atol=1e-2)
