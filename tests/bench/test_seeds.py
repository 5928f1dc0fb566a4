"""--seeds: experts rebuilt from other fine-tuning seeds, the same base and data; the spread."""

import statistics

import pytest
import torch

from modelalloy.bench.seeds import run_seeds, seed_spread, seeds_markdown, write_seeds
from modelalloy.eval.harness import run_bench


@pytest.fixture(scope="module")
def two_seeds(vision_smoke):
    results, suites = [], []

    def bench(suite):
        suites.append(suite)
        return run_bench(suite, ["linear", "task_arithmetic"], tune=False)

    results = run_seeds("tiny-vision", "smoke", 2, bench)
    return suites, results


def test_seed_zero_is_the_default_suite_and_others_differ_only_in_experts(two_seeds,
                                                                         vision_smoke):
    (s0, s1), _ = two_seeds
    assert s0.info.path == vision_smoke.info.path
    assert s1.info.path != s0.info.path
    for k, v in s0.base_state_dict().items():
        assert torch.equal(v, s1.base_state_dict()[k])
    task = s0.info.merged_tasks[0]
    e0, e1 = s0.expert_state_dict(task), s1.expert_state_dict(task)
    assert any(not torch.equal(e0[k], e1[k]) for k in e0)
    x0, _ = s0.labeled(task, "test")
    x1, _ = s1.labeled(task, "test")
    assert torch.equal(x0, x1)


def test_spread_is_the_mean_and_sd_over_seeds(two_seeds, tmp_path):
    _, results = two_seeds
    rows = {(r["method"], r["variant"]): r for r in seed_spread(results)}
    lin = rows[("linear", "default")]
    accs = []
    for res in results:
        held_in = [r["accuracy"] for r in res.records
                   if r["method"] == "linear" and not r["held_out"]]
        accs.append(sum(held_in) / len(held_in))
    assert lin["accuracy"] == pytest.approx(accs)
    assert lin["sd"] == pytest.approx(statistics.stdev(accs))
    norms = []  # merged ÷ the same seed's expert, per task, mean over tasks
    for res in results:
        acc = {(r["method"], r["task"]): r["accuracy"] for r in res.records}
        tasks = [r["task"] for r in res.records if r["method"] == "linear"
                 and not r["held_out"]]
        norms.append(statistics.fmean(acc[("linear", t)] / acc[("expert", t)] for t in tasks))
    assert lin["normalized_accuracy"] == pytest.approx(norms, abs=1e-3)
    assert lin["normalized_sd"] == pytest.approx(statistics.stdev(norms), abs=1e-3)
    assert len(lin["delta"]) == 2 and lin["better"] + lin["worse"] <= 2
    assert rows[("base", "reference")]["sd"] == 0.0
    md = seeds_markdown(list(rows.values()))
    assert "| seed 0 | seed 1 |" in md and "± " in md
    paths = write_seeds(list(rows.values()), tmp_path, "tiny-vision (smoke)")
    assert paths["md"].is_file() and paths["json"].is_file()


def test_seeds_cli_writes_the_spread(two_seeds, tmp_path):
    from typer.testing import CliRunner

    from modelalloy.cli import app

    res = CliRunner().invoke(app, ["bench", "--suite", "tiny-vision", "--size", "smoke",
                                   "--methods", "task_arithmetic", "--no-tune", "--seeds", "2",
                                   "--out", str(tmp_path), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "| seed 0 | seed 1 |" in res.output
    assert (tmp_path / "seeds.md").is_file() and (tmp_path / "seeds.json").is_file()
