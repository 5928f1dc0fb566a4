#!/usr/bin/env python
"""Rows for `modelalloy optimize` on the local suites: every algorithm from its interface, next
to task arithmetic and TIES with λ tuned on the validation split, and each paper's claim.

    PYTHONPATH=src python benchmarks/optimize_rows.py                      # smoke suites
    PYTHONPATH=src python benchmarks/optimize_rows.py --suites tiny-vision --size full

Every row is a run of ``modelalloy.search.driver.optimize`` (the CLI's function) into
``--work``; its ``recipe.yaml`` is merged in memory and scored on the val and test splits of the
merged tasks. Writes docs/benchmarks_optimize.md and a JSON of every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
LAMBDAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def mean_acc(suite: Any, sd: dict[str, torch.Tensor], split: str) -> float:
    res = suite.evaluate(sd, suite.info.merged_tasks, split=split)
    return sum(r["accuracy"] for r in res.values()) / len(res)


def score_recipe(suite: Any, recipe_path: Path) -> tuple[float, float]:
    from modelalloy.optimize.candidate import ModelPool, merge_candidate
    from modelalloy.recipe.load import load_recipe
    from modelalloy.stats import load_stats

    if "\n---" in recipe_path.read_text():  # a staged recipe: what merge-multi writes
        from modelalloy.multistage import run_stages
        from modelalloy.optimize.candidate import load_state_dict

        work = recipe_path.parent / "merge-multi"
        run_stages(recipe_path, work / "stages", work / "merged", force=True)
        sd = load_state_dict(work / "merged")
        return mean_acc(suite, sd, "val"), mean_acc(suite, sd, "test")
    rec = load_recipe(recipe_path)
    if rec.merge_method == "chunk_task_arithmetic":  # expert_merging_pp: coefficients as stats
        stats = [dict(load_stats(recipe_path.parent / "stats" / Path(e.model).name /
                                 "merge_coeffs.safetensors")) for e in rec.expert_entries()]
        sd = merge_candidate(rec, ModelPool(), stats={"merge_coeffs": stats})
    else:
        sd = merge_candidate(rec, ModelPool())
    return mean_acc(suite, sd, "val"), mean_acc(suite, sd, "test")


def tuned_baseline(suite: Any, method: str, template: dict[str, Any]) -> dict[str, Any]:
    """λ of ``method`` picked on val (the hand-tuned row a search must beat)."""
    from modelalloy.optimize.candidate import ModelPool, merge_candidate
    from modelalloy.recipe.load import recipe_from_dict

    pool = ModelPool()
    best: tuple[float, float, float] | None = None
    t0 = time.perf_counter()
    for lam in LAMBDAS:
        data = {k: v for k, v in template.items() if k != "search"}
        data["merge_method"] = method
        data["parameters"] = {"lambda": lam, **({"normalize": False}
                                                if method == "task_arithmetic" else {})}
        sd = merge_candidate(recipe_from_dict(data), pool)
        val = mean_acc(suite, sd, "val")
        if best is None or val > best[0]:
            best = (val, lam, mean_acc(suite, sd, "test"))
    assert best is not None
    return {"row": f"{method} (λ={best[1]} tuned on val)", "val": best[0], "test": best[2],
            "trials": len(LAMBDAS), "seconds": round(time.perf_counter() - t0, 1)}


def run_rows(suite_name: str, size: str, work: Path, budget: int, steps: int,
             log: Any, rows_wanted: list[str] | None = None,
             save: Any = None) -> dict[str, Any]:
    """Every row of one suite; ``save(partial)`` after each row (a long run keeps what it
    did)."""
    from modelalloy.bench import load_suite
    from modelalloy.search.driver import optimize
    from modelalloy.search.objectives import suite_template

    suite = load_suite(suite_name, size)
    spec = f"suite:{suite_name}?size={size}"
    rows: list[dict[str, Any]] = []
    # one folder per suite and size (a resumed row must be the same run)
    folder = work / (suite_name if size == "smoke" else f"{suite_name}-{size}")
    base_tpl = suite_template(spec)
    rows.append(tuned_baseline(suite, "task_arithmetic", base_tpl))
    rows.append(tuned_baseline(suite, "ties", suite_template(spec, "ties")))
    log(f"{suite_name}: baselines {rows[0]['val']:.3f} / {rows[1]['val']:.3f}")

    def template(name: str, method: str, search: dict[str, Any],
                 extra_models: list[str] | None = None) -> Path:
        data = suite_template(spec, method, search)
        for task in extra_models or []:
            data["models"].append({"model": str(suite.info.expert_dir(task))})
        path = folder / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    ties_layers = {"granularity": "layer",
                   "parameters": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}}
    task_w = {"granularity": "task", "parameters": {"weight": [0.0, 1.0]}}
    layer_w = {"granularity": "layer", "parameters": {"weight": [0.0, 1.0]}}
    held_out = suite.info.held_out_tasks
    runs = [
        ("evolve", "evolve", template("evolve", "ties", ties_layers), budget, {}),
        ("layerwise_search", "layerwise_search", template("lws", "ties", ties_layers), budget,
         {}),
        ("layerwise_search (uniform: task-wise)", "layerwise_search",
         template("lws_uniform", "ties", {**ties_layers, "granularity": "task"}), budget, {}),
        ("map (task-wise weights)", "map", template("map", "task_arithmetic", task_w), None,
         {}),
        ("fw_merging", "fw_merging", template("fw", "task_arithmetic", layer_w), 10, {}),
        ("fw_merging + held-out experts in the pool", "fw_merging",
         template("fw_irrelevant", "task_arithmetic", layer_w, held_out), 10, {}),
        ("fw_merging (from the base, step 1)", "fw_merging",
         template("fw_base", "task_arithmetic", layer_w), 10,
         {"init": "base", "step_size": 1.0}),
        ("fw_merging (from the base, step 1) + held-out experts", "fw_merging",
         template("fw_base_irrelevant", "task_arithmetic", layer_w, held_out), 10,
         {"init": "base", "step_size": 1.0}),
        ("adamerging (task-wise)", "adamerging", template("ada_t", "task_arithmetic", task_w),
         steps, {}),
        ("adamerging (layer-wise)", "adamerging",
         template("ada_l", "task_arithmetic", layer_w), steps, {}),
        ("expert_merging", "expert_merging", template("em", "task_arithmetic", layer_w), None,
         {}),
        ("expert_merging_pp", "expert_merging_pp", template("empp", "task_arithmetic",
                                                            layer_w), None, {}),
        ("sens_merging", "sens_merging", template("sens", "task_arithmetic", layer_w), None,
         {}),
        ("self_positioning", "self_positioning", template("sp", "task_arithmetic", task_w),
         min(steps, 300), {}),
    ]
    if suite_name == "tiny-lm":  # GPT-2 layers all chain: any path is a model (not so for
        # tiny-vision's blocks, whose shapes change along the stack)
        runs.insert(1, ("evolve (PS then DFS)", "evolve",
                        template("evolve_ps_dfs", "ties", {**ties_layers, "space": "ps+dfs",
                                                           "dataflow": {"scale": False}}),
                        budget, {}))
    if rows_wanted:
        runs = [r for r in runs if any(r[0].startswith(w) for w in rows_wanted)]
    notes: dict[str, Any] = {}

    def result() -> dict[str, Any]:
        return {"suite": suite_name, "size": size, "rows": rows, "notes": notes,
                "merged": suite.info.merged_tasks, "held_out": held_out, "budget": budget,
                "steps": steps}

    for row, algo, tpl, b, opts in runs:
        out = folder / algo.replace(" ", "_") / Path(tpl).stem
        t0 = time.perf_counter()
        try:
            res = optimize(algo, tpl, [spec], out, budget=b, options=opts, seed=0,
                           resume=out.exists())
        except Exception as err:  # a row that fails is reported, the others still run
            rows.append({"row": row, "error": f"{type(err).__name__}: {err}"})
            log(f"{suite_name}: {row} failed: {err}")
            continue
        val, test = score_recipe(suite, res.recipe_path)
        rows.append({"row": row, "val": val, "test": test, "trials": len(res.trials),
                     "seconds": round(time.perf_counter() - t0, 1)})
        notes[row] = res.notes
        log(f"{suite_name}: {row}: val {val:.3f} test {test:.3f} ({len(res.trials)} trials)")
        if save is not None:
            save(result())
    return result()


def _row(rows: list[dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["row"].startswith(prefix) and "val" in r), None)


def claims(d: dict[str, Any]) -> list[str]:
    rows = d["rows"]
    ta, ties = _row(rows, "task_arithmetic"), _row(rows, "ties")
    assert ta is not None and ties is not None
    hand = max(ta, ties, key=lambda r: r["val"])
    out = []

    def pts(x: float) -> str:
        return f"{100 * x:+.1f}"

    ev = next((r for r in rows if r["row"] == "evolve" and "val" in r), None)
    hy = _row(rows, "evolve (PS then DFS)")
    if hy:
        ok = hy["val"] > hand["val"] and hy["test"] > hand["test"]
        out.append(f"- `evolve` PS then DFS beats the best hand-tuned row ({hand['row']}) on "
                   f"val and test: **{'shows' if ok else 'does not show'}** (val "
                   f"{pts(hy['val'] - hand['val'])}, test {pts(hy['test'] - hand['test'])} "
                   "points)" + (f"; against `evolve` in the parameter space alone: val "
                                f"{pts(hy['val'] - ev['val'])}, test "
                                f"{pts(hy['test'] - ev['test'])} points." if ev else "."))
    if ev:
        ok = ev["val"] > hand["val"] and ev["test"] > hand["test"]
        out.append(f"- `evolve` beats the best hand-tuned row ({hand['row']}) on val and test: "
                   f"**{'shows' if ok else 'does not show'}** (val {pts(ev['val'] - hand['val'])}"
                   f", test {pts(ev['test'] - hand['test'])} points).")
    for name in ("adamerging (task-wise)", "adamerging (layer-wise)", "expert_merging",
                 "expert_merging_pp", "sens_merging", "self_positioning"):
        r = _row(rows, name)
        if r:
            ok = r["test"] > ta["test"]
            out.append(f"- `{name}` beats task arithmetic on the held-in tasks (test): "
                       f"**{'shows' if ok else 'does not show'}** "
                       f"({pts(r['test'] - ta['test'])} points).")
    for plain, more, how in [("fw_merging", "fw_merging +", "paper defaults: x_0 = task "
                              "arithmetic over the whole pool, step 0.1"),
                             ("fw_merging (from the base, step 1)",
                              "fw_merging (from the base, step 1) +", "from the base, step 1")]:
        fw = next((r for r in rows if r["row"] == plain and "val" in r), None)
        fwi = _row(rows, more)
        if fw and fwi:
            loss = fw["test"] - fwi["test"]
            out.append(f"- FW-Merging ({how}) with the held-out tasks' experts added to the "
                       f"pool loses no more than 1 point: "
                       f"**{'shows' if loss <= 0.01 else 'does not show'}** "
                       f"({pts(-loss)} points on test).")
    mp = _row(rows, "map")
    note = d["notes"].get("map (task-wise weights)", {})
    if mp and note:
        k = len(d["merged"])
        err, design = note.get("front_prediction_error"), note.get("design_points")
        out.append(f"- MAP's predicted front matches the re-evaluated one: mean |predicted − "
                   f"real| accuracy = {err} ({100 * err:.1f} points) over the "
                   f"{mp['trials'] - design} re-evaluated front points (the quadratics' fit "
                   f"error on the designed merges: {note.get('surrogate_fit_error')}); "
                   f"{mp['trials']} evaluations in all ({design} designed merges + the "
                   f"re-evaluations), where a grid of 11 values per task would take "
                   f"{11 ** k:,}; the recipe it picks (equal preferences) is "
                   f"{pts(mp['test'] - ta['test'])} points on test against task arithmetic.")
    lw = next((r for r in rows if r["row"] == "layerwise_search" and "val" in r), None)
    lu = _row(rows, "layerwise_search (uniform")
    if lw and lu:
        ok = lw["val"] > lu["val"]
        out.append(f"- layer-wise search beats its best uniform configuration (val): "
                   f"**{'shows' if ok else 'does not show'}** ({pts(lw['val'] - lu['val'])} "
                   f"points; test {pts(lw['test'] - lu['test'])}).")
    return out


def section(d: dict[str, Any]) -> str:
    lines = [f"## {d['suite']} ({d['size']})", "",
             f"Merged tasks {', '.join(d['merged'])}; held out {', '.join(d['held_out'])}. "
             "Mean accuracy over the merged tasks, in %. Budgets: "
             f"{d.get('budget')} trials per search, {d.get('steps')} learner steps "
             f"(`--size {d['size']} --budget {d.get('budget')} --steps {d.get('steps')}`).", "",
             "| row | val | test | trials | seconds |", "|---|---:|---:|---:|---:|"]
    for r in d["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['row']} | {100 * r['val']:.1f} | {100 * r['test']:.1f} | "
                         f"{r['trials']} | {r['seconds']} |")
    lines += ["", "### The papers' claims", "", *claims(d), ""]
    return "\n".join(lines)


HEAD = """# `modelalloy optimize` on the local suites

