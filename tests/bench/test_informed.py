"""Data-informed methods end to end on the smoke tiny-vision suite (modelalloy.eval.informed)."""

import math

import pytest
import torch

from modelalloy.api import merge_state_dicts
from modelalloy.eval.informed import (
    InformedConfig,
    apply_coefficients,
    informed_methods,
    merge_through_recipe,
    run_informed,
)
from modelalloy.eval.suite_stats import SuiteModule, suite_module, task_batches
from modelalloy.stats import collect_grams

# the tiny-vision body's last block: its Linear projection, the one layer with a Gram
FC = "blocks.3.weight"
SMALL = InformedConfig(stats_limit=24, fisher_limit=6, adamerging_steps=4, expert_samples=2,
                       sens_limit=4, self_positioning_steps=4, batch_size=12)


@pytest.fixture(scope="module")
def informed(vision_smoke):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    try:
        yield run_informed(vision_smoke, SMALL, baselines=("linear", "task_arithmetic"))
    finally:
        torch.set_num_threads(threads)


def test_every_informed_method_runs_and_gives_finite_accuracies(vision_smoke, informed):
    methods = {r["method"] for r in informed.records if r["variant"] == "informed"}
    # the registry's data-informed methods (AIM's rows named after the merges it relaxes), OTA
    # after grafting, the learners
    expected = {"regmean", "regmean_pp", "fisher", "ota", "aim(task_arithmetic)", "aim(ties)",
                "ota_ffg", "adamerging_task", "adamerging_layer", "expert_merging",
                "sens_merging", "self_positioning"}
    assert set(informed_methods(len(vision_smoke.info.merged_tasks))) == (
        expected - {"aim(task_arithmetic)", "aim(ties)"}) | {"aim"}
    assert methods == expected
    n_tasks = len(vision_smoke.info.tasks)
    for method in methods:
        rows = [r for r in informed.records if r["method"] == method]
        assert len(rows) == n_tasks
        for r in rows:
            assert math.isfinite(r["accuracy"]) and 0.0 <= r["accuracy"] <= 1.0
    # the baselines come from the harness, next to the informed rows
    assert {"base", "expert", "linear", "task_arithmetic"} <= {r["method"]
                                                              for r in informed.records}
    assert informed.extra["regmean_gram_layers"] == [FC]  # convolutions: no Gram


def _fc_inputs(suite, sd, task):
    model = suite.new_model()
    model.load_state_dict(sd)
    seen = []
    handle = model.blocks[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(suite.labeled(task, "val")[0])
    handle.remove()
    return seen[0]


def test_regmean_at_least_as_good_as_averaging_on_the_merged_layer(vision_smoke):
    """On the last block (the Linear projection, the layer with a Gram), RegMean's regression
    loss Σ_k ‖X_k W − X_k W_k‖² is no larger than plain averaging's, and its accuracy is not
    below plain averaging's."""
    suite = vision_smoke
    tasks = suite.info.merged_tasks
    experts = [suite.expert_state_dict(t) for t in tasks]
    batches = task_batches(suite, tasks, "val", 16)
    grams = [collect_grams(suite_module(suite, sd, tasks), batches[k])
             for k, sd in enumerate(experts)]
    rm = merge_state_dicts("regmean", None, experts, stats={"gram": grams})
    avg = merge_state_dicts("linear", None, experts)
    # tensors without a Gram are the plain average
    assert torch.allclose(rm["blocks.1.weight"], avg["blocks.1.weight"], atol=1e-6)

    def loss(w):
        total = 0.0
        for k, (sd, t) in enumerate(zip(experts, tasks, strict=True)):
            x = _fc_inputs(suite, sd, t)
            total += float(((x @ w.T - x @ experts[k][FC].T) ** 2).sum())
        return total

    assert loss(rm[FC]) <= loss(avg[FC]) * (1 + 1e-5)
    acc = {name: sum(r["accuracy"] for r in suite.evaluate(sd, tasks).values()) / len(tasks)
           for name, sd in (("regmean", rm), ("linear", avg))}
    assert acc["regmean"] >= acc["linear"] - 1e-9


def test_learned_coefficients_reproduce_through_the_engine(vision_smoke, informed, tmp_path):
    suite = vision_smoke
    tasks = suite.info.merged_tasks
    base = suite.base_state_dict()
    experts = [suite.expert_state_dict(t) for t in tasks]
    res = informed.extra["adamerging_layer"]
    assert res.coefficients.min() >= 0 and res.coefficients.max() <= 1
    direct = apply_coefficients(res, base, experts)
    engine = merge_through_recipe(res, suite, tasks, tmp_path)
    for name, t in direct.items():
        assert torch.allclose(engine[name], t, atol=1e-5), name


def test_stacked_view_renames_both_ways(vision_smoke):
    suite = vision_smoke
    tasks = suite.info.merged_tasks
    base = suite.base_state_dict()
    m = suite_module(suite, base, tasks, stacked=True)
    assert isinstance(m, SuiteModule)
    names = set(m.state_dict())
    assert names == set(m.to_module_names(base))
    assert m.to_body_names(m.state_dict()).keys() == base.keys()
    x = suite.labeled(tasks[1], "val")[0][:5]
    flat = suite_module(suite, base, tasks)
    assert torch.allclose(m(x, task=1), flat(x, task=1))
    assert torch.allclose(flat(x, task=1), suite.head(tasks[1])(flat._body(x)))
    # The body's own numbered stack is what RegMean++ walks (not one block holding it all).
    from modelalloy.stats.regmean_pp import find_block_stack

    prefix, blocks = find_block_stack(m)
    assert prefix == "blocks" and len(blocks) == suite.new_model().depth + 1


@pytest.mark.slow
def test_the_same_glue_runs_on_the_tiny_lm_suite(bench_cache):
    """tiny-lm (transformers GPT-2): the LM itself, prompt batches, sampled Fisher."""
    from modelalloy.bench import load_suite

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        suite = load_suite("tiny-lm", "smoke")
        cfg = InformedConfig(stats_limit=8, fisher_limit=2, adamerging_steps=2,
                             expert_samples=1, sens_limit=2, self_positioning_steps=2,
                             batch_size=4)
        res = run_informed(suite, cfg, baselines=("task_arithmetic",))
    finally:
        torch.set_num_threads(threads)
    rows = [r for r in res.records if r["variant"] == "informed"]
    assert {r["method"] for r in rows} >= {"regmean", "regmean_pp", "fisher", "ota",
                                            "adamerging_layer", "expert_merging"}
    assert all(math.isfinite(r["accuracy"]) and 0 <= r["accuracy"] <= 1 for r in rows)
    assert "transformer.h.0.mlp.c_fc.weight" in res.extra["regmean_gram_layers"]  # Conv1D


def _stat(nbytes: int) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.zeros(nbytes, dtype=torch.uint8)}]


