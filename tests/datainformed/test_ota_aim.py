"""OTA / FFG / AIM against naive per-entry loops and limiting cases."""

from __future__ import annotations

import torch
from torch import nn

from modelalloy import merge_state_dicts
from modelalloy.api import aim_relax
from modelalloy.stats import collect_activations, save_stats
from modelalloy.stats.optimizer import load_adam_moments


def _models(k: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(4, 5, generator=gen), "b": torch.randn(4, generator=gen)}
    experts = [{n: t + torch.randn(t.shape, generator=gen) for n, t in base.items()}
               for _ in range(k)]
    vs = [{n: torch.rand(t.shape, generator=gen) * 1e-6 for n, t in base.items()}
          for _ in range(k)]
    return base, experts, vs


def test_ota_with_equal_second_moments_is_task_arithmetic_mean():
    """Equal v for every model: the curvature weights cancel and OTA is θ₀ + mean τ (the
    paper's limiting case: a plain linear merge of the task vectors)."""
    base, experts, vs = _models()
    same = [vs[0]] * 3
    out = merge_state_dicts("ota", base, experts, stats={"exp_avg_sq": same})
    for n in base:
        mean_tau = sum(e[n] - base[n] for e in experts) / 3
        torch.testing.assert_close(out[n], base[n] + mean_tau)
    # without a base, equal moments give the plain average of the models
    out2 = merge_state_dicts("ota", None, experts, stats={"exp_avg_sq": same})
    torch.testing.assert_close(out2["w"], sum(e["w"] for e in experts) / 3)


def test_ota_naive_loop_with_thresholds_and_fallback():
    base, experts, vs = _models(2, seed=1)
    thr = [1e-7, 3e-7]
    p, eps = 0.5, 1e-12
    out = merge_state_dicts("ota", base, experts, stats={"exp_avg_sq": vs}, threshold=thr,
                            epsilon=eps, weight=[1.0, 2.0])
    w = base["w"].flatten().tolist()
    got = out["w"].flatten().tolist()
    saw_fallback = False
    for j in range(len(w)):
        num = den = 0.0
        for k in range(2):
            v = vs[k]["w"].flatten()[j].item()
            tau = experts[k]["w"].flatten()[j].item() - w[j]
            if v * tau * tau >= thr[k]:
                wk = v ** p * [1.0, 2.0][k] + eps
                num += wk * tau
                den += wk
        if den <= 1.1 * 2 * eps:
            expect = w[j]
            saw_fallback = True
        else:
            expect = w[j] + num / den
        assert abs(got[j] - expect) < 1e-5 * max(1.0, abs(expect)), j
    assert saw_fallback


def test_ota_rank1_compression_by_hand():
    base, experts, vs = _models(2, seed=2)
    out = merge_state_dicts("ota", base, experts, stats={"exp_avg_sq": vs}, compress="rank1",
                            epsilon=0.0)
    approx = []
    for v in vs:
        m = v["w"]
        r = [sum(m[i, j].item() for j in range(5)) for i in range(4)]
        c = [sum(m[i, j].item() for i in range(4)) for j in range(5)]
        tot = sum(r)
        approx.append(torch.tensor([[r[i] * c[j] / tot for j in range(5)] for i in range(4)]))
    p = [a.sqrt() for a in approx]
    taus = [e["w"] - base["w"] for e in experts]
    expect = base["w"] + (p[0] * taus[0] + p[1] * taus[1]) / (p[0] + p[1])
    torch.testing.assert_close(out["w"], expect, rtol=1e-5, atol=1e-6)


def test_ffg_keeps_top_density_by_saliency():
    base, experts, vs = _models(1, seed=3)
    out = merge_state_dicts("ffg", base, experts, stats={"exp_avg_sq": vs}, density=0.25)
    tau = experts[0]["w"] - base["w"]
    sal = (vs[0]["w"] * tau ** 2).flatten()
    kept = (out["w"] - base["w"]).flatten() != 0
    assert int(kept.sum()) == 5  # 25% of 20
    assert sal[kept].min() >= sal[~kept].max()
    torch.testing.assert_close((out["w"] - base["w"]).flatten()[kept], tau.flatten()[kept])
    mag = merge_state_dicts("ffg", base, experts, stats={"exp_avg_sq": [{}]}, density=0.5,
                            metric="magnitude")
    keep_m = (mag["w"] - base["w"]).flatten() != 0
    assert tau.abs().flatten()[keep_m].min() >= tau.abs().flatten()[~keep_m].max()


def test_adam_moments_from_torch_optimizer_state(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    stat = load_adam_moments(tmp_path / "optimizer.pt", names, shapes=shapes)
    for n, p in model.named_parameters():
        torch.testing.assert_close(stat[n], opt.state[p]["exp_avg_sq"])
    path = save_stats(stat, tmp_path / "expert")
    assert path.name == "exp_avg_sq.safetensors"
    again = load_adam_moments(path)
    torch.testing.assert_close(again["2.weight"], stat["2.weight"])
    r1 = load_adam_moments(path, compress="rank1")
    v = stat["0.weight"]
    torch.testing.assert_close(r1["0.weight"], torch.outer(v.sum(1), v.sum(0)) / v.sum())


def test_aim_relaxation_by_hand():
    torch.manual_seed(0)
    base_m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    base = {k: v.clone() for k, v in base_m.state_dict().items()}
    merged = {k: v + torch.randn_like(v) for k, v in base.items()}
    x = torch.randn(10, 3)
    acts = collect_activations(base_m, [x])
    out = aim_relax(base, merged, acts, omega=0.4)
    a = x.abs().mean(0)
    f = 1 - a / a.max() * 0.6
    torch.testing.assert_close(out["0.weight"], base["0.weight"]
                               + (merged["0.weight"] - base["0.weight"]) * f)
    # the LayerNorm weight is relaxed along its own channels; biases keep the merged values
    h = base_m[0](x).detach()
    a1 = h.abs().mean(0)
    f1 = 1 - a1 / a1.max() * 0.6
    torch.testing.assert_close(out["1.weight"], base["1.weight"]
                               + (merged["1.weight"] - base["1.weight"]) * f1)
    torch.testing.assert_close(out["0.bias"], merged["0.bias"])
    # ω = 1 keeps the merge
    same = aim_relax(base, merged, acts, omega=1.0)
    for k in merged:
        torch.testing.assert_close(same[k], merged[k])
