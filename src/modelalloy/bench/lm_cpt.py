"""The continual-pre-training + chat-vector case on tiny-lm (WIDEN's and the chat-vector papers').

From the tiny-lm suite's base θ_0, two models that relate the way those papers' models do:

- *instruct* θ_I: θ_0 fine-tuned on the suite's held-in tasks jointly (every weight) — the
  "chat" model: it has the skills, on the suite's own alphabets;
- *CPT* θ_C: θ_0 continually pre-trained on a new domain — the same task formats on inputs from
  a new alphabet (:data:`DOMAIN_LETTERS`, upper-case letters the base never saw as inputs),
  answers right only ``pretrain_correct`` of the time, as in pre-training: it knows the
  domain's text, not the skills.

The chat-vector recipe is θ_C + (θ_I − θ_0) (task arithmetic with λ = 1 over θ_0). A merge that
inherits both should do the skills on the new domain (``domain:<task>``), which neither model
was trained for, and keep the skills on the old one. The models and the domain's test split are
cached next to the suite (``tiny-lm-cpt-<size>-<hash>``; the hash covers the suite's own).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modelalloy.bench import common, lm
from modelalloy.bench.common import build_cached, load_state_dict

BUILD_VERSION = 1
DOMAIN_LETTERS = "KLMNOPQR"
# Tasks whose answers stay meaningful on upper-case inputs ("upper" would be the identity).
DOMAIN_TASKS = ("rev", "sort", "shift", "max", "len", "double", "count")
SIZES: dict[str, dict[str, Any]] = {
    "full": {"cpt_steps": 1200, "cpt_lr": 1e-3, "cpt_per_task": 2000,
             "instruct_steps": 600, "instruct_lr": 3e-4},
    "smoke": {"cpt_steps": 60, "cpt_lr": 3e-3, "cpt_per_task": 200,
              "instruct_steps": 60, "instruct_lr": 3e-3},
}


def domain_examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``task`` on inputs drawn from :data:`DOMAIN_LETTERS` (same prompt format)."""
    rng = random.Random(f"domain/{task}/{seed}")
    make = lm.TASKS[task][0]
    return [(f"{lm.TAGS[task]}:{x}=", y) for x, y in (make(rng, DOMAIN_LETTERS)
                                                       for _ in range(n))]


def domain_tasks(suite_cfg: dict[str, Any]) -> list[str]:
    return [t for t in suite_cfg["tasks"] if t in DOMAIN_TASKS]


def _build(out: Path, suite: Any, cfg: dict[str, Any], log: Callable[[str], None]
           ) -> dict[str, Any]:
    from transformers import GPT2LMHeadModel

    scfg = suite.info.config
    seed = scfg["seed"]
    base_sd = suite.base_state_dict()
    tasks = domain_tasks(scfg)
    rng = random.Random(f"cpt/{seed}")
    text = []
    for t in tasks:
        for p, a in domain_examples(t, cfg["cpt_per_task"], seed):
            right = rng.random() < scfg["pretrain_correct"]
            text.append((p, a if right else lm._corrupt(a, rng, DOMAIN_LETTERS)))
    model = GPT2LMHeadModel(lm.gpt2_config(scfg))
    model.load_state_dict(base_sd, strict=False)
    model.tie_weights()
    lm._train(model, text, cfg["cpt_steps"], cfg["cpt_lr"], scfg["batch"], seed + 17,
              prompt_loss=True)
    lm._save(out / "cpt", model)
    log("tiny-lm-cpt: continually pre-trained on the new alphabet")
    model = GPT2LMHeadModel(lm.gpt2_config(scfg))
    model.load_state_dict(base_sd, strict=False)
    model.tie_weights()
    sft = [ex for t in scfg["tasks"] for ex in lm.make_examples(t, scfg["train_per_task"], seed)]
    lm._train(model, sft, cfg["instruct_steps"], cfg["instruct_lr"], scfg["batch"], seed + 19,
              prompt_loss=False)
    lm._save(out / "instruct", model)
    log("tiny-lm-cpt: instruct model fine-tuned on every held-in task")
    for t in tasks:
        lm._save_examples(out / "data" / t / "labels.safetensors",
                          domain_examples(t, scfg["eval_per_task"], seed + 2), with_answers=True)
    return {"tasks": [{"name": f"domain:{t}", "held_out": True} for t in tasks]}


class CptCase:
    """The built case: base / instruct / CPT state dicts and scoring on both domains."""

    def __init__(self, suite: Any, path: Path) -> None:
        self.suite, self.path = suite, path
        self.tasks = domain_tasks(suite.info.config)

    @classmethod
    def build(cls, suite: Any, *, rebuild: bool = False,
              log: Callable[[str], None] | None = None) -> CptCase:
        import sys

        size = suite.info.size
        if size not in SIZES:
            raise common.SuiteError(f"tiny-lm-cpt: no configuration for size '{size}'")
        cfg = {**SIZES[size], "suite": suite.info.path.name}
        path = build_cached("tiny-lm-cpt", size, cfg, (sys.modules[__name__], lm),
                            lambda out, lg: _build(out, suite, cfg, lg), rebuild=rebuild,
                            cache_dir=suite.info.path.parent, log=log)
        return cls(suite, path)

    def state_dict(self, which: str) -> dict[str, torch.Tensor]:
        """``base``, ``instruct`` or ``cpt``."""
        if which == "base":
            return self.suite.base_state_dict()
        return load_state_dict(self.path / which)

    def evaluate(self, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """Held-in tasks on the suite's test split, and ``domain:<task>`` on the new alphabet."""
        out = self.suite.evaluate(state_dict, self.suite.info.merged_tasks)
        model = self.suite._model(state_dict)
        max_new = self.suite.info.config["n_positions"] - 16
        for t in self.tasks:
            prompts, answers = lm._load_examples(self.path / "data" / t / "labels.safetensors")
            assert answers is not None
            gens = lm.greedy(model, prompts, max_new)
            hits = lm.hits(gens, answers)  # the suite's score: "final"
            out[f"domain:{t}"] = {"accuracy": sum(hits) / len(hits),
                                  "mean_length": sum(len(g) + 1 for g in gens) / len(gens),
                                  "correct": hits}
        return out
