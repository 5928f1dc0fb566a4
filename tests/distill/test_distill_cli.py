"""`modelalloy distill` on the tiny-lm smoke suite: the student moves toward its teachers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_recipe


@pytest.mark.slow
def test_short_distillation_lowers_the_kl_and_writes_a_model(lm_smoke, run_cli,
                                                            tmp_path: Path):
    info = lm_smoke.info
    models = "".join(f"  - model: {info.expert_dir(t)}\n" for t in info.merged_tasks)
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\n"
                          f"base_model: {info.base_dir}\nmodels:\n{models}"
                          "parameters:\n  lambda: 0.3\n")
    out = tmp_path / "student"
    res = run_cli("distill", recipe, "--data", "suite:tiny-lm:smoke", "--out", out,
                  "--steps", "12", "--per-task", "6", "--batch", "8", "--lr", "3e-3",
                  "--threads", "1", "--checkpoint-every", "6", "--feature-weight", "0.1")
    assert res.code == 0, res.err
    report = json.loads((out / "distill.json").read_text())
    assert report["kl_after"] < report["kl_before"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "student.ckpt" / "state.json").read_text())["step"] == 12
    res = run_cli("eval", out, "--suite", "tiny-lm", "--size", "smoke")
    assert res.code == 0, res.err
    res = run_cli("distill", recipe, "--data", "suite:tiny-lm:smoke", "--out", out)
    assert res.code == 1 and "already exists" in res.err
