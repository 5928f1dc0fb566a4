"""kernels.slices.warm compiles a plan's kernels before a budgeted merge measures its
baseline (engine.run._load_kernels): every kernel the merge will call has its signature."""

from __future__ import annotations

import pytest
import torch

from modelalloy.kernels import elementwise, rowwise, slices
from modelalloy.methods.registry import get_method

CASES = [
    ("dare_ties", {"density": 0.2}, [elementwise.dare_l1_kernel, elementwise.dare_ties_kernel]),
    ("ties", {"density": 0.2}, [elementwise.ties_count_kernel, elementwise.ties_collect_kernel,
                                elementwise.ties_kernel]),
    ("breadcrumbs_ties", {"density": 0.2, "granularity": "row"}, [rowwise.band_ties_kernel]),
]


@pytest.mark.parametrize(("name", "given", "compiled"), CASES)
def test_warm_compiles_the_kernels_and_their_passes(name, given, compiled):
    spec = get_method(name)
    params = spec.resolve(3, given, name)
    kernel = spec.kernel_for(params)
    assert kernel is not None
    slices.warm(kernel, params, 4, torch.bfloat16, torch.bfloat16)
    for function in compiled:
        assert any(str(sig[0].dtype) == "uint16" for sig in function.signatures), function
