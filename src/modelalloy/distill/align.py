"""Aligning teachers that do not share the student's tokenizer (heterogeneous merging).

Two alignments, both exact-match (FuseLLM / "Unconstrained Model Merging" style):

* **vocabulary**: a teacher token maps to the student token with the same string
  (``get_vocab()`` keys); a teacher token with no such student token has no image, and the
  probability mass the teacher puts on it is dropped (the rest is renormalised). A teacher that
  shares no token at all with the student cannot be distilled and is refused.
* **positions**: both tokenise the same text (with character offsets). Student position i
  predicts the token covering characters [a, b); a teacher position j is aligned with it when
  the teacher's next token covers exactly [a, b) too (same context, same prediction target).
  Positions with no such teacher token get no target from that teacher (fallback: CE only).
  FuseLLM aligns the leftovers by minimum edit distance between token strings; we leave them
  out rather than guess, which is exact for character-level and shared-prefix tokenizers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from modelalloy.distill.errors import DistillError


def vocab_map(teacher_vocab: Mapping[str, int], student_vocab: Mapping[str, int],
              teacher_size: int, where: str = "teacher") -> torch.Tensor:
    """(teacher_size,) long tensor: the student id of each teacher id, −1 where none."""
    out = torch.full((teacher_size,), -1, dtype=torch.long)
    for token, tid in teacher_vocab.items():
        sid = student_vocab.get(token)
        if sid is not None and 0 <= tid < teacher_size:
            out[tid] = sid
    if not bool((out >= 0).any()):
        raise DistillError(f"{where}: shares no token with the student's vocabulary; exact-match "
                           "alignment is impossible (use a student with a related tokenizer)")
    return out


def aligned_positions(student_offsets: Sequence[tuple[int, int]],
                      teacher_offsets: Sequence[tuple[int, int]],
                      teacher_ids: Sequence[int] | None = None, unk_id: int | None = None
                      ) -> list[tuple[int, int]]:
    """[(i, j)]: student position i and teacher position j predict the same character span."""
    spans = {tuple(span): j for j, span in enumerate(teacher_offsets) if j >= 1}
    pairs = []
    for i in range(len(student_offsets) - 1):
        j1 = spans.get(tuple(student_offsets[i + 1]))
        if j1 is None:
            continue
        if unk_id is not None and teacher_ids is not None and teacher_ids[j1] == unk_id:
            continue  # the teacher cannot spell this token
        pairs.append((i, j1 - 1))
    return pairs


def to_student_vocab(probs: torch.Tensor, mapping: torch.Tensor, student_size: int
                     ) -> torch.Tensor:
    """Teacher distributions (n, V_t) -> student vocabulary (n, V_s), unmapped mass dropped
    and the rest renormalised."""
    keep = mapping >= 0
    out = torch.zeros(probs.shape[0], student_size, dtype=probs.dtype)
    out.index_add_(1, mapping[keep], probs[:, keep])
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12)
