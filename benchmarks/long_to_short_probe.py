"""Why merging tiny-lm's long and short sum experts collapses: measurements.

    PYTHONPATH=src python benchmarks/long_to_short_probe.py [--size full] [--n 300]
        [--pair suite|shared-parent]

Prints, for the suite's long/short pair (``sum_long`` writes running sums, ``sum_short``
answers directly; both fine-tuned from the suite's base):

1. the task vectors' sizes: ‖τ‖ of each pair expert and of the held-in experts, relative to
   ‖θ_0‖, and the cosine between τ_long and τ_short;
2. the straight path θ(α) = (1 − α)·θ_short + α·θ_long: final-answer accuracy (with its 95%
   bootstrap interval), mean response length, and the share of answers in the long format
   (running sums then ``;``), the short format (digits only) or neither (malformed).

``--pair shared-parent`` measures the pair the long-to-short study merges instead
(:mod:`modelalloy.bench.lm_l2s`: both experts a few small steps from one parent that sums in
both formats; sizes are then relative to that parent) and adds each point's paired difference
from the long expert.

A merge keeps the long expert's accuracy at a shorter length only if some point between the
experts answers well; when every interior point is malformed, no interpolation-style merge
(linear, task arithmetic, TIES, SLERP) can.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from modelalloy.bench import load_suite
from modelalloy.bench.lm import final_answer, greedy, make_examples
from modelalloy.eval.intervals import accuracy_interval, difference_interval


def _flat(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten().float() for _, v in sorted(sd.items())])


def _format(text: str) -> str:
    if ";" in text and all(part.isdigit() for part in text.split(";")[0].split(",")):
        return "long"
    return "short" if text.isdigit() else "malformed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--pair", choices=["suite", "shared-parent"], default="suite")
    args = ap.parse_args(argv)
    suite = load_suite("tiny-lm", args.size)
    long_task, short_task = suite.info.extra["pair"]
    source = suite
    if args.pair == "shared-parent":
        from modelalloy.bench.lm_l2s import L2SCase

        source = L2SCase.build(suite)
    base = source.base_state_dict()
    long_sd, short_sd = source.expert_state_dict(long_task), source.expert_state_dict(short_task)
    b = _flat(base)
    tl, ts = _flat(long_sd) - b, _flat(short_sd) - b
    sizes = {t: float((_flat(suite.expert_state_dict(t)) - b).norm() / b.norm())
             for t in suite.info.merged_tasks}
    report = {"pair": args.pair, "norm_long": float(tl.norm() / b.norm()),
              "norm_short": float(ts.norm() / b.norm()),
              "norm_held_in_median": sorted(sizes.values())[len(sizes) // 2],
              "cos_long_short": float(tl @ ts / (tl.norm() * ts.norm())),
              "distance_long_short": float((tl - ts).norm() / b.norm())}
    print(json.dumps(report, indent=1))
    tests = make_examples(long_task, args.n, suite.info.config["seed"] + 2)
    prompts = [p for p, _ in tests]
    max_new = suite.info.config["n_positions"] - 16
    path = []
    print("| α (0 = short, 1 = long) | accuracy | Δ vs long | length | long | short | "
          "malformed |")
    print("|---|---|---|---|---|---|---|")
    long_hits: list[bool] = []
    for i in reversed(range(11)):  # α = 1 (the long expert) first: the paired reference
        a = i / 10
        sd = {k: (1 - a) * short_sd[k] + a * long_sd[k] for k in base}
        gens = greedy(suite._model(sd), prompts, max_new)
        hits = [final_answer(g) == final_answer(y) for g, (_, y) in zip(gens, tests, strict=True)]
        lo, hi = accuracy_interval(hits)
        long_hits = long_hits or hits
        d, dlo, dhi = difference_interval([hits], [long_hits])
        kinds = [_format(g) for g in gens]
        row = {"alpha": a, "accuracy": sum(hits) / len(hits), "ci": [lo, hi],
               "vs_long": [d, dlo, dhi],
               "length": sum(len(g) + 1 for g in gens) / len(gens),
               **{k: kinds.count(k) / len(kinds) for k in ("long", "short", "malformed")}}
        path.append(row)
        print(f"| {a:.1f} | {100 * row['accuracy']:.1f} ± {50 * (hi - lo):.1f} | "
              f"{100 * d:+.1f} ({100 * dlo:+.1f}..{100 * dhi:+.1f}) | {row['length']:.1f} | "
              f"{100 * row['long']:.0f}% | {100 * row['short']:.0f}% | "
              f"{100 * row['malformed']:.0f}% |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({**report, "path": path}, indent=1))
    assert not math.isnan(report["cos_long_short"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
