"""Parameter validation and the registry contract for every built-in method."""

import math

import pytest
import torch

from modelalloy.errors import MethodError
from modelalloy.methods import get_method, list_methods

EXPECTED = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
            "breadcrumbs_ties", "slerp", "model_stock", "della", "della_linear"}


@pytest.mark.parametrize(("method", "params", "name"), [
    ("ties", {"density": 1.5}, "density"),
    ("dare_ties", {"density": -0.1}, "density"),
    ("slerp", {"t": -0.1}, "'t'"),
    ("slerp", {"t": 1.5}, "'t'"),
    ("ties", {"weight": [1.0, "heavy"]}, "weight"),  # negative weights are valid (mergekit)
    ("ties", {"weight": math.nan}, "weight"),
    ("task_arithmetic", {"lambda": math.inf}, "lambda"),
    ("della", {"epsilon": 0.6}, "epsilon"),
    ("breadcrumbs", {"gamma": 2.0}, "gamma"),
    ("ties", {"scope": "everything"}, "scope"),
    ("ties", {"vote": "count"}, "vote"),
    ("dare_linear", {"rescale_norm": "l2"}, "rescale_norm"),
    ("linear", {"normalize": "yes"}, "normalize"),
    ("ties", {"density": [0.5, 0.5, 0.5]}, "density"),
    ("ties", {"k": 20}, "k"),
])
def test_bad_values_name_the_parameter(method, params, name):
    spec = get_method(method)
    with pytest.raises(MethodError, match=name):
        spec.resolve(2, params, where=f"method '{method}'")


def test_all_methods_registered_with_papers_and_docstrings():
    specs = {s.name: s for s in list_methods()}
    assert EXPECTED <= set(specs)
    for name in EXPECTED:
        spec = specs[name]
        assert spec.paper and spec.summary
        doc = spec.fn.__doc__ or __import__(spec.fn.__module__, fromlist=["x"]).__doc__
        assert "arXiv" in doc or "SIGGRAPH" in doc, name
        assert len({p.name for p in spec.params}) == len(spec.params)


def test_mergekit_parameter_names_are_accepted():
    get_method("ties").resolve(2, {"weight": [1, 0.5], "density": [0.2, 0.4], "lambda": 1.0,
                                   "normalize": True, "int8_mask": True}, "r")
    get_method("dare_ties").resolve(2, {"rescale": True, "int8_mask": True}, "r")
    get_method("breadcrumbs").resolve(2, {"density": 0.1, "gamma": 0.01}, "r")
    get_method("della").resolve(2, {"density": 0.7, "epsilon": 0.07, "lambda": 1.1}, "r")
    get_method("model_stock").resolve(2, {"filter_wise": True}, "r")
    get_method("slerp").resolve(1, {"t": 0.3}, "r")


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_inputs_are_never_modified(run, method):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    experts = [base + 0.1 * torch.randn(4, 6, generator=g) for _ in range(2)]
    before = [base.clone()] + [e.clone() for e in experts]
    params = {"density": 0.5} if "density" in {p.name for p in get_method(method).params} else {}
    if method.startswith("della"):
        params["epsilon"] = 0.1
    if method == "slerp":
        params["t"] = 0.5
    out = run(method, None if method == "linear" else base, experts, **params)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    for a, b in zip(before, [base, *experts], strict=True):
        assert torch.equal(a, b)
