import torch

from modelalloy.methods.orderstats import order_stats
from modelalloy.methods.orderstats import signed_keys as monotone_keys


def test_monotone_keys_order_signed_floats():
    x = torch.tensor([-1e30, -3.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 3.0, 1e30])
    k = monotone_keys(x)
    assert torch.all(k[1:] >= k[:-1])
    assert int(k.min()) >= 0 and int(k.max()) < 1 << 16


def test_order_stats_equal_sorting_the_concatenation():
    g = torch.Generator().manual_seed(0)
    chunks = [[torch.randn(n, generator=g) * s, torch.randn(n, generator=g).abs()]
              for n, s in ((50, 1.0), (7, 1e-3), (300, 10.0), (1, 0.0))]
    chunks[1][0][3] = chunks[0][0][5]  # a tie across tensors
    ranks = [[0, 10, 179, 357], [0, 200, 357, 1000]]
    got, maxima = order_stats(lambda: iter(chunks), 2, lambda r, n: ranks[r])
    assert order_stats(lambda: iter(chunks), 2, lambda r, n: [n - 1])[0] == [
        [float(torch.cat([c[r] for c in chunks]).max())] for r in range(2)]
    for r in range(2):
        flat = torch.cat([c[r] for c in chunks]).sort().values
        want = [float(flat[min(i, flat.numel() - 1)]) for i in ranks[r]]
        assert got[r] == want
        assert maxima[r] == float(flat[-1])
