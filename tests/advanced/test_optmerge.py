import torch

from modelalloy.api import merge_state_dicts


def reference(W0, Ws, steps, lr):
    """The official loop: full SVDs, zero-padded S·Vh factors, autograd, torch SGD."""
    vectors = torch.stack([W - W0 for W in Ws])
    K = len(Ws)
    low_rank, denoised = [], []
    for v in vectors:
        u, s, vh = torch.linalg.svd(v, full_matrices=True)
        r = s.shape[0] // K
        s = s.clone()
        s[r:] = 0
        vh = vh.clone()
        vh[r:, :] = 0
        S = torch.zeros(v.shape)
        S[:len(s), :len(s)] = torch.diag(s)
        low_rank.append(S @ vh)
        u2, s2, vh2 = torch.linalg.svd(v, full_matrices=False)
        denoised.append(u2[:, :r] @ torch.diag(s2[:r]) @ vh2[:r])
    low_rank, denoised = torch.stack(low_rank), torch.stack(denoised)
    M = torch.nn.Parameter(vectors.mean(0))
    opt = torch.optim.SGD([M], lr=lr, momentum=0.9)
    norms = vectors.reshape(K, -1).norm(dim=1) ** 2
    for _ in range(steps):
        inner = torch.matmul(M.unsqueeze(0) - denoised, low_rank.transpose(1, 2))
        loss = torch.sum(inner ** 2 / norms.view(-1, 1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return W0 + M.detach()


def test_optmerge_matches_the_official_loop():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(5, 6, generator=g)
    Ws = [W0 + torch.randn(5, 6, generator=g) for _ in range(2)]
    want = reference(W0, Ws, steps=20, lr=0.05)
    got = merge_state_dicts("optmerge", {"layers.0.q.weight": W0},
                            [{"layers.0.q.weight": W} for W in Ws], steps=20, lr=0.05)
    assert torch.allclose(got["layers.0.q.weight"], want, atol=1e-5)
    start = merge_state_dicts("optmerge", {"w": W0}, [{"w": W} for W in Ws], steps=0)["w"]
    assert torch.allclose(start, W0 + sum(W - W0 for W in Ws) / 2, atol=1e-6)


def test_optmerge_of_one_model_is_that_model_and_exclusions():
    g = torch.Generator().manual_seed(1)
    base = {"layers.0.q.weight": torch.randn(4, 4, generator=g), "layers.0.norm.weight":
            torch.ones(4), "lm_head.weight": torch.randn(3, 4, generator=g),
            "layers.0.scale": torch.zeros(4)}
    e = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    out = merge_state_dicts("optmerge", base, [e])
    # K = 1: τ̃ = τ (full rank kept), the start M = τ is the minimum.
    assert torch.allclose(out["layers.0.q.weight"], e["layers.0.q.weight"], atol=1e-6)
    assert torch.equal(out["layers.0.norm.weight"], base["layers.0.norm.weight"])
    assert torch.equal(out["lm_head.weight"], base["lm_head.weight"])
    assert torch.allclose(out["layers.0.scale"], e["layers.0.scale"])  # non-2-D: the mean
