"""Aligning teachers that do not share the student's tokenizer (heterogeneous merging).

Two alignments, exact-match by default (FuseLLM / "Unconstrained Model Merging" style), each
with a minimum-edit-distance fallback (``alignment="edit"``, FuseLLM's rule for what exact match
leaves; needs the ``distill`` extra, rapidfuzz):

* **vocabulary**: a teacher token maps to the student token with the same string
  (``get_vocab()`` keys); a teacher token with no such student token has no image, and the
  probability mass the teacher puts on it is dropped (the rest is renormalised). A teacher that
  shares no token at all with the student cannot be distilled and is refused.
* **positions**: both tokenise the same text (with character offsets). Student position i
  predicts the token covering characters [a, b); a teacher position j is aligned with it when
  the teacher's next token covers exactly [a, b) too (same context, same prediction target).
  Positions with no such teacher token get no target from that teacher (fallback: CE only).
  By default we leave them out rather than guess, which is exact for character-level and
  shared-prefix tokenizers.

The edit fallback (:func:`edit_vocab_map`, :func:`edit_aligned_positions`):

* a teacher token with no exact student string maps to the student token at the smallest
  Levenshtein distance d(s, t) = min #insertions + deletions + substitutions turning s into t
  (ties: the lowest student id), so no teacher mass is dropped;
* the two token sequences (their surface strings, cut from the text by the offsets) are aligned
  by a minimum-edit-distance alignment whose units are whole tokens; tokens matched as equal or
  substituted one-for-one are aligned, and the student position before each aligned student
  token takes the teacher's distribution at the position before its partner. Where a run of
  k student tokens is replaced by a run of l ≠ k teacher tokens, the first min(k, l) are paired
  in order (FuseLLM's dynamic-time-warping alignment pairs them many-to-one; we keep pairs
  one-to-one so each student position gets at most one distribution per teacher).
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


def _rapidfuzz() -> object:
    try:
        import rapidfuzz
    except ImportError:
        raise DistillError("the edit-distance alignment needs rapidfuzz: "
                           "pip install 'modelalloy[distill]'") from None
    return rapidfuzz


def edit_vocab_map(teacher_vocab: Mapping[str, int], student_vocab: Mapping[str, int],
                   teacher_size: int) -> torch.Tensor:
    """:func:`vocab_map` with every unmatched teacher token sent to the student token at the
    smallest Levenshtein distance (ties: the lowest student id)."""
    _rapidfuzz()
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    out = torch.full((teacher_size,), -1, dtype=torch.long)
    for token, tid in teacher_vocab.items():
        sid = student_vocab.get(token)
        if sid is not None and 0 <= tid < teacher_size:
            out[tid] = sid
    left = [(t, i) for t, i in teacher_vocab.items() if 0 <= i < teacher_size and out[i] < 0]
    if left and student_vocab:
        order = sorted(student_vocab.items(), key=lambda kv: kv[1])
        names = [t for t, _ in order]
        dist = cdist([t for t, _ in left], names, scorer=Levenshtein.distance, workers=1)
        best = dist.argmin(axis=1)  # the first minimum: the lowest student id
        for (_, tid), j in zip(left, best, strict=True):
            out[tid] = order[int(j)][1]
    return out


def edit_aligned_positions(student_tokens: Sequence[str], teacher_tokens: Sequence[str]
                           ) -> list[tuple[int, int]]:
    """[(i, j)]: student position i and teacher position j predict tokens that a minimum edit
    distance alignment of the two token sequences pairs (equal or substituted)."""
    _rapidfuzz()
    from rapidfuzz.distance import Levenshtein

    pairs = []
    for tag, a0, a1, b0, b1 in Levenshtein.opcodes(list(student_tokens), list(teacher_tokens)):
        if tag not in ("equal", "replace"):
            continue
        for a, b in zip(range(a0, a1), range(b0, b1), strict=False):
            if a >= 1 and b >= 1:
                pairs.append((a - 1, b - 1))
    return pairs


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
