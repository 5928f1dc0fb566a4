"""Teacher targets: each example tokenised by every teacher, aligned, fused, stored once.

The teachers are fixed, so their fused distributions are computed once before training
(one teacher-forced pass of each teacher over the data, as the spec's cost note says).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelalloy.distill.align import aligned_positions, to_student_vocab, vocab_map
from modelalloy.distill.errors import DistillError
from modelalloy.distill.loss import fusion_weights


@dataclass
class Teacher:
    name: str
    model: nn.Module
    tokenizer: Any


@dataclass(frozen=True)
class Example:
    """A text; the CE applies to tokens starting at or after character ``loss_start``."""

    text: str
    loss_start: int = 0


@dataclass
class Target:
    """One example for the student: its ids, gold positions and the fused teacher target."""

    ids: torch.Tensor  # (T,)
    gold_pos: torch.Tensor  # positions i whose next token ids[i+1] is trained with CE
    kl_pos: torch.Tensor  # positions with a fused teacher target
    probs: torch.Tensor  # (len(kl_pos), V_s)
    weights: list[float]  # the fusion weight of each teacher on this example


def encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _vocab_size(model: nn.Module, tokenizer: Any) -> int:
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if out is not None:
        return int(out.weight.shape[0])
    return len(tokenizer.get_vocab())


@torch.no_grad()
def build_targets(examples: Sequence[Example], student_tokenizer: Any,
                  student_vocab_size: int, teachers: Sequence[Teacher], *,
                  fusion: str = "min_ce", temperature: float = 1.0,
                  log: Callable[[str], None] | None = None) -> list[Target]:
    """Fused teacher targets for every example (see modelalloy.distill.loss)."""
    log = log or (lambda _m: None)
    if not teachers:
        raise DistillError("distill: no teachers")
    fusion_weights([1.0], fusion)  # checks the rule name
    s_vocab = student_tokenizer.get_vocab()
    maps = [vocab_map(t.tokenizer.get_vocab(), s_vocab, _vocab_size(t.model, t.tokenizer),
                      where=f"teacher '{t.name}'") for t in teachers]
    for t, m in zip(teachers, maps, strict=True):
        t.model.eval()
        log(f"distill: teacher '{t.name}': {int((m >= 0).sum())}/{len(m)} tokens map to the "
            "student's vocabulary")
    out = []
    for ex in examples:
        ids, offsets = encode(student_tokenizer, ex.text)
        if len(ids) < 2:
            continue
        gold_pos = [i for i in range(len(ids) - 1) if offsets[i + 1][0] >= ex.loss_start]
        per_teacher: list[dict[int, torch.Tensor]] = []
        ces: list[float] = []
        for t, mapping in zip(teachers, maps, strict=True):
            t_ids, t_off = encode(t.tokenizer, ex.text)
            pairs = aligned_positions(offsets, t_off, t_ids, t.tokenizer.unk_token_id) \
                if t_ids else []
            if not pairs:
                per_teacher.append({})
                ces.append(float("inf"))
                continue
            logits = t.model(input_ids=torch.tensor([t_ids])).logits[0].float()
            rows = torch.tensor([j for _, j in pairs])
            probs = to_student_vocab(torch.softmax(logits[rows] / temperature, -1), mapping,
                                     student_vocab_size)
            plain = probs if temperature == 1.0 else to_student_vocab(
                torch.softmax(logits[rows], -1), mapping, student_vocab_size)
            at = {i: k for k, (i, _) in enumerate(pairs)}
            gold_rows = [(at[i], ids[i + 1]) for i in gold_pos if i in at]
            ce = float("inf")
            if gold_rows:
                p = torch.stack([plain[r, g] for r, g in gold_rows])
                ce = float(-p.clamp_min(1e-12).log().mean())
            ces.append(ce)
            per_teacher.append({i: probs[k] for i, k in at.items()})
        weights = fusion_weights(ces, fusion)
        kl_pos, rows_out = [], []
        for i in range(len(ids) - 1):
            have = [(w, d[i]) for w, d in zip(weights, per_teacher, strict=True)
                    if w > 0 and i in d]
            if not have:
                continue
            total = sum(w for w, _ in have)
            kl_pos.append(i)
            rows_out.append(sum(w * p for w, p in have) / total)
        out.append(Target(ids=torch.tensor(ids), gold_pos=torch.tensor(gold_pos, dtype=torch.long),
                          kl_pos=torch.tensor(kl_pos, dtype=torch.long),
                          probs=torch.stack(rows_out) if rows_out else
                          torch.zeros(0, student_vocab_size), weights=weights))
    if not out:
        raise DistillError("distill: no example of the data has two or more student tokens")
    return out
