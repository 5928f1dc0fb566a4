"""`modelalloy eval BUNDLE#TASK`: a TALL bundle's expert, read through the engine's bundle
source, scores as the same rebuilt weights given as a state dict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelalloy.bundle import TallBundle, compress_to
from modelalloy.eval.harness import SuiteScorer


@pytest.mark.slow
def test_eval_of_a_bundle_expert_is_the_eval_of_its_weights(vision_smoke, run_cli,
                                                           tmp_path: Path):
    tasks = vision_smoke.info.merged_tasks[:2]
    bundle = tmp_path / "bundle"
    compress_to(bundle, vision_smoke.base_state_dict(),
                {t: vision_smoke.expert_state_dict(t) for t in tasks}, mask_lambda=0.4)
    out = tmp_path / "records.json"
    res = run_cli("eval", f"{bundle}#{tasks[1]}", "--suite", "tiny-vision", "--size", "smoke",
                  "--json", out)
    assert res.code == 0, res.err
    got = json.loads(out.read_text())["records"]
    weights = TallBundle.load(bundle).rebuild(tasks[1])
    want = SuiteScorer(vision_smoke, split="test").records(f"bundle#{tasks[1]}", weights,
                                                          variant="eval")
    assert [(r["task"], r["accuracy"]) for r in got] == \
        [(r["task"], r["accuracy"]) for r in want]
    # the rebuilt expert is not the base: it scores its own task above the base
    base = SuiteScorer(vision_smoke, split="test").records("base",
                                                          vision_smoke.base_state_dict())
    own = {r["task"]: r["accuracy"] for r in got}[tasks[1]]
    assert own > {r["task"]: r["accuracy"] for r in base}[tasks[1]]
