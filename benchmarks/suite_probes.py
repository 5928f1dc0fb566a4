"""Measurements behind docs/benchmarks.md's "what the suites cannot show yet" (issue 20).

    PYTHONPATH=src python benchmarks/suite_probes.py widen [--suite tiny-vision] [--size full]
    PYTHONPATH=src python benchmarks/suite_probes.py tall  [--suite tiny-vision] [--limit N]

``widen``: held-in mean accuracy of the base, task arithmetic at λ 1 and 0.3, and WIDEN at
several score calibrations (s_cal) and one above-average ratio (t_avg).
``tall``: TALL masks at λ_t ∈ {0.2, ..., 0.6} and λ_t chosen per task on validation (the
paper's protocol): each rebuilt expert's accuracy ÷ the expert's, the mask densities, and how
much of τ_t the mask drops and of the other tasks' vectors it keeps.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch

from modelalloy.api import merge_state_dicts
from modelalloy.bench import load_suite
from modelalloy.bundle import compress

TALL_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)


def _mean_acc(suite: Any, sd: dict[str, torch.Tensor], tasks: list[str]) -> float:
    res = suite.evaluate(sd, tasks)
    return 100 * sum(res[t]["accuracy"] for t in tasks) / len(tasks)


def widen(suite: Any) -> None:
    tasks = suite.info.merged_tasks
    base = suite.base_state_dict()
    experts = [suite.expert_state_dict(t) for t in tasks]
    rows = [("base", base)]
    rows += [(f"task arithmetic λ={lam}", merge_state_dicts("task_arithmetic", base, experts,
                                                             **{"lambda": lam}))
             for lam in (1.0, 0.3)]
    rows += [(f"widen s_cal={sc}", merge_state_dicts("widen", base, experts,
                                                     score_calibration=sc))
             for sc in (1.0, 0.5, 0.3, 0.2)]
    rows.append(("widen t_avg=2 s_cal=1", merge_state_dicts("widen", base, experts,
                                                            above_average_ratio=2.0)))
    print("| model | held-in mean (%) |\n|---|---|")
    for label, sd in rows:
        print(f"| {label} | {_mean_acc(suite, sd, tasks):.1f} |", flush=True)


def _flat(sd: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([sd[k].flatten().float() for k in keys])


def tall_overlap(suite: Any) -> None:
    tasks = suite.info.merged_tasks
    base = suite.base_state_dict()
    keys = [k for k in base if base[k].is_floating_point()]
    b = _flat(base, keys)
    tv = torch.stack([_flat(suite.expert_state_dict(t), keys) - b for t in tasks])
    mtl = tv.sum(0)
    cos = [float(tv[i] @ tv[j] / (tv[i].norm() * tv[j].norm()))
           for i, j in itertools.combinations(range(len(tasks)), 2)]
    print(f"mean pairwise cosine of the task vectors {sum(cos) / len(cos):.3f} "
          f"(min {min(cos):.3f}, max {max(cos):.3f})")
    for lam in TALL_GRID:
        err, lost, kept = [], [], []
        for i in range(len(tasks)):
            m = (tv[i].abs() >= lam * (mtl - tv[i]).abs()).float()
            n = tv[i].norm()
            err.append(float((m * mtl - tv[i]).norm() / n))
            lost.append(float(((1 - m) * tv[i]).norm() / n))
            kept.append(float((m * (mtl - tv[i])).norm() / n))
        k = len(tasks)
        print(f"λ {lam}: ‖m∘τ_MTL − τ_t‖/‖τ_t‖ {sum(err) / k:.2f}; τ_t dropped "
              f"{sum(lost) / k:.2f}; other tasks kept {sum(kept) / k:.2f} (× ‖τ_t‖)")


def tall(suite: Any, limit: int | None) -> None:
    tasks = suite.info.merged_tasks
    base = suite.base_state_dict()
    experts = {t: suite.expert_state_dict(t) for t in tasks}
    exp = {t: suite.evaluate(experts[t], [t], limit=limit)[t]["accuracy"] for t in tasks}
    val: dict[tuple[float, str], float] = {}
    test: dict[tuple[float, str], float] = {}
    print("| λ_t | kept (%) | mask density |\n|---|---|---|")
    for lam in TALL_GRID:
        bundle = compress(base, experts, mask_lambda=lam)
        dens = bundle.mask_densities()
        for t in tasks:
            sd = bundle.rebuild(t)
            val[(lam, t)] = suite.evaluate(sd, [t], split="val")[t]["accuracy"]
            test[(lam, t)] = suite.evaluate(sd, [t], limit=limit)[t]["accuracy"]
        kept = 100 * sum(test[(lam, t)] / exp[t] for t in tasks) / len(tasks)
        print(f"| {lam} | {kept:.1f} | {sum(dens.values()) / len(dens):.2f} |", flush=True)
    choice = {t: max(TALL_GRID, key=lambda lam, t=t: (val[(lam, t)], -abs(lam - 0.4)))
              for t in tasks}
    kept = 100 * sum(test[(choice[t], t)] / exp[t] for t in tasks) / len(tasks)
    print(f"| per task on val {choice} | {kept:.1f} | |")
    tall_overlap(suite)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("probe", choices=("widen", "tall"))
    ap.add_argument("--suite", default="tiny-vision")
    ap.add_argument("--size", default="full")
    ap.add_argument("--limit", type=int, default=None, help="test examples per task")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    suite = load_suite(args.suite, args.size)
    if args.probe == "widen":
        widen(suite)
    else:
        tall(suite, args.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
