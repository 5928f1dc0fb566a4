"""evolve's PS then DFS in one run (search.space ps+dfs): the parameter-space merge becomes a
stage, the data-flow search runs over it and the experts, and merge-multi reproduces it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("cma")

from modelalloy.errors import OptimizeError  # noqa: E402
from modelalloy.optimize.candidate import ModelPool, merge_candidate, merge_staged  # noqa: E402
from modelalloy.optimize.hybrid import PS_STAGE  # noqa: E402
from modelalloy.optimize.template import load_template  # noqa: E402
from modelalloy.search.driver import optimize  # noqa: E402
from modelalloy.search.workers import candidate_recipe  # noqa: E402
from tests.optimize import synthetic  # noqa: E402

OBJECTIVE = "python:tests.optimize.synthetic:ps_then_path"
OPTIONS = {"ps_budget": 60, "patience": 3}


def hybrid_template(root: Path, **dataflow) -> Path:
    base, (a, b) = synthetic.save_hybrid_family(root / "models")
    data = {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(a)}, {"model": str(b)}],
            "parameters": {"lambda": 1.0, "normalize": False}, "dtype": "float32",
            "search": {"space": "ps+dfs", "parameters": {"weight": [0.0, 1.0]},
                       "dataflow": {"scale": False, **dataflow}}}
    path = root / "hybrid.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_ps_then_dfs_finds_the_known_best_and_merge_multi_reproduces_it(tmp_path, run_cli):
    tpl = hybrid_template(tmp_path)
    res = optimize("evolve", tpl, [OBJECTIVE], tmp_path / "out", budget=100, seed=0,
                   options=OPTIONS)
    space, _ = load_template(tpl)
    ps_trials, dfs_trials = res.trials[:60], res.trials[60:]
    assert all(isinstance(t["candidate"], list) for t in ps_trials)
    assert all(set(t["candidate"]) == {"genome", "ps"} for t in dfs_trials)
    # phase 1: the weights (0.3, 0.7) by construction (the missing layer 2 is a constant)
    ps_best = max(ps_trials, key=lambda t: t["scores"]["fitness"])
    weights = [space.ps.bound("weight").value(u) for u in ps_best["candidate"]]
    assert all(abs(w - e) < 0.05 for w, e in zip(weights, synthetic.HYBRID_WEIGHTS,
                                                 strict=True)), weights
    assert res.notes["ps_trial"] == ps_best["trial"]
    # phase 2 stands on that PS merge and finds its own path followed by b's layer 1
    assert all(t["candidate"]["ps"] == ps_best["candidate"] for t in dfs_trials)
    assert res.best["trial"] >= 60
    steps = space.flow.path(res.best["candidate"]["genome"])
    assert [space.flow.cells[j] for j, _ in steps] == [f"{PS_STAGE}:0", f"{PS_STAGE}:1", "b:1"]
    # what the path adds is b's layer 1, whose absence cost ‖b.layers.1‖² in phase 1
    _, (_, b) = synthetic.hybrid_family()
    missing = float((b["layers.1.weight"].double() ** 2).sum()
                    + (b["layers.1.bias"].double() ** 2).sum())
    gain = res.best["scores"]["fitness"] - ps_best["scores"]["fitness"]
    assert gain == pytest.approx(missing, rel=1e-6)
    # the PS stage on its own, and the staged recipe that merge-multi runs
    assert (tmp_path / "out" / "ps_recipe.yaml").is_file()
    text = res.recipe_path.read_text()
    assert "merge-multi" in text and text.count("---") == 1
    r = run_cli("merge-multi", res.recipe_path, "-I", tmp_path / "work", "--out-path",
                tmp_path / "merged")
    assert r.code == 0, r.err
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    cand = merge_staged(candidate_recipe(space, res.best["candidate"]), ModelPool())
    assert sorted(merged) == sorted(cand)
    assert all(torch.equal(merged[n], cand[n]) for n in cand)
    assert synthetic.ps_then_path(merged) == res.best["scores"]["fitness"]
    # the stage on disk is the PS merge of phase 1's best genome
    ps_disk = load_file(str(tmp_path / "work" / PS_STAGE / "model.safetensors"))
    ps_mem = merge_candidate(space.recipe(ps_best["candidate"]), ModelPool())
    assert sorted(ps_disk) == sorted(ps_mem)
    assert all(torch.equal(ps_disk[n], ps_mem[n]) for n in ps_mem)


def test_ps_then_dfs_resumes_mid_dataflow_to_the_same_result(tmp_path):
    tpl = hybrid_template(tmp_path)
    full = optimize("evolve", tpl, [OBJECTIVE], tmp_path / "full", budget=100, seed=1,
                    options=OPTIONS)
    cut = tmp_path / "cut"
    optimize("evolve", tpl, [OBJECTIVE], cut, budget=70, seed=1, options=OPTIONS)
    lines = (cut / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 70
    resumed = optimize("evolve", tpl, [OBJECTIVE], cut, budget=100, seed=1, options=OPTIONS,
                       resume=True)
    assert [t["candidate"] for t in resumed.trials] == [t["candidate"] for t in full.trials]
    assert [t["scores"] for t in resumed.trials] == [t["scores"] for t in full.trials]
    assert resumed.recipe_path.read_text() == full.recipe_path.read_text()
    # another data-flow setting is another run
    data = yaml.safe_load(tpl.read_text())
    data["search"]["dataflow"]["repeats"] = 2
    tpl.write_text(yaml.safe_dump(data))
    with pytest.raises(OptimizeError, match="differs in search"):
        optimize("evolve", tpl, [OBJECTIVE], cut, budget=100, seed=1, options=OPTIONS,
                 resume=True)
    assert json.loads((cut / "state.json").read_text())["finished"] is True


def test_ps_then_dfs_errors(tmp_path):
    tpl = hybrid_template(tmp_path, depth=2)
    with pytest.raises(OptimizeError, match="search.dataflow.depth: unknown key"):
        load_template(tpl)
    tpl = hybrid_template(tmp_path, repeats=0)
    with pytest.raises(OptimizeError, match="search.dataflow.repeats"):
        load_template(tpl)
    tpl = hybrid_template(tmp_path)
    with pytest.raises(OptimizeError, match="ps.dfs is searched by evolve, not 'map'"):
        optimize("map", tpl, [OBJECTIVE], tmp_path / "map", budget=10)
    with pytest.raises(OptimizeError, match="ps_budget=200"):
        optimize("evolve", tpl, [OBJECTIVE], tmp_path / "o", budget=100,
                 options={"ps_budget": 200})


@pytest.mark.slow
def test_ps_then_dfs_on_two_ray_workers_gives_the_same_run(tmp_path):
    pytest.importorskip("ray")
    tpl = hybrid_template(tmp_path)
    opts = {"ps_budget": 12, "popsize": 4}
    one = optimize("evolve", tpl, [OBJECTIVE], tmp_path / "one", budget=24, seed=3,
                   options=opts)
    two = optimize("evolve", tpl, [OBJECTIVE], tmp_path / "two", budget=24, seed=3,
                   options=opts, workers=2)
    assert [(r["candidate"], r["scores"]) for r in one.trials] == \
        [(r["candidate"], r["scores"]) for r in two.trials]
    assert any("ps" in r["candidate"] for r in two.trials if isinstance(r["candidate"], dict))
    assert one.recipe_path.read_text() == two.recipe_path.read_text()
