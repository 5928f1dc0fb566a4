"""The CUDA path: a clean error without a GPU; the same numbers as the CPU with one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from modelalloy import merge
from tests.conftest import write_recipe

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def ties_recipe(tmp_path, base, experts):
    return write_recipe(tmp_path / "r.yaml",
                        f"merge_method: dare_ties\nbase_model: {base}\nseed: 3\n"
                        "parameters: {density: 0.4}\nmodels:\n"
                        + "".join(f"  - model: {e}\n" for e in experts))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_a_clean_error(gpt2_family, tmp_path, run_cli):
    base, experts = gpt2_family
    result = run_cli("merge", ties_recipe(tmp_path, base, experts), tmp_path / "out",
                     "--device", "cuda")
    assert result.code != 0 and "CUDA is not available" in result.err
    assert "Traceback" not in result.err and not (tmp_path / "out").exists()


@pytest.mark.gpu
@needs_cuda
def test_cuda_matches_cpu_within_float_tolerance(gpt2_family, tmp_path):
    base, experts = gpt2_family
    recipe = ties_recipe(tmp_path, base, experts)
    cpu = load_file(merge(recipe, tmp_path / "cpu").path / "model.safetensors")
    gpu = load_file(merge(recipe, tmp_path / "gpu", device="cuda").path / "model.safetensors")
    for name, t in cpu.items():
        torch.testing.assert_close(gpu[name], t, rtol=1e-5, atol=1e-6)
