"""Expert Merging (++): alignment loss goes down, coefficients in (0, 1), chunks as torch.chunk."""

from __future__ import annotations

import torch
from torch import nn

from modelalloy import merge_state_dicts
from modelalloy.methods.chunked import chunk_scale
from modelalloy.optimize.expert_merging import allocate_chunks, expert_merging


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [{k: v + 0.5 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    samples = [[torch.randn(1, 5, generator=gen) + k for _ in range(4)] for k in range(2)]
    return model, base, experts, samples


def test_chunk_scale_matches_torch_chunk():
    for numel, m in ((10, 4), (6, 4), (7, 3), (5, 1), (9, 9)):
        coeffs = torch.arange(1.0, m + 1)
        pieces = torch.arange(numel).chunk(m)
        expect = torch.cat([torch.full((len(p),), coeffs[i].item()) for i, p in enumerate(pieces)])
        torch.testing.assert_close(chunk_scale(numel, coeffs), expect)


def test_layer_wise_alignment_improves_and_stays_in_range():
    model, base, experts, samples = _setup()
    res = expert_merging(model, base, experts, samples, epochs=15, grad_accum=1, lr=0.2,
                         gamma=0.0)
    assert res.history[-1] < res.history[0]
    assert set(res.alphas) == {"0.weight", "2.weight", "4.weight"}  # biases stay at the base
    for a in res.alphas.values():
        assert a.shape == (2, 1) and (a > 0).all() and (a < 1).all()
    assert any((a - 0.1).abs().max() > 1e-3 for a in res.alphas.values())
    # a strong pull to the init keeps the coefficients there
    pinned = expert_merging(model, base, experts, samples, epochs=3, grad_accum=1, lr=0.05,
                            gamma=1e4)
    moved = max(float((a - 0.1).abs().max()) for a in pinned.alphas.values())
    free = max(float((a - 0.1).abs().max()) for a in res.alphas.values())
    assert moved < free
    recipe = res.to_coefficients().to_recipe("base", ["a", "b"])
    assert recipe["merge_method"] == "task_arithmetic"


def test_chunk_wise_result_merges_through_chunk_task_arithmetic():
    model, base, experts, samples = _setup()
    chunks = {"0.weight": 3, "2.weight": 0, "4.weight": 5}
    res = expert_merging(model, base, experts, samples, chunks=chunks, epochs=2, grad_accum=2,
                         init=[0.2, 0.4])
    assert res.alphas["0.weight"].shape == (2, 3) and res.alphas["4.weight"].shape == (2, 5)
    torch.testing.assert_close(res.alphas["2.weight"], torch.tensor([[0.2], [0.4]]))  # fixed
    stats = res.to_statistics()
    out = merge_state_dicts("chunk_task_arithmetic", base, experts,
                            stats={"merge_coeffs": stats})
    for name in ("0.weight", "4.weight"):
        expect = base[name].flatten().clone()
        for k in range(2):
            tau = (experts[k][name] - base[name]).flatten()
            start = 0
            for s, piece in enumerate(tau.chunk(chunks[name])):
                expect[start:start + len(piece)] += res.alphas[name][k, s] * piece
                start += len(piece)
        torch.testing.assert_close(out[name], expect.reshape(base[name].shape))
    torch.testing.assert_close(out["0.bias"], base["0.bias"])


def test_allocate_chunks_by_hand():
    model, base, experts, samples = _setup()
    res = expert_merging(model, base, experts, samples, epochs=1)
    m = allocate_chunks(res, base, experts, budget=12, kappa=1.0)
    imp = {}
    for n in res.alphas:
        imp[n] = sum(abs(float(res.alphas[n][k, 0]))
                     * float((experts[k][n] - base[n]).abs().mean()) * base[n].numel()
                     for k in range(2))
    total = sum(imp.values())
    for n in imp:
        assert m[n] == int(12 * imp[n] / total)


def test_expert_merging_on_gpt2(tiny_gpt2, lm_batches):
    model = tiny_gpt2(0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [{k: v.clone() for k, v in tiny_gpt2(s).state_dict().items()} for s in (1, 2)]
    samples = [[{k: v[:1] for k, v in b.items()} for b in lm_batches(50 + k, n_batches=2)]
               for k in range(2)]
    res = expert_merging(model, base, experts, samples, hidden_layers=[0, 1], epochs=2,
                         grad_accum=2)
    assert "transformer.h.0.attn.c_attn.weight" in res.alphas
    assert not any("ln_" in n or "wte" in n or n.endswith("bias") for n in res.alphas)
    assert len(res.history) == 2
