"""Tensor-wide Breadcrumbs and DARE's L1 rescale (mergekit's conventions, the defaults) stream
slice by slice with the whole tensor's bits, and never hold the whole tensor."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import modelalloy
from modelalloy.methods import breadcrumbs, dare, get_method
from modelalloy.plan.planner import SLICE_ELEMENTS

NAME = "model.layers.0.mlp.weight"
SHAPES = {NAME: (1031, 517),  # 2 slices and an odd remainder: rows do not align with slices
          "model.norm.weight": (517,)}
assert SHAPES[NAME][0] * SHAPES[NAME][1] > 2 * SLICE_ELEMENTS

CASES: list[tuple[str, dict[str, Any]]] = [
    ("breadcrumbs", {"density": [0.3, 0.6], "gamma": 0.02}),
    ("breadcrumbs", {"density": 0.1, "gamma": 0.0, "weight": [0.7, 1.3]}),
    ("breadcrumbs_ties", {"density": 0.2, "gamma": 0.01}),
    ("breadcrumbs_ties", {"density": [0.5, 0.25], "gamma": [0.3, 0.05], "vote": "paper"}),
    ("dare_linear", {"density": [0.3, 0.6]}),
    ("dare_ties", {"density": 0.4, "weight": [1.0, 0.5]}),
    ("dare_ties", {"density": 0.7, "vote": "paper", "normalize": True}),
]


def _models(levels: int | None, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Base and two experts in bfloat16; with ``levels``, every delta is one of a few values,
    so thousands of entries tie at each cut-off."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).bfloat16().float() for k, s in SHAPES.items()}
    out = [{k: v.bfloat16() for k, v in base.items()}]
    for _ in range(2):
        if levels is None:
            deltas = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        else:
            deltas = {k: torch.randint(-levels, levels + 1, v.shape, generator=g).float()
                      * 0.0625 for k, v in base.items()}
        out.append({k: (v + deltas[k]).bfloat16() for k, v in base.items()})
    return out


def _sliced(method: str, params: dict[str, Any], models) -> dict[str, torch.Tensor]:
    top = {k: v for k, v in params.items() if not isinstance(v, list)}
    own = [{k: v[i] for k, v in params.items() if isinstance(v, list)} for i in range(2)]
    recipe = {"merge_method": method, "base_model": "base", "seed": 3, "parameters": top,
              "models": [{"model": f"e{i}", "parameters": own[i]} for i in range(2)]}
    return modelalloy.merge(recipe, sources={"base": models[0], "e0": models[1],
                                             "e1": models[2]})


@pytest.mark.parametrize("path", ["torch", "fused"])
@pytest.mark.parametrize("levels", [None, 3])
@pytest.mark.parametrize(("method", "params"), CASES)
def test_sliced_merge_has_the_whole_tensor_bits(monkeypatch, method, params, levels, path):
    monkeypatch.setenv("MODELALLOY_KERNELS", "0" if path == "torch" else "1")
    models = _models(levels)
    resolved = get_method(method).resolve(2, params, method)
    assert resolved.get("granularity", "tensor") == "tensor"  # mergekit's conventions
    assert resolved.get("rescale_norm", "l1") == "l1"
    from modelalloy.engine import execute

    seen: list[str] = []
    original = execute.PlanExecutor._merge_sliced
    monkeypatch.setattr(execute.PlanExecutor, "_merge_sliced",
                        lambda self, entry, writer: seen.append(entry.name)
                        or original(self, entry, writer))
    sliced = _sliced(method, params, models)
    assert seen == [NAME]
    whole = modelalloy.merge_state_dicts(method, models[0], models[1:], seed=3, **params)
    for name in SHAPES:
        assert torch.equal(sliced[name].view(torch.int16), whole[name].view(torch.int16)), name


@pytest.mark.parametrize(("method", "module"), [("breadcrumbs_ties", breadcrumbs),
                                                ("dare_ties", dare)])
def test_the_tensor_wide_path_never_holds_the_whole_tensor(monkeypatch, method, module):
    """Every task vector the method forms, in its passes and its merge, is one slice."""
    largest: list[int] = []
    original = module.task_vectors

    def spy(base, experts):
        largest.append(max(e.numel() for e in experts))
        return original(base, experts)

    monkeypatch.setattr(module, "task_vectors", spy)
    sub = torch.sub

    def sub_spy(*args, **kwargs):
        largest.append(args[0].numel())
        return sub(*args, **kwargs)

    monkeypatch.setattr(torch, "sub", sub_spy)
    monkeypatch.setenv("MODELALLOY_KERNELS", "0")
    _sliced(method, {"density": 0.3}, _models(None))
    assert largest and max(largest) <= SLICE_ELEMENTS
    numel = SHAPES[NAME][0] * SHAPES[NAME][1]
    # the big tensor was seen in slices covering it (once per pass and expert, at least)
    assert sum(n for n in largest if n > SHAPES["model.norm.weight"][0]) >= numel
