"""Parameters that feed a whole-model statistic must be uniform: the planner checks them from
the resolved per-tensor parameters, before any tensor is read, and the methods' ``prepare``
no longer reads the whole model to check them. OPCM's recipe path streams the base and each
model tensor by tensor: the same bits as the whole-model :class:`modelalloy.continual.OPCM`."""

from __future__ import annotations

import pytest
import torch

import modelalloy
from modelalloy.continual import opcm_merge
from modelalloy.engine.execute import PlanExecutor
from modelalloy.errors import PlanError

from .helpers import NAMES, make_models

# (method, a parameter of its whole-model pass, two different values)
CASES = [("consensus", "density", 0.2, 0.5), ("tall_masks", "density", 0.2, 0.5),
         ("doge", "density", 0.3, 0.6), ("lines", "density", 0.2, 0.5),
         ("pcb", "keep_ratio", 0.1, 0.5), ("opcm", "alpha", 0.5, 0.3)]


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every tensor the engine reads from a source (all reads go through PlanExecutor._load)."""
    seen: list[str] = []
    real = PlanExecutor._load

    def spy(self, ckpt, name):
        seen.append(name)
        return real(self, ckpt, name)

    monkeypatch.setattr(PlanExecutor, "_load", spy)
    return seen


def _recipe(method: str, n_experts: int, parameters: dict) -> dict:
    return {"merge_method": method, "base_model": "base",
            "models": [{"model": f"e{i}"} for i in range(n_experts)], "parameters": parameters}


def _sources(n_experts: int, seed: int = 0) -> dict:
    base, experts = make_models(n_experts, seed=seed, shape=(6, 5))
    return {"base": base, **{f"e{i}": e for i, e in enumerate(experts)}}


@pytest.mark.parametrize(("method", "param", "first", "other"), CASES)
def test_a_per_tensor_value_is_refused_at_plan_time_before_any_read(loads, method, param,
                                                                     first, other):
    filtered = [{"filter": "layers.1", "value": other}, {"value": first}]
    with pytest.raises(PlanError, match=f"{method}: tensor 'model.layers.1.w.weight': "
                                        f"parameter '{param}' must be the same"):
        modelalloy.merge(_recipe(method, 2, {param: filtered}), sources=_sources(2))
    assert loads == []


@pytest.mark.parametrize(("method", "parameters"),
                         [("consensus", {"base_merge": "task_arithmetic"}),
                          ("doge", {"scope": "per_tensor", "steps": 2})])
def test_no_whole_model_pass_when_the_method_needs_none(loads, method, parameters):
    """These settings need no whole-model statistic: ``prepare`` looks at the first tensor
    group only, then the main pass reads each tensor once. The check used to add a full pass
    (every tensor of every model) in between."""
    n_sources = 3
    modelalloy.merge(_recipe(method, n_sources - 1, parameters), sources=_sources(2))
    assert len(loads) == (len(NAMES) + 1) * n_sources


@pytest.mark.parametrize("options", [{}, {"alpha": 0.2, "shuffle": True, "seed": 5},
                                     {"exclude": ""}])
def test_opcm_recipe_streaming_gives_the_whole_model_bits(options):
    options = dict(options)
    seed = options.pop("seed", 0)
    shuffle = options.get("shuffle", False)
    sources = _sources(4, seed=3)
    recipe = {**_recipe("opcm", 4, options), "seed": seed}
    got = modelalloy.merge(recipe, sources=sources)
    experts = [sources[f"e{i}"] for i in range(4)]
    if shuffle:
        import random

        order = list(range(4))
        random.Random(seed).shuffle(order)
        experts = [experts[i] for i in order]
    whole = {k: v for k, v in options.items() if k != "shuffle"}
    want = opcm_merge(sources["base"], experts, **whole)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_opcm_recipe_reads_the_base_with_each_model_pass(loads):
    """No whole-model pass apart from the merge itself: the first group, one pass per model
    (the base read with it, tensor by tensor, instead of a pass collecting the whole base),
    and the main pass, each reading the base and the 3 experts per tensor."""
    modelalloy.merge(_recipe("opcm", 3, {}), sources=_sources(3, seed=1))
    assert len(loads) == (1 + (3 + 1) * len(NAMES)) * 4
