#!/usr/bin/env python
"""Where does `modelalloy merge` spend its time? py-spy samples, grouped by stage.

Runs ``modelalloy merge RECIPE OUT`` under ``py-spy record`` (all threads, native frames off,
idle threads left out) and sorts every sample into one stage by the innermost modelalloy
frame and its source line: start-up (imports, CLI), planning (opening checkpoints, headers),
read (safetensors/mmap -> tensor), cast up (bf16 -> fp32), non-finite check, method math,
selection (kthvalue/topk/sort), random masks, cast down (fp32 -> output dtype), write, other.

py-spy is a tool, not a dependency: install it anywhere (``pip install py-spy`` into any venv)
and pass ``--py-spy PATH`` or put it on PATH. Used by merge_speed.py ``--py-spy``; standalone::

    python benchmarks/profile_merge.py RECIPE.yml [--threads 2] [--py-spy PATH]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")
STAGES = ["start-up (imports, CLI)", "planning (open checkpoints, headers)", "read",
          "cast up (to float32)", "non-finite check", "method math", "selection (kthvalue/topk/"
          "sort)", "random masks", "cast down (to output dtype)", "write", "other"]


def find_py_spy(explicit: str | None) -> str | None:
    for cand in (explicit, os.environ.get("PY_SPY"), shutil.which("py-spy"),
                 str(REPO.parent / "venv-tools" / "bin" / "py-spy")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


class _Lines:
    def __init__(self, roots: list[Path]):
        self.roots = roots
        self.cache: dict[str, list[str]] = {}

    def text(self, file: str, line: int) -> str:
        if file not in self.cache:
            self.cache[file] = []
            for root in self.roots:
                p = root / file
                if p.is_file():
                    self.cache[file] = p.read_text(errors="replace").splitlines()
                    break
        lines = self.cache[file]
        return lines[line - 1] if 0 < line <= len(lines) else ""


def classify(frames: list[tuple[str, str, int]], lines: _Lines) -> str:
    """frames: outermost first, (function, file, line)."""
    files = [f for _, f, _ in frames]
    if not any("engine/run.py" in f or "engine/execute.py" in f for f in files):
        return STAGES[0]
    if any(f.startswith("modelalloy/io/writer.py") for f in files):
        return "write"
    if any(fn in ("make_plan", "build_plan", "open_models") for fn, _, _ in frames):
        return STAGES[1]
    # the innermost modelalloy frame says what the code was doing
    for fn, f, ln in reversed(frames):
        if not f.startswith("modelalloy/"):
            continue
        src = lines.text(f, ln)
        if f.startswith("modelalloy/io/"):
            return "read"
        if f.startswith("modelalloy/methods/"):
            if fn in ("kth_largest", "_bin_keys", "global_thresholds") or re.search(
                    r"kthvalue|topk|sort|kth_largest|quantile", src):
                return STAGES[6]
            if re.search(r"bernoulli|rand|Generator|manual_seed", src):
                return "random masks"
            return "method math"
        if f.endswith("engine/execute.py"):
            if "isfinite" in src:
                return "non-finite check"
            if "float32" in src:
                return STAGES[3]
            if "ckpt.get" in src or "reference.get" in src:
                return "read"
            if "out_dtype" in src or "contiguous" in src:
                return STAGES[8]
        return "other"
    return "other"


def hot_lines(raw: Path, top: int = 10) -> list[tuple[str, int]]:
    """The innermost modelalloy source lines with the most samples (start-up left out: only
    stacks that pass through the engine, in the main thread or a worker)."""
    counts: collections.Counter[str] = collections.Counter()
    for row in raw.read_text(errors="replace").splitlines():
        head, _, n = row.rpartition(" ")
        if not n.isdigit() or "modelalloy/engine/" not in head:
            continue
        for p in reversed(head.split(";")[1:]):
            m = FRAME.match(p)
            if m and "modelalloy/" in m.group("file"):
                f = m.group("file")
                counts[f"{f[f.find('modelalloy/'):]}:{m.group('line')} {m.group('func')}"] += int(n)
                break
    return counts.most_common(top)


def aggregate(raw: Path, src_roots: list[Path]) -> dict:
    lines = _Lines(src_roots)
    counts: collections.Counter[str] = collections.Counter()
    threads: set[str] = set()
    for row in raw.read_text(errors="replace").splitlines():
        head, _, n = row.rpartition(" ")
        if not n.isdigit():
            continue
        parts = head.split(";")
        threads.add(parts[0])
        frames = []
        for p in parts[1:]:
            m = FRAME.match(p)
            if m:
                f = m.group("file")
                i = f.find("modelalloy/")
                frames.append((m.group("func"), f[i:] if i >= 0 else f, int(m.group("line"))))
        counts[classify(frames, lines)] += int(n)
    return {"samples": dict(counts), "total": sum(counts.values()), "threads": len(threads)}


def profile(cmd: list[str], env: dict[str, str], py_spy: str, rate: int, work: Path,
            src_roots: list[Path], tag: str = "merge") -> dict:
    raw = work / f"py-spy-{tag}.raw.txt"
    r = subprocess.run([py_spy, "record", "-r", str(rate), "-f", "raw", "-o", str(raw),
                        "--threads", "--"] + cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not raw.exists():
        return {"error": (r.stderr or r.stdout).strip()[-500:]}
    out = aggregate(raw, src_roots)
    out["rate"] = rate
    out["raw"] = str(raw)
    out["hot_lines"] = hot_lines(raw, top=12)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--py-spy", default=None)
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--src", type=Path, default=REPO / "src")
    args = ap.parse_args(argv)
    spy = find_py_spy(args.py_spy)
    if spy is None:
        print("py-spy not found: pip install py-spy (any venv) and pass --py-spy", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(args.src))
        cmd = [sys.executable, "-m", "modelalloy", "merge", str(args.recipe),
               str(Path(tmp) / "out"), "--force"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        res = profile(cmd, env, spy, args.rate, Path(tmp), [args.src])
    if "error" in res:
        print(res["error"], file=sys.stderr)
        return 1
    total = res["total"] or 1
    for stage in STAGES:
        n = res["samples"].get(stage, 0)
        print(f"{stage:40s} {n / res['rate']:8.2f} s  {100 * n / total:5.1f}%")
    print("hottest lines (innermost modelalloy frame; samples):")
    for line, n in res["hot_lines"]:
        print(f"  {n:6d}  {line}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
