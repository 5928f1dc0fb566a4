"""DMM's style-promptable student (Song et al., 2025), adapted to causal language models.

DMM distils many style-specific teachers into one student conditioned on a learnable style
vector per teacher: for a sampled style s, the student given s is trained to match teacher s.
Here the student is a causal LM and the style vector v_s ∈ ℝ^d (d: the embedding width) is
added to the input embedding at every position (a learned one-vector prompt; DMM feeds its
style embedding into the denoiser, a language model's entry point is its input embeddings):

    h_0(x, s) = E[x_t] + p_t + v_s,    v_s initialised to 0 (the student starts unstyled)
    per step: s ~ Uniform{1..K};  loss = λ·CE(gold) + (1 − λ)·KL(P_{teacher s} ‖ P_student(·|s))

on teacher s's own (unfused) distributions, aligned to the student's tokens as in
:mod:`modelalloy.distill.targets`. DMM's feature-imitation and adversarial terms are not used
(the language suites score exact answers; the KL carries the style).

Output: the student as an HF folder plus ``styles.safetensors`` (the K × d vectors, key
``styles``) and ``styles.json`` (the teacher name of each row). :func:`load_style_student`
reads it back; :meth:`StyleStudent.styled` gives a module that runs with one style and the
plain model's call signature (``generate``-style decoding, the suites' greedy decoder).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from modelalloy.distill.errors import DistillError
from modelalloy.distill.targets import Target
from modelalloy.distill.train import DistillConfig, batch_loss
from modelalloy.io.checkpoint import read_state_dict

STYLES_FILE, NAMES_FILE = "styles.safetensors", "styles.json"


class StyleStudent(nn.Module):
    """A causal LM with one learned style vector per teacher added to its input embeddings."""

    def __init__(self, lm: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        if not names:
            raise DistillError("style student: no styles (teachers)")
        self.lm, self.names = lm, list(names)
        width = int(lm.get_input_embeddings().weight.shape[1])
        self.styles = nn.Parameter(torch.zeros(len(self.names), width))

    def index(self, name: str) -> int:
        if name not in self.names:
            raise DistillError(f"style student: no style '{name}' (styles: {self.names})")
        return self.names.index(name)

    def forward(self, input_ids: torch.Tensor, style: torch.Tensor, **kwargs: Any) -> Any:
        """``style``: (batch,) style indices."""
        embeds = self.lm.get_input_embeddings()(input_ids) + self.styles[style][:, None, :]
        return self.lm(inputs_embeds=embeds, **kwargs)

    def styled(self, style: int | str) -> nn.Module:
        """A module with the LM's call signature that always runs with ``style``."""
        return _Styled(self, self.index(style) if isinstance(style, str) else int(style))


class _Styled(nn.Module):
    def __init__(self, student: StyleStudent, style: int) -> None:
        super().__init__()
        self.student, self.style = student, style

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        style = torch.full((input_ids.shape[0],), self.style, dtype=torch.long)
        return self.student(input_ids, style, **kwargs)


def train_style_student(student: StyleStudent, per_teacher: Sequence[Sequence[Target]],
                        cfg: DistillConfig, *, pad_id: int = 0,
                        log: Callable[[str], None] | None = None) -> list[dict[str, float]]:
    """Adam on the student and its style vectors: each step draws a style s and a batch of
    teacher s's targets, and takes λ·CE + (1 − λ)·KL with the student run as style s."""
    log = log or (lambda _m: None)
    if len(per_teacher) != len(student.names):
        raise DistillError(f"style student: {len(student.names)} styles but targets of "
                           f"{len(per_teacher)} teachers")
    if any(not t for t in per_teacher):
        raise DistillError("style student: a teacher has no aligned targets")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    student.train()
    try:
        for step in range(1, cfg.steps + 1):
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            s = int(torch.randint(len(per_teacher), (1,), generator=gen))
            pool = per_teacher[s]
            idx = torch.randint(len(pool), (min(cfg.batch, len(pool)),), generator=gen)
            loss, ce, kl = batch_loss(student.styled(s), [pool[i] for i in idx.tolist()], cfg,
                                      pad_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"step": step, "style": s, "loss": round(float(loss.detach()), 5),
                            "ce": round(ce, 5), "kl": round(kl, 5)})
            if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps:
                log(f"distill: step {step}/{cfg.steps} style {student.names[s]} loss "
                    f"{float(loss.detach()):.4f} (KL {kl:.4f}) "
                    f"{time.perf_counter() - start:.1f}s")
    finally:
        torch.set_num_threads(threads)
        student.eval()
    return history


@torch.no_grad()
def style_kl(student: StyleStudent, per_teacher: Sequence[Sequence[Target]],
             cfg: DistillConfig, pad_id: int = 0, batch: int = 64) -> list[list[float]]:
    """M[k][s] = mean KL(teacher k ‖ student run as style s) over teacher k's targets: a
    style-promptable student has its smallest entry of row k at s = k."""
    student.eval()
    out = []
    for targets in per_teacher:
        row = []
        for s in range(len(student.names)):
            total = 0.0
            for i in range(0, len(targets), batch):
                chunk = list(targets[i:i + batch])
                total += batch_loss(student.styled(s), chunk, cfg, pad_id)[2] * len(chunk)
            row.append(round(total / len(targets), 5))
        out.append(row)
    return out


def save_styles(folder: Path, student: StyleStudent) -> None:
    save_file({"styles": student.styles.detach().contiguous().clone()},
              str(folder / STYLES_FILE))
    (folder / NAMES_FILE).write_text(json.dumps(student.names, indent=1))


def load_style_student(folder: str | Path) -> tuple[StyleStudent, Any]:
    """(the style student of a ``distill --styles`` folder, its tokenizer)."""
    from modelalloy.distill.models import load_model

    folder = Path(folder)
    for name in (STYLES_FILE, NAMES_FILE):
        if not (folder / name).is_file():
            raise DistillError(f"{folder}: not a style student ({name} missing)")
    lm, tok = load_model(folder)
    names = json.loads((folder / NAMES_FILE).read_text())
    styles = read_state_dict(folder / STYLES_FILE).get("styles")
    if not isinstance(names, list) or styles is None or styles.shape[0] != len(names):
        raise DistillError(f"{folder}: {STYLES_FILE} and {NAMES_FILE} do not match")
    student = StyleStudent(lm, [str(n) for n in names])
    if styles.shape != student.styles.shape:
        raise DistillError(f"{folder}: style vectors of width {styles.shape[1]}, the model's "
                           f"embeddings are {student.styles.shape[1]} wide")
    student.styles.data.copy_(styles)
    return student.eval(), tok


@torch.no_grad()
def style_accuracy(suite: Any, student: StyleStudent, tasks: Sequence[str] | None = None,
                   split: str = "test") -> dict[str, dict[str, float]]:
    """{style: {task: exact-match accuracy}} of a tiny-lm suite's tasks, the student run with
    each style in turn: a style-promptable student scores each task best under the style of
    that task's teacher."""
    from modelalloy.bench import lm

    if suite.info.name != "tiny-lm":
        raise DistillError(f"style student: suite accuracy is for tiny-lm, not {suite.info.name}")
    tasks = list(tasks or suite.info.merged_tasks)
    max_new = suite.info.config["n_positions"] - 16
    out: dict[str, dict[str, float]] = {}
    for name in student.names:
        model = student.styled(name)
        row = {}
        for task in tasks:
            prompts, answers = suite.labeled(task, split)
            gens = lm.greedy(model, prompts, max_new)
            row[task] = sum(lm.hits(gens, answers)) / len(answers)
        out[name] = row
    return out
