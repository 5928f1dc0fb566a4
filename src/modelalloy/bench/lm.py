"""tiny-lm: a small GPT-2 with a character tokenizer, pre-trained on a task mixture, and experts.

- Vocabulary: characters (digits, letters, a few symbols) plus <pad> and <eos>; the tokenizer
  is saved in HF format (tokenizer.json), so ``AutoTokenizer.from_pretrained`` loads it.
- Tasks are synthetic string/number skills written as ``tag:input=answer<eos>`` and scored by
  exact match of the greedy answer. Held-in tasks are merged; held-out tasks are never merged
  (their experts exist only to normalise accuracy). Each merged task draws its inputs from an
  alphabet of its own (four letters, neighbours sharing one: ``ALPHABETS``), as the papers'
  experts each see a dataset of their own.
- The *base* is pre-trained on a general mixture: every task's format, answers right only part
  of the time (a model that knows how to answer but not how to do each task well); each
  *expert* is the base fine-tuned on one task with a small step, every weight but the (tied)
  token and position embeddings and the final layer norm (``finetune_freeze``), as the papers
  keep a frozen zero-shot head.
- A long-to-short pair: ``sum_long`` writes running sums before its answer
  (``sum:352=3,8,10;10``), ``sum_short`` answers directly (``sum:352=10``), on the same prompts.
  Both are scored on the final answer in either format (``hits``), so for a merged model the
  two columns are one measurement; ``evaluate(score="exact")`` scores each in its own format
  instead. The mean response length is recorded.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from modelalloy.bench import common
from modelalloy.bench.common import (
    SuiteError,
    SuiteInfo,
    TaskInfo,
    load_split,
    load_state_dict,
    save_model_folder,
    save_split,
)

# Bump whenever a change alters what a build produces: it is part of the cache key.
BUILD_VERSION = 3

CHARS = list("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:=;,+>. ")
PAD, EOS = "<pad>", "<eos>"
VOCAB = [PAD, EOS] + CHARS
STOI = {c: i for i, c in enumerate(VOCAB)}
LETTERS = "abcdefgh"


def encode(text: str) -> list[int]:
    return [STOI[c] for c in text]


def decode(ids: list[int]) -> str:
    out = []
    for i in ids:
        if i == STOI[EOS]:
            break
        if i != STOI[PAD]:
            out.append(VOCAB[i])
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Tasks: name -> (make(rng, letters) -> (input, answer), description)

def _word(rng: random.Random, letters: str, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random, letters: str) -> str:
    return "".join(rng.choice("123456789") for _ in range(rng.randint(3, 4)))


def _sum_long(s: str) -> str:
    total, steps = 0, []
    for ch in s:
        total += int(ch)
        steps.append(str(total))
    return ",".join(steps) + ";" + str(total)


# The letters each merged task's inputs are drawn from (other tasks: LETTERS). Four letters
# each, neighbours sharing one: the experts then refine the base on inputs of their own (as the
# papers' experts do on their own datasets), and their task vectors barely overlap.
ALPHABETS: dict[str, str] = {
    "rev": "abcd", "sort": "defg", "upper": "ghij", "shift": "jklm",
    "max": "mnop", "len": "pqrs", "double": "stuv", "count": "vwxy",
}


def task_letters(task: str) -> str:
    return ALPHABETS.get(task, LETTERS)


TaskFn = Callable[[random.Random, str], tuple[str, str]]
TASKS: dict[str, tuple[TaskFn, str]] = {}


def _task(name: str, desc: str, fn: Callable[[str, str], str],
          gen: Callable[[random.Random, str], str] = _word) -> None:
    def make(rng: random.Random, letters: str) -> tuple[str, str]:
        w = gen(rng, letters)
        return w, fn(w, letters)

    TASKS[name] = (make, desc)


_task("rev", "reverse the letters", lambda w, _a: w[::-1])
_task("sort", "sort the letters", lambda w, _a: "".join(sorted(w)))
_task("upper", "upper-case", lambda w, _a: w.upper())
_task("shift", "Caesar shift by one (a->b)", lambda w, _a: "".join(chr(ord(c) + 1) for c in w))
_task("max", "the largest letter", lambda w, _a: max(w))
_task("len", "the number of letters", lambda w, _a: str(len(w)))
_task("double", "every letter twice", lambda w, _a: "".join(c + c for c in w))
_task("count", "how many times the alphabet's first letter occurs", lambda w, a: str(w.count(a[0])))
_task("min", "the smallest letter", lambda w, _a: min(w))
_task("last", "the last letter", lambda w, _a: w[-1])
_task("first2", "the first two letters", lambda w, _a: w[:2])
_task("sum_short", "digit sum, answered directly", lambda s, _a: str(sum(map(int, s))), _digits)
_task("sum_long", "digit sum with running sums first (chain of thought)",
      lambda s, _a: _sum_long(s), _digits)

# The tag the prompt carries: the long/short pair shares one prompt.
TAGS = {name: name for name in TASKS} | {"sum_short": "sum", "sum_long": "sum"}


def final_answer(text: str) -> str:
    """The answer after any chain of thought (``3,8,10;10`` -> ``10``)."""
    return text.rsplit(";", 1)[-1]


SCORES = ("exact", "final")


def hits(generations: list[str], answers: list[str], score: str = "final") -> list[bool]:
    """Per example, whether a greedy answer counts.

    ``final`` (the suite's score, and the long-to-short study's): the final answer, whichever
    format it comes in; on the pair's shared prompts it is the same for both tasks, so for
    every model but the experts ``sum_long`` and ``sum_short`` are one measurement shown
    twice. ``exact``: the answer exactly as the task writes it. The long/short
    pair shares its prompts, so only the format tells its two tasks apart: a direct answer
    never counts for ``sum_long``, nor a running-sum one for ``sum_short``, and each column
    says how often a model answers right *in that format*. Every published tiny-lm table was
    measured with ``final``; switching the suite to ``exact`` changes the pair's columns and
    the held-out mean, so it waits for those tables to be regenerated.
    """
    if score not in SCORES:
        raise SuiteError(f"tiny-lm: score {score!r}: choose one of {', '.join(SCORES)}")
    pairs = zip(generations, answers, strict=True)
    if score == "final":
        return [final_answer(g) == final_answer(a) for g, a in pairs]
    return [g == a for g, a in pairs]


def make_examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"{TAGS[task]}/{seed}")  # the long/short pair shares its prompts
    letters = task_letters(task)
    return [(f"{TAGS[task]}:{x}=", y) for x, y in (TASKS[task][0](rng, letters)
                                                    for _ in range(n))]


def _corrupt(answer: str, rng: random.Random, letters: str = LETTERS) -> str:
    """A plausible wrong answer of the same shape (what the base is partly taught)."""
    chars = list(answer)
    i = rng.randrange(len(chars))
    pool = "0123456789" if chars[i].isdigit() else (letters.upper() if chars[i].isupper()
                                                     else letters)
    chars[i] = rng.choice(pool)
    if len(chars) > 1 and rng.random() < 0.5:
        j = rng.randrange(len(chars))
        chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


# ---------------------------------------------------------------------------------------------

FROZEN = ["transformer.wte", "transformer.wpe", "transformer.ln_f"]
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "seed": 0, "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 48,
        "tasks": ["rev", "sort", "upper", "shift", "max", "len", "double", "count"],
        "held_out": ["min", "last"],
        "pair": ["sum_long", "sum_short"],
        "pretrain_steps": 2400, "pretrain_lr": 1e-3, "pretrain_correct": 0.5,
        "batch": 32, "finetune_steps": 200, "finetune_lr": 3e-4, "finetune_freeze": FROZEN,
        "pair_finetune_steps": 2400, "pair_finetune_lr": 1e-3, "pair_train_per_task": 8000,
        "train_per_task": 2000, "val_per_task": 50, "eval_per_task": 500, "general": 200,
    },
    "smoke": {
        "seed": 0, "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32,
        "tasks": ["len", "max"],
        "held_out": ["last"],
        "pair": ["sum_long", "sum_short"],
        "pretrain_steps": 120, "pretrain_lr": 3e-3, "pretrain_correct": 0.3,
        "batch": 32, "finetune_steps": 80, "finetune_lr": 3e-3, "finetune_freeze": FROZEN,
        "train_per_task": 300, "val_per_task": 20, "eval_per_task": 40, "general": 40,
    },
}


def gpt2_config(cfg: dict[str, Any]) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(VOCAB), n_positions=cfg["n_positions"],
                      n_embd=cfg["n_embd"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=STOI[EOS], eos_token_id=STOI[EOS], pad_token_id=STOI[PAD],
                      tie_word_embeddings=True)


def save_tokenizer(folder: Path) -> None:
    """Write an HF fast tokenizer (one token per character) into ``folder``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(STOI), unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   bos_token=EOS, unk_token=PAD)
    fast.padding_side = "left"
    fast.save_pretrained(str(folder))


