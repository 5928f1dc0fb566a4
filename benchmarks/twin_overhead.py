"""Twin-Merging inference overhead on tiny-lm (full): tokens/s of the routed model against the
plain merged (shared) model, alternating runs in one process, one thread.

    MODELALLOY_CACHE=... PYTHONPATH=src python benchmarks/twin_overhead.py
"""

from __future__ import annotations

import json
import time

import torch


def main() -> None:
    from modelalloy.bench import load_suite
    from modelalloy.bench.lm import greedy
    from modelalloy.twin.suite_bench import build_suite_bundle

    torch.set_num_threads(1)
    suite = load_suite("tiny-lm", "full")
    bundle = build_suite_bundle(suite, density=0.1)
    prompts = [p for t in suite.info.merged_tasks for p in suite.labeled(t, "test")[0]]
    shared = suite.new_model()
    shared.load_state_dict(bundle.shared, strict=False)
    shared.tie_weights()
    max_new = suite.info.config["n_positions"] - 16
    models = {"shared": shared, "twin_sample": bundle.model(suite.new_model(), "sample"),
              "twin_top1": bundle.model(suite.new_model(), "top1")}
    out: dict[str, list[dict[str, float]]] = {}
    for _repeat in range(2):
        for name, model in models.items():
            start = time.perf_counter()
            gens = greedy(model, prompts, max_new)
            seconds = time.perf_counter() - start
            tokens = sum(len(g) + 1 for g in gens)
            out.setdefault(name, []).append({"seconds": round(seconds, 2), "tokens": tokens,
                                             "tokens_per_s": round(tokens / seconds, 1)})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
