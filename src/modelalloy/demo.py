"""`make demo`: build the benchmark suite (cached), merge with every method, compare.

    python -m modelalloy.demo [--suite tiny-vision|tiny-lm] [--size full|smoke] [--out DIR]

Builds (or finds in ~/.cache/modelalloy) the suite's base model and task experts, merges the
experts with every registered method that can run on them (the papers' defaults, and the scaling
coefficient chosen on the validation split), prints the comparison table of merges and writes
DIR/results.{md,json,png}. TALL masks (``tall_masks``) is not a merge: each expert is rebuilt
from the TALL bundle and reported in a separate "bundles" table (its accuracy on its own task,
the share of the expert's accuracy kept, the bundle's storage ratio). Methods that need
statistics (RegMean, RegMean++, Fisher, OTA, AIM) get them collected on the suite's unlabeled
inputs first (the Fisher on the validation split; OTA reads the Adam moments saved with each
expert), once per suite, cached in the suite folder (``modelalloy.eval.suite_stats.BenchStats``).
Methods that need statistics the bench cannot make or a different number of models are listed
as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelalloy.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="tiny-vision", choices=["tiny-vision", "tiny-lm"])
    parser.add_argument("--size", default="full", choices=["full", "smoke"])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--methods", default="all", help="comma-separated, or 'all'")
    args = parser.parse_args(argv)

    from modelalloy.bench import load_suite
    from modelalloy.eval.harness import run_bench
    from modelalloy.eval.report import print_table, write_results

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    log(f"building or loading {args.suite} ({args.size}); the first build takes minutes")
    suite = load_suite(args.suite, args.size, log=log)
    log(f"suite ready in {time.perf_counter() - start:.1f}s: {suite.info.path}")
    methods = None if args.methods == "all" else args.methods.split(",")
    result = run_bench(suite, methods, log=log)
    paths = write_results(result, args.out)
    print_table(result.records, f"{args.suite} ({args.size}): accuracy %")
    if result.stats_seconds:
        print("statistics collected: " + ", ".join(f"{k} {v:.1f}s"
                                                    for k, v in result.stats_seconds.items()))
    for name, reason in result.skipped.items():
        print(f"skipped {name}: {reason}")
    print(f"wrote {paths['md']}, {paths['json']} and the plot {paths['png']} "
          f"({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
