"""Heterogeneous tiny-lm experts: another width, depth and character vocabulary.

Weight-space merging needs experts of one architecture; distillation does not. These experts
make that case measurable on tiny-lm: a GPT-2 of a different width and depth, with its own
character vocabulary (the suite's characters in reverse order plus three symbols the suite never
uses, so token ids differ everywhere and the vocabulary sizes differ), trained from scratch on
one held-in task (loss on the whole text: it has no pre-trained base to learn the format from).

They are built next to the suite, cached by the suite's folder name and their own config::

    <cache>/tiny-lm-hetero-<size>-<hash>/experts/<task>/   config.json, model.safetensors,
                                                          tokenizer files
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from modelalloy.bench import common
from modelalloy.bench.common import SuiteError, TaskInfo

BUILD_VERSION = 1
EXTRA = ["#", "@", "!"]
HETERO_SIZES: dict[str, dict[str, Any]] = {
    "full": {"n_layer": 3, "n_embd": 96, "n_head": 4, "steps": 1500, "lr": 2e-3, "batch": 32,
             "train": 4000},
    "smoke": {"n_layer": 2, "n_embd": 48, "n_head": 2, "steps": 300, "lr": 3e-3, "batch": 32,
              "train": 600},
}


def hetero_vocab() -> list[str]:
    from modelalloy.bench.lm import CHARS, EOS, PAD

    return [PAD, EOS] + CHARS[::-1] + EXTRA


def save_char_tokenizer(folder: Path, vocab: list[str]) -> Any:
    """An HF fast tokenizer with one token per character of ``vocab``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from modelalloy.bench.lm import EOS, PAD

    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(vocab)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   bos_token=EOS, unk_token=PAD)
    fast.save_pretrained(str(folder))
    return fast


def _config(cfg: dict[str, Any], suite_cfg: dict[str, Any], vocab: list[str]) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(vocab), n_positions=suite_cfg["n_positions"],
                      n_embd=cfg["n_embd"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                      eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)


def _train_expert(folder: Path, cfg: dict[str, Any], suite_cfg: dict[str, Any], task: str,
                  index: int) -> None:
    from transformers import GPT2LMHeadModel

    from modelalloy.bench import lm

    vocab = hetero_vocab()
    stoi = {c: i for i, c in enumerate(vocab)}
    seed = suite_cfg["seed"] * 1000 + 500 + index
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(_config(cfg, suite_cfg, vocab))
    data = [[stoi[c] for c in p + a] + [1] for p, a in lm.make_examples(task, cfg["train"],
                                                                      suite_cfg["seed"])]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for _ in range(cfg["steps"]):
        rows = [data[rng.randrange(len(data))] for _ in range(cfg["batch"])]
        ids, labels = lm._batch(rows, [1] * len(rows))  # <pad> is 0 in both vocabularies
        logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits  # 0 is <pad>
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    model.config.architectures = ["GPT2LMHeadModel"]
    model.save_pretrained(str(folder), safe_serialization=True)
    save_char_tokenizer(folder, vocab)


def hetero_experts(suite: Any, tasks: list[str] | None = None, *,
                   log: Callable[[str], None] | None = None,
                   cache_dir: Path | None = None) -> dict[str, Path]:
    """{task: folder} of heterogeneous experts for a built tiny-lm suite (built on first use)."""
    import sys

    info = suite.info
    if info.name != "tiny-lm":
        raise SuiteError(f"heterogeneous experts exist for tiny-lm, not {info.name}")
    tasks = tasks or info.merged_tasks[:1]
    unknown = [t for t in tasks if t not in info.merged_tasks]
    if unknown:
        raise SuiteError(f"tiny-lm: {unknown} are not held-in tasks of the suite")
    cfg = {**HETERO_SIZES[info.size], "suite": info.path.name, "tasks": tasks}

    def builder(out: Path, lg: Callable[[str], None]) -> dict[str, Any]:
        for task in tasks:
            _train_expert(out / "experts" / task, cfg, info.config, task,
                          info.merged_tasks.index(task))
            lg(f"tiny-lm-hetero: expert '{task}' trained")
        return {"tasks": common.task_dicts([TaskInfo(t) for t in tasks])}

    path = common.build_cached("tiny-lm-hetero", info.size, cfg, (sys.modules[__name__],),
                               builder, cache_dir=cache_dir, log=log)
    return {t: path / "experts" / t for t in tasks}
