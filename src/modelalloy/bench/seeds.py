"""Spread over fine-tuning seeds: the same suite with its experts rebuilt from N seeds.

``modelalloy bench --seeds N`` builds the suite with ``finetune_seed`` 0..N-1 (the base, the
data and the task heads stay the same; each seed is its own cached suite), runs the bench on
each (``bench``: the command's comparison, its ``--methods`` — every registered method unless
named, as without ``--seeds`` — and options), and reports per method the mean accuracy on
every seed, their mean and standard deviation
(n − 1 in the denominator), the same for the normalised accuracy (merged ÷ the task's expert
of the same seed, mean over tasks), and on how many seeds the difference from task arithmetic
was significant and in which direction. The bootstrap intervals measure the test-set noise of one
set of experts; the seed spread measures how much the ranking depends on which experts were
trained.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelalloy.eval.harness import BenchResult, summarize
from modelalloy.eval.report import row_label


def seed_overrides(seed: int) -> dict[str, Any] | None:
    """Seed 0 is the suite as built by default (same cache entry); others override."""
    return None if seed == 0 else {"finetune_seed": seed}


def run_seeds(suite_name: str, size: str, n_seeds: int,
              bench: Callable[[Any], BenchResult], *, rebuild: bool = False,
              log: Callable[[str], None] | None = None, first: int = 0) -> list[BenchResult]:
    """``bench(suite)`` on the suite built from each fine-tuning seed first..n_seeds-1."""
    from modelalloy.bench import load_suite

    log = log or (lambda _m: None)
    out = []
    for s in range(first, n_seeds):
        suite = load_suite(suite_name, size, rebuild=rebuild, log=log,
                           overrides=seed_overrides(s))
        log(f"seed {s}: suite at {suite.info.path}")
        out.append(bench(suite))
    return out


def seed_spread(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """One row per (method, variant) present on every seed: accuracies, mean, sd, and the
    signs of the significant differences from task arithmetic."""
    per_seed = [{(r["method"], r["variant"]): r for r in summarize(res.records)}
                for res in results]
    rows = []
    for key in per_seed[0]:
        if not all(key in s for s in per_seed):
            continue
        accs = [s[key]["accuracy"] for s in per_seed]
        norms = [s[key]["normalized_accuracy"] for s in per_seed]
        deltas = [s[key]["delta"] for s in per_seed if s[key].get("delta")]
        row: dict[str, Any] = {
            "method": key[0], "variant": key[1], "params": per_seed[0][key]["params"],
            "accuracy": accs, "mean": statistics.fmean(accs),
            "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "held_out_accuracy": [s[key]["held_out_accuracy"] for s in per_seed],
            "normalized_accuracy": norms, "normalized_mean": statistics.fmean(norms),
            "normalized_sd": statistics.stdev(norms) if len(norms) > 1 else 0.0,
        }
        if len(deltas) == len(per_seed):
            row["delta"] = [d["value"] for d in deltas]
            row["better"] = sum(d["significant"] and d["value"] > 0 for d in deltas)
            row["worse"] = sum(d["significant"] and d["value"] < 0 for d in deltas)
        rows.append(row)
    return rows


def seeds_markdown(rows: list[dict[str, Any]]) -> str:
    n = len(rows[0]["accuracy"]) if rows else 0
    header = (["method"] + [f"seed {i}" for i in range(n)]
              + ["mean ± sd", "norm acc mean ± sd", "Δ vs TA (mean)",
                 "significant +/− (seeds)"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        label = row_label(r)
        delta = (f"{100 * statistics.fmean(r['delta']):+.1f}" if "delta" in r else "—")
        signs = f"{r['better']} / {r['worse']}" if "delta" in r else "—"
        cells = ([label] + [f"{100 * a:.1f}" for a in r["accuracy"]]
                 + [f"{100 * r['mean']:.1f} ± {100 * r['sd']:.1f}",
                    f"{100 * r['normalized_mean']:.1f} ± {100 * r['normalized_sd']:.1f}",
                    delta, signs])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SEEDS_NOTE = ("Mean held-in accuracy (%) of the suite rebuilt with its experts fine-tuned from "
              "each seed (same base, data and heads); *mean ± sd* over seeds (*norm acc*: merged "
              "÷ the task's expert of the same seed, mean over tasks); *significant "
              "+/−*: on how many seeds the paired bootstrap interval of the difference from "
              "task arithmetic lay above / below 0. A tuned row's λ is the one chosen on seed 0 "
              "(each seed chooses its own).")


def write_seeds(rows: list[dict[str, Any]], out_dir: Path, title: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "seeds.json", "md": out_dir / "seeds.md"}
    paths["json"].write_text(json.dumps(rows, indent=1))
    paths["md"].write_text(f"# {title}: spread over fine-tuning seeds\n\n{SEEDS_NOTE}\n\n"
                           f"{seeds_markdown(rows)}\n")
    return paths
