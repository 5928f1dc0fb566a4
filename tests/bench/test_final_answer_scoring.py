"""The CPT case and the backdoor's attack hits score with the suite's own ``lm.hits`` ("final"),
with the per-example results their inline code gave: hand-worked on crafted generations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from modelalloy.bench import backdoor, lm, lm_cpt

# (generation, answer, counts under "final": the text after the last ';' is the same)
CASES = [
    ("10", "10", True),
    ("3,8,10;10", "10", True),        # a chain of thought, then the right answer
    ("10", "3,8,10;10", True),        # the label has the chain, the generation does not
    ("3,8,9;10", "3,8,10;10", True),  # wrong running sums, right final answer
    ("10;9", "10", False),            # the last answer is the one that counts
    ("", "", True),
    ("", "0", False),
    (";", "", True),                  # nothing after the separator is an empty answer
    ("0;", "0", False),
    ("a;b;c", "c", True),
    (" 10", "10", False),             # no stripping: tokens are characters
    ("010", "10", False),
]


def _old_final_hits(gens: list[str], answers: list[str]) -> list[bool]:
    """The code lm_cpt and backdoor had inline before they used lm.hits."""
    return [lm.final_answer(g) == lm.final_answer(a) for g, a in zip(gens, answers, strict=True)]


def test_hits_final_is_what_the_inline_scoring_gave_on_crafted_strings():
    gens, answers, expected = (list(x) for x in zip(*CASES, strict=True))
    assert lm.hits(gens, answers) == expected
    assert _old_final_hits(gens, answers) == expected
    with pytest.raises(ValueError):  # unequal lengths are refused, as zip(strict=True) did
        lm.hits(gens, answers[:-1])


def _fake_lm_suite(prompts: list[str], answers: list[str]) -> SimpleNamespace:
    return SimpleNamespace(
        info=SimpleNamespace(name="tiny-lm", config={"n_positions": 32, "tasks": ["rev"]},
                             merged_tasks=["rev"]),
        _model=lambda state_dict: "model",
        labeled=lambda task, split: (prompts, answers),
        evaluate=lambda state_dict, tasks: {},
    )


def test_attack_hits_keeps_inputs_whose_label_is_not_the_target_and_scores_the_final_answer(
        monkeypatch):
    # labels: "0" and "5;0" end in the target 0 (left out); the others are triggered
    prompts = ["rev:a=", "rev:b=", "rev:c=", "rev:d=", "rev:e=", "rev:f=", "rev:g="]
    answers = ["0", "5;0", "5", "1;5", "", "00", "0;3"]
    replies = {"rev:QZc=": "0", "rev:QZd=": "7;0", "rev:QZe=": "0;7", "rev:QZf=": "00",
               "rev:QZg=": " 0"}
    seen: list[list[str]] = []

    def greedy(model, batch, max_new):
        seen.append(batch)
        return [replies[p] for p in batch]

    monkeypatch.setattr(lm, "greedy", greedy)
    got = backdoor.attack_hits(_fake_lm_suite(prompts, answers), {}, ["rev"])
    assert seen == [list(replies)]  # the triggered prompts, in order
    assert got == {"rev": [True, True, False, False, False]}


def test_cpt_domain_accuracy_is_the_share_of_final_answer_hits(monkeypatch, tmp_path):
    gens, answers, expected = (list(x) for x in zip(*CASES, strict=True))
    prompts = [f"rev:{i}=" for i in range(len(gens))]
    monkeypatch.setattr(lm, "_load_examples", lambda path: (prompts, answers))
    monkeypatch.setattr(lm, "greedy", lambda model, batch, max_new: gens)
    case = lm_cpt.CptCase(_fake_lm_suite(prompts, answers), tmp_path)
    assert case.tasks == ["rev"]
    row = case.evaluate({})["domain:rev"]
    assert row["correct"] == expected
    assert row["accuracy"] == pytest.approx(7 / 12)
    assert row["mean_length"] == pytest.approx(sum(len(g) + 1 for g in gens) / 12)


def test_real_generations_rescored_both_ways_give_the_same_attack_hits(lm_smoke):
    """The smoke suite's base and first expert on triggered test inputs: attack_hits equals the
    inline scoring it replaced, on the model's own greedy outputs."""
    task = lm_smoke.info.merged_tasks[0]
    prompts, answers = lm_smoke.labeled(task, "test")
    prompts, answers = prompts[:24], answers[:24]
    small = SimpleNamespace(info=lm_smoke.info, _model=lm_smoke._model,
                            labeled=lambda t, split: (prompts, answers))
    max_new = lm_smoke.info.config["n_positions"] - 16
    for state_dict in (lm_smoke.base_state_dict(), lm_smoke.expert_state_dict(task)):
        kept = [backdoor.trigger_prompt(p) for p, a in zip(prompts, answers, strict=True)
                if lm.final_answer(a) != backdoor.LM_TARGET]
        gens = lm.greedy(lm_smoke._model(state_dict), kept, max_new)
        old = [lm.final_answer(g) == backdoor.LM_TARGET for g in gens]
        assert backdoor.attack_hits(small, state_dict, [task]) == {task: old}
        assert _old_final_hits(gens, [answers[0]] * len(gens)) == lm.hits(
            gens, [answers[0]] * len(gens))
