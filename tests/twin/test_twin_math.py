"""Twin-Merging: router gates, SVD truncation, exact reproduction at full rank, soft routing."""

from __future__ import annotations

import math

import pytest
import torch

from modelalloy.twin import (
    TwinModel,
    TwinRouter,
    exclusive_factors,
    rank_for,
    tail_energy,
    truncate,
)
from tests.twin.helpers import Tiny, family


def test_gates_are_the_softmax_of_the_router_logits_and_sum_to_one():
    torch.manual_seed(0)
    router = TwinRouter(dim=4, num_tasks=3).eval()
    e = torch.randn(5, 4)
    gates = router.gates(e)
    logits = router(e).tolist()
    for row, lg in zip(gates.tolist(), logits, strict=True):
        z = sum(math.exp(v) for v in lg)
        assert row == pytest.approx([math.exp(v) / z for v in lg], abs=1e-6)
        assert sum(row) == pytest.approx(1.0, abs=1e-6)


def test_rank_from_density():
    assert rank_for((40, 30), 0.1) == 3  # floor(0.1 * 30)
    assert rank_for((6, 8), 0.1) == 1  # floor gives 0: at least rank 1
    assert rank_for((6, 8), 1.0) == 6


def test_truncation_error_is_the_tail_singular_energy():
    torch.manual_seed(0)
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    q1, _ = torch.linalg.qr(torch.randn(8, 6))
    q2, _ = torch.linalg.qr(torch.randn(6, 6))
    delta = q1 @ torch.diag(s) @ q2.T  # singular values known by construction
    low = truncate(delta, density=0.34)  # floor(0.34 * 6) = 2
    assert low.rank == 2
    err = float(((delta - low.dense()) ** 2).sum())
    expected = 3.0 ** 2 + 2.0 ** 2 + 1.0 ** 2 + 0.5 ** 2  # 14.25
    assert err == pytest.approx(expected, rel=1e-4)
    assert tail_energy(delta, 2) == pytest.approx(expected, rel=1e-6)


def _routed(density: float = 1.0):
    base, experts = family()
    shared = {n: (base[n] + experts["t0"][n] + experts["t1"][n]) / 3 for n in base}  # any θ*
    factors = {t: exclusive_factors(shared, sd, density) for t, sd in experts.items()}
    module = Tiny()
    module.load_state_dict(shared)
    model = TwinModel(module, TwinRouter(6, 2), ["t0", "t1"], factors)
    return model, shared, experts


def _run(state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    m = Tiny()
    m.load_state_dict(state)
    return m(ids)


def test_full_rank_bundle_reproduces_each_expert_when_routed_to_it():
    model, _shared, experts = _routed(1.0)
    assert model.branch_kinds == {"embedding": 1, "linear": 2, "layernorm": 1, "fallback": 1}
    ids = torch.randint(0, 12, (3, 5))
    for k, task in enumerate(["t0", "t1"]):
        gates = torch.nn.functional.one_hot(torch.full((3,), k), 2).float()
        with torch.no_grad():
            got = model(ids, gates=gates)
            want = _run(experts[task], ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_soft_per_sample_gates_equal_the_mixed_weights_of_each_sample():
    model, shared, experts = _routed(1.0)
    ids = torch.randint(0, 12, (2, 5))
    gates = torch.tensor([[0.7, 0.3], [0.1, 0.9]])
    with torch.no_grad():
        got = model(ids, gates=gates)
    for b in range(2):
        w = gates[b]
        mixed = {n: shared[n] + w[0] * (experts["t0"][n] - shared[n])
                 + w[1] * (experts["t1"][n] - shared[n]) for n in shared}
        with torch.no_grad():
            want = _run(mixed, ids[b:b + 1])[0]
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


def test_low_rank_branches_equal_the_truncated_weights():
    model, shared, experts = _routed(0.34)
    ids = torch.randint(0, 12, (2, 5))
    gates = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    approx = {}
    for n, t in shared.items():
        d = experts["t0"][n] - t
        approx[n] = t + (truncate(d, 0.34).dense() if d.dim() == 2 else d)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, gates=gates), _run(approx, ids), atol=1e-5,
                                   rtol=1e-5)


def test_gpt2_full_rank_reproduces_experts_including_tied_head_and_generate():
    pytest.importorskip("transformers")
    from transformers import GPT2LMHeadModel

    from tests.conftest import tiny_gpt2_config

    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    sd = {n: p.detach().clone() for n, p in base.named_parameters()}
    experts = {f"t{k}": {n: t + 0.05 * torch.randn_like(t) for n, t in sd.items()}
               for k in range(2)}
    shared = {n: (experts["t0"][n] + experts["t1"][n]) / 2 for n in sd}
    factors = {t: exclusive_factors(shared, e, 1.0) for t, e in experts.items()}
    module = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    module.load_state_dict(shared, strict=False)
    model = TwinModel(module, TwinRouter(32, 2), ["t0", "t1"], factors)
    assert set(model.branch_kinds) == {"conv1d", "embedding", "layernorm", "linear"}
    ids = torch.randint(0, 64, (2, 6))
    ref = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    ref.load_state_dict(experts["t1"], strict=False)
    gates = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, gates=gates).logits,
                                   ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        with model.pinned(gates):
            got = model.shared.generate(input_ids=ids, max_new_tokens=4, do_sample=False,
                                        pad_token_id=0)
        want = ref.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
