"""Sens-Merging coefficients against a hand-rolled computation with ordinary autograd."""

from __future__ import annotations

import copy

import torch
from torch import nn

from modelalloy.optimize.sens_merging import layer_group, sens_merging


def test_layer_groups():
    assert layer_group("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert layer_group("transformer.h.0.ln_1.bias") == "transformer.h.0"
    assert layer_group("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_group("lm_head.weight") == "lm_head"
    assert layer_group("2.weight") == "2"


def test_sens_merging_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [{k: v + 0.5 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    gen = torch.Generator().manual_seed(1)
    calib = [[{"input": torch.randn(3, 3, generator=gen),
               "labels": torch.randint(0, 4, (3,), generator=gen)}] for _ in range(3)]
    res, info = sens_merging(model, base, experts, calib, temperature=0.05)
    nets = []
    for sd in experts:
        m = copy.deepcopy(model)
        m.load_state_dict(sd)
        nets.append(m)
    alpha = []
    for k, m in enumerate(nets):
        s = {"0": 0.0, "2": 0.0}
        x, y = calib[k][0]["input"], calib[k][0]["labels"]
        for i in range(3):
            m.zero_grad()
            nn.functional.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
            for name, p in m.named_parameters():
                s[name.split(".")[0]] += float((p.detach() * p.grad).abs().sum())
        s = {g: v / 3 for g, v in s.items()}
        norm = (s["0"] ** 2 + s["2"] ** 2) ** 0.5
        alpha.append({g: v / norm for g, v in s.items()})
    g = torch.zeros(3, 3)
    with torch.no_grad():
        for j in range(3):
            for i in range(3):
                if i != j:
                    x = calib[j][0]["input"]
                    g[i, j] = (nets[i](x) - nets[j](x)).norm(dim=-1).mean()
    tau = g.sum(1) / g.sum()
    for grp, name in (("0", "0.weight"), ("2", "2.bias")):
        logits = torch.tensor([alpha[k][grp] * float(tau[k]) / 0.05 for k in range(3)])
        expect = 3 * torch.softmax(logits, 0)
        got = torch.tensor([res.weight_of(name, k) for k in range(3)])
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    assert info["k_sigma_max"] > info["k_sigma_min"]
    sim, _ = sens_merging(model, base, experts, calib, direction="similarity")
    assert sim.coefficients.shape == (4, 3)


def test_sens_merging_on_gpt2_runs(tiny_gpt2, lm_batches):
    model = tiny_gpt2(0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [{k: v.clone() for k, v in tiny_gpt2(s).state_dict().items()} for s in (1, 2)]
    calib = [lm_batches(60 + k, n_batches=1, batch=2) for k in range(2)]
    res, info = sens_merging(model, base, experts, calib)
    assert "transformer.h.1" in info["groups"]
    assert res.weight_of("transformer.h.1.mlp.c_fc.weight", 0) == res.weight_of(
        "transformer.h.1.ln_2.bias", 0)
    torch.testing.assert_close(res.coefficients.sum(1), torch.full((res.coefficients.shape[0],),
                                                                   2.0))
