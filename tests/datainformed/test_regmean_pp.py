"""RegMean++ against a hand-rolled sequential least-squares merge."""

from __future__ import annotations

import torch
from torch import nn

from modelalloy import merge_state_dicts
from modelalloy.stats import collect_grams
from modelalloy.stats.regmean_pp import collect_regmean_pp_grams, find_block_stack


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _lstsq(xs: list[torch.Tensor], ws: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat(xs).double()
    y = torch.cat([xk.double() @ w.double().T for xk, w in zip(xs, ws, strict=True)])
    return torch.linalg.lstsq(x, y).solution.T


def test_regmean_pp_on_mlp_is_sequential_least_squares():
    experts = [_mlp(s) for s in (0, 1, 2)]
    gen = torch.Generator().manual_seed(7)
    data = [[torch.randn(10, 4, generator=gen)] for _ in experts]
    stats, merged = collect_regmean_pp_grams(experts, data)
    # layer 0: inputs are the raw data, as in RegMean
    w0 = _lstsq([d[0] for d in data], [m[0].weight.detach() for m in experts])
    torch.testing.assert_close(merged["0.weight"].double(), w0, rtol=1e-5, atol=1e-5)
    b0 = torch.stack([m[0].bias.detach() for m in experts]).mean(0)
    torch.testing.assert_close(merged["0.bias"], b0)
    # layer 2: inputs come from the MERGED layer 0, not from each expert's own layer 0
    hs = [torch.tanh(d[0] @ merged["0.weight"].T + b0) for d in data]
    w2 = _lstsq(hs, [m[2].weight.detach() for m in experts])
    torch.testing.assert_close(merged["2.weight"].double(), w2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats[1]["2.weight"], hs[1].T @ hs[1] / 10, rtol=1e-5, atol=1e-6)
    # ... which differs from plain RegMean's Gram on the expert's own layer 0
    own = collect_grams(experts[1], data[1])
    assert not torch.allclose(own["2.weight"], stats[1]["2.weight"], atol=1e-4)
    # the engine reproduces the driver's weights from the saved statistics
    again = merge_state_dicts("regmean_pp", None, [m.state_dict() for m in experts],
                              stats={"gram_pp": stats})
    for k in merged:
        torch.testing.assert_close(again[k], merged[k])


def test_regmean_pp_on_gpt2_uses_merged_hidden_states(tiny_gpt2, lm_batches):
    experts = [tiny_gpt2(s) for s in (1, 2)]
    data = [lm_batches(20 + s) for s in (1, 2)]
    assert find_block_stack(experts[0])[1] == ["transformer.h.0", "transformer.h.1"]
    stats, merged = collect_regmean_pp_grams(experts, data, alpha=0.9)
    # Independent check of block 1's c_attn Gram for candidate 1: run the merged model to the
    # output of block 0 (hidden_states[1]) and apply candidate 1's own ln_1 of block 1.
    model = tiny_gpt2(0)
    model.load_state_dict(merged)
    rows = []
    with torch.no_grad():
        for b in data[1]:
            h = model(**b, output_hidden_states=True).hidden_states[1]
            x = experts[1].transformer.h[1].ln_1(h)
            rows.append(x[b["attention_mask"].bool()])
    x = torch.cat(rows)
    key = "transformer.h.1.attn.c_attn.weight"
    torch.testing.assert_close(stats[1][key], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    # tied lm_head / wte: averaged, no Gram
    assert "lm_head.weight" not in stats[0]
    wte = "transformer.wte.weight"
    torch.testing.assert_close(merged[wte], (experts[0].state_dict()[wte]
                                             + experts[1].state_dict()[wte]) / 2)
    again = merge_state_dicts("regmean_pp", None, [m.state_dict() for m in experts],
                              stats={"gram_pp": stats}, alpha=0.9, input_dim="first")
    for k in merged:
        torch.testing.assert_close(again[k], merged[k])
