"""Throwaway methods with the shapes of the real ones, so recipe tests depend on no method code."""

from __future__ import annotations

import pytest

from modelalloy.methods.registry import _REGISTRY, Param, register_method


def _identity(base, experts, params, ctx):
    return experts[0] if base is None else base


def _register(name: str, **kw) -> None:
    if name not in _REGISTRY:
        register_method(name=name, paper="test", summary="test", **kw)(_identity)


# mergekit ties: per-model weight and density, global normalize / lambda.
_register("_test_ties", base="required", min_models=1, params=[
    Param("weight", float, 1.0, "mixing weight", per_model=True),
    Param("density", float, 1.0, "fraction kept", per_model=True, gt=0.0, le=1.0),
    Param("normalize", bool, True, "divide by the sum of weights"),
    Param("lambda", float, 1.0, "scale of the merged task vector", ge=0.0),
])
# mergekit slerp: exactly one model besides the base, global t in [0, 1].
_register("_test_slerp", base="required", min_models=1, max_models=1, params=[
    Param("t", float, 0.5, "interpolation factor", ge=0.0, le=1.0),
])
# mergekit linear: no base, per-model weight.
_register("_test_linear", base="none", min_models=2, params=[
    Param("weight", float, 1.0, "mixing weight", per_model=True),
    Param("normalize", bool, True, "divide by the sum of weights"),
], aliases=("_test_lin",))
# a base-optional method with int / str / bool parameters.
_register("_test_opt", base="optional", min_models=1, params=[
    Param("k", int, 4, "an integer", ge=1),
    Param("mode", str, "sum", "a choice", choices=("sum", "mean")),
    Param("rescale", bool, False, "a per-model flag", per_model=True),
])
# a weight with the schema bound that ties uses (ge=0).
_register("_test_bounded", base="none", min_models=1, params=[
    Param("weight", float, 1.0, "mixing weight", per_model=True, ge=0.0),
])


@pytest.fixture
def parse():
    from modelalloy.recipe import parse_recipe

    def _parse(text: str, **kw):
        return parse_recipe(text, **kw)

    return _parse
