"""One of the seed papers' studies at full size, saved where the docs pages read it.

    PYTHONPATH=src python benchmarks/study_rows.py --study held-out --suite tiny-lm
    PYTHONPATH=src python benchmarks/study_rows.py --study scale --suite tiny-vision \\
        --settings "0.5×,1×"          # only these variants (the 4× suite is costly to build)

Runs ``modelalloy.bench.studies.run_study`` (what ``modelalloy bench --study NAME`` runs) and
writes benchmarks/results/studies/<suite>-<study>.{json,md} and docs/img/<suite>-study-<study>.png;
the JSON also records the commit, the wall and CPU seconds and the load average, since the
shared machine's load decides the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

from modelalloy.bench.docs import measured_commit
from modelalloy.bench.studies import STUDY_NAMES, run_study, write_study

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", required=True, choices=STUDY_NAMES)
    ap.add_argument("--suite", default="tiny-lm")
    ap.add_argument("--size", default="full")
    ap.add_argument("--methods", default=None, help="comma-separated (default: the study's)")
    ap.add_argument("--settings", default=None,
                    help="comma-separated variant labels of scale / base-quality")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "studies"))
    ap.add_argument("--img", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args(argv)
    start, cpu0, load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()
    study = run_study(args.study, args.suite, args.size,
                      args.methods.split(",") if args.methods else None,
                      settings=args.settings.split(",") if args.settings else None,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    tmp = Path(args.out) / f".{args.suite}-{args.study}"
    paths = write_study(study, tmp, args.suite, args.size)
    stem = Path(args.out) / f"{args.suite}-{args.study}"
    data = json.loads(paths["json"].read_text())
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    data.update(commit=measured_commit(), wall_seconds=round(wall, 1),
                cpu_seconds=round(cpu, 1),
                load_average={"start": list(load0), "end": list(os.getloadavg())},
                command=f"PYTHONPATH=src python benchmarks/study_rows.py {argv_text}")
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    shutil.move(paths["md"], stem.with_suffix(".md"))
    if paths["png"].is_file():
        shutil.move(paths["png"], Path(args.img) / f"{args.suite}-study-{args.study}.png")
    shutil.rmtree(tmp, ignore_errors=True)
    print(stem.with_suffix(".md").read_text())
    print(f"wall {wall:.0f} s, CPU {cpu:.0f} s, load {load0[0]:.1f} → {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
