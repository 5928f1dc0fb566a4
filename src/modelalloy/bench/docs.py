"""Regenerate docs/benchmarks.md from measured numbers (one command).

    PYTHONPATH=src python -m modelalloy.bench.docs [--suites tiny-vision,tiny-lm]
        [--out docs/benchmarks.md] [--results bench-out] [--check-rebuild] [--only SUITE]

Builds (or loads from the cache) each suite at full size, runs every registered method, checks
the quality bars, and writes the page: measured tables first, then how the suites were tuned.
``--check-rebuild`` also rebuilds each suite from scratch in a temporary cache and checks that
the same seed gives bit-identical experts and identical numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from modelalloy.bench import load_suite
from modelalloy.eval.harness import (
    BenchResult,
    long_to_short,
    run_bench,
    summarize,
    sweep_num_experts,
)
from modelalloy.eval.report import (
    INTERVAL_NOTE,
    delta_cell,
    markdown_table,
    merge_records,
    plot_rows,
    row_label,
    verdict,
    write_results,
)
from modelalloy.eval.sweeps import long_to_short_markdown, sweep_markdown, write_sweep

HISTORY = Path(__file__).with_name("tuning_history.md")
FINDINGS = Path(__file__).with_name("findings.md")


# The long/short pair shares its prompts and is scored on the final answer (docs/evaluation.md).
PAIR_NOTE = (" `sum_long` and `sum_short` share their prompts and are both scored on the final "
             "answer: for every row but the experts' they are one number shown twice, and "
             "*held-out acc* counts it twice.")

def quality_bars(result: BenchResult) -> list[tuple[str, bool, str]]:
    rows = {(r["method"], r["variant"]): r for r in summarize(result.records)}
    recs = result.records
    experts = {r["task"]: r["accuracy"] for r in recs if r["method"] == "expert"}
    held_in = [t for t in experts if not any(r["task"] == t and r["held_out"] for r in recs)]
    worst = min(held_in, key=lambda t: experts[t])
    base = rows[("base", "reference")]["accuracy"]
    expert = rows[("expert", "reference")]["accuracy"]
    bars = [(f"each expert ≥ 90% on its own task (lowest: {worst} {100 * experts[worst]:.1f})",
             experts[worst] >= 0.9, ""),
            (f"base clearly worse than the experts ({100 * base:.1f} vs {100 * expert:.1f})",
             expert - base >= 0.10, "")]
    avg = rows.get(("linear", "default"))
    if avg is not None:
        bars.append((f"simple averaging loses clearly against the experts "
                     f"({100 * avg['accuracy']:.1f} vs {100 * expert:.1f})",
                     expert - avg["accuracy"] >= 0.05, ""))
        best = None
        for m in ("task_arithmetic", "ties"):
            for v in ("tuned", "default"):
                r = rows.get((m, v))
                if r and (best is None or r["accuracy"] > best[1]["accuracy"]):
                    best = (f"{m} ({v})", r)
        if best:
            gain = best[1]["accuracy"] - avg["accuracy"]
            bars.append((f"task arithmetic or TIES win back part of the loss (best: {best[0]} "
                         f"{100 * best[1]['accuracy']:.1f}, {100 * gain:+.1f} over averaging)",
                         gain >= 0.01 and best[1]["accuracy"] < expert, ""))
    return bars


def interval_widths(result: BenchResult) -> str:
    """The measured resolution: median 95% half-widths of a task's accuracy, of a suite mean
    and of a paired difference from task arithmetic, in points."""
    rows = [r for r in summarize(merge_records(result.records)) if "accuracy_ci" in r]
    task = [50 * (r["ci_high"] - r["ci_low"]) for r in merge_records(result.records)
            if not r["held_out"] and "ci_low" in r]
    mean = [50 * (r["accuracy_ci"][1] - r["accuracy_ci"][0]) for r in rows]
    delta = [50 * (r["delta"]["ci"][1] - r["delta"]["ci"][0]) for r in rows
             if r.get("delta") and r["method"] not in ("base", "expert")]
    n = sorted({r["n"] for r in result.records if "n" in r})
    return (f"Resolution ({'/'.join(map(str, n))} test examples per task; median 95% "
            f"half-widths): one task ±{statistics.median(task):.1f} points, a suite mean "
            f"±{statistics.median(mean):.1f}, a paired difference from task arithmetic "
            f"±{statistics.median(delta) if delta else float('nan'):.1f}.")


def verdict_table(result: BenchResult) -> str:
    rows = plot_rows(result.records)
    lines = ["| method | mean acc | Δ vs TA | verdict |", "|---|---|---|---|"]
    for r in rows:
        if r["method"] in ("base", "expert", "task_arithmetic"):
            continue
        lines.append(f"| {row_label(r)} | {100 * r['accuracy']:.1f} | {delta_cell(r)} | "
                     f"{verdict(r)} |")
    return "\n".join(lines)


# The methods measured for the page (the optimisation-based ones take minutes per merge on two
# shared cores; `modelalloy bench --methods all` runs every registered method).
DOC_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della",
               "model_stock", "tsv_m", "consensus", "widen"]
CHECK_METHODS = ["linear", "ties"]
SEED_METHODS = ["linear", "task_arithmetic", "ties", "tsv_m"]


def check_same_numbers(name: str, size: str, result: BenchResult, rebuild: bool) -> str:
    """Re-run part of the bench (and with ``rebuild`` rebuild the suite); compare the records."""
    methods = CHECK_METHODS
    keep = {"base", "expert", *methods}
    result = BenchResult(result.suite, result.size,
                         [r for r in result.records if r["method"] in keep], {}, {}, {})
    if rebuild:
        with tempfile.TemporaryDirectory() as tmp:
            suite = load_suite(name, size, cache_dir=Path(tmp))
            again = run_bench(suite, methods)
            first = load_suite(name, size)
            same_w = all(torch.equal(first.expert_state_dict(t)[k], suite.expert_state_dict(t)[k])
                         for t in suite.info.merged_tasks
                         for k in first.expert_state_dict(t))
        how = "rebuilt from scratch in a fresh cache"
    else:
        again = run_bench(load_suite(name, size), methods)
        same_w, how = True, "re-run on the cached suite"
    same = [(r["method"], r["variant"], r["task"], r["accuracy"]) for r in result.records] == \
        [(r["method"], r["variant"], r["task"], r["accuracy"]) for r in again.records]
    ok = same and same_w
    return f"{'PASS' if ok else 'FAIL'}: same seed, same numbers ({how})"


def seeds_section(name: str, size: str, first: BenchResult, n_seeds: int, out_dir: Path,
                  log: Any) -> list[str]:
    """The spread over fine-tuning seeds of :data:`SEED_METHODS` (seed 0 from ``first``)."""
    from modelalloy.bench.seeds import (
        SEEDS_NOTE,
        run_seeds,
        seed_spread,
        seeds_markdown,
        write_seeds,
    )

    keep = {"base", "expert", *SEED_METHODS}
    first = BenchResult(first.suite, first.size,
                        [r for r in first.records if r["method"] in keep], {}, {}, {})
    others = run_seeds(name, size, n_seeds, lambda s: run_bench(s, SEED_METHODS, log=log),
                       log=log, first=1)
    rows = seed_spread([first, *others])
    write_seeds(rows, out_dir / name, f"{name} ({size})")
    return [f"Spread over {n_seeds} fine-tuning seeds (`modelalloy bench --suite {name} "
            f"--seeds {n_seeds}`). " + SEEDS_NOTE, "", seeds_markdown(rows), ""]


def section(name: str, size: str, out_dir: Path, rebuild: bool, log: Any,
            n_seeds: int = 1) -> str:
    start = time.perf_counter()
    suite = load_suite(name, size, log=log)
    built = suite.info.build_seconds
    result = run_bench(suite, DOC_METHODS, log=log)
    write_results(result, out_dir / name)
    repeats = 1 if name == "tiny-lm" else 2
    sweep = sweep_num_experts(suite, "task_arithmetic", repeats=repeats, log=log)
    write_sweep(sweep, out_dir / name, "task_arithmetic")
    bars = quality_bars(result)
    same = check_same_numbers(name, size, result, rebuild)
    lines = [f"## {name} ({size})", "",
             f"Suite build: {built:.0f}s on this machine (1 torch thread; a shared 2-core "
             f"machine, so wall times are noisy); bench run: "
             f"{time.perf_counter() - start:.0f}s. Command: `modelalloy bench --suite {name} "
             f"--size {size} --out DIR`; measured at commit `{measured_commit()}` (load average "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end).", "",
             "Accuracy in %. *mean/norm acc* average the merged tasks (norm = merged ÷ the "
             "task's expert); *held-out acc* averages tasks that are never merged. Rows with "
             "*(λ=… on val)* use the scaling coefficient chosen on the validation split; the "
             "others use the papers' defaults." + (PAIR_NOTE if suite.info.extra.get("pair")
                                                   else ""), "",
             INTERVAL_NOTE, "", markdown_table(result.records), "",
             interval_widths(result), "", "Verdicts on the claim \"beats task arithmetic\" "
             "(tuned rows where a method has one; *shows*: the paired 95% interval of Δ lies "
             "above 0; *does not show*: it lies below +1 point; *cannot tell*: it straddles "
             "both):", "", verdict_table(result), "", "Quality bars:", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok, _ in bars]
    lines += [f"- {same}", ""]
    if n_seeds > 1:
        lines += seeds_section(name, size, result, n_seeds, out_dir, log)
    if result.skipped:
        lines += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in result.skipped.items()), ""]
    if suite.info.extra.get("pair"):
        from modelalloy.bench.lm_l2s import L2SCase

        rows = long_to_short(L2SCase.build(suite, log=log),
                             ["linear", "task_arithmetic", "ties", "slerp"], log=log)
        lines += ["Long-to-short (chain-of-thought expert merged with the direct one, both "
                  "fine-tuned from one shared parent θ_P, the `base` row; final-answer accuracy "
                  "and mean response length on the same prompts):", "",
                  long_to_short_markdown(rows), ""]
    lines += [f"Number of experts merged (task arithmetic, λ=0.3, {repeats} random subset(s) "
              "per k):",
              "", sweep_markdown(sweep), "",
              f"![per-task accuracy per method](img/{name}-results.png)",
              f"![experts merged](img/{name}-sweep.png)", ""]
    return "\n".join(lines)


def measured_commit() -> str:
    """The short commit the numbers were measured at (``+dirty`` with uncommitted changes)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _page_section(page: Path, name: str) -> str | None:
    """The measured section of suite ``name`` on an existing page (from its "## name" heading
    to the next "## " heading), so that ``--only`` keeps the other suites' numbers even without
    their cached RESULTS/<suite>/section.md."""
    if not page.is_file():
        return None
    lines = page.read_text().split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith(f"## {name} (")]
    if not starts:
        return None
    end = next((i for i in range(starts[0] + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    return "\n".join(lines[starts[0]:end]).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelalloy.bench.docs")
    parser.add_argument("--suites", default="tiny-vision,tiny-lm")
    parser.add_argument("--size", default="full")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--results", type=Path, default=Path("bench-out"))
    parser.add_argument("--check-rebuild", action="store_true")
    parser.add_argument("--seeds", type=int, default=1,
                        help="also rebuild the experts from this many fine-tuning seeds and "
                             "report the spread of SEED_METHODS")
    parser.add_argument("--only", default=None,
                        help="regenerate only these suites; reuse the others' sections from "
                             "RESULTS/<suite>/section.md (a slow machine need not redo both)")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    parts = ["# Benchmarks: the built-in suites", "",
             "Generated by `PYTHONPATH=src python -m modelalloy.bench.docs` (per-suite sections "
             "are cached in\n`RESULTS/<suite>/section.md`; `--only SUITE` regenerates one) — do "
             "not edit the measured\nsections by hand; the tuning history at the end is kept in\n"
             "`src/modelalloy/bench/tuning_history.md`.", ""]
    only = args.only.split(",") if args.only else None
    for name in args.suites.split(","):
        cached = args.results / name / "section.md"
        if only is not None and name not in only:
            kept = cached.read_text() if cached.is_file() else _page_section(args.out, name)
            parts.append(kept or f"## {name}\n\n(not measured yet: run with `--only {name}`)\n")
            continue
        text = section(name, args.size, args.results, args.check_rebuild, log, args.seeds)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(text)
        img = args.out.parent / "img"
        img.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.results / name / "results.png", img / f"{name}-results.png")
        shutil.copyfile(args.results / name / "sweep-task_arithmetic.png",
                        img / f"{name}-sweep.png")
        parts.append(text)
    parts.append(FINDINGS.read_text())
    parts.append(HISTORY.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(parts))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
