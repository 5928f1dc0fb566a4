"""A conformance suite over every registered method, as scikit-learn's check_estimator is for
estimators: each method gets the checks its declared capabilities call for.

- every method: the inputs are unchanged; the same seed gives the same bits; the output has
  the reference model's names, shapes and dtypes; a non-finite input is refused naming the
  tensor; the recipe's per-tensor parameters reach the method (a name filter changes exactly
  the tensors it selects) where the method takes per-model parameters tensor by tensor;
- methods that declare a random draw (a ``seed``-dependent mask): another seed changes bits;
- methods that declare a sliced execution shape (elementwise / rowwise): sliced = whole on the
  torch slices and on the fused kernels (so fused = torch), and in-memory = on-disk for every
  method, are in tests/engine/test_in_memory.py, over the same tables.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import modelalloy
from modelalloy.errors import NonFiniteError
from modelalloy.methods import get_method, list_methods
from tests.engine.test_in_memory import (
    INT_NAME,
    METHODS,
    _assert_same_bits,
    _models,
    _stats,
)

ALL = sorted(s.name for s in list_methods())
# Per-model parameters resolved tensor by tensor (a method with a whole-model pass checks that
# they are uniform instead, and says so: that refusal is its contract).
TAKES_PER_TENSOR = sorted(m for m in ALL if "weight" in {p.name for p in get_method(m).params}
                          and get_method(m).execution.prepare is None)


def _refs(method: str) -> list[str]:
    return ["base"] + [f"e{i}" for i in range(METHODS[method][0])]


def _recipe(method: str, seed: int = 7, params: dict[str, Any] | None = None,
            first_model_params: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = get_method(method)
    refs = _refs(method)
    recipe = {"merge_method": method, "seed": seed,
              "parameters": METHODS[method][1] if params is None else params,
              "models": [{"model": r} for r in refs[1:]]}
    if first_model_params:
        recipe["models"][0]["parameters"] = first_model_params
    if spec.base != "none":
        recipe["base_model"] = refs[0]
    return recipe


def _inputs(method: str, big: bool = False, seed: int = 0):
    spec = get_method(method)
    models = _models(METHODS[method][0], big=big, seed=seed)
    refs = _refs(method)
    sources = {r: m for r, m in zip(refs, models, strict=True)
               if spec.base != "none" or r != "base"}
    owners = ["base"] if spec.stats_from == "base" else refs[1:]
    stats = {kind: {r: _stats(kind, models[refs.index(r)], seed=refs.index(r) + len(kind))
                    for r in owners} for kind in spec.stats}
    return models, sources, stats or None


def _merge(method: str, sources, stats, **recipe_options: Any) -> dict[str, torch.Tensor]:
    return modelalloy.merge(_recipe(method, **recipe_options), sources=sources, stats=stats,
                            threads=2)


@pytest.mark.parametrize("method", ALL)
def test_every_method_is_in_the_tables(method):
    assert method in METHODS, f"add {method} to METHODS in tests/engine/test_in_memory.py"


@pytest.mark.parametrize("method", ALL)
def test_inputs_unchanged_same_seed_same_bits_names_shapes_dtypes(method):
    models, sources, stats = _inputs(method)
    before = {r: {k: v.clone() for k, v in sd.items()} for r, sd in sources.items()}
    first = _merge(method, sources, stats)
    for ref, sd in sources.items():
        _assert_same_bits(sd, before[ref])
    _assert_same_bits(_merge(method, sources, stats), first)
    reference = models[0] if get_method(method).base != "none" else models[1]
    assert list(first) == list(reference)
    for name, tensor in reference.items():
        assert first[name].shape == tensor.shape and first[name].dtype == tensor.dtype, name
    assert torch.equal(first[INT_NAME], reference[INT_NAME])


@pytest.mark.parametrize("method", ALL)
def test_nonfinite_input_is_refused_naming_the_tensor(method):
    _, sources, stats = _inputs(method)
    ref = sorted(r for r in sources if r != "base")[0]
    sources = {**sources, ref: dict(sources[ref])}
    bad = sources[ref]["model.layers.0.mlp.weight"].clone()
    bad[1, 2] = float("inf")
    sources[ref]["model.layers.0.mlp.weight"] = bad
    with pytest.raises(NonFiniteError, match="model.layers.0.mlp.weight"):
        _merge(method, sources, stats)


def _draws_at_random(method: str) -> bool:
    """Two seeds give different bits: the methods whose masks are drawn (DARE, DELLA)."""
    _, sources, stats = _inputs(method)
    return not all(torch.equal(a, b) for a, b in zip(
        _merge(method, sources, stats, seed=1).values(),
        _merge(method, sources, stats, seed=2).values(), strict=True))


def test_exactly_the_random_methods_depend_on_the_seed():
    random = {m for m in ALL if _draws_at_random(m)}
    # The methods whose papers draw a random mask, and nothing else.
    assert random == {m for m in ALL if m.startswith(("dare", "della"))}, random


@pytest.mark.parametrize("method", TAKES_PER_TENSOR)
def test_a_name_filter_changes_exactly_the_tensors_it_selects(method):
    """The first expert's weight differs from the others' on layer 1 only (the others keep
    theirs: methods that normalise by the weights' sum ignore a weight shared by all)."""
    _, sources, stats = _inputs(method)
    n = METHODS[method][0]
    plain = {k: v for k, v in METHODS[method][1].items() if k != "weight"}
    uniform = _merge(method, sources, stats, params={**plain, "weight": 0.7})
    filtered = _merge(method, sources, stats, params={**plain, "weight": 0.7},
                      first_model_params={"weight": [{"filter": "layers.1", "value": 0.2},
                                                     {"value": 0.7}]})
    del n
    floats = [k for k, v in uniform.items() if v.is_floating_point()]
    changed = {k for k in floats if not torch.equal(uniform[k], filtered[k])}
    selected = {k for k in floats if "layers.1" in k}
    assert changed <= selected and changed, (method, changed)
