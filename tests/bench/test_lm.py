import math

import pytest
import torch

from modelalloy.bench.common import SuiteError
from modelalloy.bench.lm import (
    ALPHABETS,
    SIZES,
    VOCAB,
    final_answer,
    hits,
    make_examples,
    task_letters,
)


def test_tasks_and_long_short_pair():
    (p, a), = make_examples("sum_long", 1, 0)
    (p2, a2), = make_examples("sum_short", 1, 0)
    assert p == p2 and p.startswith("sum:") and p.endswith("=")
    assert final_answer(a) == a2 == str(sum(map(int, p[4:-1])))
    assert len(a) > len(a2)
    assert make_examples("rev", 3, 0) == make_examples("rev", 3, 0)


def test_the_pair_is_scored_in_its_own_format_and_the_study_on_the_final_answer():
    long_answer, short_answer = "3,8,10;10", "10"
    gens = ["3,8,10;10", "10", "3,9,10;10", "9"]
    # exact: a direct answer never counts for sum_long, nor a running-sum one for sum_short
    assert hits(gens, [long_answer] * 4, "exact") == [True, False, False, False]
    assert hits(gens, [short_answer] * 4, "exact") == [False, True, False, False]
    # final: the answer after the running sums, whatever the format (wrong sums included)
    assert hits(gens, [long_answer] * 4) == [True, True, True, False]  # the suite's default
    assert hits(gens, [short_answer] * 4, "final") == [True, True, True, False]
    with pytest.raises(SuiteError, match="score 'loose'"):
        hits(gens, gens, "loose")


def test_sum_long_and_sum_short_columns_measure_different_things(lm_smoke, monkeypatch):
    """The pair shares its test prompts: scored on the final answer, the two columns were the
    same number for every model but the experts. Scored in each task's format they split one
    model's answers between them."""
    from modelalloy.bench import lm

    pair = ["sum_long", "sum_short"]
    prompts, long_answers = lm_smoke.labeled("sum_long", "test")
    assert lm_smoke.labeled("sum_short", "test")[0] == prompts
    base = lm_smoke.base_state_dict()
    # the real experts (weak on sums at smoke size): one answer counts for one format at most,
    # and only when its final answer is right; the final-answer hits are the same for both
    for expert in pair:
        exact = lm_smoke.evaluate(lm_smoke.expert_state_dict(expert), pair, score="exact")
        final = lm_smoke.evaluate(lm_smoke.expert_state_dict(expert), pair)
        assert final["sum_long"]["correct"] == final["sum_short"]["correct"]
        for long_hit, short_hit, final_hit in zip(exact["sum_long"]["correct"],
                                                  exact["sum_short"]["correct"],
                                                  final["sum_long"]["correct"], strict=True):
            assert not (long_hit and short_hit)
            assert final_hit or not (long_hit or short_hit)
    # a model that always answers right with its running sums: all of sum_long, none of
    # sum_short; right on every final answer
    answer_of = dict(zip(prompts, long_answers, strict=True))
    monkeypatch.setattr(lm, "greedy", lambda _model, ps, _max_new: [answer_of[p] for p in ps])
    exact = lm_smoke.evaluate(base, pair, score="exact")
    assert exact["sum_long"]["accuracy"] == 1.0 and exact["sum_short"]["accuracy"] == 0.0
    final = lm_smoke.evaluate(base, pair, score="final")
    assert final["sum_long"]["accuracy"] == final["sum_short"]["accuracy"] == 1.0
    # and one that answers right, directly: the other way round
    answer_of = {p: final_answer(a) for p, a in answer_of.items()}
    exact = lm_smoke.evaluate(base, pair, score="exact")
    assert exact["sum_long"]["accuracy"] == 0.0 and exact["sum_short"]["accuracy"] == 1.0


def test_merged_tasks_draw_inputs_from_their_own_alphabet():
    full = SIZES["full"]["tasks"]
    assert set(full) <= set(ALPHABETS)
    for t in full:
        letters = task_letters(t)
        for prompt, _ in make_examples(t, 50, 0):
            assert set(prompt.split(":", 1)[1][:-1]) <= set(letters)
    # neighbours share at most one letter; tasks further apart share none
    for i, a in enumerate(full):
        for b in full[i + 1:]:
            assert len(set(ALPHABETS[a]) & set(ALPHABETS[b])) <= 1
    (p, a), = make_examples("count", 1, 3)
    assert a == str(p[6:-1].count(ALPHABETS["count"][0]))


