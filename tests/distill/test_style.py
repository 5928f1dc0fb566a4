"""DMM's style-promptable student: one learned style vector per teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from modelalloy.distill.errors import DistillError  # noqa: E402
from modelalloy.distill.style import (  # noqa: E402
    StyleStudent,
    load_style_student,
    save_styles,
    style_kl,
    train_style_student,
)
from modelalloy.distill.targets import Target  # noqa: E402
from modelalloy.distill.train import DistillConfig  # noqa: E402


def _lm(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=8,
                                      n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)).eval()


def _targets(rule: int, n: int = 8) -> list[Target]:
    """Teacher ``rule``'s target: the next token is (token + rule) mod 8, with certainty."""
    gen = torch.Generator().manual_seed(rule)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 8, (6,), generator=gen)
        pos = torch.arange(5)
        probs = torch.zeros(5, 8)
        probs[pos, (ids[:5] + rule) % 8] = 1.0
        out.append(Target(ids=ids, gold_pos=pos, kl_pos=pos, probs=probs, weights=[1.0]))
    return out


def test_zero_styles_leave_the_model_unchanged():
    lm = _lm()
    student = StyleStudent(lm, ["a", "b"])
    ids = torch.randint(0, 8, (2, 5))
    want = lm(input_ids=ids).logits
    got = student.styled("b")(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        student.styles[1] = 1.0
    # the style vector is added to every position's input embedding
    emb = lm.get_input_embeddings()(ids) + 1.0
    torch.testing.assert_close(student.styled(1)(input_ids=ids).logits,
                               lm(inputs_embeds=emb).logits)
    with pytest.raises(DistillError, match="no style 'c'"):
        student.styled("c")


def test_each_style_reproduces_its_own_teacher(one_thread):
    # two teachers that disagree everywhere (next = token + 1 vs token + 3): a student without
    # styles cannot match both; with them, row k of the KL matrix is smallest at style k
    per_teacher = [_targets(1), _targets(3)]
    student = StyleStudent(_lm(), ["plus1", "plus3"])
    cfg = DistillConfig(steps=150, lr=1e-2, batch=8, lam=0.0)
    train_style_student(student, per_teacher, cfg)
    kl = style_kl(student, per_teacher, cfg)
    assert kl[0][0] < 0.5 * kl[0][1] and kl[1][1] < 0.5 * kl[1][0]
    assert kl[0][0] < 0.3 and kl[1][1] < 0.3


def test_styles_round_trip_and_bad_folders_are_refused(tmp_path: Path):
    from modelalloy.bench.lm import save_tokenizer

    lm = _lm()
    student = StyleStudent(lm, ["x", "y"])
    with torch.no_grad():
        student.styles.normal_()
    lm.save_pretrained(str(tmp_path), safe_serialization=True)
    save_tokenizer(tmp_path)
    with pytest.raises(DistillError, match="not a style student"):
        load_style_student(tmp_path)
    save_styles(tmp_path, student)
    back, _tok = load_style_student(tmp_path)
    assert back.names == ["x", "y"]
    torch.testing.assert_close(back.styles, student.styles)
    (tmp_path / "styles.json").write_text(json.dumps(["x"]))
    with pytest.raises(DistillError, match="do not match"):
        load_style_student(tmp_path)


@pytest.mark.slow
def test_distill_styles_on_the_lm_suite(lm_smoke, run_cli, one_thread, tmp_path: Path):
    from modelalloy.distill.style import style_accuracy
    from tests.conftest import write_recipe

    info = lm_smoke.info
    models = "".join(f"  - model: {info.expert_dir(t)}\n" for t in info.merged_tasks)
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\n"
                          f"base_model: {info.base_dir}\nmodels:\n{models}"
                          "parameters:\n  lambda: 0.3\n")
    out = tmp_path / "student"
    res = run_cli("distill", recipe, "--data", "suite:tiny-lm:smoke", "--out", out, "--styles",
                  "--steps", "10", "--per-task", "4", "--batch", "4", "--lr", "3e-3",
                  "--threads", "1")
    assert res.code == 0, res.err
    report = json.loads((out / "distill.json").read_text())
    assert report["styles"] == info.merged_tasks
    assert report["kl_after"] < report["kl_before"]
    student, _ = load_style_student(out)
    acc = style_accuracy(lm_smoke, student, split="val")
    assert set(acc) == set(info.merged_tasks)
