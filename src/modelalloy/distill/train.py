"""Train the student on the fused teacher targets: progress, checkpoints, resume.

Batches are drawn with a generator seeded by (seed, step), so a resumed run draws exactly the
batches the uninterrupted run would have. A checkpoint folder holds ``student.safetensors``,
``optimizer.pt`` (tensors only, read back with ``weights_only=True``) and ``state.json``
(the step, the loss history and the settings it must resume with).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from modelalloy.distill.errors import DistillError
from modelalloy.distill.loss import distill_loss, feature_loss
from modelalloy.distill.targets import Target
from modelalloy.io.checkpoint import load_pickle, read_state_dict


@dataclass
class DistillConfig:
    steps: int = 200
    lr: float = 1e-3
    batch: int = 16
    lam: float = 0.9  # weight of the CE on gold tokens (FuseLLM's default 0.9)
    feature_weight: float = 0.0  # β of the hidden-feature term (0: logits only)
    temperature: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (1 is fastest for tiny models)
    alignment: str = "exact"  # heterogeneous tokenizers: "exact" or "edit" (edit fallback)
    styles: bool = False  # DMM: one style vector per teacher (modelalloy.distill.style)


def _batch(targets: Sequence[Target], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t.ids) for t in targets)
    ids = torch.full((len(targets), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(targets), width), dtype=torch.long)
    for i, t in enumerate(targets):
        ids[i, :len(t.ids)] = t.ids
        mask[i, :len(t.ids)] = 1
    return ids, mask


def batch_loss(student: nn.Module, targets: Sequence[Target], cfg: DistillConfig, pad_id: int
               ) -> tuple[torch.Tensor, float, float]:
    ids, mask = _batch(targets, pad_id)
    feats = cfg.feature_weight > 0
    res = student(input_ids=ids, attention_mask=mask, output_hidden_states=feats)
    logits = res.logits
    total, ces, kls = logits.sum() * 0, 0.0, 0.0
    for b, t in enumerate(targets):
        loss, ce, kl = distill_loss(logits[b], t.ids[t.gold_pos + 1], t.gold_pos, t.kl_pos,
                                    t.probs, cfg.lam, cfg.temperature)
        if feats and t.feats is not None and len(t.kl_pos):
            loss = loss + cfg.feature_weight * feature_loss(
                res.hidden_states[-1][b][t.kl_pos], t.feats)
        total = total + loss
        ces += float(ce.detach())
        kls += float(kl.detach())
    n = len(targets)
    return total / n, ces / n, kls / n


@torch.no_grad()
def mean_kl(student: nn.Module, targets: Sequence[Target], cfg: DistillConfig, pad_id: int,
            batch: int = 64) -> float:
    """Mean per-example KL(fused teachers ‖ student) over ``targets``."""
    student.eval()
    total = 0.0
    for start in range(0, len(targets), batch):
        chunk = targets[start:start + batch]
        total += batch_loss(student, chunk, cfg, pad_id)[2] * len(chunk)
    return total / len(targets)


def _save_checkpoint(folder: Path, student: nn.Module, opt: torch.optim.Optimizer, step: int,
                     cfg: DistillConfig, history: list[dict[str, float]]) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # cloned one by one: tied weights (lm_head / wte) become separate tensors safetensors takes
    save_file({k: v.detach().contiguous().clone() for k, v in student.state_dict().items()},
              str(tmp / "student.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": asdict(cfg),
                                                "history": history}, indent=1))
    if folder.exists():
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    os.replace(tmp, folder)


def _resume(folder: Path, student: nn.Module, opt: torch.optim.Optimizer, cfg: DistillConfig
            ) -> tuple[int, list[dict[str, float]]]:
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise DistillError(f"{folder}: no checkpoint to resume (state.json missing)")
    state = json.loads(state_path.read_text())
    free = ("steps", "checkpoint_every", "threads")  # may change between runs
    saved = {k: v for k, v in state["config"].items() if k not in free}
    now = {k: v for k, v in asdict(cfg).items() if k not in free}
    if saved != now:
        raise DistillError(f"{folder}: the checkpoint was made with {saved}, this run asks for "
                           f"{now}; resume with the same settings")
    missing, unexpected = student.load_state_dict(read_state_dict(folder / "student.safetensors"),
                                                  strict=False)
    if unexpected:
        raise DistillError(f"{folder}: the checkpoint does not fit the student")
    opt.load_state_dict(load_pickle(folder / "optimizer.pt"))
    del missing
    return int(state["step"]), list(state["history"])


def train_student(student: nn.Module, targets: Sequence[Target], cfg: DistillConfig, *,
                  pad_id: int = 0, checkpoint_dir: Path | None = None, resume: bool = False,
                  log: Callable[[str], None] | None = None) -> list[dict[str, float]]:
    """Adam on λ·CE + (1−λ)·KL for ``cfg.steps`` steps; returns the loss history."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(student, targets, cfg, pad_id, checkpoint_dir, resume, log)
    finally:
        torch.set_num_threads(threads)


def _train(student: nn.Module, targets: Sequence[Target], cfg: DistillConfig, pad_id: int,
           checkpoint_dir: Path | None, resume: bool, log: Callable[[str], None] | None
           ) -> list[dict[str, float]]:
    log = log or (lambda _m: None)
    if not targets:
        raise DistillError("distill: no training examples")
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    step, history = 0, []
    if resume:
        if checkpoint_dir is None:
            raise DistillError("distill: resume needs a checkpoint folder")
        step, history = _resume(checkpoint_dir, student, opt, cfg)
        log(f"distill: resumed at step {step}")
    start = time.perf_counter()
    student.train()
    while step < cfg.steps:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(targets), (min(cfg.batch, len(targets)),), generator=gen)
        loss, ce, kl = batch_loss(student, [targets[i] for i in idx.tolist()], cfg, pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        history.append({"step": step, "loss": round(float(loss.detach()), 5), "ce": round(ce, 5),
                        "kl": round(kl, 5)})
        if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps:
            log(f"distill: step {step}/{cfg.steps} loss {float(loss.detach()):.4f} (CE {ce:.4f}, "
                f"KL {kl:.4f}) {time.perf_counter() - start:.1f}s")
        if checkpoint_dir is not None and cfg.checkpoint_every and (
                step % cfg.checkpoint_every == 0 or step == cfg.steps):
            _save_checkpoint(checkpoint_dir, student, opt, step, cfg, history)
    student.eval()
    return history
