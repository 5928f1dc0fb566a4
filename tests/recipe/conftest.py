"""Throwaway methods with the shapes of the real ones, so recipe tests depend on no method code."""

from __future__ import annotations

import pytest

from modelalloy.methods.registry import _ALIASES, _REGISTRY, Param, register_method


def _identity(base, experts, params, ctx):
    return experts[0] if base is None else base


TEST_METHODS = [
    # mergekit ties: per-model weight and density, global normalize / lambda.
    dict(name="_test_ties", base="required", min_models=1, params=[
        Param("weight", float, 1.0, "mixing weight", per_model=True),
        Param("density", float, 1.0, "fraction kept", per_model=True, gt=0.0, le=1.0),
        Param("normalize", bool, True, "divide by the sum of weights"),
        Param("lambda", float, 1.0, "scale of the merged task vector", ge=0.0),
    ]),
    # mergekit slerp: exactly one model besides the base, global t in [0, 1].
    dict(name="_test_slerp", base="required", min_models=1, max_models=1, params=[
        Param("t", float, 0.5, "interpolation factor", ge=0.0, le=1.0),
    ]),
    # mergekit linear: no base, per-model weight.
    dict(name="_test_linear", base="none", min_models=2, params=[
        Param("weight", float, 1.0, "mixing weight", per_model=True),
        Param("normalize", bool, True, "divide by the sum of weights"),
    ], aliases=("_test_lin",)),
    # a base-optional method with int / str / bool parameters.
    dict(name="_test_opt", base="optional", min_models=1, params=[
        Param("k", int, 4, "an integer", ge=1),
        Param("mode", str, "sum", "a choice", choices=("sum", "mean")),
        Param("rescale", bool, False, "a per-model flag", per_model=True),
    ]),
    # a weight with the schema bound that ties uses (ge=0).
    dict(name="_test_bounded", base="none", min_models=1, params=[
        Param("weight", float, 1.0, "mixing weight", per_model=True, ge=0.0),
    ]),
]


@pytest.fixture(scope="package", autouse=True)
def test_methods():
    """Register the stand-in methods for the recipe tests only, and remove them afterwards, so
    suites that list every registered method never see them."""
    added = []
    for kw in TEST_METHODS:
        if kw["name"] not in _REGISTRY:
            register_method(paper="test", summary="test", **kw)(_identity)
            added.append(kw)
    yield
    for kw in added:
        _REGISTRY.pop(kw["name"], None)
        for alias in kw.get("aliases", ()):
            _ALIASES.pop(alias, None)


@pytest.fixture
def parse():
    from modelalloy.recipe import parse_recipe

    return parse_recipe
