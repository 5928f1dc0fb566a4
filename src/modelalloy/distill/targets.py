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

from modelalloy.distill.align import (
    aligned_positions,
    edit_aligned_positions,
    edit_vocab_map,
    to_student_vocab,
    vocab_map,
)
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
    feats: torch.Tensor | None = None  # (len(kl_pos), d): fused teacher last hidden states


def encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _vocab_size(model: nn.Module, tokenizer: Any) -> int:
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if out is not None:
        return int(out.weight.shape[0])
    return len(tokenizer.get_vocab())


ALIGNMENTS = ("exact", "edit")


def _with_edit_pairs(pairs: list[tuple[int, int]], text: str,
                     offsets: Sequence[tuple[int, int]], t_off: Sequence[tuple[int, int]]
                     ) -> list[tuple[int, int]]:
    """The exact pairs, plus edit-distance pairs for the student positions they leave."""
    have = {i for i, _ in pairs}
    extra = edit_aligned_positions([text[a:b] for a, b in offsets],
                                   [text[a:b] for a, b in t_off])
    return sorted(pairs + [(i, j) for i, j in extra if i not in have])


@torch.no_grad()
def build_targets(examples: Sequence[Example], student_tokenizer: Any,
                  student_vocab_size: int, teachers: Sequence[Teacher], *,
                  fusion: str = "min_ce", temperature: float = 1.0,
                  student_width: int | None = None, alignment: str = "exact",
                  log: Callable[[str], None] | None = None) -> list[Target]:
    """Fused teacher targets for every example (see modelalloy.distill.loss); with
    ``student_width`` also the fused last hidden states (feature imitation), which needs
    every teacher to have that width. ``alignment``: "exact" (string match only) or "edit"
    (exact, then the minimum-edit-distance fallback; modelalloy.distill.align)."""
    log = log or (lambda _m: None)
    if not teachers:
        raise DistillError("distill: no teachers")
    fusion_weights([1.0], fusion)  # checks the rule name
    if alignment not in ALIGNMENTS:
        raise DistillError(f"distill: alignment must be one of {ALIGNMENTS}, not '{alignment}'")
    s_vocab = student_tokenizer.get_vocab()
    maps = [edit_vocab_map(t.tokenizer.get_vocab(), s_vocab, _vocab_size(t.model, t.tokenizer))
            if alignment == "edit" else
            vocab_map(t.tokenizer.get_vocab(), s_vocab, _vocab_size(t.model, t.tokenizer),
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
        feats_of: list[dict[int, torch.Tensor]] = []
        ces: list[float] = []
        for t, mapping in zip(teachers, maps, strict=True):
            t_ids, t_off = encode(t.tokenizer, ex.text)
            pairs = aligned_positions(offsets, t_off, t_ids, t.tokenizer.unk_token_id) \
                if t_ids else []
            if alignment == "edit" and t_ids:
                pairs = _with_edit_pairs(pairs, ex.text, offsets, t_off)
            if not pairs:
                per_teacher.append({})
                feats_of.append({})
                ces.append(float("inf"))
                continue
            res = t.model(input_ids=torch.tensor([t_ids]),
                          output_hidden_states=student_width is not None)
            logits = res.logits[0].float()
            if student_width is not None:
                hidden = res.hidden_states[-1][0].float()
                if hidden.shape[-1] != student_width:
                    raise DistillError(f"teacher '{t.name}': hidden width {hidden.shape[-1]}, "
                                       f"the student's is {student_width}; feature imitation "
                                       "needs equal widths (set the feature weight to 0)")
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
            feats_of.append({i: hidden[j] for i, j in pairs} if student_width is not None
                            else {})
        weights = fusion_weights(ces, fusion)
        kl_pos, rows_out, feat_rows = [], [], []
        for i in range(len(ids) - 1):
            have = [(w, d[i], f.get(i)) for w, d, f in zip(weights, per_teacher, feats_of,
                                                            strict=True) if w > 0 and i in d]
            if not have:
                continue
            total = sum(w for w, _, _ in have)
            kl_pos.append(i)
            rows_out.append(sum(w * p for w, p, _ in have) / total)
            if student_width is not None:
                feat_rows.append(sum(w * f for w, _, f in have) / total)
        out.append(Target(ids=torch.tensor(ids), gold_pos=torch.tensor(gold_pos, dtype=torch.long),
                          kl_pos=torch.tensor(kl_pos, dtype=torch.long),
                          probs=torch.stack(rows_out) if rows_out else
                          torch.zeros(0, student_vocab_size), weights=weights,
                          feats=(torch.stack(feat_rows) if feat_rows else
                                 torch.zeros(0, student_width))
                          if student_width is not None else None))
    if not out:
        raise DistillError("distill: no example of the data has two or more student tokens")
    return out
