"""The long-to-short case on tiny-lm, built the way the L2S paper's models relate.

The L2S paper merges a long chain-of-thought model with a short-answer one that share a capable
base (both fine-tuned from Qwen2.5-Math): their difference is a change of style, not of skill.
The suite's own pair (``sum_long``, ``sum_short``) is fine-tuned far from a base that sums
digits right 21% of the time, and every merge of it collapses (docs/benchmarks.md, findings).
This case rebuilds the pair from one shared parent:

- *parent* θ_P: the suite's base θ_0 fine-tuned on digit sums with the answer written in either
  format (half running sums first, half direct), so it can do the task both ways;
- *long* θ_L and *short* θ_S: θ_P fine-tuned a few hundred small steps on one format each
  (the suite's held-in experts' schedule), so τ_L = θ_L − θ_P and τ_S = θ_S − θ_P are small.

Merges take θ_P as their base. Scoring: final-answer exact match (in either format) on the
pair's shared test prompts and mean response length. Cached next to the suite
(``tiny-lm-l2s-<size>-<hash>``; the hash covers the suite's own).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modelalloy.bench import common, lm
from modelalloy.bench.common import build_cached, load_state_dict

BUILD_VERSION = 1
SIZES: dict[str, dict[str, Any]] = {
    "full": {"parent_steps": 1200, "parent_lr": 1e-3, "parent_per_format": 4000,
             "style_steps": 200, "style_lr": 3e-4},
    "smoke": {"parent_steps": 60, "parent_lr": 3e-3, "parent_per_format": 200,
              "style_steps": 30, "style_lr": 1e-3},
}


def both_formats(pair: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` prompts, each answered in one of the pair's formats drawn at random."""
    long_task, short_task = pair
    rng = random.Random(f"l2s-parent/{seed}")
    long_ex = lm.make_examples(long_task, n, seed + 31)
    short_ex = lm.make_examples(short_task, n, seed + 31)  # the same prompts (shared tag)
    return [lx if rng.random() < 0.5 else sx for lx, sx in zip(long_ex, short_ex, strict=True)]


def _build(out: Path, suite: Any, cfg: dict[str, Any], log: Callable[[str], None]
           ) -> dict[str, Any]:
    from transformers import GPT2LMHeadModel

    scfg = suite.info.config
    seed, pair = scfg["seed"], list(suite.info.extra["pair"])

    def fresh(sd: dict[str, torch.Tensor]) -> Any:
        model = GPT2LMHeadModel(lm.gpt2_config(scfg))
        model.load_state_dict(sd, strict=False)
        model.tie_weights()
        return model

    model = fresh(suite.base_state_dict())
    lm._train(model, both_formats(pair, cfg["parent_per_format"], seed), cfg["parent_steps"],
              cfg["parent_lr"], scfg["batch"], seed + 23, prompt_loss=False)
    lm._save(out / "parent", model)
    parent_sd = {k: v.clone() for k, v in model.state_dict().items()}
    log("tiny-lm-l2s: parent fine-tuned on sums in both formats")
    for i, task in enumerate(pair):
        model = fresh(parent_sd)
        lm._train(model, lm.make_examples(task, scfg["train_per_task"], seed + 37),
                  cfg["style_steps"], cfg["style_lr"], scfg["batch"], seed + 41 + i,
                  prompt_loss=False)
        lm._save(out / task, model)
        log(f"tiny-lm-l2s: '{task}' expert fine-tuned from the parent")
    return {"tasks": [{"name": t, "held_out": True} for t in pair]}


class _Info:
    def __init__(self, suite: Any) -> None:
        self.name, self.size = "tiny-lm-l2s", suite.info.size
        self.extra = {"pair": list(suite.info.extra["pair"])}


class L2SCase:
    """The built case, with the suite interface the long-to-short study reads: ``info.extra``
    (the pair), ``base_state_dict`` (the parent), ``expert_state_dict`` and ``evaluate``."""

    def __init__(self, suite: Any, path: Path) -> None:
        self.suite, self.path, self.info = suite, path, _Info(suite)

    @classmethod
    def build(cls, suite: Any, *, rebuild: bool = False,
              log: Callable[[str], None] | None = None) -> L2SCase:
        size = suite.info.size
        if size not in SIZES:
            raise common.SuiteError(f"tiny-lm-l2s: no configuration for size '{size}'")
        if len(suite.info.extra.get("pair") or []) != 2:
            raise common.SuiteError(f"tiny-lm-l2s: suite {suite.info.path.name} has no pair")
        cfg = {**SIZES[size], "version": BUILD_VERSION, "suite": suite.info.path.name}
        path = build_cached("tiny-lm-l2s", size, cfg, (sys.modules[__name__], lm),
                            lambda out, lg: _build(out, suite, cfg, lg), rebuild=rebuild,
                            cache_dir=suite.info.path.parent, log=log)
        return cls(suite, path)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return load_state_dict(self.path / "parent")

    def expert_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        if task not in self.info.extra["pair"]:
            raise common.SuiteError(f"tiny-lm-l2s: no expert '{task}' (pair: "
                                    f"{', '.join(self.info.extra['pair'])})")
        return load_state_dict(self.path / task)

    def evaluate(self, state_dict: dict[str, torch.Tensor], tasks: list[str] | None = None,
                 score: str = "final") -> dict[str, dict[str, Any]]:
        """The suite's scoring on the pair's shared test prompts; by default the final answer
        in either format (``lm.hits``): the study asks whether a merge answers right, and how
        long, not in which format."""
        return self.suite.evaluate(state_dict, tasks or self.info.extra["pair"][:1],
                                   score=score)
