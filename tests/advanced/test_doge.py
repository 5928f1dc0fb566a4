import torch

from modelalloy.api import merge_state_dicts
from modelalloy.methods.doge import doge_loss_grad


def reference_doge(W0, Ws, lamda, steps, lr, divisor, density):
    """Autograd + torch.optim.Adam, the official loop shape, on one tensor (per-tensor mask)."""
    tvs = torch.stack([W - W0 for W in Ws])
    K = len(Ws)
    lams = torch.stack([lamda / tvs[k].norm() for k in range(K)])
    r = min(W0.shape)
    ku = r // K
    sum_u = torch.zeros(W0.shape[0], r)
    for k in range(K):
        u, _, _ = torch.linalg.svd(tvs[k], full_matrices=False)
        sum_u[:, k * ku:(k + 1) * ku] = u[:, :ku]
    uu, _, _ = torch.linalg.svd(sum_u, full_matrices=False)
    P = uu[:, :int(r / divisor)] @ uu[:, :int(r / divisor)].T
    delta = torch.nn.Parameter(torch.zeros_like(W0))
    opt = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.0
        s_tv = (tvs * lams.view(-1, 1, 1)).sum(0)
        s_d = (delta.unsqueeze(0) * lams.view(-1, 1, 1)).sum(0)
        for v in tvs:
            loss = loss + (-v * s_tv - v * s_d + v * v).sum(dim=1).pow(2).sum()
        loss.backward()
        delta.grad = delta.grad - P @ delta.grad
        opt.step()
    out = W0.clone()
    d = W0.numel()
    for k in range(K):
        kth = tvs[k].abs().flatten().kthvalue(d - int(d * density)).values
        out = out + lams[k] * (tvs[k] + delta.detach()) * (tvs[k].abs() >= kth)
    return out


def test_doge_matches_autograd_adam_reference():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(6, 4, generator=g)
    Ws = [W0 + 0.5 * torch.randn(6, 4, generator=g) for _ in range(2)]
    # lr large enough that δ moves visibly in 30 steps
    want = reference_doge(W0, Ws, 0.07, steps=30, lr=1e-2, divisor=2, density=0.5)
    got = merge_state_dicts("doge", {"layers.0.w.weight": W0},
                            [{"layers.0.w.weight": W} for W in Ws],
                            steps=30, lr=1e-2, subspace=2.0, density=0.5)["layers.0.w.weight"]
    assert torch.allclose(got, want, atol=1e-5)
    no_opt = merge_state_dicts("doge", {"layers.0.w.weight": W0},
                               [{"layers.0.w.weight": W} for W in Ws], steps=0, density=0.5)
    assert not torch.allclose(no_opt["layers.0.w.weight"], got, atol=1e-4)


def test_doge_gradient_is_autograd_gradient():
    g = torch.Generator().manual_seed(1)
    tvs = torch.randn(3, 4, 5, generator=g)
    lams = torch.tensor([0.1, 0.2, 0.3])
    delta = torch.randn(4, 5, generator=g, requires_grad=True)
    m = (lams.view(-1, 1, 1) * tvs).sum(0) + lams.sum() * delta
    loss = sum(((v * (v - m)).sum(dim=1) ** 2).sum() for v in tvs)
    loss.backward()
    val, grad = doge_loss_grad(tvs, lams, delta.detach())
    assert torch.allclose(val, loss.detach(), rtol=1e-5)
    assert torch.allclose(grad, delta.grad, rtol=1e-4, atol=1e-5)


def test_doge_no_steps_hand_worked_and_unselected_tensors_stay_at_base():
    # τ = [[3, 4]] (‖τ‖ = 5, λ_1 = 0.07/5); one task, density 0.5 keeps |τ| >= 2nd smallest
    # of the whole model's selected |τ| = {3, 4} -> both; δ = 0 with steps = 0.
    base = {"layers.0.q.weight": torch.zeros(1, 2), "layers.0.norm.weight": torch.zeros(2),
            "embed.weight": torch.zeros(2, 2)}
    experts = [{"layers.0.q.weight": torch.tensor([[3.0, 4.0]]),
                "layers.0.norm.weight": torch.ones(2), "embed.weight": torch.ones(2, 2)}]
    out = merge_state_dicts("doge", base, experts, steps=0, density=0.5)
    assert torch.allclose(out["layers.0.q.weight"], 0.07 / 5 * torch.tensor([[3.0, 4.0]]))
    assert torch.equal(out["layers.0.norm.weight"], torch.zeros(2))
    assert torch.equal(out["embed.weight"], torch.zeros(2, 2))
