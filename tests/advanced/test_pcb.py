import torch

from modelalloy.api import merge_state_dicts

from .helpers import make_models


def naive_pcb(base, experts, keep, clip, lam):
    """The official algorithm written out on the flattened T×d matrix (sorted-key order)."""
    names = sorted(base)
    M = torch.stack([torch.cat([(e[n] - base[n]).flatten() for n in names]) for e in experts])
    T, d = M.shape
    A = M.abs()
    srt = A.sort(dim=1).values
    lo = srt[:, int(d * clip)].unsqueeze(1)
    hi = srt[:, int(d * (1 - clip)) - 1].unsqueeze(1)
    A = torch.clamp(A, lo, hi)
    tau = torch.sign(M) * A
    mn, mx = A.min(dim=1, keepdim=True).values, A.max(dim=1, keepdim=True).values
    intra = torch.exp(T * ((A - mn) / (mx - mn)) ** 2)
    inter = torch.tanh(M * M.sum(dim=0))
    beta = intra * inter
    bs = beta.sort(dim=1).values
    bmin = bs[:, int(d * (1 - keep))].unsqueeze(1)
    beta = torch.clamp(beta, min=bmin)
    bmn, bmx = beta.min(dim=1, keepdim=True).values, beta.max(dim=1, keepdim=True).values
    scale = (beta - bmn) / (bmx - bmn)
    merged = (tau * scale).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)
    out, i = {}, 0
    for n in names:
        k = base[n].numel()
        out[n] = base[n] + lam * merged[i:i + k].reshape(base[n].shape)
        i += k
    return out


def test_pcb_matches_the_flattened_official_algorithm():
    base, experts = make_models(3, seed=4)
    want = naive_pcb(base, experts, keep=0.3, clip=0.05, lam=1.2)
    got = merge_state_dicts("pcb", base, experts, keep_ratio=0.3, clip_ratio=0.05,
                            **{"lambda": 1.2})
    for n in base:
        assert torch.allclose(got[n], want[n], atol=1e-5), n


def test_pcb_single_task_hand_worked():
    # T = 1, no clipping: β grows with |τ|; threshold = sorted β at index ⌊4·0.5⌋ = 2, so only
    # the largest entry is strictly above it and survives (β̂ = 1): τ_m = [0, 0, 0, -4].
    base = {"w": torch.zeros(4)}
    experts = [{"w": torch.tensor([1.0, -2.0, 3.0, -4.0])}]
    out = merge_state_dicts("pcb", base, experts, keep_ratio=0.5, clip_ratio=0.0, **{"lambda": 0.5})
    assert torch.allclose(out["w"], torch.tensor([0.0, 0.0, 0.0, -2.0]))


def test_pcb_all_zero_task_gives_no_nan():
    base, experts = make_models(2, seed=5)
    experts.append({n: v.clone() for n, v in base.items()})  # τ = 0
    for scope in ("global", "per_tensor"):
        out = merge_state_dicts("pcb", base, experts, scope=scope)
        assert all(torch.isfinite(v).all() for v in out.values())
    only_zero = merge_state_dicts("pcb", base, [experts[-1]])
    assert all(torch.equal(only_zero[n], base[n]) for n in base)


def test_pcb_per_tensor_scope_is_the_algorithm_on_each_tensor():
    base, experts = make_models(2, seed=6)
    got = merge_state_dicts("pcb", base, experts, keep_ratio=0.4, clip_ratio=0.1,
                            scope="per_tensor")
    for n in base:
        want = naive_pcb({n: base[n]}, [{n: e[n]} for e in experts], 0.4, 0.1, 1.0)[n]
        assert torch.allclose(got[n], want, atol=1e-5), n
