"""The backdoor benchmark: merges that include a backdoored expert, clean accuracy and ASR.

One held-in task's clean expert is replaced by its backdoored twin
(:mod:`modelalloy.bench.backdoor`); each method merges the experts; every record carries the
clean accuracy (as :class:`SuiteScorer` scores it) and ``asr``, the attack success rate on that
task's triggered test inputs. The summary gives, per method, the held-in clean accuracy, the ASR
on the backdoored task (succession) and the mean ASR on the other held-in tasks (transfer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modelalloy.eval.harness import SuiteScorer, paper_settings, summarize
from modelalloy.eval.report import _ci

METHODS = ("task_arithmetic", "ties", "adamerging", "dam")


@dataclass
class BackdoorConfig:
    """Step counts and granularity default to the official DAM layer-wise configuration
    (1000 mask steps, then 1000 AdaMerging steps; AdaMerging alone gets as many)."""

    adamerging_steps: int = 1000
    dam_mask_steps: int = 1000
    dam_adamerging_steps: int = 1000
    granularity: str = "layer"
    dam_final_mask: str = "sample"
    batch_size: int = 16
    seed: int = 0


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: held-in clean accuracy and the mean ASR of each backdoor effect
    (succession: the backdoored task; transfer: the other held-in tasks), with intervals."""
    keep = ("method", "variant", "accuracy", "accuracy_ci", "normalized_accuracy",
            "asr_succession", "asr_succession_ci", "asr_transfer", "asr_transfer_ci")
    return [{k: row.get(k) for k in keep} for row in summarize(records)]


def backdoor_bench(suite: Any, task: str | None = None, methods: Sequence[str] = METHODS,
                   cfg: BackdoorConfig | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Records (with ``asr``), summary rows and timings of each method with a backdoored
    expert of ``task`` (default: the first held-in task) among the merged experts."""
    from modelalloy.api import merge_state_dicts
    from modelalloy.bench.backdoor import backdoored_suite
    from modelalloy.eval.informed import apply_coefficients
    from modelalloy.eval.suite_stats import suite_module, task_batches

    log = log or (lambda _m: None)
    cfg = cfg or BackdoorConfig()
    tasks = suite.info.merged_tasks
    attacked = backdoored_suite(suite, task, log=log)
    task = attacked.task
    experts = [attacked.expert_state_dict(t) for t in tasks]
    base = suite.base_state_dict()
    scorer = SuiteScorer(attacked)
    records = scorer.records("base", base, variant="reference", tasks=tasks)
    records += scorer.records("backdoored expert", attacked.expert_state_dict(task),
                              variant="reference", tasks=[task])
    timings: dict[str, float] = {}
    batches = None
    for method in methods:
        start = time.perf_counter()
        if method in ("task_arithmetic", "ties"):
            params = paper_settings(method)
            merged = merge_state_dicts(method, base, experts, seed=cfg.seed, **params)
        elif method in ("adamerging", "dam"):
            batches = batches or task_batches(suite, tasks, "test", cfg.batch_size)
            module = suite_module(suite, base, tasks)
            if method == "adamerging":
                from modelalloy.optimize.adamerging import adamerging

                res = adamerging(module, base, experts, batches, granularity=cfg.granularity,
                                 steps=cfg.adamerging_steps, batches_per_step=1,
                                 seed=cfg.seed)
                merged = apply_coefficients(res, base, experts)
                params = {"granularity": cfg.granularity, "steps": cfg.adamerging_steps}
            else:
                from modelalloy.optimize.dam import dam

                res = dam(module, base, experts, batches, mask_steps=cfg.dam_mask_steps,
                          adamerging_steps=cfg.dam_adamerging_steps,
                          granularity=cfg.granularity, final=cfg.dam_final_mask,
                          seed=cfg.seed)
                merged = {**base, **_body_names(module, res.merged)}
                params = {"mask_steps": cfg.dam_mask_steps,
                          "adamerging_steps": cfg.dam_adamerging_steps,
                          "granularity": cfg.granularity, "final_mask": cfg.dam_final_mask}
        else:
            raise ValueError(f"backdoor bench: unknown method '{method}'")
        timings[method] = round(time.perf_counter() - start, 2)
        records += scorer.records(method, merged, params=params, tasks=tasks)
        log(f"backdoor: {method} merged in {timings[method]} s")
    return {"suite": suite.info.name, "size": suite.info.size, "backdoored_task": task,
            "records": records, "summary": summary_rows(records), "timings": timings}


def _body_names(module: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from modelalloy.eval.suite_stats import to_body_names

    return to_body_names(module, state)


def markdown(result: dict[str, Any]) -> str:
    lines = [f"backdoored task: {result['backdoored_task']}", "",
             "| method | clean acc | norm acc | ASR succession | ASR transfer |",
             "|---|---|---|---|---|"]
    for r in result["summary"]:
        lines.append(f"| {r['method']} | {_ci(r['accuracy'], r['accuracy_ci'])}"
                     f" | {_ci(r['normalized_accuracy'], None)}"
                     f" | {_ci(r['asr_succession'], r['asr_succession_ci'])}"
                     f" | {_ci(r['asr_transfer'], r['asr_transfer_ci'])} |")
    return "\n".join(lines)
