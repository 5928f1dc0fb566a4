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


def _rows(scorer: SuiteScorer, suite: Any, method: str, sd: dict[str, torch.Tensor],
          params: dict[str, Any], variant: str = "default") -> list[dict[str, Any]]:
    from modelalloy.bench.backdoor import attack_success

    rows = scorer.records(method, sd, variant=variant, params=params,
                          tasks=suite.info.merged_tasks)
    asr = attack_success(suite, sd, suite.info.merged_tasks)
    for r in rows:
        r["asr"] = round(asr[r["task"]], 4)
    return rows


def summarize_asr(records: list[dict[str, Any]], backdoored: str) -> list[dict[str, Any]]:
    out = []
    for row in summarize(records):
        rs = [r for r in records if r["method"] == row["method"]
              and r["variant"] == row["variant"] and "asr" in r]
        own = [r["asr"] for r in rs if r["task"] == backdoored]
        other = [r["asr"] for r in rs if r["task"] != backdoored]
        out.append({"method": row["method"], "variant": row["variant"],
                    "accuracy": row["accuracy"],
                    "normalized_accuracy": row["normalized_accuracy"],
                    "asr_backdoored": own[0] if own else None,
                    "asr_other": sum(other) / len(other) if other else None})
    return out


def backdoor_bench(suite: Any, task: str | None = None, methods: Sequence[str] = METHODS,
                   cfg: BackdoorConfig | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Records (with ``asr``), summary rows and timings of each method with a backdoored
    expert of ``task`` (default: the first held-in task) among the merged experts."""
    from modelalloy.api import merge_state_dicts
    from modelalloy.bench.backdoor import backdoored_experts
    from modelalloy.bundle._checkpoint import load_state_dict
    from modelalloy.eval.informed import apply_coefficients
    from modelalloy.eval.suite_stats import suite_module, task_batches

    log = log or (lambda _m: None)
    cfg = cfg or BackdoorConfig()
    tasks = suite.info.merged_tasks
    task = task or tasks[0]
    bad = load_state_dict(backdoored_experts(suite, [task], log=log)[task])
    experts = [bad if t == task else suite.expert_state_dict(t) for t in tasks]
    base = suite.base_state_dict()
    scorer = SuiteScorer(suite)
    records = _rows(scorer, suite, "base", base, {}, "reference")
    records += [{**r, "method": "backdoored expert", "variant": "reference"}
                for r in _rows(scorer, suite, "expert", bad, {}, "reference") if r["task"] == task]
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
        records += _rows(scorer, suite, method, merged, params)
        log(f"backdoor: {method} merged in {timings[method]} s")
    return {"suite": suite.info.name, "size": suite.info.size, "backdoored_task": task,
            "records": records, "summary": summarize_asr(records, task), "timings": timings}


def _body_names(module: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from modelalloy.eval.suite_stats import to_body_names

    return to_body_names(module, state)


def markdown(result: dict[str, Any]) -> str:
    lines = [f"backdoored task: {result['backdoored_task']}", "",
             "| method | clean acc | norm acc | ASR backdoored task | ASR other tasks |",
             "|---|---|---|---|---|"]

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}"

    for r in result["summary"]:
        lines.append(f"| {r['method']} | {pct(r['accuracy'])} | {pct(r['normalized_accuracy'])}"
                     f" | {pct(r['asr_backdoored'])} | {pct(r['asr_other'])} |")
    return "\n".join(lines)
