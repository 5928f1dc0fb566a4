"""Distillation merging on tiny-vision: a body matched to each expert through its task head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modelalloy.distill.errors import DistillError
from modelalloy.distill.train import DistillConfig
from modelalloy.distill.vision import distill_vision, suite_images, teacher_outputs
from tests.conftest import write_recipe


def test_a_teacher_distilled_into_itself_has_zero_kl(vision_smoke, one_thread):
    task = vision_smoke.info.merged_tasks[0]
    expert = vision_smoke.expert_state_dict(task)
    images = suite_images(vision_smoke, [task], 32)
    _, report = distill_vision(vision_smoke, expert, {task: expert}, images,
                               DistillConfig(steps=0, lam=0.0))
    assert report["kl_before"] == pytest.approx(0.0, abs=1e-6)


def test_the_kl_is_the_teacher_to_student_divergence(vision_smoke, one_thread):
    s = vision_smoke
    task = s.info.merged_tasks[0]
    images = suite_images(s, [task], 16)
    base, expert = s.base_state_dict(), s.expert_state_dict(task)
    _, report = distill_vision(s, base, {task: expert}, images, DistillConfig(steps=0))
    # KL(p_teacher ‖ p_student) worked out directly from both bodies through the task head
    t_logits = teacher_outputs(s, {task: expert}, images)[task][0]
    body = s.new_model()
    body.load_state_dict(base)
    with torch.no_grad():
        z = s.head(task)(body(images[task]))
    p, logq = F.softmax(t_logits, -1), F.log_softmax(z, -1)
    want = float((p * (p.log() - logq)).sum(-1).mean())
    assert report["kl_before"] == pytest.approx(want, rel=1e-4)


def test_training_moves_the_base_toward_two_teachers(vision_smoke, one_thread):
    s = vision_smoke
    tasks = s.info.merged_tasks[:2]
    teachers = {t: s.expert_state_dict(t) for t in tasks}
    images = suite_images(s, tasks, 64)
    sd, report = distill_vision(s, s.base_state_dict(), teachers, images,
                                DistillConfig(steps=30, lr=3e-3, batch=32))
    assert report["kl_after"] < 0.7 * report["kl_before"]
    assert set(sd) == set(s.base_state_dict())
    with pytest.raises(DistillError, match="no images"):
        distill_vision(s, sd, teachers, {tasks[0]: images[tasks[0]]}, DistillConfig(steps=1))


@pytest.mark.slow
def test_distill_command_on_tiny_vision(vision_smoke, run_cli, one_thread, tmp_path: Path):
    info = vision_smoke.info
    models = "".join(f"  - model: {info.expert_dir(t)}\n" for t in info.merged_tasks)
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\n"
                          f"base_model: {info.base_dir}\nmodels:\n{models}"
                          "parameters:\n  lambda: 0.3\n")
    out = tmp_path / "student"
    res = run_cli("distill", recipe, "--data", "suite:tiny-vision:smoke", "--out", out,
                  "--steps", "20", "--per-task", "64", "--lr", "3e-3", "--threads", "1")
    assert res.code == 0, res.err
    report = json.loads((out / "distill.json").read_text())
    assert report["kl_after"] < report["kl_before"]
    assert report["teachers"] == info.merged_tasks
    res = run_cli("eval", out, "--suite", "tiny-vision", "--size", "smoke")
    assert res.code == 0, res.err
    res = run_cli("distill", recipe, "--data", "suite:tiny-vision:smoke", "--styles",
                  "--out", tmp_path / "s2")
    assert res.code == 1 and "(--styles) is for language models" in res.err