Every row is `modelalloy optimize ALGORITHM` run from its interface (docs/optimize.md) on the
suite's validation split, its `recipe.yaml` merged and scored on val and test. The baselines
are task arithmetic and TIES with λ tuned on val over {lambdas}. Searches: `evolve` and
`layerwise_search` over layer-wise TIES weights and densities; `map` over task-wise
task-arithmetic weights; `fw_merging` 10 iterations, layer-wise. Shared, noisy 2-core
machine; one seed; small suites (one validation example is about a point) — differences of a
few points are noise.

    PYTHONPATH=src python benchmarks/optimize_rows.py --suites tiny-vision --budget 60
    PYTHONPATH=src python benchmarks/optimize_rows.py --suites tiny-lm --budget 24 --steps 50
    PYTHONPATH=src python benchmarks/optimize_rows.py --size full --budget 60 --steps 100

On tiny-lm a row `evolve (PS then DFS)` runs the parameter space for half the budget, then
the data-flow space over its merge and the experts (docs/optimize.md); its staged recipe is
scored through `merge-multi`. (On tiny-vision a path must chain the blocks' shapes, which most
paths do not: no row.)

"""


TAIL = """
## Reading these rows

- The budgets are small (60 and 24 trials, against 100 for mergekit-evolve and 1000 in the
  Sakana paper) and the smoke suites' validation splits hold 40 (tiny-vision) and 20 (tiny-lm)
  examples per task: a search that fits val by one or two examples does not carry to test.
  The full suites and larger budgets are the test of the claims; these rows check that every
  algorithm runs from the interface on both suites and writes a recipe `merge` reproduces.
