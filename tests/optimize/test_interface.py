"""The optimize interface: search space, OUT folder, CLI errors, recipe reproduction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("cma")

from modelalloy.errors import OptimizeError  # noqa: E402
from modelalloy.optimize.candidate import ModelPool, merge_candidate  # noqa: E402
from modelalloy.optimize.template import load_template  # noqa: E402
from modelalloy.recipe.load import load_recipe  # noqa: E402
from modelalloy.search.driver import optimize  # noqa: E402
from tests.optimize import synthetic  # noqa: E402

QUAD = "python:tests.optimize.synthetic:quadratic"
LAYERS = "python:tests.optimize.synthetic:quadratic_layers"


def test_evolve_finds_the_known_task_weights(template, tmp_path):
    # the quadratic's maximum is at weights (0.3, 0.7) by construction (synthetic.TARGET)
    res = optimize("evolve", template(), [QUAD], tmp_path / "out", budget=60, seed=0)
    w = res.best["candidate"]
    assert abs(w[0] - 0.3) < 0.05 and abs(w[1] - 0.7) < 0.05
    assert res.best["scores"]["fitness"] > -0.01
    rec = load_recipe(res.recipe_path)
    weights = [e.parameters["weight"] for e in rec.expert_entries()]
    assert weights == [round(v, 6) for v in w]
    out = tmp_path / "out"
    for f in ("trials.jsonl", "state.json", "progress.png", "coefficients.png", "summary.md"):
        assert (out / f).is_file(), f
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 60 and json.loads(lines[0])["trial"] == 0
    assert json.loads((out / "state.json").read_text())["finished"] is True


def test_layer_space_cells_and_compact_filters(template):
    space, _ = load_template(template(search={
        "granularity": "group", "layers_per_group": 2, "filters": ["bias"],
        "parameters": {"weight": [0, 1]}}))
    # groups: layers {0,1} and {2} crossed with {bias, rest}, plus head (other)
    assert len(space.cells) == 5 and space.dim == 10
    assert space.cell_of["layers.0.bias"] == space.cell_of["layers.1.bias"]
    assert space.cell_of["layers.2.weight"] != space.cell_of["layers.2.bias"]
    space, _ = load_template(template(search={"granularity": "layer",
                                              "parameters": {"weight": [0, 1]}}))
    setting = space.setting([0.1, 0.2, 0.3, 0.4])
    # one entry per layer and a catch-all for the head, as compact as the cells
    assert setting == [{"filter": "layers.0.", "value": 0.1}, {"filter": "layers.1.", "value":
                       0.2}, {"filter": "layers.2.", "value": 0.3}, {"value": 0.4}]


def test_recipe_reproduces_bit_for_bit_through_merge(template, tmp_path, run_cli):
    tpl = template(method="ties", search={"granularity": "layer", "filters": ["bias"],
                                          "parameters": {"weight": [0, 1],
                                                         "density": [0.2, 1.0]}})
    res = optimize("evolve", tpl, [LAYERS], tmp_path / "out", budget=6, seed=3)
    r = run_cli("merge", res.recipe_path, tmp_path / "merged")
    assert r.code == 0, r.err
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    cand = merge_candidate(load_recipe(res.recipe_path), ModelPool())
    assert sorted(merged) == sorted(cand)
    for n in cand:
        assert merged[n].dtype == cand[n].dtype and torch.equal(merged[n], cand[n]), n
    # and the candidate is the one that was scored
    assert synthetic.quadratic_layers(cand)["score"] == res.best["scores"]["score"]


def _trials(out: Path) -> list[tuple]:
    """What a trial is, without its timing."""
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    return [(r["trial"], r["candidate"], r["scores"]) for r in rows]


def test_killed_run_resumes_to_the_same_result(template, tmp_path):
    tpl = template(search={"granularity": "layer", "parameters": {"weight": [0, 1]}})
    full = optimize("evolve", tpl, [QUAD], tmp_path / "a", budget=25, seed=5)
    out = tmp_path / "b"
    optimize("evolve", tpl, [QUAD], out, budget=25, seed=5)
    lines = (out / "trials.jsonl").read_text().splitlines(keepends=True)
    # a kill after trial 9, in the middle of writing trial 10
    (out / "trials.jsonl").write_text("".join(lines[:10]) + lines[10][:20])
    (out / "recipe.yaml").unlink()
    calls = []
    import tests.optimize.synthetic as syn
    orig = syn.quadratic

    def counting(sd):
        calls.append(1)
        return orig(sd)

    syn.quadratic = counting
    try:
        again = optimize("evolve", tpl, [QUAD], out, budget=25, seed=5, resume=True)
    finally:
        syn.quadratic = orig
    assert len(calls) == 15  # only the trials past the log were scored
    assert _trials(tmp_path / "a") == _trials(out)
    assert full.recipe_path.read_text() == again.recipe_path.read_text()


def test_failing_objective_keeps_trials_and_resumes(template, tmp_path, run_cli):
    synthetic.CALLS["n"] = 0
    tpl = template()
    out = tmp_path / "out"
    obj = "python:tests.optimize.synthetic:fails_on_fourth"
    r = run_cli("optimize", "evolve", tpl, "--objective", obj, "--out", out, "--budget", "8")
    assert r.code != 0
    msg = r.err.strip()
    assert len(msg.splitlines()) == 1 and "failed on trial 3" in msg
    assert "metric server went away" in msg and "--resume" in msg
    assert len((out / "trials.jsonl").read_text().splitlines()) == 3
    r = run_cli("optimize", "evolve", tpl, "--objective", obj, "--out", out, "--budget", "8")
    assert r.code != 0 and "--resume" in r.err  # refuses to overwrite a run
    # the library speaks its arguments, the command its flags
    assert "pass --resume to continue it or choose another --out DIR" in r.err
    with pytest.raises(OptimizeError, match="pass resume=True to continue it or choose "
                                            "another out=DIR"):
        optimize("evolve", tpl, [obj], out, budget=8)
    r = run_cli("optimize", "evolve", tpl, "--objective", obj, "--out", out, "--budget", "8",
                "--resume")
    assert r.code == 0, r.err
    assert len((out / "trials.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize("args,expect", [
    (["nosuch"], "unknown algorithm 'nosuch'"),
    (["evolve", "--objective", "bleu:x"], "unknown objective 'bleu:x'"),
    (["evolve", "--objective", "suite:tiny-nothing"], "unknown suite 'tiny-nothing'"),
    (["evolve", "--objective", QUAD, "--ray-address", "127.0.0.1:9"],
     "no Ray cluster answers there"),
])
def test_one_line_errors(template, tmp_path, run_cli, args, expect):
    tpl = template()
    algo, rest = args[0], args[1:]
    if "--objective" not in rest:
        rest = [*rest, "--objective", QUAD]
    r = run_cli("optimize", algo, tpl, *rest, "--out", tmp_path / "out")
    assert r.code != 0
    assert expect in r.err and len(r.err.strip().splitlines()) == 1, r.err


def test_no_free_parameter(template, tmp_path, run_cli):
    tpl = template(search=None)
    r = run_cli("optimize", "evolve", tpl, "--objective", QUAD, "--out", tmp_path / "o")
    assert r.code != 0 and "no free parameter" in r.err
    assert len(r.err.strip().splitlines()) == 1
    tpl = template(search={"parameters": {"density": [0, 1]}})  # task_arithmetic has none
    r = run_cli("optimize", "evolve", tpl, "--objective", QUAD, "--out", tmp_path / "o")
    assert r.code != 0 and "has no such parameter" in r.err


def test_workers_without_ray_name_the_extra(template, tmp_path, run_cli, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    r = run_cli("optimize", "evolve", template(), "--objective", QUAD, "--out",
                tmp_path / "o", "--workers", "2")
    assert r.code != 0 and "modelalloy[search]" in r.err


def test_list_and_template(run_cli):
    r = run_cli("optimize", "--list")
    assert r.code == 0
    for name in ("evolve", "adamerging", "expert_merging", "sens_merging"):
        assert name in r.out


@pytest.mark.slow
def test_sigkilled_command_resumes_to_the_same_result(template, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import subprocess_env

    tpl = template(search={"granularity": "layer", "parameters": {"weight": [0, 1]}})
    obj = "python:tests.optimize.synthetic:quadratic_slow"
    out = tmp_path / "killed"
    env = subprocess_env()
    env["PYTHONPATH"] = f"{Path(__file__).resolve().parents[2]}{os.pathsep}{env['PYTHONPATH']}"
    proc = subprocess.Popen([sys.executable, "-m", "modelalloy", "optimize", "evolve", tpl,
                             "--objective", obj, "--out", out, "--budget", "40", "--seed",
                             "4"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    trials = out / "trials.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not trials.exists()
                                      or len(trials.read_text().splitlines()) < 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(trials.read_text().splitlines())
    assert 8 <= done < 40 and not (out / "recipe.yaml").exists()
    again = optimize("evolve", tpl, [obj], out, budget=40, seed=4, resume=True)
    full = optimize("evolve", tpl, [obj], tmp_path / "full", budget=40, seed=4)
    assert _trials(out) == _trials(tmp_path / "full")
    assert again.recipe_path.read_text() == full.recipe_path.read_text()


def test_several_objectives_combine_by_their_weights(template, tmp_path, run_cli):
    out = tmp_path / "out"
    r = run_cli("optimize", "evolve", template(), "--objective", QUAD, "--objective", LAYERS,
                "--weights", "2,0.5", "--out", out, "--budget", "3")
    assert r.code == 0, r.err
    for line in (out / "trials.jsonl").read_text().splitlines():
        s = json.loads(line)["scores"]
        assert s["fitness"] == pytest.approx(2 * s["0:score"] + 0.5 * s["1:score"])
    r = run_cli("optimize", "evolve", template(), "--objective", QUAD, "--weights", "1,2",
                "--out", tmp_path / "o2")
    assert r.code != 0 and "2 weights for 1 objectives" in r.err


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_only_changed_tensors_are_merged_again(template, tmp_path, method):
    tpl = template(method=method, search={"granularity": "layer", "parameters": {
        "weight": [0, 1], "density": [0.2, 1.0]}}, seed=7)
    space, _ = load_template(tpl)
    pool, fresh = ModelPool(), ModelPool(reuse=False)
    genome = [0.5] * space.dim
    first = merge_candidate(space.recipe(genome), pool)
    assert pool.merged_tensors == 7 and pool.reused_tensors == 0
    moved = list(genome)
    moved[space.genes.index(next(g for g in space.genes if g.cell == 1))] = 0.9  # layer 1
    second = merge_candidate(space.recipe(moved), pool)
    assert pool.merged_tensors == 7 + 2  # layers.1.weight and .bias, nothing else
    again = merge_candidate(space.recipe(moved), fresh)
    assert all(torch.equal(second[n], again[n]) for n in again)  # the same bits
    assert not torch.equal(first["layers.1.weight"], second["layers.1.weight"])
    assert second["layers.0.weight"] is first["layers.0.weight"]


def test_gradients_turn_reuse_off(template):
    tpl = template(method="ties", search={"parameters": {"weight": [0, 1]}})
    space, _ = load_template(tpl)
    data = space.recipe_dict([0.5, 0.5])
    data["parameters"]["density"] = [0.3, 0.9]  # interpolated over the layer position
    from modelalloy.recipe.load import recipe_from_dict

    pool = ModelPool()
    merge_candidate(recipe_from_dict(data), pool)
    merge_candidate(recipe_from_dict(data), pool)
    assert pool.merged_tensors == 0 and pool.reused_tensors == 0  # whole merges, no reuse
