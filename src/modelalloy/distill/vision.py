"""Distillation merging on tiny-vision: one body trained to match every expert through the
frozen head of that expert's task.

The suite's experts share the base's architecture (a conv body) and each task has a fixed
classification head. For unlabeled images x of task k (the suite's training digits under the
task's transform; their labels are never read), teacher k gives logits z_k = head_k(f_k(x)) and
the student body f_s gives z_s = head_k(f_s(x)); the loss is the language path's, with the
teacher's prediction as the gold label::

    L = λ · CE(argmax z_k, softmax(z_s)) + (1 − λ) · KL(softmax(z_k / T) ‖ softmax(z_s / T)) · T²
        [+ β · ‖f_s(x) − f_k(x)‖² / d]

summed over the tasks of a step (one batch of each). The teachers are fixed, so their logits
and features are computed once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from modelalloy.distill.errors import DistillError
from modelalloy.distill.loss import feature_loss, kl_to_target
from modelalloy.distill.train import DistillConfig

Images = dict[str, torch.Tensor]


def suite_images(suite: Any, tasks: list[str], n_per_task: int) -> Images:
    """Unlabeled images of each task: the suite's training digits (never its val/test split)
    under the task's transform, as the experts were fine-tuned on (labels dropped)."""
    from modelalloy.bench import vision

    cfg = suite.info.config
    all_tasks = cfg["tasks"] + cfg["held_out"]
    digits = vision._digits(cfg["seed"], cfg["eval_per_task"], cfg["val_per_task"])["train"][0]
    out = {}
    for task in tasks:
        if task not in all_tasks:
            raise DistillError(f"distill: '{task}' is not a tiny-vision task ({all_tasks})")
        i = all_tasks.index(task)
        x = vision.apply_task(task, digits[:n_per_task], (cfg["seed"] * 1000 + i) * 10,
                              cfg.get("canvas", 8), vision.POSITIONS[i])
        out[task] = x
    return out


@torch.no_grad()
def teacher_outputs(suite: Any, teachers: Mapping[str, Mapping[str, torch.Tensor]],
                    images: Images) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{task: (teacher logits through the task's head, teacher features)}."""
    out = {}
    for task, sd in teachers.items():
        body = suite.new_model()
        body.load_state_dict(dict(sd))
        feats = body(images[task])
        out[task] = (suite.head(task)(feats), feats)
    return out


def distill_vision(suite: Any, student: Mapping[str, torch.Tensor],
                   teachers: Mapping[str, Mapping[str, torch.Tensor]], images: Images,
                   cfg: DistillConfig, log: Callable[[str], None] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train a body from ``student`` to match each teacher (keyed by its task); returns the
    student's state dict and a report (KL before and after, history, seconds)."""
    log = log or (lambda _m: None)
    if not teachers:
        raise DistillError("distill: no teachers")
    missing = [t for t in teachers if t not in images]
    if missing:
        raise DistillError(f"distill: no images for the teachers of {missing}")
    start = time.perf_counter()
    targets = teacher_outputs(suite, teachers, images)
    label_s = time.perf_counter() - start
    body = suite.new_model()
    body.load_state_dict(dict(student))
    heads = {t: suite.head(t) for t in teachers}
    for head in heads.values():
        head.requires_grad_(False)

    def task_loss(task: str, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        t_logits, t_feats = targets[task][0][idx], targets[task][1][idx]
        feats = body(images[task][idx])
        z = heads[task](feats)
        kl = kl_to_target(F.softmax(t_logits / cfg.temperature, -1), z, cfg.temperature)
        loss = cfg.lam * F.cross_entropy(z, t_logits.argmax(-1)) + (1 - cfg.lam) * kl
        if cfg.feature_weight > 0:
            loss = loss + cfg.feature_weight * feature_loss(feats, t_feats)
        return loss, float(kl.detach())

    def mean_kl() -> float:
        with torch.no_grad():
            body.eval()
            return sum(task_loss(t, torch.arange(len(images[t])))[1]
                       for t in teachers) / len(teachers)

    kl_before = mean_kl()
    opt = torch.optim.Adam(body.parameters(), lr=cfg.lr)
    history = []
    start = time.perf_counter()
    body.train()
    for step in range(1, cfg.steps + 1):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        total, kls = torch.zeros(()), 0.0
        for task in teachers:
            idx = torch.randint(len(images[task]), (min(cfg.batch, len(images[task])),),
                                generator=gen)
            loss, kl = task_loss(task, idx)
            total, kls = total + loss, kls + kl
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        history.append({"step": step, "loss": round(float(total.detach()), 5),
                        "kl": round(kls / len(teachers), 5)})
        if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps:
            log(f"distill: step {step}/{cfg.steps} loss {float(total.detach()):.4f} "
                f"(KL {kls / len(teachers):.4f}) {time.perf_counter() - start:.1f}s")
    train_s = time.perf_counter() - start
    kl_after = mean_kl()
    report = {"teachers": list(teachers), "examples": sum(len(images[t]) for t in teachers),
              "kl_before": kl_before, "kl_after": kl_after,
              "label_seconds": round(label_s, 2), "train_seconds": round(train_s, 2),
              "history": history[-10:]}
    return {k: v.detach().clone() for k, v in body.state_dict().items()}, report
