"""Distillation merging: KL and loss against hand-computed values, fusion, alignment, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from modelalloy.distill.align import aligned_positions, to_student_vocab, vocab_map
from modelalloy.distill.errors import DistillError
from modelalloy.distill.loss import distill_loss, fusion_weights, kl_to_target
from modelalloy.distill.targets import Target
from modelalloy.distill.train import DistillConfig, train_student


def test_kl_equals_the_hand_computed_value():
    target = torch.tensor([[0.75, 0.25]])
    # q = softmax([0, 0]) = [0.5, 0.5]
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812
    assert float(kl_to_target(target, torch.tensor([[0.0, 0.0]]))) == pytest.approx(expected,
                                                                                     abs=1e-6)
    # temperature 2: q = softmax([2, 0] / 2) and the KL is scaled by T² = 4
    q0 = math.e / (math.e + 1)
    expected_t = 4 * (0.75 * math.log(0.75 / q0) + 0.25 * math.log(0.25 / (1 - q0)))
    got = float(kl_to_target(target, torch.tensor([[2.0, 0.0]]), temperature=2.0))
    assert got == pytest.approx(expected_t, abs=1e-6)


def test_loss_is_lambda_ce_plus_one_minus_lambda_kl():
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    target = torch.tensor([[0.2, 0.3, 0.5]])
    loss, ce, kl = distill_loss(logits, gold=torch.tensor([1, 1]), gold_pos=torch.tensor([0, 1]),
                                kl_pos=torch.tensor([1]), target=target, lam=0.25)
    z0 = math.e + 2
    z1 = 2 + math.e ** 2
    ce_hand = (-math.log(1 / z0) - math.log(math.e ** 2 / z1)) / 2
    q = [1 / z1, math.e ** 2 / z1, 1 / z1]
    kl_hand = sum(p * math.log(p / qq) for p, qq in zip([0.2, 0.3, 0.5], q, strict=True))
    assert float(ce) == pytest.approx(ce_hand, abs=1e-6)
    assert float(kl) == pytest.approx(kl_hand, abs=1e-6)
    assert float(loss) == pytest.approx(0.25 * ce_hand + 0.75 * kl_hand, abs=1e-6)


def test_fusion_rules():
    assert fusion_weights([2.0, 0.5], "min_ce") == [0.0, 1.0]
    assert fusion_weights([2.0, 0.5], "inverse_ce") == pytest.approx([0.2, 0.8])
    assert fusion_weights([2.0, float("inf")], "mean") == [1.0, 0.0]
    with pytest.raises(DistillError, match="fusion must be one of"):
        fusion_weights([1.0], "max")


def test_teachers_sharing_no_tokens_are_refused_in_one_line():
    with pytest.raises(DistillError) as err:
        vocab_map({"<s>": 0, "x": 1}, {"<pad>": 0, "a": 1}, 2, where="teacher 'other'")
    assert "teacher 'other': shares no token with the student's vocabulary" in str(err.value)
    assert "\n" not in str(err.value)


def test_vocab_mapping_drops_and_renormalises_unmapped_mass():
    mapping = vocab_map({"a": 0, "#": 1, "b": 2}, {"b": 0, "a": 1}, 3)
    assert mapping.tolist() == [1, -1, 0]
    got = to_student_vocab(torch.tensor([[0.5, 0.3, 0.2]]), mapping, 2)
    assert got.tolist()[0] == pytest.approx([0.2 / 0.7, 0.5 / 0.7])


def test_positions_align_where_the_predicted_spans_agree():
    student = [(0, 1), (1, 2), (2, 3), (3, 4)]  # a b c d
    teacher = [(0, 2), (2, 3), (3, 4)]  # ab c d
    assert aligned_positions(student, teacher) == [(1, 0), (2, 1)]
    # a teacher position whose target is its unknown token gives no target
    assert aligned_positions(student, teacher, [5, 0, 7], unk_id=0) == [(2, 1)]


def _targets(n: int = 6, vocab: int = 64) -> list[Target]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (7,), generator=gen)
        probs = torch.softmax(torch.randn(6, vocab, generator=gen), -1)
        out.append(Target(ids=ids, gold_pos=torch.arange(3, 6), kl_pos=torch.arange(6),
                          probs=probs, weights=[1.0]))
    return out


def _student():
    from transformers import GPT2LMHeadModel

    from tests.conftest import tiny_gpt2_config

    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config())


def test_resume_continues_exactly_where_the_run_stopped(tmp_path: Path):
    pytest.importorskip("transformers")
    targets = _targets()
    straight = _student()
    train_student(straight, targets, DistillConfig(threads=1, steps=4, batch=3, checkpoint_every=0))
    resumed = _student()
    ckpt = tmp_path / "ckpt"
    train_student(resumed, targets, DistillConfig(threads=1, steps=2, batch=3, checkpoint_every=2),
                  checkpoint_dir=ckpt)
    again = _student()  # a fresh process: weights come from the checkpoint
    cfg = DistillConfig(threads=1, steps=4, batch=3, checkpoint_every=2)
    hist = train_student(again, targets, cfg, checkpoint_dir=ckpt, resume=True)
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    for (n, a), (_, b) in zip(straight.state_dict().items(), again.state_dict().items(),
                              strict=True):
        torch.testing.assert_close(a, b, msg=n)
    with pytest.raises(DistillError, match="made with"):
        train_student(_student(), targets, DistillConfig(threads=1, steps=5, batch=3, lr=0.5),
                      checkpoint_dir=ckpt, resume=True)


def test_feature_term_is_the_mean_squared_error():
    from modelalloy.distill.loss import feature_loss

    h = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # rows: (1 + 4) / 2 and (1 + 1) / 2, mean 1.75
    assert float(feature_loss(h, t)) == pytest.approx(1.75)


def test_feature_targets_need_teachers_of_the_students_width(tmp_path: Path):
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    from modelalloy.bench.lm import VOCAB, save_tokenizer
    from modelalloy.distill.targets import Example, Teacher, build_targets

    save_tokenizer(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=len(VOCAB), n_positions=16, n_embd=8,
                                         n_layer=1, n_head=2)).eval()
    ex = [Example("ab:cd=dc", 6)]
    got = build_targets(ex, tok, len(VOCAB), [Teacher("t", teacher, tok)], student_width=8)
    assert got[0].feats is not None and got[0].feats.shape == (len(got[0].kl_pos), 8)
    with pytest.raises(DistillError, match="hidden width 8, the student's is 16"):
        build_targets(ex, tok, len(VOCAB), [Teacher("t", teacher, tok)], student_width=16)