def _batch(texts: list[list[int]], answer_starts: list[int]) -> tuple[torch.Tensor, ...]:
    width = max(len(t) for t in texts)
    ids = torch.full((len(texts), width), STOI[PAD], dtype=torch.long)
    labels = torch.full((len(texts), width), -100, dtype=torch.long)
    for i, (t, a) in enumerate(zip(texts, answer_starts, strict=True)):
        ids[i, :len(t)] = torch.tensor(t)
        labels[i, a:len(t)] = torch.tensor(t[a:])
    return ids, labels


def _train(model: Any, data: list[tuple[str, str]], steps: int, lr: float, batch: int,
           seed: int, prompt_loss: bool, freeze: tuple[str, ...] = ()) -> torch.optim.AdamW:
    enc = [(encode(p), encode(a) + [STOI[EOS]]) for p, a in data]
    # Frozen weights stay in the optimizer at lr 0: they do not move, and Adam's moments (saved
    # with the expert, read by OTA / FFG) still cover every parameter.
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not n.startswith(freeze)]}]
    if freeze:
        groups.append({"params": [p for n, p in named if n.startswith(freeze)], "lr": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        items = [enc[rng.randrange(len(enc))] for _ in range(batch)]
        ids, labels = _batch([p + a for p, a in items],
                             [1 if prompt_loss else len(p) for p, a in items])
        logits = model(input_ids=ids, attention_mask=(ids != STOI[PAD]).long()).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return opt


@torch.no_grad()
def greedy(model: Any, prompts: list[str], max_new: int) -> list[str]:
    """Batched greedy decoding with left padding (no sampling: deterministic)."""
    enc = [encode(p) for p in prompts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), STOI[PAD], dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    done = torch.zeros(len(enc), dtype=torch.bool)
    out = torch.full((len(enc), max_new), STOI[PAD], dtype=torch.long)
    past = None
    cur_ids, cur_pos = ids, (mask.cumsum(1) - 1).clamp(min=0)
    for step in range(max_new):
        res = model(input_ids=cur_ids, attention_mask=mask, position_ids=cur_pos,
                    past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = res.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, STOI[PAD]), nxt)
        out[:, step] = nxt
        done |= nxt == STOI[EOS]
        if bool(done.all()):
            break
        cur_pos = cur_pos[:, -1:] + 1
        cur_ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones((len(enc), 1), dtype=torch.long)], 1)
    return [decode(row.tolist()) for row in out]


