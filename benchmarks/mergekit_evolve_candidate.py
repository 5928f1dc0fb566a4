#!/usr/bin/env python
"""mergekit-evolve's on-disk candidate, timed: run in mergekit's own virtual environment (never
imports modelalloy), driven by benchmarks/candidate_cost.py.

What mergekit-evolve without vLLM does per trial (mergekit/evo/actors.py ``OnDiskMergeEvaluator``
→ helpers.py ``merge_model`` then ``evaluate_model``): ``run_merge`` of the candidate's config
into a fresh temporary folder, with the options ``mergekit-evolve`` builds (one shard,
safetensors, tokenizer copied, quiet, CPU), then lm-eval's ``huggingface`` model with
``pretrained=FOLDER, dtype=bfloat16``, which is ``AutoModelForCausalLM.from_pretrained``. Both
happen inside a Ray actor that lives for the whole search, so no interpreter start is paid per
trial; this worker is likewise started once.

Protocol: one JSON object per stdin line, ``{"config": YAML_PATH, "out": FOLDER}``; one JSON line
back per candidate, ``{"merge": s, "load": s, "merge_cpu": s, "load_cpu": s}`` (wall and
CPU seconds) (or ``{"error": ...}``). The first line written
is ``{"ready": seconds spent importing}``. The output folder is removed after the load, untimed
(mergekit-evolve removes it after the evaluation).
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402
import yaml  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def options() -> MergeOptions:
    """The fields mergekit/scripts/evolve.py sets, for a CPU run without a LoRA cache."""
    return MergeOptions(cuda=False, low_cpu_memory=False, out_shard_size=1_000_000_000_000,
                        random_seed=0, quiet=True, read_to_gpu=False, copy_tokenizer=True,
                        safe_serialization=True)


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def candidate(config_path: str, out: str) -> dict[str, float]:
    config = MergeConfiguration.model_validate(yaml.safe_load(open(config_path)))
    c0, t0 = cpu_seconds(), time.perf_counter()
    run_merge(config, out_path=out, options=options())
    c1, t1 = cpu_seconds(), time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    c2, t2 = cpu_seconds(), time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    del model
    shutil.rmtree(out, ignore_errors=True)
    return {"merge": t1 - t0, "load": t2 - t1, "merge_cpu": c1 - c0, "load_cpu": c2 - c1,
            "params": params}


def main() -> int:
    print(json.dumps({"ready": time.perf_counter() - T0}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            res: dict[str, object] = dict(candidate(job["config"], job["out"]))
        except Exception as err:  # reported to the driver, which prints it
            res = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
