"""kernels.slices.warm compiles a plan's kernels before a budgeted merge measures its
baseline (engine.run._load_kernels): every kernel the merge will call has its signature."""

from __future__ import annotations

import pytest
import torch

from modelalloy.kernels import bands, elementwise, rowwise, slices
from modelalloy.methods.registry import get_method

CASES = [
    ("dare_ties", {"density": 0.2}, [elementwise.dare_l1_kernel, elementwise.dare_ties_kernel]),
    ("ties", {"density": 0.2}, [elementwise.ties_count_kernel, elementwise.ties_collect_kernel,
                                elementwise.ties_kernel]),
    ("breadcrumbs_ties", {"density": 0.2, "granularity": "row"}, [rowwise.band_ties_kernel]),
    ("breadcrumbs_ties", {"density": 0.2}, [elementwise.ties_count_kernel,
                                            bands.band_collect_kernel,
                                            bands.band_ties_tensor_kernel]),
    ("breadcrumbs", {"density": 0.2}, [bands.band_sum_tensor_kernel]),
]


@pytest.mark.parametrize(("name", "given", "compiled"), CASES)
def test_warm_compiles_the_kernels_and_their_passes(name, given, compiled):
    spec = get_method(name)
    params = spec.resolve(3, given, name)
    kernel = spec.execution.kernel_for(params)
    assert kernel is not None
    slices.warm(kernel, params, 4, torch.bfloat16, torch.bfloat16)
    for function in compiled:
        assert any(str(sig[0].dtype) == "uint16" for sig in function.signatures), function


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "dare_linear", "breadcrumbs",
                                  "model_stock", "della", "della_linear"])
def test_warm_runs_every_kernel_on_its_tiny_rows(name):
    spec = get_method(name)
    given = {"density": 0.5} if any(p.name == "density" for p in spec.params) else {}
    params = spec.resolve(3, given, name, conventions="paper")
    kernel = spec.execution.kernel_for(params)
    assert kernel is not None
    slices.warm(kernel, params, 4, torch.bfloat16, torch.float32)