def _save_examples(path: Path, examples: list[tuple[str, str]], with_answers: bool) -> None:
    prompts = [encode(p) for p, _ in examples]
    width = max(len(p) for p in prompts)
    t = torch.full((len(prompts), width), STOI[PAD], dtype=torch.long)
    for i, p in enumerate(prompts):
        t[i, :len(p)] = torch.tensor(p)
    tensors = {"prompts": t}
    if with_answers:
        answers = [encode(a) for _, a in examples]
        aw = max(len(a) for a in answers)
        at = torch.full((len(answers), aw), STOI[PAD], dtype=torch.long)
        for i, a in enumerate(answers):
            at[i, :len(a)] = torch.tensor(a)
        tensors["answers"] = at
    save_split(path, tensors)


def _load_examples(path: Path) -> tuple[list[str], list[str] | None]:
    d = load_split(path)
    prompts = [decode(r.tolist()) for r in d["prompts"]]
    answers = [decode(r.tolist()) for r in d["answers"]] if "answers" in d else None
    return prompts, answers


def _save(folder: Path, model: Any, opt: torch.optim.Optimizer | None = None,
          names: dict[int, str] | None = None) -> None:
    """HF folder: config.json, model.safetensors (tied lm_head omitted, as HF does),
    tokenizer files, and Adam's moments in optimizer.safetensors."""
    params = dict(model.named_parameters())
    config = model.config.to_dict()
    config["architectures"] = ["GPT2LMHeadModel"]
    save_model_folder(folder, {k: v for k, v in model.state_dict().items() if k in params},
                      config, optimizer=opt, names=names)
    save_tokenizer(folder)


def all_tasks(cfg: dict[str, Any]) -> list[tuple[str, bool]]:
    """(task, held out) for every expert the suite builds, in build order."""
    return ([(t, False) for t in cfg["tasks"]] + [(t, True) for t in cfg["held_out"]]
            + [(t, True) for t in cfg["pair"]])


