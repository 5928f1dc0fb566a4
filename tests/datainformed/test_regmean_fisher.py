"""RegMean and Fisher merging against least squares, closed forms and naive loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelalloy import merge_state_dicts
from modelalloy.errors import PlanError
from modelalloy.methods import get_method
from modelalloy.stats import collect_fisher, collect_grams


def test_regmean_single_linear_equals_pooled_least_squares():
    torch.manual_seed(0)
    experts = [nn.Linear(5, 3, bias=False) for _ in range(3)]
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(n, 5, generator=gen) for n in (8, 13, 21)]  # different amounts of data
    grams = [collect_grams(m, [x], reduce="sum") for m, x in zip(experts, data, strict=True)]
    merged = merge_state_dicts("regmean", None, [m.state_dict() for m in experts],
                               stats={"gram": grams})
    # least squares over the pooled inputs: min_W Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖²
    x = torch.cat(data).double()
    y = torch.cat([xk.double() @ m.weight.double().T
                   for xk, m in zip(data, experts, strict=True)]).detach()
    w_ls = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(merged["weight"].double(), w_ls, rtol=1e-5, atol=1e-5)
    # with per-token mean Grams (the reference default) and equal amounts of data: same answer
    data_eq = [torch.randn(10, 5, generator=gen) for _ in range(3)]
    grams_mean = [collect_grams(m, [x]) for m, x in zip(experts, data_eq, strict=True)]
    merged2 = merge_state_dicts("regmean", None, [m.state_dict() for m in experts],
                                stats={"gram": grams_mean})
    x = torch.cat(data_eq).double()
    y = torch.cat([xk.double() @ m.weight.double().T
                   for xk, m in zip(data_eq, experts, strict=True)]).detach()
    torch.testing.assert_close(merged2["weight"].double(), torch.linalg.lstsq(x, y).solution.T,
                               rtol=1e-5, atol=1e-5)


def test_regmean_alpha_zero_is_per_feature_weighted_average_and_bias_is_mean():
    torch.manual_seed(2)
    experts = [nn.Linear(4, 2) for _ in range(2)]
    xs = [torch.randn(9, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) for _ in range(2)]
    grams = [collect_grams(m, [x]) for m, x in zip(experts, xs, strict=True)]
    merged = merge_state_dicts("regmean", None, [m.state_dict() for m in experts],
                               stats={"gram": grams}, alpha=0.0)
    d = [torch.diagonal(g["weight"]) for g in grams]  # per-input-feature E[x_i²]
    expect = (experts[0].weight * d[0] + experts[1].weight * d[1]) / (d[0] + d[1])
    torch.testing.assert_close(merged["weight"], expect.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged["bias"], ((experts[0].bias + experts[1].bias) / 2).detach())


def test_regmean_off_diagonal_scaling_by_hand():
    g1 = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    g2 = torch.tensor([[1.0, -0.3], [-0.3, 3.0]])
    w1, w2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, 0.5]])
    a = 0.4
    t1 = torch.tensor([[2.0, 0.2], [0.2, 1.0]])  # off-diagonals × 0.4, by hand
    t2 = torch.tensor([[1.0, -0.12], [-0.12, 3.0]])
    expect = torch.linalg.solve(t1 + t2, t1 @ w1.T + t2 @ w2.T).T
    out = merge_state_dicts("regmean", None, [{"w": w1}, {"w": w2}],
                            stats={"gram": [{"w": g1}, {"w": g2}]}, alpha=a)
    torch.testing.assert_close(out["w"], expect)


def test_regmean_on_gpt2_conv1d_equals_least_squares(tiny_gpt2, lm_batches):
    """Same code path on a transformers model: block 0's c_attn (Conv1D, weight (d_in, d_out))."""
    experts = [tiny_gpt2(s) for s in (1, 2)]
    # A fresh LayerNorm (weight 1, bias 0) outputs rows that sum to zero, which makes X
    # rank-deficient; give the norms trained-looking values so least squares is well posed.
    gen = torch.Generator().manual_seed(5)
    for m in experts:
        for name, p in m.named_parameters():
            if ".ln_" in name:
                p.data += 0.3 * torch.randn(p.shape, generator=gen)
    batches = [lm_batches(10 + s, pad_last=0) for s in (1, 2)]
    grams = [collect_grams(m, b, reduce="sum") for m, b in zip(experts, batches, strict=True)]
    merged = merge_state_dicts("regmean", None, [m.state_dict() for m in experts],
                               stats={"gram": grams}, input_dim="first")
    key = "transformer.h.0.attn.c_attn.weight"
    xs, ys = [], []
    with torch.no_grad():
        for m, bs in zip(experts, batches, strict=True):
            for b in bs:
                pos = torch.arange(b["input_ids"].shape[1])
                h = m.transformer.wte(b["input_ids"]) + m.transformer.wpe(pos)
                x = m.transformer.h[0].ln_1(h).reshape(-1, 32).double()
                xs.append(x)
                ys.append(x @ m.transformer.h[0].attn.c_attn.weight.double())
    w_ls = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution
    torch.testing.assert_close(merged[key].double(), w_ls, rtol=1e-4, atol=1e-4)
    # the square c_proj (32×32) is also merged in the Conv1D orientation with input_dim=first
    assert merged["transformer.h.0.attn.c_proj.weight"].shape == (32, 32)
    # non-linear tensors: plain average
    ln = "transformer.h.1.ln_2.weight"
    torch.testing.assert_close(merged[ln], (experts[0].state_dict()[ln]
                                            + experts[1].state_dict()[ln]) / 2)