def test_stats_memory_drops_the_least_recently_used_past_its_byte_cap():
    from modelalloy.eval.suite_stats import StatsMemory

    mem = StatsMemory()
    a, b, c = _stat(40), _stat(40), _stat(40)
    mem.put(("s", "a"), a, cap=100)
    mem.put(("s", "b"), b, cap=100)
    assert mem.get(("s", "a")) is a  # a hit is the cached object; "a" is now the most recent
    mem.put(("s", "c"), c, cap=100)
    assert mem.get(("s", "b")) is None  # least recently used: evicted
    assert mem.get(("s", "a")) is a and mem.get(("s", "c")) is c
    assert mem.nbytes == 80
    mem.put(("s", "big"), _stat(101), cap=100)  # larger than the cap: not kept, evicts nothing
    assert mem.get(("s", "big")) is None and mem.nbytes == 80
    mem.put(("s", "a"), _stat(10), cap=100)  # replacing an entry recounts its bytes
    assert mem.nbytes == 50


def test_memory_cap_from_config_then_environment(monkeypatch):
    from modelalloy.eval.suite_stats import DEFAULT_MEMORY_BYTES, MEMORY_ENV, memory_cap

    monkeypatch.delenv(MEMORY_ENV, raising=False)
    assert memory_cap() == DEFAULT_MEMORY_BYTES == 2 * 1000**3
    monkeypatch.setenv(MEMORY_ENV, "512MiB")
    assert memory_cap() == 512 * 1024**2
    assert memory_cap("1GB") == 1000**3 and memory_cap(0) == 0


def test_bench_stats_hits_in_memory_and_respects_the_cap(vision_smoke, monkeypatch):
    from modelalloy.eval import suite_stats as inf

    tasks = vision_smoke.info.merged_tasks
    args = (vision_smoke, tasks, vision_smoke.base_state_dict(),
            [vision_smoke.expert_state_dict(t) for t in tasks])
    monkeypatch.delenv(inf.MEMORY_ENV, raising=False)
    inf._MEMORY.clear()
    first = inf.BenchStats(*args).get("exp_avg_sq")
    assert inf.BenchStats(*args).get("exp_avg_sq") is first
    assert inf._MEMORY.nbytes == inf.stats_nbytes(first) > 0
    # A cap below the entry: nothing stays in memory; the files on disk serve the next call
    # (the cap is not part of the cache key).
    inf._MEMORY.clear()
    logs: list[str] = []
    capped = inf.BenchStats(*args, config=inf.BenchStatsConfig(memory=inf.stats_nbytes(first) - 1),
                            log=logs.append)
    again = capped.get("exp_avg_sq")
    assert inf._MEMORY.nbytes == 0 and again is not first
    assert any("cached" in m for m in logs)
    assert all(torch.equal(x[n], y[n]) for x, y in zip(first, again, strict=True) for n in x)
    monkeypatch.setenv(inf.MEMORY_ENV, "0")
    inf.BenchStats(*args).get("exp_avg_sq")
    assert inf._MEMORY.nbytes == 0
