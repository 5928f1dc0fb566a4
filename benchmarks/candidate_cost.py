#!/usr/bin/env python
"""What a search trial costs before its evaluation: a candidate merged in memory and loaded into
a live model, against the same candidate merged to disk and read back (mergekit-evolve's path
without vLLM). Also whole trials per second on the local suites, and 1 against 2 Ray workers.

    PYTHONPATH=src python benchmarks/candidate_cost.py                       # 100M, both parts
    PYTHONPATH=src python benchmarks/candidate_cost.py --size 2M --candidates 2 --no-suites

Models: the synthetic Llama of ``benchmarks/merge_speed.py`` (bf16, base + 3 experts, cached
in ``benchmarks/.cache``). Candidates: the template's layer-group weights (and densities for
TIES) drawn at random, the same genomes for every path. "In memory" is
``modelalloy.optimize.candidate.merge_candidate`` (the path every optimizer uses: the engine's
in-memory executor) writing straight into the parameters of a ``LlamaForCausalLM`` built once
(``into=``). Against it: (a) ``modelalloy.merge`` of the same recipe into a fresh folder (the
engine: sharded safetensors, fsync, rename), the shards read back with safetensors into the same
module; (b) that folder loaded by ``AutoModelForCausalLM.from_pretrained`` (what lm-eval's
``huggingface`` model does with ``pretrained=FOLDER`` in mergekit-evolve); (c) mergekit-evolve's
own path, mergekit's ``run_merge`` + ``from_pretrained`` in mergekit's venv
(``benchmarks/mergekit_evolve_candidate.py``, started once like mergekit-evolve's Ray actor;
``--mergekit-bin``). No path pays an interpreter start per candidate. Medians over the
candidates after the first (a warm-up for every path). Writes the section
"Search candidates: in memory against disk" of docs/performance.md and a JSON of the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Search candidates: in memory against disk"
sys.path.insert(0, str(REPO / "benchmarks"))


def template(method: str, models: dict[str, Path]) -> dict[str, Any]:
    params = {"weight": [0.0, 1.0]}
    if method == "ties":
        params["density"] = [0.1, 1.0]
    return {"merge_method": method, "base_model": str(models["base"]),
            "models": [{"model": str(models[f"expert{k}"])} for k in (1, 2, 3)],
            "parameters": {"lambda": 1.0, **({"normalize": False}
                                             if method == "task_arithmetic" else {})},
            "dtype": "bfloat16",
            "search": {"granularity": "group", "layers_per_group": 2, "parameters": params}}


class MergekitEvolve:
    """benchmarks/mergekit_evolve_candidate.py in mergekit's venv, started once (as
    mergekit-evolve's Ray actor is): one candidate per request, its merge and load times back."""

    def __init__(self, python: Path, log_path: Path) -> None:
        import subprocess

        self.log = open(log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(python), str(REPO / "benchmarks" / "mergekit_evolve_candidate.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
        self.import_seconds = float(self._reply()["ready"])
        self.start_seconds = time.perf_counter() - t0

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # mergekit or transformers may print lines of their own
            if line.startswith("{"):
                return dict(json.loads(line))
        raise RuntimeError(f"the mergekit worker stopped (its log: {self.log.name})")

    def candidate(self, config: Path, out: Path) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"config": str(config), "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        res = self._reply()
        if "error" in res:
            raise RuntimeError(f"mergekit candidate {config}: {res['error']}")
        return res

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread (the figure under load)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def mergekit_python(binary: str | None, log: Any) -> Path | None:
    """The python of the venv that holds ``mergekit-yaml`` (merge_speed.py's search), or None."""
    from merge_speed import find_mergekit

    path, how = find_mergekit(binary)
    py = Path(path).parent / "python" if path else None
    if py is None or not py.exists():
        log(f"skipping the mergekit-evolve column: {how}")
        return None
    return py


def measure_candidates(size: str, method: str, n: int, cache: Path, log: Any,
                       mergekit: Path | None = None) -> dict[str, Any]:
    import yaml
    from merge_speed import generate_models
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import modelalloy
    from modelalloy.optimize.candidate import ModelPool, merge_candidate
    from modelalloy.optimize.template import load_template

    models = generate_models(size, cache, log=log)
    work = Path(tempfile.mkdtemp(prefix="candidate-cost-"))
    worker = MergekitEvolve(mergekit, work / "mergekit.log") if mergekit else None
    try:
        tpl = work / "template.yaml"
        tpl.write_text(yaml.safe_dump(template(method, models)))
        space, recipe = load_template(tpl)
        config = LlamaConfig.from_dict(json.loads((models["base"] / "config.json").read_text()))
        module = LlamaForCausalLM(config).to(torch.bfloat16).eval()
        t0 = time.perf_counter()
        pool = ModelPool(reuse=False)  # every candidate merged whole, as on the disk path
        pool.sources(recipe)
        load_seconds = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(0)
        genomes = [torch.rand(space.dim, generator=gen).tolist() for _ in range(n)]
        mem, disk, disk_merge, disk_fp, mk, mk_merge = [], [], [], [], [], []
        mem_sd: list[float] = []
        cpu: dict[str, list[float]] = {"in_memory": [], "in_memory_state_dict": [], "disk": [],
                                       "disk_from_pretrained": [], "mergekit": []}
        for i, genome in enumerate(genomes):
            rec = space.recipe(genome)
            c0, t0 = cpu_seconds(), time.perf_counter()
            merge_candidate(rec, pool, into=module)  # merged straight into the live model
            mem.append(time.perf_counter() - t0)
            cpu["in_memory"].append(cpu_seconds() - c0)
            # what a search trial did before live models: a new state dict, then the objective's
            # load_state_dict into its model
            c0, t0 = cpu_seconds(), time.perf_counter()
            module.load_state_dict(merge_candidate(rec, pool), strict=False)
            mem_sd.append(time.perf_counter() - t0)
            cpu["in_memory_state_dict"].append(cpu_seconds() - c0)
            path = work / f"cand{i}.yaml"
            path.write_text(rec.to_yaml())
            out = work / f"merged{i}"
            c0, t0 = cpu_seconds(), time.perf_counter()
            modelalloy.merge(path, out)
            c1, t1 = cpu_seconds(), time.perf_counter()
            # (a) the shards read into the module already built (our strictest disk path)
            loaded: dict[str, torch.Tensor] = {}
            for shard in sorted(out.glob("*.safetensors")):
                loaded.update(load_file(str(shard)))
            module.load_state_dict(loaded, strict=False)
            c2, t2 = cpu_seconds(), time.perf_counter()
            del loaded
            # (b) the folder loaded as lm-eval's huggingface model loads `pretrained=PATH`
            fresh = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
            c3, t3 = cpu_seconds(), time.perf_counter()
            del fresh
            cpu["disk"].append(c2 - c0)
            cpu["disk_from_pretrained"].append((c1 - c0) + (c3 - c2))
            disk.append(t2 - t0)
            disk_merge.append(t1 - t0)
            disk_fp.append((t1 - t0) + (t3 - t2))
            shutil.rmtree(out)
            msg = (f"[{method}] candidate {i}: in memory {mem[-1]:.2f} s, disk {disk[-1]:.2f} s, "
                   f"disk + from_pretrained {disk_fp[-1]:.2f} s")
            if worker is not None:  # (c) mergekit-evolve's own path
                res = worker.candidate(path, work / f"mergekit{i}")
                if res["params"] != sum(p.numel() for p in module.parameters()):
                    raise RuntimeError(f"mergekit's model has {res['params']} parameters, "
                                       "not the candidate's")
                mk.append(res["merge"] + res["load"])
                mk_merge.append(res["merge"])
                cpu["mergekit"].append(res["merge_cpu"] + res["load_cpu"])
                msg += f", mergekit-evolve {mk[-1]:.2f} s (merge {res['merge']:.2f} s)"
            log(msg)
        def rest(xs: list[float]) -> list[float]:
            return xs[1:] or xs  # the first candidate warms up every path (JIT, caches)

        def med(xs: list[float]) -> float:
            return statistics.median(rest(xs))

        row = {"size": size, "method": method, "candidates": n, "genes": space.dim,
               "load_average": round(os.getloadavg()[0], 1), "nice": os.nice(0),
               "params": sum(p.numel() for p in module.parameters()),
               "pool_load_seconds": round(load_seconds, 2),
               "in_memory": round(med(mem), 3),
               "disk": round(med(disk), 3), "disk_merge_write": round(med(disk_merge), 3),
               "speedup": round(med(disk) / med(mem), 2),
               "in_memory_first": round(mem[0], 3), "in_memory_min": round(min(rest(mem)), 3),
               "disk_min": round(min(rest(disk)), 3),
               "speedup_min": round(min(rest(disk)) / min(rest(mem)), 2),
               "in_memory_state_dict": round(med(mem_sd), 3),
               "in_memory_state_dict_min": round(min(rest(mem_sd)), 3),
               "disk_from_pretrained": round(med(disk_fp), 3),
               "disk_from_pretrained_min": round(min(rest(disk_fp)), 3),
               "speedup_from_pretrained": round(med(disk_fp) / med(mem), 2)}
        row["cpu"] = {k: round(med(v), 3) for k, v in cpu.items() if v}
        if worker is not None:
            row.update({"mergekit": round(med(mk), 3), "mergekit_merge": round(med(mk_merge), 3),
                        "mergekit_first": round(mk[0], 3), "mergekit_min": round(min(rest(mk)), 3),
                        "speedup_mergekit": round(med(mk) / med(mem), 2),
                        "mergekit_start": round(worker.start_seconds, 2)})
        return row
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(work, ignore_errors=True)


def suite_search(path: Path, spec: str) -> Path:
    """The suites' search template: layer-wise TIES weights and densities."""
    import yaml

    from modelalloy.search.objectives import suite_template

    data = suite_template(spec, "ties")
    data["search"] = {"granularity": "layer",
                      "parameters": {"weight": [0, 1], "density": [0.1, 1.0]}}
    path.write_text(yaml.safe_dump(data))
    return path


def suite_row(suite: str, size: str, budget: int) -> dict[str, Any]:
    return {"suite": suite, "size": size, "budget": budget,
            "load_average": round(os.getloadavg()[0], 1), "nice": os.nice(0)}


def measure_suites(budget: int, log: Any, size: str = "smoke",
                   repeats: int = 1) -> list[dict[str, Any]]:
    """evolve on each suite of ``size``: trials per second (merge + score, one worker), and the
    whole run with 1 and 2 Ray workers (Ray's start excluded: the evaluation phase only).
    With ``repeats`` > 1 the three runs are interleaved that many times and the medians
    reported: this machine's speed drifts by 10-20% over minutes, which a ratio of two runs
    made minutes apart would carry."""

    from modelalloy.search.driver import optimize

    rows = []
    keys = (("w1", 1, False), ("w1t1", 1, True), ("w2", 2, False))
    for suite in ("tiny-vision", "tiny-lm"):
        spec = f"suite:{suite}?size={size}"
        work = Path(tempfile.mkdtemp(prefix="trials-"))
        try:
            tpl = suite_search(work / "t.yaml", spec)
            row = suite_row(suite, size, budget)
            threads = torch.get_num_threads()
            walls: dict[str, list[float]] = {k: [] for k, _, _ in keys}
            trial_s: dict[str, list[float]] = {k: [] for k, _, _ in keys}
            first = None
            # one worker with the process's threads; one worker on one torch thread (what
            # each Ray worker gets); two Ray workers
            for rep in range(repeats):
                for key, workers, one_thread in keys:
                    if one_thread:
                        torch.set_num_threads(1)
                    try:
                        res = optimize("evolve", tpl, [spec], work / f"{key}-{rep}",
                                       budget=budget, workers=workers,
                                       options={"popsize": 8})
                    finally:
                        torch.set_num_threads(threads)
                    walls[key].append(res.eval_seconds)  # scoring only: without Ray's start
                    trial_s[key].append(sum(r["seconds"] for r in res.trials))
                    scores = [r["scores"] for r in res.trials]
                    if first is None:
                        first = scores
                        row["trials_per_second"] = round(len(res.trials) / trial_s[key][0], 2)
                        row["best"] = round(res.best["scores"]["fitness"], 4)
                    else:  # the same seed: the same trials whatever the workers
                        same = row.get(f"{key}_same_trials", True) and scores == first
                        row[f"{key}_same_trials"] = same
                    log(f"[{suite}] {key}: {res.eval_seconds:.1f} s scoring {len(res.trials)} "
                        f"trials ({res.seconds:.1f} s in all)")
            for key, _, _ in keys:
                row[f"{key}_wall"] = round(statistics.median(walls[key]), 2)
                row[f"{key}_trial_seconds"] = round(statistics.median(trial_s[key]), 2)
                if repeats > 1:
                    row[f"{key}_walls"] = [round(w, 2) for w in walls[key]]
            row["repeats"] = repeats
            row["load_average_after"] = round(os.getloadavg()[0], 1)
            rows.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def measure_trial_path(size: str, methods: list[str], n: int, cache: Path, budget: int,
                       suite_size: str, log: Any, *, models_too: bool = True,
                       suites_too: bool = True) -> dict[str, Any]:
    """A search trial's merge + load before and after live models: (1) on the synthetic Llama,
    the candidate merged into a new state dict (with the pool's re-merge cache) and
    ``load_state_dict`` into the model (what every objective did) against ``merge_into`` the
    live model (what a trial does now); (2) whole trials of ``evolve`` on the suites, one
    worker on one torch thread, ``in_place=False`` (a state dict, a model built per trial and
    loaded: the suites' old path) against the live model. CPU-seconds per trial, the first
    trial (which builds the live model) left out."""
    import yaml
    from merge_speed import generate_models
    from transformers import LlamaConfig, LlamaForCausalLM

    import modelalloy.search.workers as workers
    from modelalloy.optimize.candidate import LiveModel, ModelPool, merge_candidate, merge_into
    from modelalloy.optimize.template import load_template
    from modelalloy.search.driver import optimize

    out: dict[str, Any] = {"models": [], "suites": []}
    models = generate_models(size, cache, log=log) if models_too else {}
    work = Path(tempfile.mkdtemp(prefix="trial-path-"))
    try:
        for method in methods if models_too else []:
            tpl = work / f"{method}.yaml"
            tpl.write_text(yaml.safe_dump(template(method, models)))
            space, recipe = load_template(tpl)
            config = LlamaConfig.from_dict(json.loads((models["base"] / "config.json")
                                                      .read_text()))
            module = LlamaForCausalLM(config).to(torch.bfloat16).eval()
            live = LiveModel(module)

            def live_for(shapes: Any, live: LiveModel = live) -> LiveModel:
                live.fit(shapes)
                return live

            old_pool = ModelPool()
            old_pool.sources(recipe)
            new_pool = ModelPool(dict(old_pool.items()))
            gen = torch.Generator().manual_seed(0)
            genomes = [torch.rand(space.dim, generator=gen).tolist() for _ in range(n)]
            cpu: dict[str, list[float]] = {"before": [], "after": []}
            wall: dict[str, list[float]] = {"before": [], "after": []}
            for i, genome in enumerate(genomes):
                rec = space.recipe(genome)
                c0, t0 = cpu_seconds(), time.perf_counter()
                module.load_state_dict(merge_candidate(rec, old_pool), strict=False)
                cpu["before"].append(cpu_seconds() - c0)
                wall["before"].append(time.perf_counter() - t0)
                live.forget()  # the path above wrote into the module too
                c0, t0 = cpu_seconds(), time.perf_counter()
                merge_into(rec, new_pool, live_for)
                cpu["after"].append(cpu_seconds() - c0)
                wall["after"].append(time.perf_counter() - t0)
                log(f"[trial path, {method}] candidate {i}: before {cpu['before'][-1]:.2f} "
                    f"CPU-s, after {cpu['after'][-1]:.2f} CPU-s")
            out["models"].append({
                "size": size, "method": method, "candidates": n,
                "params": sum(p.numel() for p in module.parameters()),
                "load_average": round(os.getloadavg()[0], 1), "nice": os.nice(0),
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                **{f"{k}_cpu": round(statistics.median(v[1:] or v), 3) for k, v in cpu.items()},
                **{f"{k}_wall": round(statistics.median(v[1:] or v), 3)
                   for k, v in wall.items()}})
            del module, live, old_pool, new_pool

        per_trial: list[tuple[float, float]] = []
        scorer = workers.score_candidate

        def timed(*args: Any, **kwargs: Any) -> Any:
            c0, t0 = time.process_time(), time.perf_counter()
            res = scorer(*args, **kwargs)
            per_trial.append((time.process_time() - c0, time.perf_counter() - t0))
            return res

        threads = torch.get_num_threads()
        workers.score_candidate = timed  # type: ignore[assignment]
        torch.set_num_threads(1)  # what each Ray worker runs on
        try:
            for suite in ("tiny-vision", "tiny-lm") if suites_too else ():
                spec = f"suite:{suite}?size={suite_size}"
                tpl = suite_search(work / f"{suite}.yaml", spec)
                row = suite_row(suite, suite_size, budget)
                scores = {}
                # before, after, and again (the machine's load drifts: the better of two)
                for rnd, key in enumerate(("before", "after", "before", "after")):
                    per_trial.clear()
                    res = optimize("evolve", tpl, [spec], work / f"{suite}-{rnd}",
                                   budget=budget, options={"popsize": 8},
                                   in_place=key == "after")
                    rest = per_trial[1:]  # the first trial builds the live model
                    cpu_t = statistics.median(c for c, _ in rest)
                    wall_t = statistics.median(w for _, w in rest)
                    row[f"{key}_cpu"] = min(row.get(f"{key}_cpu", cpu_t), round(cpu_t, 4))
                    row[f"{key}_wall"] = min(row.get(f"{key}_wall", wall_t), round(wall_t, 4))
                    scores[key] = [r["scores"] for r in res.trials]
                    log(f"[trial path, {suite}] {key}: {cpu_t * 1e3:.1f} ms CPU, "
                        f"{wall_t * 1e3:.1f} ms wall per trial")
                row["same_scores"] = scores["before"] == scores["after"]
                row["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                row["load_average_after"] = round(os.getloadavg()[0], 1)
                out["suites"].append(row)
        finally:
            workers.score_candidate = scorer  # type: ignore[assignment]
            torch.set_num_threads(threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return out


def render_trial_path(tp: dict[str, Any]) -> list[str]:
    def load(r: dict[str, Any]) -> str:
        text = str(r.get("load_average", ""))
        if "load_average_after" in r:
            text += f" → {r['load_average_after']}"
        text += f" (nice {r['nice']})" if r.get("nice") else ""
        return text + (f", {r['when']}" if "when" in r else "")

    L = ["", "### A search trial's merge + load: state dicts against live models",
         "",
         "Before: the candidate merged into a new state dict (the pool's re-merge cache on), "
         "then loaded into the objective's model (`load_state_dict`; the suites also built "
         "that model, randomly initialised, every trial). After: `merge_into` the objective's "
         "live model — the merged tensors written straight into its parameters, only the "
         "tensors whose parameters changed since the model's last candidate (these random "
         "genomes move all of them). Medians over the candidates after the first; CPU-seconds "
         "(user + system) are the figure under load; the load column gives when each row "
         "was measured. Command: "
         "`PYTHONPATH=src python benchmarks/candidate_cost.py --trial-path --cache-dir "
         "/work/main/benchmarks/.cache`.", "",
         "| model | method | candidates | load average, when | CPU-s before | CPU-s after | "
         "before ÷ after | wall before (s) | wall after (s) |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in tp.get("models", []):
        L.append(f"| synthetic Llama {r['size']} ({r['params'] / 1e6:.0f}M, bf16) | "
                 f"{r['method']} | {r['candidates']} | {load(r)} | {r['before_cpu']:.3f} | "
                 f"{r['after_cpu']:.3f} | {r['before_cpu'] / r['after_cpu']:.2f}× | "
                 f"{r['before_wall']:.3f} | {r['after_wall']:.3f} |")
    if tp.get("suites"):
        L += ["", "Whole trials (merge + score, validation split) of `evolve` (layer-wise TIES, "
              "population 8), one worker on one torch thread (what a Ray worker runs on), "
              "`optimize(..., in_place=False)` (before) against the default (after); per "
              "trial, the better of two runs each, the first trial left out.", "",
              "| suite | trials | load average (before → after), when | CPU-ms per trial before | "
              "after | before ÷ after | wall ms per trial before | after | same scores |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in tp["suites"]:
            L.append(f"| {r['suite']} ({r['size']}) | {r['budget']} | {load(r)} | "
                     f"{r['before_cpu'] * 1e3:.1f} | {r['after_cpu'] * 1e3:.1f} | "
                     f"{r['before_cpu'] / r['after_cpu']:.2f}× | "
                     f"{r['before_wall'] * 1e3:.1f} | {r['after_wall'] * 1e3:.1f} | "
                     f"{'yes' if r['same_scores'] else '**no**'} |")
    L += ["", "What changed for a trial: no model is built per trial (the suites built a "
          "randomly initialised one, whose initialisation alone is a pass over every weight), "
          "no merged state dict is allocated and no `load_state_dict` copies it: the engine "
          "writes each merged slice into the parameter it belongs to, and only the tensors "
          "whose parameters changed. The scores are the same bits (last column; "
          "tests/optimize/test_in_place.py). The Ray rows above (1 against 2 workers) run "
          "through `optimize`'s default, the live models: `OMP_WAIT_POLICY=PASSIVE "
          "PYTHONPATH=src python benchmarks/candidate_cost.py --no-candidates --suite-size "
          "full --budget 192`, on a quiet machine."]
    return L


def render(results: dict[str, Any]) -> str:
    L = [SECTION, "",
         "What a search trial costs before it is evaluated (merge + load into a model ready to "
         "run), three ways against the in-memory candidate (`merge_candidate`, the merge "
         "every `modelalloy optimize` algorithm uses, here writing into the parameters of a "
         "model built once, `into=`, as a search trial now merges into its objective's live "
         "model; next to it the same merge as a search trial made it before live models: a "
         "new state dict, then the objective's `load_state_dict` into its model): "
         "(a) `modelalloy merge` of the candidate into a fresh folder, its shards read "
         "back with safetensors into that same built model — the strictest comparison; (b) the "
         "same folder loaded with `AutoModelForCausalLM.from_pretrained(FOLDER, "
         "dtype=bfloat16)`, which is what lm-eval's `huggingface` model does with "
         "`pretrained=FOLDER` in mergekit-evolve; (c) mergekit-evolve's own on-disk path "
         "(`OnDiskMergeEvaluator`: mergekit's `run_merge` with the options `mergekit-evolve` "
         "sets, then the same `from_pretrained`), run by "
         "`benchmarks/mergekit_evolve_candidate.py` in mergekit's venv. Every path runs in a "
         "process started once — mergekit-evolve's Ray actor also lives for the whole search — "
         "so no interpreter start or import is counted in any column (the mergekit worker's "
         "start is given below). Same candidates (random layer-group genomes) for all; removing "
         "the folder afterwards is not timed; no tokenizer is loaded (the synthetic models have "
         "none). Seconds: median (best) over the candidates after the first, which warms every "
         "path up (numba's compile, caches) and is left out of all. "
         f"Measured {results['date']} on {results['machine']}, a machine **shared with other "
         "sessions and noisy**: read ratios, not single digits. Command: "
         "`PYTHONPATH=src python benchmarks/candidate_cost.py --mergekit-bin "
         "/work/mk-venv/bin/mergekit-yaml` (`--help` for options).", "",
         "| model | method | genes | candidates | load average | in memory | in memory as a "
         "trial did it before live models (state dict + load_state_dict) | (a) our merge to "
         "disk + safetensors into the built model | (b) our merge to disk + from_pretrained | "
         "(c) mergekit-evolve: mergekit merge + from_pretrained (merge alone) "
         "| speed-up of in memory over (a) / (b) / (c), medians | CPU-s (user + system) in "
         "memory / as a trial / (a) / (b) / (c), medians | CPU-s ratio (c) ÷ in memory |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cpu_cells(r: dict[str, Any]) -> str:
        c = r.get("cpu", {})
        if not c:
            return "— | —"
        spent = " / ".join(f"{c[k]:.2f}" if k in c else "—" for k in
                           ("in_memory", "in_memory_state_dict", "disk",
                            "disk_from_pretrained", "mergekit"))
        ratio = f"{c['mergekit'] / c['in_memory']:.1f}×" if "mergekit" in c else "—"
        return f"{spent} | {ratio}"

    def cell(r: dict[str, Any], key: str) -> str:
        return f"{r[key]:.2f} ({r[key + '_min']:.2f})" if key in r else "—"

    def load(r: dict[str, Any]) -> str:
        text = str(r.get("load_average", ""))
        if "load_average_after" in r:
            text += f" → {r['load_average_after']}"
        return text + (f" (nice {r['nice']})" if r.get("nice") else "")

    for r in results.get("candidates", []) + results.get("earlier_candidates", []):
        mk = (f"{cell(r, 'mergekit')}, merge {r['mergekit_merge']:.2f}" if "mergekit" in r
              else "—")
        ratios = " / ".join(f"{r[k]:.1f}×" if k in r else "—"
                            for k in ("speedup", "speedup_from_pretrained", "speedup_mergekit"))
        L.append(f"| synthetic Llama {r['size']} ({r['params'] / 1e6:.0f}M, bf16) | "
                 f"{r['method']} | {r['genes']} | {r['candidates']} | "
                 f"{load(r)} | {cell(r, 'in_memory')} | {cell(r, 'in_memory_state_dict')} | "
                 f"{cell(r, 'disk')} | "
                 f"{cell(r, 'disk_from_pretrained')} | {mk} | {ratios} | {cpu_cells(r)} |")
    if results.get("earlier_candidates"):
        L += ["", "The rows with (a) only are kept from an earlier run on a quieter machine "
              f"({results.get('earlier_when', 'date not recorded')}), before (b) and (c) "
              "existed: the strictest comparison, timed quietly (medians over all candidates "
              "then, the first included)."]
    if results.get("suites"):
        L += ["", "Whole trials (merge + score on the validation split) with `evolve` "
              "(layer-wise TIES weights and densities, population 8) on the suites; "
              "the Ray rows are the run's wall time without Ray's start (each worker loads "
              "the models once from the object store and warms up — the objective's data "
              "read, one merge — before the first trial). Each Ray worker runs on one torch "
              "thread, so the fair one-worker baseline is one worker on one thread (third "
              "column); the process's default threads are shown too.", "",
              "| suite | trials | load average (before → after) | wall, 1 worker, default "
              "threads (s) | wall, 1 worker, 1 thread (s) | wall, 2 Ray workers (s) | "
              "speed-up 1 → 2 workers (1 thread each) | vs default threads | 2 workers busy "
              "scoring (share of 2 × wall) | a trial on 2 workers ÷ on 1 worker, 1 thread |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results.get("suites", []):
            one = r.get("w1t1_wall", r["w1_wall"])
            L.append(f"| {r['suite']} ({r.get('size', 'smoke')}) | {r['budget']} | {load(r)} | "
                     f"{r['w1_wall']:.1f} | {one:.1f} | {r['w2_wall']:.1f} | "
                     f"{one / r['w2_wall']:.2f}× | {r['w1_wall'] / r['w2_wall']:.2f}× | "
                     f"{busy(r)} | {slower(r)} |")
    L += ["", *findings(results)]
    if results.get("trial_path"):
        L += render_trial_path(results["trial_path"])
    return "\n".join(L).rstrip() + "\n"


def busy(r: dict[str, Any]) -> str:
    """How much of the 2-worker run's wall time both workers spent scoring: what is left is
    Ray's dispatch, the batch barriers and the driver (the serial part)."""
    return f"{100 * r['w2_trial_seconds'] / (2 * r['w2_wall']):.0f}%"


def slower(r: dict[str, Any]) -> str:
    """A trial's own time on 2 workers against 1 worker on 1 thread: above 1, the two workers
    did not each get a core (other load, or each other)."""
    one = r.get("w1t1_trial_seconds", r["w1_trial_seconds"])
    return f"{r['w2_trial_seconds'] / one:.2f}×"


def findings(results: dict[str, Any]) -> list[str]:
    """What the numbers say, from the numbers."""
    out = []
    for r in results.get("candidates", []):
        io = r["disk"] - r["disk_merge_write"]
        line = (f"- {r['method']} at {r['size']}: the in-memory candidate takes "
                f"{r['in_memory']:.2f} s; (a) our disk path {r['disk']:.2f} s, of which "
                f"{r['disk_merge_write']:.2f} s merging and writing (fsync, rename) and "
                f"{io:.2f} s reading the shards back into the model: "
                f"{r['speedup']:.1f}× in favour of memory")
        if "in_memory_state_dict" in r:
            trial = r["in_memory_state_dict"]
            line += (f"; as a search trial made it before live models (a new state dict, then "
                     f"`load_state_dict`) {trial:.2f} s, {r['disk'] / trial:.1f}× against (a)"
                     + (f" and {r['mergekit'] / trial:.1f}× against (c)" if "mergekit" in r
                        else ""))
        if "disk_from_pretrained" in r:
            line += (f"; (b) with `from_pretrained` instead "
                     f"{r['disk_from_pretrained']:.2f} s, {r['speedup_from_pretrained']:.1f}×")
        if "mergekit" in r:
            line += (f"; (c) mergekit-evolve's path {r['mergekit']:.2f} s (its merge "
                     f"{r['mergekit_merge']:.2f} s), **{r['speedup_mergekit']:.1f}×** "
                     f"(target 10×: {'met' if r['speedup_mergekit'] >= 10 else 'not met'}; "
                     f"its worker's start, not counted, took {r['mergekit_start']:.1f} s)")
        out.append(line + (f"; load average {r['load_average']} when measured."
                           if "load_average" in r else "."))
    slow = [r for r in results.get("candidates", []) if r["speedup"] < 2]
    for r in slow:
        out.append(f"- For {r['method']} the merge's own computation dominates (a) "
                   f"(about {r['in_memory']:.1f} s of the in-memory candidate is the merge): "
                   "keeping candidates in memory removes the I/O, not the merge (a candidate that "
                   "moves only some layer groups re-merges only those; these candidates move "
                   "all of them).")
    for r in results.get("suites", []):
        speed = r.get("w1t1_wall", r["w1_wall"]) / r["w2_wall"]
        same = [r[k] for k in ("w1t1_same_trials", "w2_same_trials") if k in r]
        out.append(f"- {r['suite']} ({r.get('size', 'smoke')}): {r['trials_per_second']:.2f} "
                   f"trials/s on one worker; 2 Ray workers {speed:.2f}× one worker on one "
                   f"thread, {r['w1_wall'] / r['w2_wall']:.2f}× one worker on the default "
                   "threads (the target was 1.7× on the 2-core machine, which other sessions "
                   f"share; load average {r.get('load_average', '?')} when measured"
                   + (f", {r['load_average_after']} after" if "load_average_after" in r else "")
                   + ")" + ("" if not same else "; the same trials with 1 and 2 workers: "
                            + ("yes" if all(same) else "**no**"))
                   + (f"; medians of {r['repeats']} interleaved repeats (2 workers "
                      f"{r['w2_walls']} s, 1 worker on one thread {r['w1t1_walls']} s, on the "
                      f"default threads {r['w1_walls']} s)" if r.get("repeats", 1) > 1 else "")
                   + ".")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="100M", help="2M, 100M or 1B (merge_speed.py's models)")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--budget", type=int, default=24, help="evolve trials per suite run")
    ap.add_argument("--repeats", type=int, default=1,
                    help="interleave the 1- and 2-worker suite runs this many times and "
                         "report medians")
    ap.add_argument("--no-suites", action="store_true")
    ap.add_argument("--suite-size", default="smoke", choices=("smoke", "full"),
                    help="the suites' size for the trials and Ray rows (the other size's rows "
                         "in --json are kept)")
    ap.add_argument("--no-candidates", action="store_true",
                    help="keep the candidate rows of --json, measure the suites only")
    ap.add_argument("--mergekit-bin", help="mergekit-yaml of the venv that holds mergekit "
                                           "(default: MERGEKIT_YAML, PATH, ../venv-mergekit)")
    ap.add_argument("--no-mergekit", action="store_true",
                    help="leave out the mergekit-evolve column")
    ap.add_argument("--trial-path", action="store_true",
                    help="measure only a search trial's merge + load before and after live "
                         "models (--size, --methods, --candidates, --budget, --suite-size; "
                         "--no-candidates / --no-suites leave a part out); keep the other "
                         "rows of --json")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--json", type=Path,
                    default=REPO / "benchmarks" / "results" / "candidate_cost.json")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    args = ap.parse_args(argv)
    from modelalloy.search.heap import keep_heap

    keep_heap()  # as `modelalloy optimize` and its Ray workers: the in-process runs compare

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    results: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results.update({"date": time.strftime("%Y-%m-%d"),
                    "machine": f"{platform.machine()}, {torch.get_num_threads()} torch "
                               f"threads, torch {torch.__version__}"})
    if args.trial_path:
        fresh_tp = measure_trial_path(
            args.size, args.methods.split(","), args.candidates, args.cache_dir, args.budget,
            args.suite_size, log, models_too=not args.no_candidates,
            suites_too=not args.no_suites)
        tp = results.setdefault("trial_path", {"models": [], "suites": []})
        tp["date"] = fresh_tp["date"]
        if fresh_tp["models"]:  # rows not measured this time stay
            tp["models"] = fresh_tp["models"]
        ran = {(r["suite"], r["size"]) for r in fresh_tp["suites"]}
        tp["suites"] = [r for r in tp["suites"] if (r["suite"], r["size"]) not in ran] \
            + fresh_tp["suites"]
    elif not args.no_candidates:
        mergekit = None if args.no_mergekit else mergekit_python(args.mergekit_bin, log)
        results["candidates"] = [measure_candidates(args.size, m, args.candidates,
                                                    args.cache_dir, log, mergekit)
                                 for m in args.methods.split(",")]
    if not args.no_suites and not args.trial_path:
        fresh = measure_suites(args.budget, log, args.suite_size, args.repeats)
        ran = {(r["suite"], r["size"]) for r in fresh}
        # the other size's rows stay (rows without a size are the smoke suites')
        results["suites"] = [r for r in results.get("suites", [])
                             if (r["suite"], r.get("size", "smoke")) not in ran] + fresh
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    from merge_speed import write_doc

    write_doc(args.out, render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