def test_regmean_singular_gram_gives_minimum_norm_solution():
    """A dead input feature (always 0) makes Σ G singular: that column gets the min-norm 0."""
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(12, 4, generator=gen) for _ in range(2)]
    for x in xs:
        x[:, 2] = 0.0
    ws = [torch.randn(3, 4, generator=gen) for _ in range(2)]
    grams = [{"w": x.T @ x} for x in xs]
    out = merge_state_dicts("regmean", None, [{"w": w} for w in ws], stats={"gram": grams})
    x = torch.cat(xs).double()
    y = torch.cat([xk.double() @ w.double().T for xk, w in zip(xs, ws, strict=True)])
    torch.testing.assert_close(out["w"].double(), (torch.linalg.pinv(x) @ y).T, rtol=1e-5,
                               atol=1e-5)
    assert torch.isfinite(out["w"]).all() and out["w"][:, 2].abs().max() < 1e-5


def test_regmean_needs_stats():
    with pytest.raises(PlanError, match="needs statistics"):
        merge_state_dicts("regmean", None, [{"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2)}])
    assert get_method("regmean").stats == ("gram",)
    assert get_method("regmean++").name == "regmean_pp"


def test_fisher_with_equal_fishers_is_averaging():
    gen = torch.Generator().manual_seed(0)
    sds = [{"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}
           for _ in range(3)]
    f = {"a": torch.rand(3, 4, generator=gen) + 0.1, "b": torch.rand(5, generator=gen) + 0.1}
    out = merge_state_dicts("fisher", None, sds, stats={"fisher": [f, f, f]})
    for k in ("a", "b"):
        torch.testing.assert_close(out[k], (sds[0][k] + sds[1][k] + sds[2][k]) / 3)


def test_fisher_weighted_average_naive_loop():
    gen = torch.Generator().manual_seed(3)
    sds = [{"a": torch.randn(2, 3, generator=gen), "b": torch.randn(4, generator=gen)}
           for _ in range(2)]
    fs = [{"a": torch.rand(2, 3, generator=gen), "b": torch.rand(4, generator=gen)}
          for _ in range(2)]
    fs[0]["a"][0, 0] = 0.0  # floored to 1e-6 (target)
    fs[1]["a"][0, 0] = 0.0  # not floored
    fs[1]["b"][1] = 0.0
    lam = [0.7, 0.3]
    out = merge_state_dicts("fisher", None, sds, stats={"fisher": fs}, weight=lam)
    norms = []
    for f in fs:
        total = 0.0
        for t in f.values():
            for v in t.flatten().tolist():
                total += v * v
        norms.append(total ** 0.5)
    for key in ("a", "b"):
        flat = []
        for j in range(sds[0][key].numel()):
            num = den = 0.0
            for k in range(2):
                fk = fs[k][key].flatten()[j].item()
                if k == 0:
                    fk = max(fk, 1e-6)
                c = lam[k] / norms[k]
                num += c * fk * sds[k][key].flatten()[j].item()
                den += c * fk
            flat.append(num / den)
        torch.testing.assert_close(out[key].flatten(), torch.tensor(flat), rtol=1e-5, atol=1e-6)
    # where both Fishers are 0, the target's value wins (favor_target)
    assert out["a"][0, 0] == sds[0]["a"][0, 0]


def test_fisher_merge_end_to_end_with_collected_fishers():
    torch.manual_seed(4)
    experts = [nn.Linear(3, 4) for _ in range(2)]
    xs = [torch.randn(6, 3) for _ in range(2)]
    fs = [collect_fisher(m, [x], mode="exact") for m, x in zip(experts, xs, strict=True)]
    out = merge_state_dicts("fisher", None, [m.state_dict() for m in experts],
                            stats={"fisher": fs}, normalize=False)
    f0 = fs[0]["weight"].clamp_min(1e-6)
    expect = (f0 * experts[0].weight + fs[1]["weight"] * experts[1].weight) / (f0 + fs[1]["weight"])
    torch.testing.assert_close(out["weight"], expect.detach())
