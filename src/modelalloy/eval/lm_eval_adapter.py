"""Evaluate any merged HF causal LM with lm-evaluation-harness (the optional ``eval`` extra).

``run_lm_eval(model_dir, ["hellaswag"])`` calls ``lm_eval.simple_evaluate`` with the "hf"
backend on a local folder. Tasks may also come from local YAML files (``include_path``):
:func:`write_local_task` writes one whose data is a local JSONL file (no download), and
:func:`export_suite_task` turns a tiny-lm suite task into such a task, so the adapter is tested
here end to end without network access.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelalloy.eval.harness import EvalError

INSTALL_HINT = ("lm-eval with its Hugging Face backend is not installed: "
                "pip install 'modelalloy[eval]' (or pip install 'lm-eval[hf]')")


def available() -> bool:
    """lm-eval and what its "hf" backend imports (accelerate) are both installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("lm_eval", "accelerate"))


def write_local_task(folder: str | Path, name: str, examples: list[dict[str, str]], *,
                     until: tuple[str, ...] = ("<eos>", "\n"), max_gen_toks: int = 32) -> Path:
    """Write ``name.yaml`` + ``name.jsonl`` (fields prompt, answer): an exact-match task.

    Returns the folder, to pass as ``include_path``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"prompt": e["prompt"], "answer": e["answer"]}) + "\n"
                            for e in examples))
    until_yaml = ", ".join(json.dumps(u) for u in until)
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data.resolve()))}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: [{until_yaml}]
  do_sample: false
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder


def export_suite_task(suite: Any, task: str, folder: str | Path, limit: int | None = None,
                      name: str | None = None) -> Path:
    """Write a tiny-lm suite task (test split) as a local lm-eval task named ``ma_<task>``."""
    prompts, answers = suite.labeled(task, "test")
    examples = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
    longest = max(len(p) for p in prompts)
    return write_local_task(folder, name or f"ma_{task}", examples[:limit] if limit else examples,
                            max_gen_toks=suite.info.config["n_positions"] - longest - 1)


def run_lm_eval(model_dir: str | Path, tasks: list[str], *, include_path: str | Path | None = None,
                limit: int | None = None, batch_size: int = 8, device: str = "cpu",
                num_fewshot: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval's "hf" backend on a local folder; returns {task: {metric: value}}."""
    if not available():
        raise EvalError(INSTALL_HINT)
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={Path(model_dir).resolve()},dtype=float32",
        tasks=list(tasks), task_manager=manager, limit=limit, batch_size=batch_size,
        device=device, num_fewshot=num_fewshot, log_samples=False)
    if results is None:
        raise EvalError("lm-eval returned no results")
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not k.startswith("alias")
                     and "stderr" not in k}
    return out
