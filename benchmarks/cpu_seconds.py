#!/usr/bin/env python
"""CPU-seconds of `modelalloy merge` from two source trees, interleaved run by run.

On a machine shared with other work, wall time measures the neighbours; the CPU time a merge
process and its threads use (user + system, from ``wait4``'s rusage) moves much less. Each
recipe runs ``--runs`` times per tree, alternating (before, after, before, ...), after one
untimed run per tree that fills numba's kernel cache; the output is deleted after each run.

    python benchmarks/cpu_seconds.py --before ../main/src --after src RECIPE.yml [...]

Prints per recipe the median CPU-seconds (user + system) and wall seconds of each tree, and
every run's CPU-seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import cpu_model  # noqa: E402


def run_once(python: str, src: Path, recipe: Path, out: Path, extra: list[str]
             ) -> tuple[float, float]:
    """(CPU-seconds user + system, wall seconds) of one merge."""
    env = dict(os.environ, PYTHONPATH=str(src))
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # start on a quiet disk
    t0 = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "modelalloy", "merge", str(recipe), str(out),
                             "--force", *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"merge failed ({src}, {recipe}): {proc.stderr.read().decode()[-500:]}")
    shutil.rmtree(out, ignore_errors=True)
    return usage.ru_utime + usage.ru_stime, wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+", type=Path)
    ap.add_argument("--before", type=Path, required=True, help="the baseline's src folder")
    ap.add_argument("--after", type=Path, required=True, help="the changed src folder")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--extra-args", default="", help="more `modelalloy merge` options")
    args = ap.parse_args(argv)
    extra = args.extra_args.split()
    work = Path(tempfile.mkdtemp(prefix="cpu-seconds-"))
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    print(f"CPU: {cpu_model()}; load before: {os.getloadavg()[0]:.2f}")
    try:
        for recipe in args.recipes:
            for src in trees.values():  # fill each tree's kernel cache, untimed
                run_once(args.python, src, recipe, work / "out", extra)
            runs: dict[str, list[tuple[float, float]]] = {k: [] for k in trees}
            for _ in range(args.runs):
                for key, src in trees.items():
                    runs[key].append(run_once(args.python, src, recipe, work / "out", extra))
            line = [f"{recipe.name}:"]
            for key, rs in runs.items():
                line.append(f"{key} {statistics.median(c for c, _ in rs):.2f} CPU-s "
                            f"({', '.join(f'{c:.2f}' for c, _ in rs)}; wall median "
                            f"{statistics.median(w for _, w in rs):.2f} s)")
            print("  ".join(line), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
