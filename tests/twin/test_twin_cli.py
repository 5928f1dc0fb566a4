"""`modelalloy twin build` from a recipe and `modelalloy eval BUNDLE` on the smoke suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_recipe


@pytest.mark.slow
def test_build_then_eval_bundle_and_broken_bundle(vision_smoke, run_cli, tmp_path: Path):
    info = vision_smoke.info
    tasks = info.merged_tasks
    models = "".join(f"  - model: {info.expert_dir(t)}\n" for t in tasks)
    recipe = write_recipe(tmp_path / "twin.yaml", f"merge_method: task_arithmetic\n"
                          f"base_model: {info.base_dir}\nmodels:\n{models}"
                          "parameters:\n  lambda: 0.3\n")
    out = tmp_path / "bundle"
    res = run_cli("twin", "build", recipe, "--out", out, "--data", "suite:tiny-vision:smoke",
                  "--density", "0.25", "--router-batch", "32")
    assert res.code == 0, res.err
    assert (out / "twin.json").is_file() and (out / "shared" / "config.json").is_file()
    assert f"{len(tasks)} experts" in res.out
    res = run_cli("eval", out, "--suite", "tiny-vision", "--size", "smoke", "--routing", "top1")
    assert res.code == 0, res.err
    assert "mean accuracy (held-in)" in res.out
    (out / "router.safetensors").unlink()
    res = run_cli("eval", out, "--suite", "tiny-vision", "--size", "smoke")
    assert res.code == 1
    assert "router.safetensors' listed in twin.json is missing" in res.err
    assert len(res.err.strip().splitlines()) == 1
    res = run_cli("twin", "build", recipe, "--out", tmp_path / "b2", "--data",
                  "suite:tiny-vision:smoke", "--density", "0")
    assert res.code == 1 and "density must be in (0, 1]" in res.err
    assert not (tmp_path / "b2").exists()
