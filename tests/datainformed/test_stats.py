"""Collectors checked against statistics computed by hand from independently built inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from modelalloy.errors import CheckpointError
from modelalloy.stats import (
    StatsReader,
    collect_activations,
    collect_fisher,
    collect_grams,
    load_stats,
    save_stats,
    stats_path,
)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_gram_of_plain_mlp_matches_direct_computation():
    model = mlp()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 4, generator=gen), torch.randn(7, 4, generator=gen)]
    stat = collect_grams(model, batches)
    x0 = torch.cat(batches)
    x2 = torch.relu(x0 @ model[0].weight.T + model[0].bias).detach()
    assert set(stat) == {"0.weight", "2.weight"}
    torch.testing.assert_close(stat["0.weight"], x0.T @ x0 / 12)
    torch.testing.assert_close(stat["2.weight"], x2.T @ x2 / 12, rtol=1e-5, atol=1e-5)
    assert stat.counts["0.weight"] == 12 and stat.input_dims["0.weight"] == "last"
    summed = collect_grams(model, batches, reduce="sum")
    torch.testing.assert_close(summed["0.weight"], x0.T @ x0)


def test_gram_on_gpt2_is_mask_aware_and_keyed_by_parameter(tiny_gpt2, lm_batches):
    model = tiny_gpt2(0)
    batches = lm_batches(3)
    stat = collect_grams(model, batches)
    # Independent computation of the input of block 0's c_attn: ln_1(wte + wpe), padding dropped.
    rows = []
    with torch.no_grad():
        for b in batches:
            pos = torch.arange(b["input_ids"].shape[1])
            h = model.transformer.wte(b["input_ids"]) + model.transformer.wpe(pos)
            x = model.transformer.h[0].ln_1(h)
            rows.append(x[b["attention_mask"].bool()])
    x = torch.cat(rows)
    key = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(stat[key], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    assert stat.input_dims[key] == "first"  # transformers' Conv1D stores (d_in, d_out)
    assert stat.counts[key] == sum(int(b["attention_mask"].sum()) for b in batches)
    # lm_head is an nn.Linear tied to wte: the Gram is stored under both names
    assert "lm_head.weight" in stat and "transformer.wte.weight" in stat
    with_pad = collect_grams(model, batches, mask_padding=False)
    assert with_pad.counts[key] == sum(b["input_ids"].numel() for b in batches)


def test_activations_are_mean_abs_per_input_channel(tiny_gpt2, lm_batches):
    model = mlp()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 4, generator=gen) for _ in range(3)]
    stat = collect_activations(model, batches)
    x = torch.cat(batches)
    torch.testing.assert_close(stat["0.weight"], x.abs().mean(0))
    h = torch.relu(x @ model[0].weight.T + model[0].bias).detach()
    torch.testing.assert_close(stat["2.weight"], h.abs().mean(0))
    # HF model: norms (1-D weights) included, embeddings excluded
    gpt = tiny_gpt2(0)
    st = collect_activations(gpt, lm_batches(1))
    assert "transformer.h.0.ln_1.weight" in st and st["transformer.h.0.ln_1.weight"].shape == (32,)
    assert "transformer.wpe.weight" not in st
    assert st["transformer.h.0.mlp.c_proj.weight"].shape == (128,)


def _naive_exact_fisher(model: nn.Linear, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed form for logits z = W x + b: ∇_W log p_c = (e_c − p) xᵀ, ∇_b = e_c − p."""
    fw = torch.zeros_like(model.weight)
    fb = torch.zeros_like(model.bias)
    with torch.no_grad():
        for x in xs:
            p = torch.softmax(model.weight @ x + model.bias, 0)
            for c in range(p.shape[0]):
                e = torch.zeros_like(p)
                e[c] = 1
                fw += p[c] * torch.outer(e - p, x) ** 2
                fb += p[c] * (e - p) ** 2
    return fw / len(xs), fb / len(xs)


def test_exact_fisher_matches_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    xs = torch.randn(6, 4)
    stat = collect_fisher(model, [xs[:4], xs[4:]], mode="exact")
    fw, fb = _naive_exact_fisher(model, xs)
    torch.testing.assert_close(stat["weight"], fw, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stat["bias"], fb, rtol=1e-5, atol=1e-7)
    assert stat.counts["weight"] == 6


def test_empirical_and_hard_fisher_closed_form():
    torch.manual_seed(1)
    model = nn.Linear(3, 4)
    xs = torch.randn(5, 3)
    labels = torch.tensor([0, 3, 1, 1, 2])
    emp = collect_fisher(model, [{"input": xs, "labels": labels}], mode="empirical")
    hard = collect_fisher(model, [{"input": xs}], mode="hard")
    fe, fh = torch.zeros(4, 3), torch.zeros(4, 3)
    with torch.no_grad():
        for x, y in zip(xs, labels, strict=True):
            p = torch.softmax(model.weight @ x + model.bias, 0)
            for acc, c in ((fe, int(y)), (fh, int(p.argmax()))):
                e = torch.zeros(4)
                e[c] = 1
                acc += torch.outer(e - p, x) ** 2
    torch.testing.assert_close(emp["weight"], fe / 5, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hard["weight"], fh / 5, rtol=1e-5, atol=1e-7)


def test_sampled_fisher_on_gpt2_is_per_example(tiny_gpt2, lm_batches):
    model = tiny_gpt2(0)
    batches = lm_batches(4, n_batches=1, batch=2)
    stat = collect_fisher(model, batches, mode="sampled", seed=3)
    key = "transformer.h.1.mlp.c_fc.weight"
    assert stat[key].shape == model.state_dict()[key].shape
    assert torch.isfinite(stat[key]).all() and (stat[key] >= 0).all()
    # per-example: squaring before averaging; the average of two single-example Fishers
    ex0 = {k: v[:1] for k, v in batches[0].items()}
    ex1 = {k: v[1:] for k, v in batches[0].items()}
    f0 = collect_fisher(model, [ex0], mode="hard")
    f1 = collect_fisher(model, [ex1], mode="hard")
    both = collect_fisher(model, batches, mode="hard")
    torch.testing.assert_close(both[key], (f0[key] + f1[key]) / 2, rtol=1e-4, atol=1e-9)
    # the mean of squared per-example gradients is not the square of the mean gradient
    assert not torch.allclose(both[key], ((f0[key].sqrt() + f1[key].sqrt()) / 2) ** 2)
    # requires_grad flags are restored
    assert all(p.requires_grad for p in model.parameters())


def test_save_load_roundtrip_and_format(tmp_path):
    model = mlp()
    stat = collect_grams(model, [torch.randn(5, 4)])
    path = save_stats(stat, tmp_path / "model")
    assert path == stats_path(tmp_path / "model", "gram")
    assert path == tmp_path / "model" / "stats" / "gram.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"0.weight", "2.weight"}
    assert meta["format"] == "modelalloy.stats" and meta["kind"] == "gram"
    assert json.loads(meta["input_dims"]) == {"0.weight": "last", "2.weight": "last"}
    back = load_stats(tmp_path / "model", "gram")
    assert back.kind == "gram" and back.counts == stat.counts and back.meta["reduce"] == "mean"
    for k in stat:
        torch.testing.assert_close(back[k], stat[k])
    reader = StatsReader(path)
    assert "0.weight" in reader and "1.weight" not in reader
    torch.testing.assert_close(reader["2.weight"], stat["2.weight"])
    with pytest.raises(CheckpointError, match="modelalloy stats"):
        StatsReader(tmp_path / "nope.safetensors")
