import json

import pytest
from typer.testing import CliRunner

from modelalloy.api import merge_state_dicts
from modelalloy.eval.harness import method_skip_reason, run_bench, summarize, sweep_num_experts
from modelalloy.eval.report import markdown_table, plot_rows, print_table, write_results
from modelalloy.methods import get_method

KEYS = {"method", "task", "held_out", "accuracy", "normalized_accuracy", "mean_length"}


@pytest.fixture(scope="module")
def bench_result(vision_smoke):
    return run_bench(vision_smoke, ["linear", "task_arithmetic", "slerp"], grid=(0.3, 1.0))


def test_records_have_the_documented_fields(bench_result, vision_smoke):
    recs = bench_result.records
    assert all(KEYS <= r.keys() for r in recs)
    methods = {(r["method"], r["variant"]) for r in recs}
    assert {("base", "reference"), ("expert", "reference"), ("linear", "default"),
            ("task_arithmetic", "default"), ("task_arithmetic", "tuned")} <= methods
    tasks = {t.name for t in vision_smoke.info.tasks}
    assert {r["task"] for r in recs if r["method"] == "linear"} == tasks
    held = {r["task"] for r in recs if r["held_out"]}
    assert held == set(vision_smoke.info.held_out_tasks)
    expert = [r for r in recs if r["method"] == "expert"]
    assert all(r["normalized_accuracy"] == 1.0 for r in expert)


def test_slerp_is_skipped_with_a_reason(bench_result):
    assert "at most 2" in bench_result.skipped["slerp"]


def test_skip_reasons():
    assert method_skip_reason(get_method("slerp"), 2) is None
    assert method_skip_reason(get_method("task_arithmetic"), 8) is None
    assert "statistics" in method_skip_reason(get_method("regmean"), 3)


def test_tuned_lambda_is_chosen_on_validation(bench_result):
    t = bench_result.tuning["task_arithmetic"]
    assert t["chosen"] in (0.3, 1.0) and set(t["val_scores"]) == {"0.3", "1.0"}
    assert t["val_scores"][str(t["chosen"])] == max(t["val_scores"].values())


def test_linear_matches_task_arithmetic_at_one_over_n(vision_smoke):
    # averaging == base + mean task vector: a check that merging goes through the registry
    n = len(vision_smoke.info.merged_tasks)
    a = run_bench(vision_smoke, ["linear"], tune=False).records
    b = run_bench(vision_smoke, ["task_arithmetic"], tune=False,
                  params={"task_arithmetic": {"lambda": 1.0 / n}}).records
    acc = {r["task"]: r["accuracy"] for r in a if r["method"] == "linear"}
    acc2 = {r["task"]: r["accuracy"] for r in b if r["method"] == "task_arithmetic"}
    assert acc == pytest.approx(acc2, abs=1e-6)


def test_bench_writes_table_json_and_plot(bench_result, tmp_path):
    paths = write_results(bench_result, tmp_path)
    recs = json.loads(paths["json"].read_text())
    assert recs == bench_result.records
    md = paths["md"].read_text()
    assert "| method |" in md and "task_arithmetic (λ=" in md and "slerp" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| base |" in markdown_table(bench_result.records)


@pytest.fixture(scope="module")
def bundle_result(vision_smoke):
    return run_bench(vision_smoke, ["task_arithmetic", "tall_masks"], tune=False)


def test_tall_masks_is_reported_as_a_bundle_not_a_merge(bundle_result, vision_smoke):
    tasks = vision_smoke.info.merged_tasks
    rows = [r for r in bundle_result.records if r["method"] == "tall_masks"]
    # one rebuilt expert per merged task, scored on its own task only: never a merge row
    assert [(r["variant"], r["task"]) for r in rows] == [("bundle", t) for t in tasks]
    ratio = bundle_result.bundles["tall_masks"]["storage_ratio"]
    assert 0 < ratio < 1 and all(r["storage_ratio"] == ratio for r in rows)
    assert all(0.5 < r["normalized_accuracy"] for r in rows)
    # the bundle's rebuilt expert i is what the registry's tall_masks gives with task=i
    i = len(tasks) - 1
    rebuilt = merge_state_dicts("tall_masks", vision_smoke.base_state_dict(),
                                [vision_smoke.expert_state_dict(t) for t in tasks], task=i)
    acc = vision_smoke.evaluate(rebuilt, [tasks[i]])[tasks[i]]["accuracy"]
    assert rows[i]["accuracy"] == round(acc, 4)


def test_merge_table_and_plot_leave_bundles_out(bundle_result, tmp_path, capsys):
    assert "tall_masks" not in markdown_table(bundle_result.records)
    assert "task_arithmetic" in {r["method"] for r in plot_rows(bundle_result.records)}
    assert "tall_masks" not in {r["method"] for r in plot_rows(bundle_result.records)}
    paths = write_results(bundle_result, tmp_path)
    merges, bundles = paths["md"].read_text().split("## Bundles (not merges)")
    assert "tall_masks" not in merges and "| tall_masks |" in bundles
    assert "storage ratio" in bundles
    assert json.loads(paths["run"].read_text())["bundles"] == bundle_result.bundles
    print_table(bundle_result.records, "merges")
    out = capsys.readouterr().out
    assert out.index("bundles, not merges") < out.index("tall_masks")


