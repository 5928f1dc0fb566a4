"""Helpers for the method tests: run a registered method on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from modelalloy.methods import MergeContext, get_method


def f32(x):
    return None if x is None else torch.as_tensor(x, dtype=torch.float32)


def run_method(method, base, experts, *, name="layer.weight", seed=0, global_stats=None,
               conventions="paper", **params):
    """Resolve ``params`` against the method's schema and call it on float32 tensors.

    The method tests check each paper's equations, so they resolve defaults with
    ``conventions: paper`` unless told otherwise (tests/methods/test_conventions.py checks
    mergekit's)."""
    spec = get_method(method)
    base = f32(base)
    experts = [f32(e) for e in experts]
    spec.check_model_count(len(experts), base is not None)
    resolved = spec.resolve(len(experts), params, where=f"method '{method}'",
                            conventions=conventions)
    ctx = MergeContext(name=name, seed=seed, global_stats=global_stats)
    return spec(base, experts, resolved, ctx)


@pytest.fixture
def run():
    return run_method