def test_docs_only_keeps_the_other_suites_section(tmp_path):
    from modelalloy.bench.docs import _page_section

    page = tmp_path / "b.md"
    page.write_text("# B\n\nintro\n\n## tiny-vision (full)\n\n| a |\n\n![x](y.png)\n\n"
                    "## tiny-lm (full)\n\nlm\n\n## How the suites were tuned\n")
    assert _page_section(page, "tiny-vision") == "## tiny-vision (full)\n\n| a |\n\n![x](y.png)\n"
    assert _page_section(page, "tiny-lm") == "## tiny-lm (full)\n\nlm\n"
    assert _page_section(page, "other") is None
    assert _page_section(tmp_path / "missing.md", "tiny-lm") is None


def test_smoke_suite_is_hf_loadable(lm_smoke):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = lm_smoke.info
    folder = info.expert_dir(info.merged_tasks[0])
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.convert_ids_to_tokens(tok("len:abc=")["input_ids"]) == list("len:abc=")
    assert len(tok) == len(VOCAB)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    sd = lm_smoke.expert_state_dict(info.merged_tasks[0])
    for name, tensor in sd.items():
        assert torch.equal(model.state_dict()[name], tensor)
    assert (folder / "optimizer.safetensors").is_file()


def test_experts_keep_the_frozen_weights_and_ship_every_adam_moment(lm_smoke):
    from safetensors.torch import load_file

    from modelalloy.bench.lm import FROZEN

    base = lm_smoke.base_state_dict()
    for task in lm_smoke.info.merged_tasks:
        expert = lm_smoke.expert_state_dict(task)
        frozen = [k for k in base if k.startswith(tuple(FROZEN))]
        assert frozen and all(torch.equal(expert[k], base[k]) for k in frozen)
        assert not torch.equal(expert["transformer.h.0.mlp.c_fc.weight"],
                               base["transformer.h.0.mlp.c_fc.weight"])
        moments = load_file(str(lm_smoke.info.expert_dir(task) / "optimizer.safetensors"))
        assert {f"{k}.exp_avg_sq" for k in expert} <= set(moments)


def test_lm_expert_beats_base_and_eval_is_deterministic(lm_smoke):
    task = "len"
    base = lm_smoke.base_state_dict()
    expert = lm_smoke.expert_state_dict(task)
    b = lm_smoke.evaluate(base, [task])[task]
    e = lm_smoke.evaluate(expert, [task])[task]
    assert e["accuracy"] > b["accuracy"]
    assert e["mean_length"] >= 2  # one digit and the end token
    assert lm_smoke.evaluate(expert, [task]) == {task: e}
    ppl = lm_smoke.general_metrics(expert)["perplexity"]
    assert math.isfinite(ppl) and ppl > 1


def test_lm_eval_adapter_on_a_local_task(lm_smoke, tmp_path):
    from modelalloy.eval.lm_eval_adapter import available, export_suite_task, run_lm_eval

    # lm-eval[hf] is in the test extra: a missing install must fail here, not skip.
    assert available(), "lm-eval[hf] is not installed; `make test` installs it (test extra)"
    task = "len"
    include = export_suite_task(lm_smoke, task, tmp_path / "tasks", limit=12)
    res = run_lm_eval(lm_smoke.info.expert_dir(task), [f"ma_{task}"], include_path=include)
    ours = lm_smoke.evaluate(lm_smoke.expert_state_dict(task), [task], limit=12)[task]
    assert res[f"ma_{task}"]["exact_match"] == pytest.approx(ours["accuracy"])


def test_long_to_short_study(lm_smoke, tmp_path):
    from modelalloy.eval.harness import long_to_short
    from modelalloy.eval.sweeps import long_to_short_markdown, plot_long_to_short

    rows = long_to_short(lm_smoke, ["linear", "slerp", "task_arithmetic", "tall_masks"],
                         grid=(0.5,))
    names = [r["method"] for r in rows]
    assert names[:3] == ["base", "expert:sum_long", "expert:sum_short"]
    assert {"linear", "slerp", "task_arithmetic"} <= set(names)
    assert "tall_masks" not in names  # a rebuilt expert, not a merge
    assert all(r["mean_length"] > 0 for r in rows)
    assert "| slerp |" in long_to_short_markdown(rows)
    assert plot_long_to_short(rows, tmp_path / "l2s.png").is_file()


def test_vision_suite_has_no_pair(vision_smoke):
    from modelalloy.eval.harness import EvalError, long_to_short

    with pytest.raises(EvalError, match="no long/short pair"):
        long_to_short(vision_smoke)
