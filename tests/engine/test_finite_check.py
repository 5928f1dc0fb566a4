"""The fast non-finite check agrees with isfinite().all() wherever the bad value sits."""

from __future__ import annotations

import pytest
import torch

from modelalloy.engine.execute import all_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 1, 4097, -1])
def test_any_single_bad_value_is_found(bad, where):
    x = torch.randn(3, 5000)
    x.view(-1)[where] = bad
    assert not all_finite(x)


def test_finite_tensors_pass_including_extremes():
    x = torch.tensor([torch.finfo(torch.float32).max, torch.finfo(torch.float32).min, 0.0])
    assert all_finite(x)  # a sum would overflow to inf here; min/max do not
    assert all_finite(torch.randn(1000))
    assert all_finite(torch.empty(0))
    assert all_finite(torch.tensor(2.5))
    assert not all_finite(torch.tensor(float("nan")))
