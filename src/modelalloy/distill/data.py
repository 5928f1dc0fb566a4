"""Distillation data: texts from a file, or a suite's prompts labelled by the teachers.

* a ``.txt`` file: one text per line (CE and KL on every token);
* a ``.jsonl`` file: ``{"text": ...}``, or ``{"prompt": ..., "response": ...}`` (the CE then
  covers the response only, as in instruction tuning);
* ``suite:tiny-lm[:SIZE]``: fresh prompts of the suite's held-in tasks (drawn with a seed of
  their own, answers thrown away: unlabeled), each answered greedily by the teacher of its task
  (DMM's protocol: each teacher is asked on its own domain; among several teachers of a task,
  the most confident — highest mean log-probability of its own answer). With min-CE fusion
  that teacher is then the target of the whole text. Picking by confidence alone among all
  teachers failed on tiny-lm: a teacher trained from scratch on one task was the most
  confident on every task's prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from modelalloy.distill.errors import DistillError
from modelalloy.distill.targets import Example, Teacher, encode


def read_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: data file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [Example(line) for line in lines if line.strip()]
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DistillError(f"{path}:{n}: not JSON ({err.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            out.append(Example(row["text"]))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(
                row.get("response"), str):
            out.append(Example(row["prompt"] + row["response"], len(row["prompt"])))
        else:
            raise DistillError(f"{path}:{n}: expected {{\"text\"}} or {{\"prompt\", "
                               "\"response\"}")
    if not out:
        raise DistillError(f"{path}: no examples")
    return out


def _decode(tokenizer: object, ids: Sequence[int]) -> str:
    # token by token: a character tokenizer's decode() puts spaces between tokens
    return "".join(tokenizer.decode([i]) for i in ids)  # type: ignore[attr-defined]


@torch.no_grad()
def _answers(teacher: Teacher, prompts: Sequence[str], max_new: int
             ) -> list[tuple[str, float]]:
    """Greedy answers of one teacher and their mean log-probability."""
    tok, model = teacher.tokenizer, teacher.model.eval()
    eos = tok.eos_token_id
    out = []
    for prompt in prompts:
        ids, _ = encode(tok, prompt)
        x = torch.tensor([ids])
        logps, new = [], []
        past = None
        for _ in range(max_new):
            res = model(input_ids=x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logp = torch.log_softmax(res.logits[0, -1].float(), -1)
            nxt = int(logp.argmax())
            logps.append(float(logp[nxt]))
            if nxt == eos:
                break
            new.append(nxt)
            x = torch.tensor([[nxt]])
        out.append((_decode(tok, new), sum(logps) / max(1, len(logps))))
    return out


def pseudo_labelled(prompts: Mapping[str, Sequence[str]], teachers: Sequence[Teacher],
                    max_new: int, log: Callable[[str], None] | None = None) -> list[Example]:
    """Prompts (by task) answered by a teacher of that task, the most confident one when
    several are (a teacher's name is its task: the suites' expert folders are named so);
    prompts of a task no teacher is named after go to the most confident of all."""
    log = log or (lambda _m: None)
    picks = dict.fromkeys(range(len(teachers)), 0)
    out = []
    for task, group in prompts.items():
        own = [k for k, t in enumerate(teachers) if t.name.split("@")[0] == task]
        candidates = own or list(range(len(teachers)))
        answers = {k: _answers(teachers[k], group, max_new) for k in candidates}
        for i, prompt in enumerate(group):
            k = max(candidates, key=lambda j: answers[j][i][1])
            picks[k] += 1
            eos = teachers[k].tokenizer.eos_token or ""
            out.append(Example(prompt + answers[k][i][0] + eos, len(prompt)))
    log("distill: pseudo-labels from " + ", ".join(
        f"{teachers[k].name} {n}" for k, n in picks.items()))
    return out


def suite_prompts(suite: object, n_per_task: int, seed: int = 1000) -> dict[str, list[str]]:
    """Fresh unlabeled prompts of a tiny-lm suite's held-in tasks, by task."""
    from modelalloy.bench.lm import make_examples

    info = suite.info  # type: ignore[attr-defined]
    if info.name != "tiny-lm":
        raise DistillError(f"distill: suite data is available for tiny-lm, not {info.name}")
    return {t: [p for p, _answer in make_examples(t, n_per_task, info.config["seed"] + seed)]
            for t in info.merged_tasks}