def pretrain(cfg: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
    """The base: every task's format, a fraction of the answers right."""
    from transformers import GPT2LMHeadModel

    seed = cfg["seed"]
    torch.manual_seed(seed)
    rng = random.Random(f"mix/{seed}")
    mixture = []
    for t in tasks:
        letters = task_letters(t)
        for p, a in make_examples(t, cfg["train_per_task"], seed):
            right = rng.random() < cfg["pretrain_correct"]
            mixture.append((p, a if right else _corrupt(a, rng, letters)))
    model = GPT2LMHeadModel(gpt2_config(cfg))
    _train(model, mixture, cfg["pretrain_steps"], cfg["pretrain_lr"], cfg["batch"], seed,
           prompt_loss=True)
    return copy.deepcopy(model.state_dict())


def finetune(model: Any, cfg: dict[str, Any], task: str, index: int) -> torch.optim.AdamW:
    """One expert: the base fine-tuned on ``task`` (loss on the answer only). The pair's
    experts (never merged) may have their own schedule (``pair_finetune_*``)."""
    seed = cfg["seed"]
    pair = task in cfg["pair"]
    steps = cfg.get("pair_finetune_steps", cfg["finetune_steps"]) if pair else \
        cfg["finetune_steps"]
    lr = cfg.get("pair_finetune_lr", cfg["finetune_lr"]) if pair else cfg["finetune_lr"]
    n = cfg.get("pair_train_per_task", cfg["train_per_task"]) if pair else cfg["train_per_task"]
    return _train(model, make_examples(task, n, seed), steps, lr,
                  cfg["batch"], common.finetune_seed(cfg, seed * 1000 + index),
                  prompt_loss=False, freeze=tuple(cfg.get("finetune_freeze", ())))


def _workers(n_jobs: int) -> int:
    """Processes for the experts: ``$MODELALLOY_BUILD_WORKERS`` or the CPU count (at most 4).
    Not part of the config: each expert is seeded on its own, so the result is the same."""
    env = os.environ.get("MODELALLOY_BUILD_WORKERS")
    n = int(env) if env else min(4, os.cpu_count() or 1)
    return max(1, min(n, n_jobs))


def _expert_job(job: tuple[Path, dict[str, Any], int, str, dict[str, torch.Tensor]]) -> str:
    """Fine-tune and save one expert, and write its task's data splits."""
    from transformers import GPT2LMHeadModel

    out, cfg, i, task, base_sd = job
    torch.set_num_threads(1)
    seed = cfg["seed"]
    expert = GPT2LMHeadModel(gpt2_config(cfg))
    expert.load_state_dict(base_sd)
    names = {id(p): n for n, p in expert.named_parameters()}
    opt = finetune(expert, cfg, task, i)
    _save(out / "experts" / task, expert, opt, names)
    val = make_examples(task, cfg["val_per_task"], seed + 1)
    test = make_examples(task, cfg["eval_per_task"], seed + 2)
    _save_examples(out / "data" / task / "val.safetensors", val, with_answers=True)
    _save_examples(out / "data" / task / "test.safetensors", test, with_answers=False)
    _save_examples(out / "data" / task / "labels.safetensors", test, with_answers=True)
    return task


def build(out: Path, cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    from transformers import GPT2LMHeadModel

    seed = cfg["seed"]
    tasks = all_tasks(cfg)
    unknown = [t for t, _ in tasks if t not in TASKS]
    if unknown:
        raise SuiteError(f"tiny-lm: unknown tasks {unknown}; known: {', '.join(TASKS)}")
    base_sd = pretrain(cfg, [t for t, _ in tasks])
    model = GPT2LMHeadModel(gpt2_config(cfg))
    model.load_state_dict(base_sd)
    _save(out / "base", model)
    log("tiny-lm: base pre-trained")
    general = [(p, a) for t, _ in tasks
               for p, a in make_examples(t, cfg["general"] // len(tasks) + 1, seed + 7)]
    (out / "data").mkdir(exist_ok=True)
    _save_examples(out / "data" / "general.safetensors", general, with_answers=True)
    jobs = [(out, cfg, i, task, base_sd) for i, (task, _) in enumerate(tasks)]
    workers = _workers(len(jobs))
    if workers > 1:
        # Independent, single-threaded, seeded per expert: any process gives the same expert.
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            for task in pool.map(_expert_job, jobs):
                log(f"tiny-lm: expert '{task}' fine-tuned")
    else:
        for job in jobs:
            log(f"tiny-lm: expert '{_expert_job(job)}' fine-tuned")
    infos = [TaskInfo(task, held_out, TASKS[task][1]) for task, held_out in tasks]
    return {"tasks": common.task_dicts(infos), "extra": {"pair": cfg["pair"]}}


class LMSuite(common.SizedSuite):
    """A built tiny-lm suite: greedy exact-match accuracy, response length, perplexity."""

    kind = "tiny-lm"

    def __init__(self, info: SuiteInfo) -> None:
        super().__init__(info)
        self._data: dict[tuple[str, str], tuple[list[str], list[str]]] = {}

    def new_model(self, depth: int | None = None) -> Any:
        """The suite's GPT-2, randomly initialised, with ``depth`` blocks when given (a
        data-flow path changes the depth)."""
        from transformers import GPT2LMHeadModel

        cfg = self.info.config
        if depth and depth != cfg["n_layer"]:
            cfg = {**cfg, "n_layer": depth}
        return GPT2LMHeadModel(gpt2_config(cfg)).eval()

    @staticmethod
    def model_depth(names: Iterable[str]) -> int | None:
        """The block count of a state dict's tensor names (None: no block)."""
        return len({n.split(".")[2] for n in names if n.startswith("transformer.h.")}) or None

    @staticmethod
    def check_fit(shapes: Mapping[str, Any], model: Any) -> None:
        """A state dict of these tensors fills ``model`` (its causal-mask buffers and the
        ``lm_head`` tied to ``wte`` may be absent), or a one-line :class:`SuiteError`."""
        have = model.state_dict()
        missing = [m for m in have if m not in shapes and not m.endswith(
            ("attn.bias", "attn.masked_bias", "lm_head.weight"))]
        unexpected = [n for n in shapes if n not in have]
        if missing or unexpected:
            raise SuiteError(f"tiny-lm: state dict does not fit the suite's model: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}")

    def _model(self, state_dict: dict[str, torch.Tensor]) -> Any:
        # the state dict's own depth: a data-flow path (optimize's evolve) changes it
        model = self.new_model(self.model_depth(state_dict))
        self.check_fit(state_dict, model)
        model.load_state_dict(state_dict, strict=False)
        model.tie_weights()
        return model

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return load_state_dict(self.info.base_dir)

    def expert_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        return load_state_dict(self.info.expert_dir(task))

    def labeled(self, task: str, split: str) -> tuple[list[str], list[str]]:
        key = (task, split)
        if key not in self._data:
            if split == "val":
                prompts, answers = _load_examples(self.info.data_file(task, "val"))
            else:
                prompts, answers = _load_examples(self.info.data_file(task, "labels"))
            assert answers is not None
            self._data[key] = (prompts, answers)
        return self._data[key]

    def evaluate(self, state_dict: dict[str, torch.Tensor], tasks: list[str] | None = None,
                 split: str = "test", limit: int | None = None, score: str = "final"
                 ) -> dict[str, dict[str, Any]]:
        """Per task: accuracy (``score``, see :func:`hits`), mean response length and the
        per-example hits (``correct``, for the bootstrap intervals)."""
        return self.evaluate_model(self._model(state_dict), tasks, split, limit, score)

    def evaluate_model(self, model: Any, tasks: list[str] | None = None, split: str = "test",
                       limit: int | None = None, score: str = "final"
                       ) -> dict[str, dict[str, Any]]:
        """:meth:`evaluate` of a built model (the suite's GPT-2 holding the weights: a search
        merges each candidate into one in place)."""
        out: dict[str, dict[str, Any]] = {}
        max_new = self.info.config["n_positions"] - 16
        for task in tasks or [t.name for t in self.info.tasks]:
            prompts, answers = self.labeled(task, split)
            if limit is not None:
                prompts, answers = prompts[:limit], answers[:limit]
            gens = greedy(model, prompts, max_new)
            correct = hits(gens, answers, score)
            out[task] = {"accuracy": sum(correct) / len(correct),
                         "mean_length": sum(len(g) + 1 for g in gens) / len(gens),
                         "correct": correct}
        return out

    @torch.no_grad()
    def general_metrics(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        """Perplexity (per answer character) on a general split of every task's format."""
        model = self._model(state_dict)
        prompts, answers = _load_examples(self.info.path / "data" / "general.safetensors")
        assert answers is not None
        texts = [encode(p) + encode(a) + [STOI[EOS]] for p, a in zip(prompts, answers,
                                                                      strict=True)]
        ids, labels = _batch(texts, [1] * len(texts))
        logits = model(input_ids=ids, attention_mask=(ids != STOI[PAD]).long()).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return {"perplexity": float(torch.exp(loss))}
