"""Rows for the issue-4 methods on a suite: docs/benchmarks_advanced.md's numbers.

    PYTHONPATH=src python benchmarks/advanced_rows.py                 # full tiny-vision
    PYTHONPATH=src python benchmarks/advanced_rows.py --size smoke    # a quick check
    PYTHONPATH=src python benchmarks/advanced_rows.py --suite tiny-lm --parts methods,opcm

Four parts, all on the suite's merged tasks, test split unless said otherwise:

1. every issue-4 method next to averaging, task arithmetic and TIES (`run_bench`: the papers'
   defaults, and ``lambda`` chosen on the validation split where a method has one);
2. LiNeS with its one knob, β, chosen on the validation split, over task arithmetic and TIES,
   and DOGE with its λ chosen on the validation split;
3. OPCM over several random arrival orders (the recipe seed shuffles the order): mean ± std;
4. TALL masks as a compression bundle, through the real commands: `modelalloy compress` the
   experts, `modelalloy rebuild` each one, and score the rebuilt expert on its own task against
   the original; storage is measured on disk (bundle files vs base + expert files).

Writes a JSON of every number (``--out``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from modelalloy.bench import load_suite
from modelalloy.bench.docs import measured_commit
from modelalloy.eval.harness import load_model_folder, merge_experts, run_bench, summarize
from modelalloy.methods import get_method

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ["linear", "task_arithmetic", "ties"]
ADVANCED = ["tsv_m", "resm", "opcm", "consensus", "pcb", "optmerge", "lines", "doge", "widen"]
BETAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
DOGE_LAMDAS = (0.03, 0.07, 0.15, 0.3, 0.5, 1.0)  # 0.07 is the paper's (CLIP ViT) value
TALL_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)  # the paper's per-task grid


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mean_acc(suite: Any, sd: dict[str, torch.Tensor], split: str = "test") -> float:
    tasks = suite.info.merged_tasks
    res = suite.evaluate(sd, tasks, split=split)
    return sum(res[t]["accuracy"] for t in tasks) / len(tasks)


def held_out_acc(suite: Any, sd: dict[str, torch.Tensor]) -> float:
    tasks = suite.info.held_out_tasks
    res = suite.evaluate(sd, tasks)
    return sum(res[t]["accuracy"] for t in tasks) / len(tasks) if tasks else float("nan")


def method_rows(suite: Any) -> dict[str, Any]:
    result = run_bench(suite, BASELINES + ADVANCED, log=log)
    rows = {f"{r['method']}/{r['variant']}": {
        "held_in": r["accuracy"], "held_out": r["held_out_accuracy"],
        "held_in_ci": r.get("accuracy_ci"), "held_out_ci": r.get("held_out_ci"),
        "delta": r.get("delta"), "per_task": r["per_task"]} for r in summarize(result.records)}
    # The records keep each task's per-example hits: every interval can be recomputed.
    return {"rows": rows, "records": result.records, "skipped": result.skipped,
            "timings": result.timings, "tuning": result.tuning}


def methods_markdown(res: dict[str, Any]) -> str:
    """The method rows as the bench pages show them: ``x ± h`` (95% bootstrap), Δ vs task
    arithmetic (paired) and a verdict per method, with the commit and command measured."""
    from modelalloy.bench.docs import verdict_table
    from modelalloy.eval.harness import BenchResult
    from modelalloy.eval.report import INTERVAL_NOTE, markdown_table

    records = res["methods"]["records"]
    result = BenchResult(Path(res["suite"]).name, res["size"], records, {}, {}, {})
    return "\n".join([
        f"Measured at commit `{res.get('commit', 'unknown')}` with `{res.get('command', '')}`"
        f" (load average {', '.join(f'{x:.1f}' for x in res.get('load_average', []))} at the "
        f"end).", "", INTERVAL_NOTE, "", markdown_table(records), "",
        "Verdicts on \"beats task arithmetic\" (*shows*: the paired 95% interval of Δ lies "
        "above 0; *does not show*: it lies below +1 point; *cannot tell*: it straddles both):",
        "", verdict_table(result), ""])


def clean_acc(suite: Any, sd: dict[str, torch.Tensor]) -> float:
    """What a merge forgets of the base: clean digits through the pre-training head
    (tiny-vision), or perplexity on the general split (tiny-lm; lower is better)."""
    metrics = suite.general_metrics(sd)
    return metrics.get("clean_accuracy", metrics.get("perplexity", float("nan")))


def lines_rows(suite: Any, base: dict, experts: list[dict]) -> dict[str, Any]:
    """LiNeS over TA and TIES with β chosen on validation, next to its base merge (with
    the base merge's own λ chosen on validation too); clean accuracy measures forgetting."""
    spec = get_method("lines")
    out: dict[str, Any] = {}
    for merge in ("task_arithmetic", "ties"):
        val = {}
        for beta in BETAS:
            sd = merge_experts(spec, base, experts, {"merge": merge, "beta": beta})
            val[beta] = mean_acc(suite, sd, "val")
        best = max(BETAS, key=lambda b: val[b])
        sd = merge_experts(spec, base, experts, {"merge": merge, "beta": best})
        ref_params = {"task_arithmetic": {"lambda": 0.3},
                      "ties": {"density": 0.2, "lambda": 0.7}}[merge]
        ref = merge_experts(get_method(merge), base, experts, ref_params)
        out[merge] = {"beta": best, "val": val, "held_in": mean_acc(suite, sd),
                      "held_out": held_out_acc(suite, sd), "clean": clean_acc(suite, sd),
                      "reference": {"params": ref_params, "held_in": mean_acc(suite, ref),
                                    "clean": clean_acc(suite, ref)}}
        log(f"lines({merge}): beta={best} chosen on validation")
    out["clean_base"] = clean_acc(suite, base)
    return out


def doge_rows(suite: Any, base: dict, experts: list[dict]) -> dict[str, Any]:
    """DOGE with its λ chosen on validation (the paper's 0.07 is tied to CLIP's task-vector
    norms: λ_k = λ/‖τ_k‖_F sets each scaled task vector's norm to λ, per tensor)."""
    spec = get_method("doge")
    val = {}
    for lam in DOGE_LAMDAS:
        sd = merge_experts(spec, base, experts, {"lamda": lam})
        val[lam] = mean_acc(suite, sd, "val")
        log(f"doge lamda={lam}: val {100 * val[lam]:.1f}")
    best = max(DOGE_LAMDAS, key=lambda lam: val[lam])
    sd = merge_experts(spec, base, experts, {"lamda": best})
    norms = {n: [float((e[n] - base[n]).norm()) for e in experts] for n in base
             if base[n].dim() == 2}
    return {"lamda": best, "val": val, "held_in": mean_acc(suite, sd),
            "held_out": held_out_acc(suite, sd),
            "task_vector_norms": {n: (min(v), max(v)) for n, v in norms.items()}}


def opcm_orders(suite: Any, base: dict, experts: list[dict], n: int) -> dict[str, Any]:
    """OPCM over ``n`` distinct arrival orders: recipe seeds 0, 1, ... (opcm's ``shuffle``
    draws the order from the seed), skipping a seed whose order was already measured."""
    spec = get_method("opcm")
    runs: list[dict[str, Any]] = []
    seen: set[tuple[int, ...]] = set()
    seed = -1
    while len(runs) < n and seed < 50 * n:
        seed += 1
        order = list(range(len(experts)))
        random.Random(seed).shuffle(order)  # the order opcm's prepare draws for this seed
        if tuple(order) in seen:
            continue
        seen.add(tuple(order))
        sd = merge_experts(spec, base, experts, {"shuffle": True}, seed=seed)
        runs.append({"seed": seed, "order": [suite.info.merged_tasks[i] for i in order],
                     "held_in": mean_acc(suite, sd), "held_out": held_out_acc(suite, sd)})
        log(f"opcm order {seed}: {100 * runs[-1]['held_in']:.1f}")
    accs = [r["held_in"] for r in runs]
    return {"runs": runs, "mean": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "min": min(accs), "max": max(accs)}


def _cli(*args: str | Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "modelalloy", *map(str, args)], env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"modelalloy {' '.join(map(str, args))} failed:\n{res.stdout}\n"
                         f"{res.stderr}")
    return res.stdout