- `layerwise_search`'s uniform space (task-wise: 6 genes) converges faster than its layer-wise
  one (about 28 genes) at the same budget, so on val it is ahead here.
- The learners keep their papers' defaults (no λ search), while the baselines get one; on
  these suites entropy and expert alignment are poor surrogates for accuracy (as in
  docs/benchmarks_informed.md).
- FW-Merging with the paper's defaults starts from task arithmetic over the *whole* pool, so
  the irrelevant experts are in x₀ and ten steps of at most 0.03 cannot take them out; started
  from the base with step 1, the irrelevant experts cost 0.0 (tiny-vision) and 1.2 (tiny-lm,
  one test example is 1.25) points.

## The full suites (one seed, 60 trials, 100 learner steps; loaded 2-core machine)

Eight merged tasks each; tiny-vision scores 100 val and 400 test examples per task (a test
point is 0.03 of a point of the mean), tiny-lm 50 and 500. Read against the papers:

- **Reproduced on tiny-vision, not on tiny-lm**: `evolve` over the best hand-tuned row
  (tiny-vision +3.1 val, +0.7 test; tiny-lm −0.5, −0.6 against TIES λ = 1.0, the best
  hand-tuned row there); AdaMerging over task arithmetic (tiny-vision +0.6 and +0.8 test,
  task- and layer-wise; tiny-lm −0.7 and −2.0).
