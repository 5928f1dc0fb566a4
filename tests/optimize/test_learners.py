"""The learners behind `modelalloy optimize`, on the smoke tiny-vision suite: each writes a
recipe that `modelalloy merge` reproduces, holding the coefficients its learner function gives
on the same data."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from modelalloy.eval.harness import SCALE_GRID
from modelalloy.eval.informed import learn_adamerging, learn_sens_merging
from modelalloy.optimize.candidate import ModelPool, merge_candidate
from modelalloy.recipe.load import load_recipe
from modelalloy.search.driver import optimize
from modelalloy.search.objectives import suite_template

SUITE = "suite:tiny-vision?size=smoke&limit=40"


@pytest.fixture
def suite_template_path(vision_smoke, tmp_path):
    def make(granularity: str):
        data = suite_template(SUITE)
        data["search"]["granularity"] = granularity
        path = tmp_path / f"tpl-{granularity}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path
    return make


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_adamerging_layer_wise_through_optimize(vision_smoke, suite_template_path, tmp_path,
                                                run_cli):
    res = optimize("adamerging", suite_template_path("layer"), [SUITE], tmp_path / "out",
                   budget=3, options={"batch_size": 12})
    assert len(res.trials) == 1 and res.best["tag"] == "adamerging"
    tasks = vision_smoke.info.merged_tasks
    direct = learn_adamerging(vision_smoke, tasks, vision_smoke.base_state_dict(),
                              [vision_smoke.expert_state_dict(t) for t in tasks],
                              granularity="layer", steps=3, batch_size=12)
    rec = load_recipe(res.recipe_path)
    for k, entry in enumerate(rec.expert_entries()):
        by_name = {c.filter: c.value for c in entry.parameters["weight"] if c.filter}
        for name in direct.names:
            assert by_name[name] == round(direct.weight_of(name, k), 6)
    assert (tmp_path / "out" / "coefficients.png").is_file()
    r = run_cli("merge", res.recipe_path, tmp_path / "merged")
    assert r.code == 0, r.err
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    cand = merge_candidate(rec, ModelPool())
    assert all(torch.equal(merged[n], cand[n]) for n in cand)
    # the trial's score is the suite's accuracy of that very merge on the val split
    acc = vision_smoke.evaluate(cand, tasks, split="val", limit=40)
    assert res.best["scores"]["fitness"] == pytest.approx(
        sum(a["accuracy"] for a in acc.values()) / len(acc))


def test_sens_merging_and_its_granularity_check(vision_smoke, suite_template_path, tmp_path,
                                                run_cli):
    """λ unset: one trial per λ of the benchmark's grid, the best on val kept; its weights are
    Sens-Merging's λ·K·σ computed directly with that λ. A given λ is one trial."""
    res = optimize("sens_merging", suite_template_path("layer"), [SUITE], tmp_path / "out",
                   options={"limit": 4})
    assert len(res.trials) == len(SCALE_GRID)
    notes = json.loads((tmp_path / "out" / "notes.json").read_text())
    assert "k_sigma" in notes
    fitness = [t["scores"]["fitness"] for t in res.trials]
    lam = notes["lambda"]
    assert res.best["scores"]["fitness"] == max(fitness) == fitness[SCALE_GRID.index(lam)]
    tasks = vision_smoke.info.merged_tasks
    direct, _ = learn_sens_merging(vision_smoke, tasks, vision_smoke.base_state_dict(),
                                   [vision_smoke.expert_state_dict(t) for t in tasks], limit=4,
                                   scale=lam)
    rec = load_recipe(res.recipe_path)
    first = {c.filter: c.value for c in rec.expert_entries()[0].parameters["weight"]}
    assert first[direct.names[0]] == pytest.approx(direct.weight_of(direct.names[0], 0),
                                                   rel=1e-5)
    fixed = optimize("sens_merging", suite_template_path("layer"), [SUITE], tmp_path / "fixed",
                     options={"limit": 4, "scale": 0.3})
    assert len(fixed.trials) == 1
    r = run_cli("optimize", "sens_merging", suite_template_path("task"), "--objective", SUITE,
                "--out", tmp_path / "o2")
    assert r.code != 0 and "layer-wise" in r.err


@pytest.mark.parametrize("algorithm,granularity,options", [
    ("adamerging", "task", {"batch_size": 12}),
    ("expert_merging", "layer", {"samples": 2}),
    ("self_positioning", "task", {"batch_size": 12}),
    ("fw_merging", "layer", {"limit": 8, "batch_size": 8}),
    ("fw_merging", "task", {"limit": 8, "batch_size": 8, "variant": "soft", "ada_steps": 2}),
])
def test_each_learner_runs_from_the_interface(vision_smoke, suite_template_path, tmp_path,
                                              algorithm, granularity, options):
    res = optimize(algorithm, suite_template_path(granularity), [SUITE], tmp_path / "out",
                   budget=2, options=options)
    rec = load_recipe(res.recipe_path)
    assert rec.merge_method == "task_arithmetic" and len(rec.expert_entries()) == 3
    assert 0.0 <= res.best["scores"]["fitness"] <= 1.0


def test_expert_merging_pp_recipe_reproduces_the_chunk_merge(vision_smoke, suite_template_path,
                                                             tmp_path, run_cli):
    from modelalloy.stats import load_stats

    res = optimize("expert_merging_pp", suite_template_path("layer"), [SUITE],
                   tmp_path / "out", options={"samples": 2})
    rec = load_recipe(res.recipe_path)
    assert rec.merge_method == "task_arithmetic_chunks"
    assert res.notes["chunks"]  # some tensors were cut into several chunks
    r = run_cli("merge", res.recipe_path, tmp_path / "merged")
    assert r.code == 0, r.err
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    # the same chunk coefficients as statistics, through chunk_task_arithmetic
    stats = {"merge_coeffs": [dict(load_stats(tmp_path / "out" / "stats" / t /
                                              "merge_coeffs.safetensors"))
                              for t in vision_smoke.info.merged_tasks]}
    data = yaml.safe_load(res.recipe_path.read_text())
    data["merge_method"] = "chunk_task_arithmetic"
    for m in data["models"]:
        del m["parameters"]
    from modelalloy.recipe.load import recipe_from_dict

    by_stats = merge_candidate(recipe_from_dict(data), ModelPool(), stats=stats)
    assert sorted(merged) == sorted(by_stats)
    for n, t in by_stats.items():
        assert torch.equal(merged[n], t), n
    chunked = [n for n in res.notes["chunks"] if n in merged]
    assert chunked and not torch.equal(merged[chunked[0]], vision_smoke.base_state_dict()[
        chunked[0]])


def test_learner_needs_a_suite_objective(suite_template_path, tmp_path, run_cli):
    r = run_cli("optimize", "adamerging", suite_template_path("task"), "--objective",
                "python:tests.optimize.synthetic:quadratic", "--out", tmp_path / "o")
    assert r.code != 0 and "learns from a suite's data" in r.err


def test_template_names_the_suite_models(vision_smoke, run_cli):
    r = run_cli("optimize", "--template", SUITE, "--method", "ties")
    assert r.code == 0, r.err
    data = yaml.safe_load(r.out)
    assert data["merge_method"] == "ties"
    assert data["base_model"] == str(vision_smoke.info.base_dir)
    assert [m["model"] for m in data["models"]] == [
        str(vision_smoke.info.expert_dir(t)) for t in vision_smoke.info.merged_tasks]
    assert data["search"]["parameters"] == {"weight": [0.0, 1.0], "density": [0.1, 1.0]}
