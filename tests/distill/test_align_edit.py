"""The minimum-edit-distance alignment fallback for heterogeneous tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("rapidfuzz")

from modelalloy.distill.align import edit_aligned_positions, edit_vocab_map  # noqa: E402
from modelalloy.distill.errors import DistillError  # noqa: E402


def test_unmatched_tokens_go_to_the_nearest_student_token():
    teacher = {"ab": 0, "cd": 1, "zz": 2, "qqqq": 3}
    student = {"ab": 0, "cx": 1, "z": 2, "q": 3}
    # d(cd, ab)=2, d(cd, cx)=1, d(cd, z)=2, d(cd, q)=2 -> cx; d(zz, z)=1 is the minimum -> z;
    # d(qqqq, q)=3 against 4 for the others -> q; exact matches stay exact
    assert edit_vocab_map(teacher, student, 4).tolist() == [0, 1, 2, 3]
    # a tie (d(x, a) = d(x, b) = 1) goes to the lowest student id
    assert edit_vocab_map({"x": 0}, {"b": 5, "a": 2}, 1).tolist() == [2]


def test_token_sequences_align_through_an_insertion_and_a_substitution():
    # one inserted teacher token: a b c / a Q b c -> tokens (0,0), (1,2), (2,3)
    assert edit_aligned_positions(list("abc"), ["a", "Q", "b", "c"]) == [(0, 1), (1, 2)]
    # one substituted token keeps the one-for-one pairing: tokens (k, k) for k = 0..3
    assert edit_aligned_positions(list("abcd"), list("aXcd")) == [(0, 0), (1, 1), (2, 2)]


def _bigram_teacher(tmp_path: Path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "ab": 1, ":c": 2, "d=": 3, "dc": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(".."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=16, n_embd=8,
                                       n_layer=1, n_head=2)).eval()
    return model, fast


def test_edit_alignment_gives_targets_where_exact_match_gives_none(tmp_path: Path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from modelalloy.bench.lm import STOI, VOCAB, save_tokenizer
    from modelalloy.distill.targets import Example, Teacher, build_targets

    save_tokenizer(tmp_path)
    student_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    teacher = Teacher("bigrams", *_bigram_teacher(tmp_path))
    ex = [Example("ab:cd=dc", 0)]
    # no bigram is a student character: exact alignment refuses the teacher in one line
    with pytest.raises(DistillError, match="shares no token"):
        build_targets(ex, student_tok, len(VOCAB), [teacher])
    got = build_targets(ex, student_tok, len(VOCAB), [teacher], alignment="edit")[0]
    assert len(got.kl_pos) > 0
    torch.testing.assert_close(got.probs.sum(-1), torch.ones(len(got.kl_pos)))
    # "ab" is one edit from both "a" and "b": its mass lands on the lower student id
    mapping = edit_vocab_map(teacher.tokenizer.get_vocab(), student_tok.get_vocab(), 5)
    assert int(mapping[1]) == min(STOI["a"], STOI["b"])
    with pytest.raises(DistillError, match="alignment must be one of"):
        build_targets(ex, student_tok, len(VOCAB), [teacher], alignment="fuzzy")
