#!/usr/bin/env python
"""CPU-seconds of `modelalloy inspect` from two source trees, against a linear merge.

Generates (once, under ``--cache-dir``) a small synthetic Llama base and three experts with
``merge_speed.py``'s generator (``--shape``: hidden, intermediate, layers, vocab; default
512,1376,6,16000: 34M parameters, 68 MB of bf16 per model), writes merge_speed's ties and
linear recipes for them, then runs, ``--runs`` times interleaved after one untimed run each
(numba's kernel cache): ``inspect`` of the ties recipe from ``--before`` and ``--after``, and
a linear ``merge`` from ``--after``. Prints the median CPU-seconds (user + system, from
``wait4``) and wall seconds of each, and the load average; first the same calls in one
process each (``inspect_recipe``, ``api.merge``; ``time.process_time`` after a warm call),
which leaves out the interpreter's start and the imports.

    python benchmarks/inspect_cpu.py --before ../main/src --after src --runs 3
    python benchmarks/inspect_cpu.py --after src --profile   # cProfile of one inspect
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
import merge_speed  # noqa: E402


def run_once(python: str, src: Path, args: list[str]) -> tuple[float, float]:
    """(CPU-seconds user + system, wall seconds) of ``python -m modelalloy ARGS``."""
    env = dict(os.environ, PYTHONPATH=str(src))
    t0 = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "modelalloy", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args[0]} failed ({src}): {proc.stderr.read().decode()[-500:]}")
    return usage.ru_utime + usage.ru_stime, wall


IN_PROCESS = """
import shutil, sys, time
from pathlib import Path
what, recipe, out = sys.argv[1:4]
if what == "inspect":
    from modelalloy.inspection import inspect_recipe as run
    def once(): run(recipe)
else:
    from modelalloy.api import merge
    def once():
        merge(recipe, out)
        shutil.rmtree(out)
once()  # warm: imports done, kernels compiled or loaded
cpu = []
for _ in range(int(sys.argv[4])):
    t = time.process_time()
    once()
    cpu.append(time.process_time() - t)
print(" ".join(f"{c:.3f}" for c in cpu))
"""


def in_process(python: str, src: Path, what: str, recipe: Path, out: Path,
               runs: int) -> list[float]:
    """CPU-seconds of ``runs`` calls of inspect_recipe (or api.merge) in one process, after a
    warm call: without the interpreter's start and the imports."""
    env = dict(os.environ, PYTHONPATH=str(src))
    done = subprocess.run([python, "-c", IN_PROCESS, what, str(recipe), str(out), str(runs)],
                          env=env, capture_output=True, text=True, check=True)
    return [float(v) for v in done.stdout.split()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="the baseline's src folder")
    ap.add_argument("--after", type=Path, required=True, help="the changed src folder")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--shape", default="512,1376,6,16000")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "ma-inspect")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--profile", action="store_true", help="cProfile one inspect of --after")
    args = ap.parse_args(argv)
    hidden, inter, layers, vocab = (int(v) for v in args.shape.split(","))
    size = f"inspect-{hidden}x{inter}x{layers}x{vocab}"
    merge_speed.SIZES[size] = merge_speed.LlamaShape(
        hidden=hidden, intermediate=inter, layers=layers, heads=hidden // 64,
        kv_heads=max(1, hidden // 128), vocab=vocab)
    models = merge_speed.generate_models(size, args.cache_dir)
    recipes = {}
    for method in ("ties", "linear"):
        recipes[method] = args.cache_dir / f"{size}-{method}.yaml"
        recipes[method].write_text(merge_speed.recipe_yaml(method, models))
    print(f"{merge_speed.SIZES[size].params / 1e6:.1f}M parameters per model; CPU: "
          f"{merge_speed.cpu_model()}; load before: {os.getloadavg()[0]:.2f}", flush=True)
    if args.profile:
        sys.path.insert(0, str(args.after.resolve()))
        import cProfile
        import pstats

        import modelalloy.inspection.collect as collect
        from modelalloy.inspection import inspect_recipe
        from modelalloy.threads import one_intra_op_thread

        def serial(work, items, threads=None):  # in this thread, where cProfile sees it
            with one_intra_op_thread():
                for item in items:
                    yield item, work(item)

        collect.ordered_map = serial
        inspect_recipe(recipes["ties"], threads=1)  # warm: kernels compiled or loaded
        prof = cProfile.Profile()
        prof.enable()
        inspect_recipe(recipes["ties"], threads=1)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    out = args.cache_dir / "merged"
    calls = {"inspect ties (after)": (args.after, "inspect", recipes["ties"]),
             "merge linear (after)": (args.after, "merge", recipes["linear"])}
    if args.before:
        calls = {"inspect ties (before)": (args.before, "inspect", recipes["ties"]), **calls}
    for key, (src, what, recipe) in calls.items():
        cpu = in_process(args.python, src.resolve(), what, recipe, out, args.runs)
        print(f"in process, {key}: {statistics.median(cpu):.2f} CPU-s "
              f"({', '.join(f'{c:.2f}' for c in cpu)})", flush=True)
    jobs = {"inspect ties (after)": (args.after, ["inspect", str(recipes["ties"])]),
            "merge linear (after)": (args.after, ["merge", str(recipes["linear"]), str(out),
                                                  "--force"])}
    if args.before:
        jobs = {"inspect ties (before)": (args.before, ["inspect", str(recipes["ties"])]),
                **jobs}
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in jobs}
    for src, cmd in jobs.values():
        run_once(args.python, src.resolve(), cmd)
    for _ in range(args.runs):
        for key, (src, cmd) in jobs.items():
            runs[key].append(run_once(args.python, src.resolve(), cmd))
    shutil.rmtree(out, ignore_errors=True)
    for key, rs in runs.items():
        print(f"{key}: {statistics.median(c for c, _ in rs):.2f} CPU-s "
              f"({', '.join(f'{c:.2f}' for c, _ in rs)}; wall median "
              f"{statistics.median(w for _, w in rs):.2f} s)", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
