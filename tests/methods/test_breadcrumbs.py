"""Model Breadcrumbs: exactly the middle magnitude band per row is kept."""

import torch

from modelalloy.methods._sparsify import band_trim_


def _naive_band(row, n_top, n_keep):
    order = sorted(range(len(row)), key=lambda i: -abs(row[i]))  # distinct magnitudes
    keep = set(order[n_top:n_top + n_keep])
    return [row[i] if i in keep else 0.0 for i in range(len(row))]


def test_keeps_exactly_the_middle_band_per_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 20, generator=g)
    # gamma 0.1 -> n_top = 2 per row; density 0.25 -> n_keep = 5 per row
    got = band_trim_(x.clone(), 0.25, 0.1, "row")
    want = torch.tensor([_naive_band(r.tolist(), 2, 5) for r in x])
    assert torch.equal(got, want)
    assert ((got != 0).sum(dim=1) == 5).all()


def test_row_is_the_last_dimension_and_1d_is_one_row():
    x = torch.tensor([[1.0, -9.0, 3.0, 2.0], [8.0, 0.5, -0.25, 4.0]])
    # gamma 0.25 -> drop the largest one per row; density 0.5 -> keep the next two
    assert band_trim_(x.clone(), 0.5, 0.25).tolist() == [[0.0, 0.0, 3.0, 2.0],
                                                          [0.0, 0.5, 0.0, 4.0]]
    v = torch.tensor([1.0, -9.0, 3.0, 2.0])
    assert band_trim_(v.clone(), 0.5, 0.25).tolist() == [0.0, 0.0, 3.0, 2.0]


def test_scalars_untouched_and_short_rows_lose_no_outliers():
    s = torch.tensor(3.0)
    assert band_trim_(s.clone(), 0.1, 0.5).item() == 3.0
    # n = 4, gamma 0.01 -> n_top = 0; density 0.5 -> the 2 largest are kept
    assert band_trim_(torch.tensor([4.0, 1.0, -3.0, 2.0]), 0.5, 0.01).tolist() == [
        4.0, 0.0, -3.0, 0.0]


def test_tensor_granularity_follows_mergekit():
    x = torch.tensor([[1.0, -9.0], [3.0, 2.0], [8.0, 0.5]])
    # flattened, 6 entries: gamma 0.2 -> n_top 1 (the 9), density 0.5 -> keep 3: 8, 3, 2
    assert band_trim_(x.clone(), 0.5, 0.2, "tensor").tolist() == [[0.0, 0.0], [3.0, 2.0],
                                                                  [8.0, 0.0]]
    # density + gamma > 1: n_top shrinks so that density is met: density 5/6 keeps 5 -> n_top 1
    assert band_trim_(x.clone(), 5 / 6, 0.5, "tensor").tolist() == [[1.0, 0.0], [3.0, 2.0],
                                                                    [8.0, 0.5]]
    # density 1: untouched (mergekit), while the row mode still drops the outliers
    assert torch.equal(band_trim_(x.clone(), 1.0, 0.2, "tensor"), x)
    assert band_trim_(torch.tensor([1.0, 5.0, 2.0, 3.0, 4.0]), 1.0, 0.2).tolist() == [
        1.0, 0.0, 2.0, 3.0, 4.0]


def test_breadcrumbs_merge(run):
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    t1 = torch.tensor([10.0, 2.0, 1.0, 0.5])   # band (top 1 removed, keep 2): [0, 2, 1, 0]
    t2 = torch.tensor([0.25, -3.0, -1.0, 6.0])  # band: [0, -3, -1, 0]
    out = run("breadcrumbs", base, [base + t1, base + t2], density=0.5, gamma=0.25,
              weight=[1.0, 2.0], **{"lambda": 0.5})
    want = base + 0.5 * (torch.tensor([0.0, 2.0, 1.0, 0.0]) + 2 * torch.tensor([0.0, -3, -1, 0]))
    assert torch.allclose(out, want)


def test_breadcrumbs_ties_merge(run):
    base = torch.zeros(4)
    t1 = torch.tensor([10.0, 2.0, 1.0, 0.5])   # band [0, 2, 1, 0]
    t2 = torch.tensor([0.25, -3.0, -1.5, 6.0])  # band [0, -3, -1.5, 0]
    # sums [0, -1, -0.5, 0] -> signs [maj, -, -, maj]; normalize false: agreeing sums
    out = run("breadcrumbs_ties", base, [t1, t2], density=0.5, gamma=0.25)
    assert out.tolist() == [0.0, -3.0, -1.5, 0.0]


def test_breadcrumbs_rescale_restores_the_l1_norm(run):
    t = torch.tensor([10.0, 2.0, 1.0, 0.5])  # band [0, 2, 1, 0]: L1 3 of 13.5
    out = run("breadcrumbs", torch.zeros(4), [t], density=0.5, gamma=0.25, rescale=True)
    assert torch.allclose(out, torch.tensor([0.0, 2.0, 1.0, 0.0]) * 4.5)
