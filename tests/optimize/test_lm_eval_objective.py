"""The lm-eval objective: a candidate scored in memory by lm-evaluation-harness gets the score
lm-eval gives the same recipe merged to disk by `modelalloy merge` (a local task, no
download)."""

from __future__ import annotations

import pytest
import yaml

from modelalloy.search.driver import optimize
from modelalloy.search.objectives import suite_template


@pytest.mark.slow
def test_lm_eval_in_memory_matches_the_merged_folder(lm_smoke, tmp_path, run_cli):
    from modelalloy.eval.lm_eval_adapter import export_suite_task, run_lm_eval

    include = export_suite_task(lm_smoke, "len", tmp_path / "tasks", limit=6)
    tpl = tmp_path / "tpl.yaml"
    tpl.write_text(yaml.safe_dump(suite_template("suite:tiny-lm?size=smoke")))
    spec = f"lm-eval:ma_len?include={include}"
    res = optimize("evolve", tpl, [spec], tmp_path / "out", budget=2, seed=1)
    best = res.best["scores"]
    assert 0.0 <= best["ma_len"] <= 1.0 and best["score"] == best["ma_len"]
    r = run_cli("merge", res.recipe_path, tmp_path / "merged")
    assert r.code == 0, r.err
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "merged" / f).write_bytes((lm_smoke.info.base_dir / f).read_bytes())
    disk = run_lm_eval(tmp_path / "merged", ["ma_len"], include_path=include)
    assert disk["ma_len"]["exact_match"] == pytest.approx(best["ma_len"])
    # the live model the candidates are merged into scores what a loaded state dict scores
    old = optimize("evolve", tpl, [spec], tmp_path / "old", budget=2, seed=1, in_place=False)
    assert [t["scores"] for t in old.trials] == [t["scores"] for t in res.trials]


def test_lm_eval_objective_errors(tmp_path):
    from modelalloy.errors import OptimizeError
    from modelalloy.search.objectives import parse_objective

    with pytest.raises(OptimizeError, match="name the tasks"):
        parse_objective("lm-eval:")
    with pytest.raises(OptimizeError, match="unknown option 'shots'"):
        parse_objective("lm-eval:a?shots=5")
    obj = parse_objective(f"lm-eval:a,b?include={tmp_path / 'nope'}&limit=3")
    assert obj.tasks == ["a", "b"] and obj.limit == 3
    with pytest.raises(OptimizeError, match="not found"):
        obj.prepare()