- **Layer-wise search over its best uniform configuration** on val: reproduced on both (+1.9
  and +1.5 val); on test only on tiny-vision (+1.2; tiny-lm −2.5: the layer-wise space, with
  more genes, fits val).
- **FW-Merging's robustness to irrelevant models**: refuted with the paper's defaults (start
  at task arithmetic over the whole pool: −1.9 on tiny-vision, −45.1 on tiny-lm, where the
  held-out experts, in x₀ with weight 0.3 each, break the merge); reproduced from the base with
  step 1 (0.0 and −0.1).
- **Refuted on both**: Expert Merging(++) (−5 to −6 test), Sens-Merging (±0.0 on both
  full suites: K·σ stays within a few percent of uniform, as uncertain-resolved.md §4(d)
  predicts, so with λ tuned on val it is task arithmetic; before λ was tuned, λ = 1 summed all
  eight task vectors: −30 and −66), Self Positioning (−2.8, −0.7)
  against task arithmetic.
- **MAP** (rerun after the determinism fix: ridge-regularised sigmoid fit): with 8 tasks the
  predicted front is within 4.6 (tiny-vision) and 5.9 (tiny-lm) accuracy points of the
  re-evaluated one on average (mean |predicted − real| 0.046 and 0.059 over 5 front points;
  before the fix 0.26 and 0.37), from 95 evaluations where an 11-value grid needs 11⁸ ≈ 2.1·10⁸;
  its picked recipe (equal preferences) is 2.3 (tiny-vision) and 4.7 (tiny-lm) points under
  task arithmetic on test (before: 8 and 12). On the smoke suites (2–3 tasks) the front error
  is 0.021 and 0.064 from 25 and 17 evaluations (grids of 1,331 and 121).