def _files_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def tall_lambdas_on_val(suite: Any, base: dict, experts: dict[str, dict]) -> dict[str, float]:
    """The paper's per-task λ_t: the best of TALL_LAMBDAS by validation accuracy of the
    rebuilt expert on its own task (in memory, through the Python API)."""
    from modelalloy.bundle import compress

    val: dict[str, dict[float, float]] = {t: {} for t in experts}
    for lam in TALL_LAMBDAS:
        bundle = compress(base, experts, mask_lambda=lam)
        for t in experts:
            val[t][lam] = suite.evaluate(bundle.rebuild(t), [t], split="val")[t]["accuracy"]
    return {t: max(TALL_LAMBDAS, key=lambda lam, t=t: (val[t][lam], lam)) for t in experts}


def tall_bundle(suite: Any, workdir: Path, lambdas: dict[str, float] | float,
                label: str) -> dict[str, Any]:
    info = suite.info
    tasks = info.merged_tasks
    bundle = workdir / f"bundle-{label}"
    lam = (",".join(str(lambdas[t]) for t in tasks) if isinstance(lambdas, dict)
           else str(lambdas))
    out = _cli("compress", info.base_dir, *[info.expert_dir(t) for t in tasks],
               "--names", ",".join(tasks), "--mask-lambda", lam, "--out", bundle)
    per_task = {}
    for t in tasks:
        rebuilt = workdir / f"rebuilt-{label}-{t}"
        _cli("rebuild", bundle, "--task", t, "--out", rebuilt)
        sd = load_model_folder(rebuilt)
        got = suite.evaluate(sd, [t])[t]["accuracy"]
        want = suite.evaluate(suite.expert_state_dict(t), [t])[t]["accuracy"]
        per_task[t] = {"expert": want, "rebuilt": got, "kept": got / want if want else 0.0,
                       "lambda": lambdas[t] if isinstance(lambdas, dict) else lambdas}
    bundle_b = _files_bytes(bundle)
    separate_b = _files_bytes(info.base_dir) + sum(
        (info.expert_dir(t) / "model.safetensors").stat().st_size for t in tasks)
    densities = {line.split()[1].rstrip(":"): float(line.split()[3].rstrip("%")) / 100
                 for line in out.splitlines() if line.strip().startswith("mask ")}
    return {"command_output": out, "bundle_bytes": bundle_b, "separate_bytes": separate_b,
            "ratio": bundle_b / separate_b, "per_task": per_task, "mask_density": densities,
            "mean_kept": statistics.mean(p["kept"] for p in per_task.values())}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def print_tables(res: dict[str, Any]) -> None:
    rows = res["methods"]["rows"]
    print("| method | held-in % | held-out % |\n|---|---:|---:|")
    for key, r in rows.items():
        print(f"| {key} | {pct(r['held_in'])} | {pct(r['held_out'])} |")
    for merge, r in res["lines"].items():
        if merge == "clean_base":
            continue
        print(f"| lines({merge}), beta={r['beta']} on val | {pct(r['held_in'])} | "
              f"{pct(r['held_out'])} |")
    if res["lines"]:
        print("\nforgetting (clean-digit accuracy %, or general perplexity x100): base "
              f"{pct(res['lines']['clean_base'])}, " + ", ".join(
                  f"{m} {pct(r['reference']['clean'])} -> lines {pct(r['clean'])}"
                  for m, r in res["lines"].items() if m != "clean_base"))
    if res["doge"]:
        d = res["doge"]
        print(f"\ndoge, lamda={d['lamda']} on val: {pct(d['held_in'])} held-in, "
              f"{pct(d['held_out'])} held-out; val by lamda: "
              + ", ".join(f"{k}: {pct(v)}" for k, v in d["val"].items()))
    o = res["opcm_orders"]
    if o["runs"]:
        print(f"\nOPCM over {len(o['runs'])} orders: {pct(o['mean'])} ± {pct(o['std'])} "
              f"(min {pct(o['min'])}, max {pct(o['max'])})")
    for r in o["runs"]:
        print(f"  seed {r['seed']}: {pct(r['held_in'])}  {' > '.join(r['order'])}")
    for label, b in res["tall"].items():
        print(f"\nTALL bundle ({label}): {b['bundle_bytes']} B vs {b['separate_bytes']} B, "
              f"ratio {b['ratio']:.3f}, mean kept {pct(b['mean_kept'])}%")
        print("| task | λ | mask density | expert % | rebuilt % | kept % |\n"
              "|---|---:|---:|---:|---:|---:|")
        for t, p in b["per_task"].items():
            print(f"| {t} | {p['lambda']} | {pct(b['mask_density'].get(t, float('nan')))} | "
                  f"{pct(p['expert'])} | {pct(p['rebuilt'])} | {pct(p['kept'])} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="tiny-vision", choices=["tiny-vision", "tiny-lm"])
    parser.add_argument("--size", default="full", choices=["full", "smoke"])
    parser.add_argument("--orders", type=int, default=5, help="OPCM arrival orders")
    parser.add_argument("--parts", default="methods,lines,doge,opcm,tall")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/advanced_<suite>.json")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"advanced_{args.suite}.json"
    parts = set(args.parts.split(","))
    torch.set_num_threads(1)  # as the suites are built and benched (a shared machine)
    start = time.perf_counter()
    suite = load_suite(args.suite, args.size, log=log)
    base = suite.base_state_dict()
    tasks = suite.info.merged_tasks
    experts = [suite.expert_state_dict(t) for t in tasks]
    res: dict[str, Any] = {"suite": str(suite.info.path), "size": args.size,
                           "methods": {"rows": {}}, "lines": {}, "doge": {},
                           "opcm_orders": {"runs": [], "mean": 0, "std": 0, "min": 0, "max": 0},
                           "tall": {}, "seconds": {}}
    if "methods" in parts:
        t0 = time.perf_counter()
        res["methods"] = method_rows(suite)
        res["seconds"]["methods"] = time.perf_counter() - t0
    if "lines" in parts:
        t0 = time.perf_counter()
        res["lines"] = lines_rows(suite, base, experts)
        res["seconds"]["lines"] = time.perf_counter() - t0
    if "doge" in parts:
        t0 = time.perf_counter()
        res["doge"] = doge_rows(suite, base, experts)
        res["seconds"]["doge"] = time.perf_counter() - t0
    if "opcm" in parts:
        t0 = time.perf_counter()
        res["opcm_orders"] = opcm_orders(suite, base, experts, args.orders)
        res["seconds"]["opcm"] = time.perf_counter() - t0
    if "tall" in parts:
        t0 = time.perf_counter()
        chosen = tall_lambdas_on_val(suite, base, dict(zip(tasks, experts, strict=True)))
        with tempfile.TemporaryDirectory() as tmp:
            res["tall"]["lambda 0.6 (default)"] = tall_bundle(suite, Path(tmp), 0.6, "default")
            res["tall"]["lambda_t on val"] = tall_bundle(suite, Path(tmp), chosen, "val")
        res["seconds"]["tall"] = time.perf_counter() - t0
    res["seconds"]["total"] = time.perf_counter() - start
    res["load_average"] = os.getloadavg()
    res["commit"] = measured_commit()
    res["command"] = ("PYTHONPATH=src python benchmarks/advanced_rows.py "
                      + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    if res["methods"].get("records"):
        args.out.with_suffix(".md").write_text(methods_markdown(res))
    print_tables(res)
    log(f"wrote {args.out} ({res['seconds']['total']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
