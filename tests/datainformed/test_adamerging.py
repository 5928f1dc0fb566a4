"""AdaMerging: entropy goes down, coefficients stay in range, the recipe reproduces the model."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from torch import nn

from modelalloy.optimize.adamerging import adamerging, entropy_of_logits
from modelalloy.optimize.functional import TaskVectorModel, ties_split


def _setup(n_tasks: int = 3):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    experts = [{k: v + 0.6 * torch.randn_like(v) for k, v in base_sd.items()}
               for _ in range(n_tasks)]
    gen = torch.Generator().manual_seed(1)
    tasks = [[torch.randn(16, 6, generator=gen) + k for _ in range(3)] for k in range(n_tasks)]
    return base, base_sd, experts, tasks


def _entropy_by_hand(model: nn.Module, base_sd, experts, coeff_for, tasks) -> float:
    """Build θ₀ + Σ λ τ with plain tensors, load it, and average −Σ p log p per task."""
    m = copy.deepcopy(model)
    sd = {}
    for name, t0 in base_sd.items():
        sd[name] = t0 + sum(coeff_for(name, k) * (e[name] - t0) for k, e in enumerate(experts))
    m.load_state_dict(sd)
    total = 0.0
    with torch.no_grad():
        for batches in tasks:
            hs = []
            for x in batches:
                p = torch.softmax(m(x), -1)
                hs.append(float((-(p * p.log()).sum(-1)).mean()))
            total += sum(hs) / len(hs)
    return total


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_decreases_and_coefficients_stay_in_range(granularity):
    base, base_sd, experts, tasks = _setup()
    res = adamerging(base, base_sd, experts, tasks, granularity=granularity, steps=40, lr=0.05)
    assert len(res.history) == 40 and res.history[-1] < res.history[0]
    assert res.coefficients.min() >= 0.0 and res.coefficients.max() <= 1.0
    rows = 1 if granularity == "task" else 4
    assert res.coefficients.shape == (rows, 3)
    before = _entropy_by_hand(base, base_sd, experts, lambda n, k: 0.3, tasks)
    after = _entropy_by_hand(base, base_sd, experts, res.weight_of, tasks)
    assert after < before
    # the base model's own parameters were not touched
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, base_sd[k])


def test_clamp_keeps_coefficients_in_range_under_a_large_step():
    base, base_sd, experts, tasks = _setup(2)
    res = adamerging(base, base_sd, experts, tasks, granularity="layer", steps=15, lr=0.5,
                     init=0.9)
    assert res.coefficients.min() >= 0.0 and res.coefficients.max() <= 1.0
    assert ((res.coefficients == 0.0) | (res.coefficients == 1.0)).any()  # it hit a bound


def test_functional_merge_matches_loaded_weights():
    base, base_sd, experts, tasks = _setup()
    tvm = TaskVectorModel(base, base_sd, experts)
    coeffs = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.3, 0.4], [1.0, 0.0, 0.5], [0.7, 0.7, 0.1]])
    rows = {n: i for i, n in enumerate(tvm.names)}
    out = tvm.forward(coeffs, rows, tasks[0][0])
    m = copy.deepcopy(base)
    m.load_state_dict({n: base_sd[n] + sum(coeffs[rows[n], k] * (experts[k][n] - base_sd[n])
                                           for k in range(3)) for n in base_sd})
    torch.testing.assert_close(out, m(tasks[0][0]))


def test_recipe_and_heatmap(tmp_path):
    base, base_sd, experts, tasks = _setup(2)
    res = adamerging(base, base_sd, experts, tasks, steps=3)
    recipe = yaml.safe_load(res.save_recipe(tmp_path / "r.yaml", "base", ["a", "b"]).read_text())
    assert recipe["merge_method"] == "task_arithmetic" and recipe["base_model"] == "base"
    w = recipe["models"][1]["parameters"]["weight"]
    assert {"filter": "0.weight", "value": round(res.weight_of("0.weight", 1), 6)} in w
    assert w[-1] == {"value": 0.0} and recipe["parameters"] == {"normalize": False,
                                                                  "lambda": 1.0}
    # substring filters, first match wins: a longer name is never shadowed by a shorter one
    filters = [e["filter"] for e in w[:-1]]
    for i, a in enumerate(filters):
        assert not any(b in a for b in filters[:i]), a
    png = res.save_heatmap(tmp_path / "coeffs.png", ["a", "b"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adamerging_on_gpt2_layerwise_masked(tiny_gpt2, lm_batches):
    base = tiny_gpt2(0)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    experts = [{k: v.clone() for k, v in tiny_gpt2(s).state_dict().items()} for s in (1, 2)]
    tasks = [lm_batches(30 + k, n_batches=2, batch=2) for k in range(2)]
    res = adamerging(base, base_sd, experts, tasks, steps=6, lr=0.05, exclude=r"wpe")
    assert res.history[-1] < res.history[0]
    assert "transformer.wpe.weight" not in res.rows
    assert 0.0 <= float(res.coefficients.min()) and float(res.coefficients.max()) <= 1.0


def test_entropy_of_logits_is_mask_aware():
    logits = torch.tensor([[[0.0, 0.0], [10.0, -10.0]]])
    mask = torch.tensor([[1, 0]])
    torch.testing.assert_close(entropy_of_logits(logits, mask), torch.log(torch.tensor(2.0)))


def test_ties_split_by_hand():
    tvs = [{"a": torch.tensor([3.0, -1.0, 0.5, 2.0])}, {"a": torch.tensor([-4.0, 1.0, 0.2, 1.0])}]
    out = ties_split(tvs, density=0.5)
    # task 0 keeps {3, 2}; task 1 keeps {-4, 1 (index 1) or 1 (index 3)}: top-2 by magnitude
    # elected sign = sign(sum of trimmed): index0: 3-4 < 0 -> only task 1's -4 survives
    assert out[0]["a"][0] == 0 and out[1]["a"][0] == -4.0
    assert out[0]["a"][3] == 2.0
