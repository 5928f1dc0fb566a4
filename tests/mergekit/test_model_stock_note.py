"""Model Stock keeps t in [0, 1] where mergekit's formula leaves it; the merge summary says
where that changed the result."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from modelalloy import merge
from tests.conftest import write_recipe


def _folder(path, tensors):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_clamped_t_is_reported(tmp_path):
    base = _folder(tmp_path / "base", {"w": torch.zeros(2), "v": torch.zeros(2)})
    # w: deltas (1, 0) and (−1, 0.5): cos θ = −0.894, so mergekit's t = 2cos/(1 + cos) = −16.9;
    # v: deltas (1, 0) and (1, 1): cos θ = 0.707, t = 0.83 (no clamp)
    a = _folder(tmp_path / "a", {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([1.0, 0.0])})
    b = _folder(tmp_path / "b", {"w": torch.tensor([-1.0, 0.5]), "v": torch.tensor([1.0, 1.0])})
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: model_stock\nbase_model: {base}\n"
                                               f"models:\n  - model: {a}\n  - model: {b}\n")
    result = merge(recipe, tmp_path / "out")
    notes = [w for w in result.warnings if w.startswith("model_stock: t")]
    assert len(notes) == 1 and "(1 tensor(s), e.g. 'w')" in notes[0]


@pytest.mark.parametrize("method,conventions,noted", [
    ("model_stock", "", True), ("model_stock", "conventions: paper\n", False),
    ("task_arithmetic", "", False)])
def test_plan_says_where_model_stock_differs(tmp_path, run_cli, method, conventions, noted):
    """`modelalloy plan` says in one line that mergekit's t may leave [0, 1] (it reads no
    tensor, so it cannot say which)."""
    base = _folder(tmp_path / "base", {"w": torch.zeros(2)})
    a = _folder(tmp_path / "a", {"w": torch.tensor([1.0, 0.0])})
    b = _folder(tmp_path / "b", {"w": torch.tensor([-1.0, 0.5])})
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: {method}\nbase_model: {base}\n"
                                               f"models:\n  - model: {a}\n  - model: {b}\n"
                                               + conventions)
    planned = run_cli("plan", recipe)
    assert planned.code == 0, planned.err
    notes = [line for line in planned.err.splitlines() if line.startswith("note: ")]
    assert len(notes) == int(noted)
    if noted:
        assert "leaves [0, 1]" in notes[0] and "modelalloy keeps t in [0, 1]" in notes[0]
