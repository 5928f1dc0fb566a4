#!/usr/bin/env python
"""Cold `modelalloy merge` with and without the early page hints (``MODELALLOY_EARLY_HINTS``).

``modelalloy/__init__`` hints the first 256 MB of every model's first shard to the kernel
before it imports torch (src/modelalloy/early_hints.py), so a cold merge's first reads overlap
the import. This script measures what that buys: the ``merge_speed.py`` recipe of one method on
its synthetic models, the recipe's input shards dropped from the page cache
(``posix_fadvise(DONTNEED)``) before every run, runs alternating hints off / on (off first,
then on first, ...), each its own process. Per run: wall seconds, CPU seconds (user + system),
peak RSS and bytes the process read from the disk (``/proc/PID/io``).

Usage::

    PYTHONPATH=src python benchmarks/early_hints_cold.py --size 1B --method linear --runs 1

Results are appended to ``benchmarks/results/early_hints_cold.json``; the table is printed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_speed as ms  # noqa: E402

RESULTS = ms.REPO / "benchmarks" / "results" / "early_hints_cold.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1B", choices=sorted(ms.SIZES))
    ap.add_argument("--method", default="linear")
    ap.add_argument("--runs", type=int, default=1, help="runs per setting (default 1)")
    ap.add_argument("--cache-dir", type=Path, default=ms.REPO / "benchmarks" / ".cache")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="early-hints-"))
    try:
        ms.check_disk(args.size, args.cache_dir.resolve(), work)
        models = ms.generate_models(args.size, args.cache_dir.resolve())
        recipe = work / f"{args.method}.yml"
        recipe.write_text(ms.recipe_yaml(args.method, models))
        inputs = [f for p in ms.recipe_inputs(args.method, models) for f in ms.model_files(p)]
        cmd = [args.python, "-m", "modelalloy", "merge", str(recipe), str(work / "out"),
               "--force"]
        load_before = ms._load_avg()
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for run in range(args.runs):
            order = ("off", "on") if run % 2 == 0 else ("on", "off")
            for setting in order:
                env = ms.modelalloy_env() | {"MODELALLOY_EARLY_HINTS":
                                             "0" if setting == "off" else "1"}
                shutil.rmtree(work / "out", ignore_errors=True)
                ms._drop_cache(inputs)
                r = ms.run_measured(cmd, env, work / f"{setting}-{run}.log", args.timeout)
                shutil.rmtree(work / "out", ignore_errors=True)
                if r["rc"]:
                    raise SystemExit(f"hints {setting}, run {run + 1} failed: {r['log_tail']}")
                runs[setting].append(r)
                print(f"[hints {setting}] run {run + 1}: {r['wall_s']:.2f}s wall, "
                      f"{r['user_s'] + r['sys_s']:.1f} CPU-s, "
                      f"{(r['disk_read_bytes'] or 0) / 1e9:.2f} GB read from disk, "
                      f"rss {r['peak_rss_mb']:.0f} MB")
        rec = {"size": args.size, "method": args.method, "runs": runs,
               "input_bytes": sum(f.stat().st_size for f in inputs),
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "commit": ms._commit(), "cpu": ms.cpu_model(), "load_before": load_before,
               "load_after": ms._load_avg(), "command": " ".join(["modelalloy merge RECIPE OUT",
                                                                  "--force"])}
        old = json.loads(args.results.read_text()) if args.results.exists() else []
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(old + [rec], indent=1) + "\n")
        print("| hints | wall s, median | wall s (runs) | CPU-s | read from disk GB | "
              "peak RSS MB |\n|---|---:|---|---:|---:|---:|")
        for setting, rs in runs.items():
            walls = ", ".join(f"{r['wall_s']:.2f}" for r in rs)
            print(f"| {setting} | {ms._med([r['wall_s'] for r in rs]):.2f} | {walls} | "
                  f"{ms._med([r['user_s'] + r['sys_s'] for r in rs]):.1f} | "
                  f"{ms._med([(r['disk_read_bytes'] or 0) / 1e9 for r in rs]):.2f} | "
                  f"{ms._med([r['peak_rss_mb'] for r in rs]):.0f} |")
        print(f"load {load_before} / {rec['load_after']}; commit {rec['commit']}; {rec['cpu']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
