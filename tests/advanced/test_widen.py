import math

import torch

from modelalloy.api import merge_state_dicts
from modelalloy.methods.widen import widen_weights


def naive_weights(W0, Ws, t_avg=1.0, s_cal=1.0):
    """Column by column with Python loops: ranks by sorted(), softmax by exp/sum."""
    out_dim, n_cols = W0.shape
    N = len(Ws)

    def col(W, j):
        return [float(W[r, j]) for r in range(out_dim)]

    def norm(v):
        return math.sqrt(sum(x * x for x in v))

    dm, dd = [], []
    for W in Ws:
        rm, rd = [], []
        for j in range(n_cols):
            a, b = col(W, j), col(W0, j)
            rm.append(abs(norm(a) - norm(b)))
            rd.append(1 - sum(x * y for x, y in zip(a, b, strict=True)) / (norm(a) * norm(b)))
        dm.append(rm)
        dd.append(rd)

    def ranks(row):
        order = sorted(range(n_cols), key=lambda j: (row[j], j))
        r = [0.0] * n_cols
        for p, j in enumerate(order):
            r[j] = p / n_cols
        return r

    def scores(S):
        out = [[0.0] * n_cols for _ in range(N)]
        for j in range(n_cols):
            z = sum(math.exp(S[i][j]) for i in range(N))
            for i in range(N):
                out[i][j] = math.exp(S[i][j]) / z
        for i in range(N):
            mean = sum(S[i]) / n_cols
            for j in range(n_cols):
                if S[i][j] > t_avg * mean:
                    out[i][j] = s_cal
        return out

    sm = scores([ranks(r) for r in dm])
    sd = scores([ranks(r) for r in dd])
    return torch.tensor([[0.5 * (sm[i][j] + sd[i][j]) for j in range(n_cols)] for i in range(N)])


def test_widen_weights_match_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(3, 5, generator=g)
    Ws = [W0 + 0.3 * torch.randn(3, 5, generator=g) for _ in range(3)]
    got = widen_weights(W0, torch.stack([W - W0 for W in Ws]), t_avg=1.0, s_cal=0.8)
    assert torch.allclose(got, naive_weights(W0, Ws, 1.0, 0.8), atol=1e-6)


def test_widen_identical_models():
    # Identical models: same ranks, softmax = 1/N; columns above the mean rank
    # (p/in > (in-1)/(2·in), i.e. the top half) get s_cal.
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(3, 4, generator=g)
    W1 = W0 + 0.2 * torch.randn(3, 4, generator=g)
    w = widen_weights(W0, torch.stack([W1 - W0] * 2), s_cal=1.0)
    assert torch.allclose(w[0], w[1])
    for j in range(4):
        assert float(w[0, j]) in (0.5, 0.75, 1.0)  # ½(score_M + score_D), each 1/2 or 1
    out = merge_state_dicts("widen", {"w": W0}, [{"w": W1}, {"w": W1}])["w"]
    assert torch.allclose(out, W0 + (W1 - W0) * 2 * w[0], atol=1e-6)


def test_widen_one_dimensional_hand_worked():
    base = {"b": torch.zeros(2)}
    experts = [{"b": torch.tensor([1.0, 0.0])}, {"b": torch.tensor([0.0, 0.0])}]
    # |Δ| = [[1, 0], [0, 0]]; softmax over models: col 0 [e/(e+1), 1/(e+1)], col 1 [.5, .5];
    # model 0's mean is 0.5, col 0 (1 > 0.5) -> s_cal = 1; model 1 has no entry > 0.
    out = merge_state_dicts("widen", base, experts)["b"]
    assert torch.allclose(out, torch.tensor([1.0, 0.0]))


def test_widen_embedding_is_ranked_per_token():
    g = torch.Generator().manual_seed(2)
    E0 = torch.randn(6, 3, generator=g)  # vocab 6, hidden 3
    Es = [E0 + 0.1 * torch.randn(6, 3, generator=g) for _ in range(2)]
    out = merge_state_dicts("widen", {"model.embed_tokens.weight": E0},
                            [{"model.embed_tokens.weight": E} for E in Es])
    w = naive_weights(E0.T, [E.T for E in Es])  # (2, vocab)
    want = E0 + sum((Es[i] - E0) * w[i].unsqueeze(1) for i in range(2))
    assert torch.allclose(out["model.embed_tokens.weight"], want, atol=1e-6)


def test_widen_pretrained_plus_finetuned_weights_stay_bounded():
    # A continually pre-trained model with deltas 100x those of a fine-tuned one: the
    # fine-tuned model's weights stay at least the softmax floor 1/(1 + e^{(in-1)/in}).
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(8, 10, generator=g)
    ft = 0.001 * torch.randn(8, 10, generator=g)
    pt = 0.1 * torch.randn(8, 10, generator=g)
    w = widen_weights(W0, torch.stack([pt, ft]))
    floor = 1 / (1 + math.exp(0.9))
    assert float(w.min()) >= floor - 1e-6 and float(w.max()) <= 1.0
