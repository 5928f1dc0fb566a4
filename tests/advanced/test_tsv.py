import torch

from modelalloy.api import merge_state_dicts
from modelalloy.methods.tsv import adaptive_ranks, clip_outliers


def orth(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def test_tsv_m_on_orthogonal_low_rank_tasks_is_task_arithmetic():
    # 8x8 layer, T = 2, k = 4 = each task's rank; disjoint left and right singular spaces.
    # (With rank < k the spare singular vectors of the null space are arbitrary and may overlap
    # the other task's space, so the identity needs rank exactly k.)
    qu, qv = orth(8, 1), orth(8, 2)
    s1 = torch.diag(torch.tensor([3.0, 1.0, 0.7, 0.2], dtype=torch.float64))
    s2 = torch.diag(torch.tensor([2.0, 0.5, 0.4, 0.1], dtype=torch.float64))
    t1 = qu[:, :4] @ s1 @ qv[:, :4].T
    t2 = qu[:, 4:] @ s2 @ qv[:, 4:].T
    base = {"layers.0.w": torch.randn(8, 8)}
    experts = [{"layers.0.w": base["layers.0.w"] + t1.float()},
               {"layers.0.w": base["layers.0.w"] + t2.float()}]
    out = merge_state_dicts("tsv_m", base, experts)
    assert torch.allclose(out["layers.0.w"], base["layers.0.w"] + (t1 + t2).float(), atol=1e-5)


def naive_tsv(tvs, k):
    # Independent route in float64: polar factors through (AᵀA)^{-1/2} by eigh.
    m, n = tvs[0].shape
    r = min(m, n)
    U = torch.zeros(m, r, dtype=torch.float64)
    S = torch.zeros(r, dtype=torch.float64)
    V = torch.zeros(n, r, dtype=torch.float64)
    for t, tau in enumerate(tvs):
        u, s, vh = torch.linalg.svd(tau.double())
        for j in range(k):
            U[:, t * k + j] = u[:, j]
            S[t * k + j] = s[j]
            V[:, t * k + j] = vh[j, :]

    def polar(a):
        w, q = torch.linalg.eigh(a.T @ a)
        return a @ q @ torch.diag(w ** -0.5) @ q.T

    return polar(U) @ torch.diag(S) @ polar(V).T


def test_tsv_m_matches_an_independent_polar_computation():
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 4, generator=g)}
    tvs = [0.1 * torch.randn(6, 4, generator=g) for _ in range(2)]
    out = merge_state_dicts("tsv_m", base, [{"w": base["w"] + t} for t in tvs], **{"lambda": 0.7})
    want = base["w"].double() + 0.7 * naive_tsv(tvs, k=2)
    assert torch.allclose(out["w"].double(), want, atol=1e-5)
    eig = merge_state_dicts("tsv_m", base, [{"w": base["w"] + t} for t in tvs], **{"lambda": 0.7},
                            orthogonalize="eigh")
    assert torch.allclose(eig["w"].double(), want, atol=1e-4)


def test_tsv_m_non_matrix_and_excluded_get_the_mean():
    base = {"b": torch.zeros(3), "text_projection": torch.zeros(2, 2)}
    experts = [{"b": torch.tensor([1.0, 2.0, 3.0]), "text_projection": torch.eye(2)},
               {"b": torch.tensor([3.0, 2.0, 1.0]), "text_projection": torch.zeros(2, 2)}]
    out = merge_state_dicts("tsv_m", base, experts, **{"lambda": 2.0})
    assert torch.allclose(out["b"], torch.tensor([4.0, 4.0, 4.0]))
    assert torch.allclose(out["text_projection"], torch.eye(2))


def test_tsv_m_more_tasks_than_rank_gives_no_update():
    base = {"w": torch.zeros(2, 5)}
    experts = [{"w": torch.randn(2, 5)} for _ in range(3)]  # r = 2 < T = 3: k = 0
    assert torch.equal(merge_state_dicts("tsv_m", base, experts)["w"], torch.zeros(2, 5))
    one = merge_state_dicts("tsv_m", base, experts, min_rank_one=True)["w"]
    assert one.abs().sum() > 0


def test_resm_with_hooks_off_is_tsv_m():
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(6, 6, generator=g), "b": torch.randn(6, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
               for _ in range(3)]
    a = merge_state_dicts("resm", base, experts, outlier_z=0.0, adaptive_rank=False)
    b = merge_state_dicts("tsv_m", base, experts)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in base)


def test_resm_hooks_hand_worked():
    # median 0, MAD of |x| = 1 -> clip at ±3·1.4826 = ±4.4478
    x = torch.tensor([-1.0, 0.0, 1.0, 100.0, -1.0, 0.0, 1.0])
    y = clip_outliers(x, 3.0)
    assert torch.allclose(y, torch.tensor([-1.0, 0.0, 1.0, 3 * 1.4826, -1.0, 0.0, 1.0]))
    # densities: task 0 has 4/4 entries above 1% of its max, task 1 has 1/4 -> k = ⌊4·0.8⌋, ⌊4·0.2⌋
    tvs = torch.stack([torch.ones(2, 2), torch.tensor([[5.0, 0.0], [0.0, 0.0]])])
    assert adaptive_ranks(tvs, 1.0, 0.01) == [1, 0]  # r = 2: ⌊2·0.8⌋ = 1, ⌊2·0.2⌋ = 0