def test_summary_means(bench_result):
    rows = {(r["method"], r["variant"]): r for r in summarize(bench_result.records)}
    exp = rows[("expert", "reference")]
    assert exp["normalized_accuracy"] == 1.0
    assert rows[("base", "reference")]["accuracy"] < exp["accuracy"]


def test_sweep_number_of_experts(vision_smoke):
    rows = sweep_num_experts(vision_smoke, "task_arithmetic", params={"lambda": 0.5})
    assert [r["k"] for r in rows] == list(range(2, len(vision_smoke.info.merged_tasks) + 1))
    assert all(0 <= r["held_in_accuracy"] <= 1 for r in rows)


def test_bench_cli(vision_smoke, tmp_path):
    import typer

    from modelalloy.commands import bench as bench_cmd
    from modelalloy.commands import eval as eval_cmd

    app = typer.Typer()
    bench_cmd.register(app)
    eval_cmd.register(app)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["bench", "--suite", "tiny-vision", "--size", "smoke",
                                   "--methods", "linear,ties", "--out", str(out), "--quiet",
                                   "--no-tune", "--sweep", "linear"])
    assert res.exit_code == 0, res.output
    assert (out / "results.json").is_file() and (out / "results.png").is_file()
    assert (out / "sweep-linear.json").is_file()
    assert "ties" in res.output
    expert = vision_smoke.info.expert_dir(vision_smoke.info.merged_tasks[0])
    res = CliRunner().invoke(app, ["eval", str(expert), "--suite", "tiny-vision", "--size",
                                   "smoke", "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    recs = json.loads((tmp_path / "e.json").read_text())["records"]
    first = [r for r in recs if r["task"] == vision_smoke.info.merged_tasks[0]][0]
    assert first["normalized_accuracy"] == 1.0


STAT_METHODS = ["regmean", "regmean_pp", "fisher", "ota", "aim", "chunk_task_arithmetic"]


def test_skip_reasons_when_the_bench_collects_statistics():
    assert method_skip_reason(get_method("regmean"), 3, stats=True) is None
    assert method_skip_reason(get_method("aim"), 3, stats=True) is None  # relaxes a merge
    assert "exactly 1" in method_skip_reason(get_method("ffg"), 3, stats=True)
    assert "merge_coeffs" in method_skip_reason(get_method("chunk_task_arithmetic"), 3,
                                                stats=True)


def _stat_bench(suite):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_bench(suite, STAT_METHODS, tune=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stat_result(vision_smoke):
    return _stat_bench(vision_smoke)


def test_statistic_methods_run_in_the_bench(stat_result, vision_smoke):
    rows = {(r["method"], r["task"]): r for r in stat_result.records}
    tasks = [t.name for t in vision_smoke.info.tasks]
    for method in ("regmean", "regmean_pp", "fisher", "ota", "aim"):
        for t in tasks:
            assert 0.0 <= rows[(method, t)]["accuracy"] <= 1.0
    assert "chunk_task_arithmetic" in stat_result.skipped
    assert set(stat_result.skipped) == {"chunk_task_arithmetic"}
    aim = next(r for r in stat_result.records if r["method"] == "aim")
    assert aim["params"]["under"] == "task_arithmetic"
    cache = vision_smoke.info.path / "stats-cache"
    kinds = {p.name.split("-")[0] for p in cache.iterdir()}
    assert {"gram", "gram_pp", "fisher", "exp_avg_sq", "activations"} <= kinds


def test_bench_statistics_are_the_collectors_on_the_unlabeled_split(stat_result, vision_smoke):
    """RegMean in the bench == RegMean on Grams collected by hand on each expert's own task's
    test inputs (the suite's unlabeled split), and OTA == OTA on the saved Adam moments."""
    from modelalloy.api import merge_state_dicts
    from modelalloy.eval.suite_stats import BenchStatsConfig, suite_module, task_batches
    from modelalloy.stats import collect_grams
    from modelalloy.stats.optimizer import load_adam_moments

    suite = vision_smoke
    tasks = suite.info.merged_tasks
    base = suite.base_state_dict()
    experts = [suite.expert_state_dict(t) for t in tasks]
    cfg = BenchStatsConfig()
    batches = task_batches(suite, tasks, "test", cfg.batch_size, limit=cfg.limit)
    grams = [collect_grams(suite_module(suite, sd, tasks), batches[k])
             for k, sd in enumerate(experts)]
    by_hand = merge_state_dicts("regmean", None, experts, stats={"gram": grams}, alpha=0.95)
    acc = suite.evaluate(by_hand)
    got = {r["task"]: r["accuracy"] for r in stat_result.records if r["method"] == "regmean"}
    assert got == pytest.approx({t: round(a["accuracy"], 4) for t, a in acc.items()}, abs=1e-4)
    moments = [{n: v for n, v in load_adam_moments(suite.info.expert_dir(t)
                                                   / "optimizer.safetensors").items()
                if n in base} for t in tasks]
    ota = merge_state_dicts("ota", base, experts, stats={"exp_avg_sq": moments})
    acc = suite.evaluate(ota)
    got = {r["task"]: r["accuracy"] for r in stat_result.records if r["method"] == "ota"}
    assert got == pytest.approx({t: round(a["accuracy"], 4) for t, a in acc.items()}, abs=1e-4)


def test_bench_statistics_are_cached_per_suite(stat_result, vision_smoke):
    from modelalloy.eval import suite_stats

    suite_stats._MEMORY.clear()  # only the files on disk remain
    again = run_bench(vision_smoke, ["regmean", "fisher"], tune=False)
    assert again.stats_seconds == {}  # nothing collected: read from <suite>/stats-cache
    acc = {r["task"]: r["accuracy"] for r in again.records if r["method"] == "fisher"}
    first = {r["task"]: r["accuracy"] for r in stat_result.records if r["method"] == "fisher"}
    assert acc == first


@pytest.mark.slow
def test_statistic_methods_run_in_the_bench_on_the_lm_suite(bench_cache):
    """The same hook on tiny-lm (transformers GPT-2: Conv1D layout, sampled Fisher)."""
    from modelalloy.bench import load_suite

    suite = load_suite("tiny-lm", "smoke")
    res = _stat_bench(suite)
    assert set(res.skipped) == {"chunk_task_arithmetic"}
    regmean = next(r for r in res.records if r["method"] == "regmean")
    assert regmean["params"]["input_dim"] == "first"  # square Conv1D weights
    for r in res.records:
        assert 0.0 <= r["accuracy"] <= 1.0


def test_records_and_summary_carry_bootstrap_intervals(bench_result, vision_smoke):
    from modelalloy.eval.intervals import decode_correct

    n = vision_smoke.info.config["eval_per_task"]
    for r in bench_result.records:
        hits = decode_correct(r["correct"])
        assert r["n"] == n == hits.size
        assert hits.mean() == pytest.approx(r["accuracy"], abs=1e-4)
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    rows = {(r["method"], r["variant"]): r for r in summarize(bench_result.records)}
    ta = rows[("task_arithmetic", "default")]
    lin = rows[("linear", "default")]
    assert ta["accuracy_ci"][0] <= ta["accuracy"] <= ta["accuracy_ci"][1]
    assert "delta" not in ta
    assert lin["delta"]["vs"] == "task_arithmetic (default)"
    assert lin["delta"]["value"] == pytest.approx(lin["accuracy"] - ta["accuracy"], abs=1e-4)
    assert rows[("expert", "reference")]["normalized_ci"] == [1.0, 1.0]


def test_table_shows_intervals_delta_and_verdict(bench_result, tmp_path):
    from modelalloy.eval.report import delta_cell, verdict

    md = markdown_table(bench_result.records)
    assert "Δ vs TA" in md and " ± " in md and "| ref |" in md
    assert delta_cell({"method": "x", "delta": {"value": 0.021, "ci": [0.01, 0.032],
                                                "significant": True}}) == "+2.1 ± 1.1 *"
    assert verdict({"delta": {"ci": [0.001, 0.03]}}) == "shows"
    assert verdict({"delta": {"ci": [-0.03, 0.005]}}) == "does not show"
    assert verdict({"delta": {"ci": [-0.01, 0.02]}}) == "cannot tell"
    paths = write_results(bench_result, tmp_path)
    summary = json.loads(paths["summary"].read_text())
    assert all("verdict" in row for row in summary)


def test_docs_page_reports_resolution_and_verdicts(bench_result):
    from modelalloy.bench.docs import interval_widths, verdict_table

    text = interval_widths(bench_result)
    assert text.startswith("Resolution (120 test examples per task")
    table = verdict_table(bench_result)
    assert "| linear |" in table
    assert any(v in table for v in ("shows", "does not show", "cannot tell"))
    assert "| task_arithmetic" not in table


def test_widen_score_calibration_is_tuned_like_lambda(vision_smoke):
    res = run_bench(vision_smoke, ["widen"], grid=(0.3, 1.0))
    t = res.tuning["widen"]
    assert t["param"] == "score_calibration" and t["chosen"] in (0.3, 1.0)
    tuned = [r for r in res.records if r["method"] == "widen" and r["variant"] == "tuned"]
    assert tuned and tuned[0]["params"]["score_calibration"] == t["chosen"]
    assert "widen (score_calibration=" in markdown_table(res.records)