- **PS then DFS** (tiny-lm): the data-flow phase (30 trials, 18 slots: the two layers of the
  PS merge and of each of the eight experts) found paths as good as the PS merge (0.7525 on
  val) but none better, so the chosen trial is the parameter-space phase's trial 17 — the same
  trial `evolve` alone chose (the same seed gives the same first 30 trials): the row equals
  `evolve`. 30 trials over 18 path genes is a small budget (the paper: 1000s).
"""


def merge_rows(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s rows (and their notes) in place of the rows of ``old`` with the same names;
    every other row of ``old`` is kept where it was, a row ``old`` lacks is appended."""
    if not old:
        return new
    fresh = {r["row"]: r for r in new["rows"]}
    rows = [fresh.pop(r["row"], r) for r in old["rows"]]
    rows += list(fresh.values())
    notes = {**old.get("notes", {}), **new.get("notes", {})}
    return {**old, "rows": rows, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suites", default="tiny-vision,tiny-lm")
    ap.add_argument("--size", default="smoke")
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--work", type=Path, default=REPO / "bench-out" / "optimize")
    ap.add_argument("--json", type=Path,
                    default=REPO / "benchmarks" / "results" / "optimize_rows.json")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks_optimize.md")
    ap.add_argument("--from-json", action="store_true", help="only re-render the doc")
    ap.add_argument("--rows", help="only the rows whose names start with these (comma-"
                                   "separated; the tuned baselines always run)")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the rows this run makes in --json's suite, keep the "
                         "others (default: the suite's rows are replaced whole)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    dump: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for name in ([] if args.from_json else args.suites.split(",")):
        # the smoke rows keep their old key; other sizes sit beside them
        key = name if args.size == "smoke" else f"{name} ({args.size})"

        before = dump.get(key) if args.merge else None

        def save(partial: dict[str, Any], key: str = key,
                 before: dict[str, Any] | None = before) -> None:
            dump[key] = merge_rows(before, partial)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(dump, indent=1, default=str))

        save(run_rows(name, args.size, args.work, args.budget, args.steps, log,
                      args.rows.split(",") if args.rows else None, save))
    text = HEAD.format(lambdas=LAMBDAS)
    args.doc.write_text(text + "\n".join(section(d) for d in dump.values()) + TAIL)
    print(args.doc.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
