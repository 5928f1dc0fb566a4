#!/usr/bin/env python
"""CPU-seconds of a sliced, fused TIES-family merge per pass: where its time goes.

Runs the recipe in this process on one merge thread (``threads=1``, so thread CPU time is
the work) with timers around the engine's slice reads (``Checkpoint.get_slice``), each
counting pass of the kernel (``passes``: TIES' histogram and in-bin passes), the merge
kernel, and the writes. CPU time (``time.thread_time``), not wall time: the figures hold on a
machine shared with other work. Kernels are compiled (or loaded from numba's cache) by an
untimed first merge.

    PYTHONPATH=src python benchmarks/ties_passes.py RECIPE.yml [--repeats 3]

Prints one line per stage (seconds and share of the merge thread's CPU time), best of the
repeats per stage.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock


def _timed(stages: collections.Counter, key: str | None, fn):
    """``fn`` wrapped to add its thread CPU time to ``stages[key]`` (``key`` None: to the
    stage named by the thread's current pass)."""
    local = _timed.local

    def wrapper(*args, **kwargs):
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            stages[key or f"read ({getattr(local, 'stage', 'merge')})"] += \
                time.thread_time() - t0
    return wrapper


_timed.local = threading.local()


def profile_once(recipe: Path, out: Path) -> collections.Counter:
    """One merge of ``recipe`` into ``out``; CPU seconds per stage."""
    from modelalloy.api import merge
    from modelalloy.engine import execute
    from modelalloy.io.checkpoint import Checkpoint
    from modelalloy.io.writer import ShardedSafetensorsWriter
    from modelalloy.kernels import slices

    stages: collections.Counter = collections.Counter()
    local = _timed.local
    real_reduce = execute.PlanExecutor._fused_reduce

    def fused_reduce(self, entry, ctx, passes):
        # name each pass for the reads that feed it: the engine reads a slice, then calls
        # the pass on it
        named = []
        for i, p in enumerate(passes):
            def run(*a, _p=p, _i=i, **k):
                local.stage = f"pass {_i + 1}"
                t0 = time.thread_time()
                try:
                    return _p(*a, **k)
                finally:
                    stages[f"kernel (pass {_i + 1})"] += time.thread_time() - t0
            named.append(run)
        local.stage = "pass 1"
        try:
            return real_reduce(self, entry, ctx, named)
        finally:
            local.stage = "merge"

    real_factory = {name: getattr(slices, name) for name in
                    ("ties", "breadcrumbs_ties", "dare_ties", "della", "breadcrumbs")
                    if hasattr(slices, name)}  # an older tree may lack some

    def factory(name):
        def make(params):
            kernel = real_factory[name](params)
            if kernel is None:
                return None
            wrapped = _timed(stages, "kernel (merge)", kernel)
            if hasattr(kernel, "passes"):
                wrapped.passes = kernel.passes
            return wrapped
        return make

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(execute.PlanExecutor, "_fused_reduce",
                                              fused_reduce))
        stack.enter_context(mock.patch.object(Checkpoint, "get_slice",
                                              _timed(stages, None, Checkpoint.get_slice)))
        for name in real_factory:
            stack.enter_context(mock.patch.object(slices, name, factory(name)))
        for name in ("write_part", "write", "end", "close"):
            stack.enter_context(mock.patch.object(
                ShardedSafetensorsWriter, name,
                _timed(stages, f"write ({name})", getattr(ShardedSafetensorsWriter, name))))
        stack.enter_context(mock.patch.object(
            execute.PlanExecutor, "merge_entry",
            _timed(stages, "whole-tensor merges (torch)", execute.PlanExecutor.merge_entry)))
        stack.enter_context(mock.patch.object(
            execute.PlanExecutor, "run",
            _timed(stages, "engine run (main thread)", execute.PlanExecutor.run)))
        t0 = time.process_time()
        merge(recipe, out, threads=1, force=True)
        stages["whole merge (process)"] = time.process_time() - t0
    return stages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ties-passes-"))
    try:
        profile_once(args.recipe, work / "out")  # compile / load the kernels, warm the cache
        runs = [profile_once(args.recipe, work / "out") for _ in range(args.repeats)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = sorted({k for r in runs for k in r})
    best = {k: min(r.get(k, 0.0) for r in runs) for k in keys}
    total = best.pop("whole merge (process)")
    for k in keys:
        if k in best:
            print(f"{k:28s} {best[k]:7.3f} s  {100 * best[k] / total:5.1f}%")
    every = ", ".join(f"{r['whole merge (process)']:.3f}" for r in runs)
    print(f"{'whole merge (process)':28s} {total:7.3f} s  (best of {args.repeats}; "
          f"every run: {every})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
