"""Self Positioning: SLERP weights against explicit vector SLERP; the probe loss goes down."""

from __future__ import annotations

import math

import torch
from torch import nn

from modelalloy.optimize.self_positioning import info_nce, self_positioning, slerp_weights


def _slerp(x: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    cos = float(x @ y / (x.norm() * y.norm()))
    if abs(cos) > 1 - 1e-6:
        return (1 - t) * x + t * y
    om = math.acos(cos)
    return math.sin((1 - t) * om) / math.sin(om) * x + math.sin(t * om) / math.sin(om) * y


def test_slerp_weights_match_explicit_iterative_slerp():
    gen = torch.Generator().manual_seed(0)
    vs = [torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(4)]
    a = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    v = vs[0]
    for i in range(1, 4):
        t = float(a[i] / (a[:i].mean() + a[i]))
        v = _slerp(v, vs[i], t)
    gram = torch.stack([torch.stack([x @ y for y in vs]) for x in vs])
    w = slerp_weights(a, gram)
    torch.testing.assert_close(sum(wi * vi for wi, vi in zip(w, vs, strict=True)), v)
    # parallel vectors: linear interpolation
    par = [vs[0], 2 * vs[0]]
    g2 = torch.stack([torch.stack([x @ y for y in par]) for x in par])
    w2 = slerp_weights(torch.tensor([1.0, 1.0], dtype=torch.float64), g2)
    torch.testing.assert_close(w2, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_self_positioning_lowers_probe_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [{k: v + 0.3 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    target = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    target.load_state_dict({k: base[k] + 0.8 * (experts[0][k] - base[k])
                            + 0.4 * (experts[1][k] - base[k]) for k in base})
    gen = torch.Generator().manual_seed(1)
    probe = []
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(16, 4, generator=gen)
            probe.append((x, target(x)))

    def loss_fn(forward, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(forward(x), y)

    res = self_positioning(model, base, experts, probe, loss_fn, steps=80, lr=0.05, mu=0.0)
    assert sum(res.history[-4:]) < sum(res.history[:4])
    assert res.coefficients.shape == (1, 3) and (res.coefficients > 0).all()
    recipe = res.to_recipe("base", ["a", "b", "c"])
    assert isinstance(recipe["models"][0]["parameters"]["weight"], float)


def test_info_nce_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    loss = info_nce(q, d, temperature=1.0, group_size=2)
    s = q @ d.T
    expect = -(torch.log_softmax(s[0], 0)[0] + torch.log_softmax(s[1], 0)[2]) / 2
    torch.testing.assert_close(loss, expect)
