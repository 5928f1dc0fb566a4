"""DAM: the concrete mask, its rescaling, the reduction to task arithmetic, a short run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from modelalloy.api import merge_state_dicts
from modelalloy.optimize.dam import concrete, dam, final_mask, rescale


def _family(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    experts = [{k: v + 0.3 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    batches = [[torch.rand(5, 6)], [torch.rand(5, 6)]]
    return net, base, experts, batches


def test_concrete_sample_matches_the_formula():
    z = torch.tensor([0.5, -1.0])
    u = torch.rand(2, generator=torch.Generator().manual_seed(3)).tolist()
    got = concrete(z, 0.5, torch.Generator().manual_seed(3)).tolist()
    for zi, ui, g in zip([0.5, -1.0], u, got, strict=True):
        want = 1 / (1 + math.exp(-(zi + math.log(ui) - math.log(1 - ui)) / 0.5))
        assert g == pytest.approx(want, abs=1e-6)
    assert float(rescale(torch.tensor([0.2, 0.6])).mean()) == pytest.approx(1.0)


def test_without_mask_training_dam_keeps_what_task_arithmetic_keeps():
    net, base, experts, batches = _family()
    res = dam(net, base, experts, batches, mask_steps=0, adamerging_steps=0,
              final="expected")
    ta = merge_state_dicts("task_arithmetic", base, experts, lambda_=0.3)
    for name in base:
        assert torch.equal(res.masks[name], torch.ones_like(base[name]))  # σ(0) rescaled
        torch.testing.assert_close(res.merged[name], ta[name], atol=1e-6, rtol=1e-6)


def test_the_code_s_final_mask_is_one_concrete_sample_rescaled():
    # Z = 0: each entry is σ((log u − log(1 − u)) / T) for its own u, then divided by the mean
    z = {"w": torch.zeros(400)}
    got = final_mask(z, "sample", 0.5, torch.Generator().manual_seed(1))["w"]
    u = torch.rand(400, generator=torch.Generator().manual_seed(1)).clamp(1e-6, 1 - 1e-6)
    raw = 1 / (1 + torch.exp(-(u.log() - (1 - u).log()) / 0.5))
    torch.testing.assert_close(got, raw / raw.mean())
    # at T = 0.5 the sample is far from the constant σ(0) = 0.5: most entries near 0 or 2
    assert float(((got < 0.4) | (got > 1.6)).float().mean()) > 0.5
    assert torch.equal(final_mask(z, "expected", 0.5, None)["w"], torch.ones(400))
    with pytest.raises(ValueError, match="final_mask"):
        final_mask(z, "mean", 0.5, None)


def test_layer_wise_dam_without_steps_is_task_arithmetic_per_tensor():
    net, base, experts, batches = _family()
    res = dam(net, base, experts, batches, mask_steps=0, adamerging_steps=0,
              granularity="layer", final="expected", init=0.25)
    assert res.coefficients.shape == (len(base), 2)
    for name in base:
        want = base[name] + 0.25 * (experts[0][name] - base[name]) + 0.25 * (
            experts[1][name] - base[name])
        torch.testing.assert_close(res.merged[name], want, atol=1e-6, rtol=1e-6)


def test_each_phase_draws_its_own_batches():
    net, base, experts, _ = _family()
    batches = [[torch.rand(5, 6) for _ in range(3)] for _ in range(2)]
    ours = {x.data_ptr() for task in batches for x in task}

    def seen_in_one_step(fresh: bool) -> int:
        seen: set[int] = set()
        hook = net[0].register_forward_pre_hook(
            lambda _m, args: seen.add(args[0].data_ptr()))
        try:
            dam(net, base, experts, batches, mask_steps=1, adamerging_steps=0,
                fresh_batches=fresh)
        finally:
            hook.remove()
        return len(seen & ours)

    # one shuffled pass over a task's 3 batches: inner, adversary and outer get one each
    assert seen_in_one_step(True) == 6
    assert seen_in_one_step(False) == 2


def test_short_run_moves_the_mask_keeps_its_mean_and_perturbs_inputs():
    net, base, experts, batches = _family()
    res = dam(net, base, experts, batches, mask_steps=5, mask_lr=0.1, adv_lr=0.1,
              adamerging_steps=2)
    assert len(res.history) == 5
    for m in res.masks.values():
        assert float(m.mean()) == pytest.approx(1.0, abs=1e-5)
    assert any(not torch.allclose(m, torch.ones_like(m)) for m in res.masks.values())
    assert all(h["adv"] >= 0 for h in res.history)  # a cross-entropy


def test_language_model_perturbs_the_input_embeddings():
    pytest.importorskip("transformers")
    from transformers import GPT2LMHeadModel

    from tests.conftest import tiny_gpt2_config

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    experts = [{n: t + 0.02 * torch.randn_like(t) for n, t in base.items()} for _ in range(2)]
    batch = {"input_ids": torch.randint(0, 64, (2, 5)),
             "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    res = dam(model, base, experts, [[batch], [batch]], mask_steps=2, adamerging_steps=0)
    assert len(res.history) == 2 and set(res.merged) == set(base)


@pytest.mark.slow
def test_backdoor_bench_reports_asr(vision_smoke, run_cli, tmp_path: Path):
    res = run_cli("backdoor", "--suite", "tiny-vision", "--size", "smoke", "--methods",
                  "task_arithmetic,dam", "--out", tmp_path, "--dam-mask-steps", "3",
                  "--dam-adamerging-steps", "3")
    assert res.code == 0, res.err
    out = json.loads((tmp_path / "backdoor.json").read_text())
    rows = {(r["method"], r["task"]): r for r in out["records"]}
    task = out["backdoored_task"]
    # the backdoor took: the backdoored expert answers the trigger far more than the base
    assert rows[("backdoored expert", task)]["asr"] > rows[("base", task)]["asr"] + 0.05
    assert all("asr" in r for r in out["records"])
    assert "ASR succession" in (tmp_path / "backdoor.md").read_text()
