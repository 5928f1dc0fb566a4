"""Candidates merged into a live module in place (optimize/candidate.py ``merge_into``): the
module holds, bit for bit, what a fresh whole merge gives; only the tensors whose parameters
changed are merged and written again; searches score the same bits as on the state-dict path
(trials.jsonl compared, 1 and 2 workers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from modelalloy.errors import ModelAlloyError
from modelalloy.optimize.candidate import LiveModel, ModelPool, merge_candidate, merge_into
from modelalloy.optimize.template import load_template
from modelalloy.search.objectives import parse_objective, suite_template
from modelalloy.search.workers import merge_live

pytest.importorskip("cma")


def module_like(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]) -> nn.Module:
    """A module whose state dict has these names and shapes, filled with NaN (a tensor the
    merge forgot to write would show)."""
    root = nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        if dtypes.get(name, torch.float32).is_floating_point:
            mod.register_parameter(leaf, nn.Parameter(torch.full(shape, float("nan"))))
        else:
            mod.register_buffer(leaf, torch.full(shape, -1, dtype=dtypes[name]))
    return root


class Lives:
    """A live model per layout (as an objective keeps one per depth), counting builds."""

    def __init__(self, dtypes: dict[str, torch.dtype]) -> None:
        self.dtypes, self.models, self.built = dtypes, {}, 0

    def __call__(self, shapes: Any) -> LiveModel:
        key = tuple(sorted(shapes.items()))
        if key not in self.models:
            self.built += 1
            self.models[key] = LiveModel(module_like(dict(shapes), self.dtypes))
        live = self.models[key]
        live.fit(shapes)
        return live


def same(module: nn.Module, merged: dict[str, torch.Tensor]) -> bool:
    sd = module.state_dict()
    return sorted(sd) == sorted(merged) and all(
        sd[n].dtype == t.dtype and torch.equal(sd[n], t) for n, t in merged.items())


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_only_changed_tensors_are_written_and_the_module_holds_a_fresh_merge(template, method):
    tpl = template(method=method, search={"granularity": "layer", "parameters": {
        "weight": [0, 1], "density": [0.2, 1.0]}}, seed=7)
    space, _ = load_template(tpl)
    pool = ModelPool()
    dtypes = {n: t.dtype for n, t in pool.sources(space.recipe([0.5] * space.dim))[0].items()}
    lives = Lives(dtypes)
    genome = [0.5] * space.dim
    moved = list(genome)
    moved[space.genes.index(next(g for g in space.genes if g.cell == 1))] = 0.9  # layer 1
    # 7 float tensors and the int64 `step` (copied from the base), then layer 1's two, then
    # nothing, then back: layer 1 again
    for g, written in ((genome, 8), (moved, 2), (moved, 0), (genome, 2)):
        before = pool.merged_tensors
        module = merge_into(space.recipe(g), pool, lives)
        assert pool.merged_tensors - before == written
        fresh = merge_candidate(space.recipe(g), ModelPool(reuse=False))
        assert same(module, fresh)
    assert lives.built == 1 and int(module.state_dict()["step"]) == 7


def test_whole_model_passes_and_gradients_write_everything(template):
    from modelalloy.recipe.load import recipe_from_dict

    tpl = template(method="ties", search={"parameters": {"weight": [0, 1]}})
    space, _ = load_template(tpl)
    pool = ModelPool()
    lives = Lives({n: t.dtype for n, t in pool.sources(space.recipe([0.5, 0.5]))[0].items()})
    merge_into(space.recipe([0.5, 0.5]), pool, lives)  # keyed: the module holds it
    data = space.recipe_dict([0.5, 0.5])
    data["parameters"]["density"] = [0.3, 0.9]  # a gradient: re-merging a subset is not exact
    graded = recipe_from_dict(data)
    before = pool.merged_tensors
    module = merge_into(graded, pool, lives)
    assert pool.merged_tensors == before  # a whole merge, not through the keys
    assert same(module, merge_candidate(graded, ModelPool(reuse=False)))
    # what the module holds is no longer known: the keyed candidate is written whole again
    module = merge_into(space.recipe([0.5, 0.5]), pool, lives)
    assert pool.merged_tensors - before == 8
    assert same(module, merge_candidate(space.recipe([0.5, 0.5]), ModelPool(reuse=False)))


def test_a_staged_candidate_and_a_deeper_path_get_a_model_of_their_own(tmp_path):
    from modelalloy.optimize.candidate import merge_staged
    from modelalloy.search.workers import candidate_recipe
    from tests.optimize import synthetic

    base, (a, b) = synthetic.save_hybrid_family(tmp_path / "models")
    data = {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(a)}, {"model": str(b)}],
            "parameters": {"lambda": 1.0, "normalize": False}, "dtype": "float32",
            "search": {"space": "ps+dfs", "parameters": {"weight": [0.0, 1.0]},
                       "dataflow": {"scale": False}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    space, _ = load_template(tmp_path / "t.yaml")
    pool = ModelPool()
    lives = Lives({n: t.dtype for n, t in pool.sources(space.recipe([0.5] * space.dim))[0]
                   .items()})
    ps = [0.3] * space.dim
    depths = set()
    for on in ([0, 1], [0, 1, 2, 3], [1, 2]):
        cand = {"genome": [0.9 if i in on else 0.1 for i in range(space.flow.dim)], "ps": ps}
        recipe = candidate_recipe(space, cand)
        module = merge_live(recipe, pool, lives)
        expect = merge_staged(recipe, ModelPool(reuse=False))
        assert same(module, expect)
        depths.add(len(expect))
    assert lives.built == len(depths) > 1


def test_tied_lm_head_stays_tied_and_scores_as_the_state_dict_path(lm_smoke, tmp_path):
    spec = "suite:tiny-lm?size=smoke&limit=4"
    tpl = tmp_path / "t.yaml"
    tpl.write_text(yaml.safe_dump(suite_template(spec, "task_arithmetic")))
    space, _ = load_template(tpl)
    obj = parse_objective(spec)
    pool = ModelPool()
    for genome in ([0.2] * space.dim, [0.7] * space.dim):
        module = merge_into(space.recipe(genome), pool, obj.live_models())
        merged = merge_candidate(space.recipe(genome), ModelPool(reuse=False))
        assert module.lm_head.weight is module.transformer.wte.weight
        assert torch.equal(module.lm_head.weight, merged["transformer.wte.weight"])
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            assert torch.equal(module(input_ids=ids).logits,
                               lm_smoke._model(dict(merged))(input_ids=ids).logits)
        assert obj.score_module(module) == obj.score(merged)


def test_a_candidate_that_does_not_fit_the_model_is_one_line(vision_smoke):
    obj = parse_objective("suite:tiny-vision?size=smoke")
    body = vision_smoke.base_state_dict()
    shapes = {n: tuple(t.shape) for n, t in body.items()}
    shapes["blocks.1.weight"] = (3, 3)
    with pytest.raises(ModelAlloyError, match="does not fit a body of depth 3: size mismatch"):
        obj.live_models()(shapes)
    shapes = {n: tuple(t.shape) for n, t in body.items() if n != "blocks.0.bias"}
    with pytest.raises(ModelAlloyError, match="Missing key.*blocks.0.bias"):
        obj.live_models()(shapes)


# -- searches: the same trials on the live-model path as on the state-dict path ---------------


def suite_search(root: Path, spec: str, method: str = "ties") -> Path:
    data = suite_template(spec, method)
    data["search"] = {"granularity": "layer",
                      "parameters": {"weight": [0, 1], "density": [0.1, 1.0]}}
    path = root / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def trials(out: Path) -> list[tuple[Any, Any]]:
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    return [(r["candidate"], r["scores"]) for r in rows]


@pytest.mark.parametrize("suite", ["tiny-vision", "tiny-lm"])
def test_a_search_scores_the_same_bits_in_place_as_on_state_dicts(suite, request, tmp_path,
                                                                 monkeypatch):
    from modelalloy.search.driver import optimize

    request.getfixturevalue("vision_smoke" if suite == "tiny-vision" else "lm_smoke")
    import modelalloy.search.workers as workers

    spec = f"suite:{suite}?size=smoke&limit=4"
    tpl = suite_search(tmp_path, spec)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return merge_into(*args, **kwargs)

    monkeypatch.setattr(workers, "merge_into", spy)
    new = optimize("evolve", tpl, [spec], tmp_path / "new", budget=6, seed=3,
                   options={"popsize": 3})
    assert len(calls) == 6  # every trial merged into the live model
    old = optimize("evolve", tpl, [spec], tmp_path / "old", budget=6, seed=3,
                   options={"popsize": 3}, in_place=False)
    assert len(calls) == 6
    assert trials(tmp_path / "new") == trials(tmp_path / "old")
    assert new.recipe_path.read_text() == old.recipe_path.read_text()
    # killed after trial 3, mid-line: resumed on fresh live models, the same trials and recipe
    log = tmp_path / "new" / "trials.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:3]) + lines[3][:20])
    new.recipe_path.unlink()
    again = optimize("evolve", tpl, [spec], tmp_path / "new", budget=6, seed=3,
                     options={"popsize": 3}, resume=True)
    assert len(calls) == 6 + 3
    assert trials(tmp_path / "new") == trials(tmp_path / "old")
    assert again.recipe_path.read_text() == old.recipe_path.read_text()


@pytest.mark.slow
def test_two_ray_workers_in_place_give_the_state_dict_path_trials(vision_smoke, lm_smoke,
                                                                 tmp_path):
    pytest.importorskip("ray")
    from modelalloy.search.driver import optimize

    for suite in ("tiny-vision", "tiny-lm"):
        spec = f"suite:{suite}?size=smoke&limit=4"
        root = tmp_path / suite
        root.mkdir()
        tpl = suite_search(root, spec)
        optimize("evolve", tpl, [spec], root / "old", budget=8, seed=5,
                 options={"popsize": 4}, in_place=False)
        optimize("evolve", tpl, [spec], root / "two", budget=8, seed=5, workers=2,
                 options={"popsize": 4})
        assert trials(root / "two") == trials(root / "old"), suite


def test_tied_tensors_are_written_again_together(tmp_path):
    """``emb`` and ``out`` are one parameter in the module (tied), two tensors in the
    checkpoints, merged with their own weights: after a candidate that moves only ``emb``'s
    weight, the module holds what a fresh whole merge loaded in order gives (``out`` written
    after ``emb``, as the engine writes them, so ``out``'s value is the one left)."""
    from safetensors.torch import save_file

    from modelalloy.recipe.load import recipe_from_dict

    gen = torch.Generator().manual_seed(0)
    base = {"emb.weight": torch.randn(4, 3, generator=gen),
            "out.weight": torch.randn(4, 3, generator=gen)}
    folders = []
    for name in ("base", "e0", "e1"):
        sd = base if name == "base" else {n: t + torch.randn(t.shape, generator=gen)
                                          for n, t in base.items()}
        folder = tmp_path / name
        folder.mkdir()
        save_file(sd, str(folder / "model.safetensors"))
        (folder / "config.json").write_text("{}")
        folders.append(folder)

    def recipe(w_emb: float):
        return recipe_from_dict({
            "merge_method": "task_arithmetic", "base_model": str(folders[0]),
            "models": [{"model": str(f), "parameters": {"weight": [
                {"filter": "emb", "value": w_emb}, {"value": 0.5}]}} for f in folders[1:]],
            "parameters": {"normalize": False}, "dtype": "float32"})

    module = nn.Module()
    module.emb = nn.Module()
    module.out = nn.Module()
    module.emb.weight = module.out.weight = nn.Parameter(torch.zeros(4, 3))
    live = LiveModel(module)
    assert live.tied == {"emb.weight": ["out.weight"], "out.weight": ["emb.weight"]}

    def live_for(shapes):
        live.fit(shapes)
        return live

    pool = ModelPool()
    for w in (0.2, 0.9):
        merge_into(recipe(w), pool, live_for)
        fresh = merge_candidate(recipe(w), ModelPool(reuse=False))
        assert torch.equal(module.emb.weight, fresh["out.weight"])
    assert pool.merged_tensors == 4  # the second candidate moved emb only, out written again
