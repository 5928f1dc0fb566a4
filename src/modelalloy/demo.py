"""`make demo` before the benchmark suite exists: tiny random checkpoints, several merges.

Builds a tiny GPT-2 base and three "experts" (the base plus structured random task vectors)
as HF folders, merges them from YAML recipes with several methods through the real engine, and
prints how far each merged task vector sits from each expert's.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from modelalloy.api import merge
from modelalloy.io.checkpoint import open_checkpoint

RECIPES = {
    "linear": "merge_method: linear\nmodels:\n{models_all}",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: base\nparameters:\n"
                       "  lambda: 0.5\nmodels:\n{models}",
    "ties": "merge_method: ties\nbase_model: base\nparameters:\n  density: 0.3\n  lambda: 1.0\n"
            "models:\n{models}",
    "dare_ties": "merge_method: dare_ties\nbase_model: base\nparameters:\n  density: 0.5\n"
                 "seed: 7\nmodels:\n{models}",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: base\nparameters:\n  density: 0.3\n"
                   "  gamma: 0.01\nmodels:\n{models}",
    "slerp": "merge_method: slerp\nbase_model: base\nparameters:\n  t: 0.5\nmodels:\n"
             "  - model: expert0\n",
}


def build_models(root: Path) -> list[str]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
    base = GPT2LMHeadModel(config)
    base.save_pretrained(root / "base")
    names = []
    for i in range(3):
        expert = GPT2LMHeadModel(config)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        expert.save_pretrained(root / f"expert{i}")
        names.append(f"expert{i}")
    return names


def task_vector_distance(root: Path, merged: Path, expert: str) -> float:
    """Relative L2 distance between merged − base and expert − base over all float tensors."""
    num = den = 0.0
    with (open_checkpoint(root / "base") as b, open_checkpoint(merged) as m,
          open_checkpoint(root / expert) as e):
        for name in b.names():
            base = b.get(name).float()
            if not b.info(name).dtype.is_floating_point:
                continue
            tau = e.get(name).float() - base
            num += float(((m.get(name).float() - base) - tau).pow(2).sum())
            den += float(tau.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="modelalloy-demo-") as tmp:
        root = Path(tmp)
        experts = build_models(root)
        models_all = "".join(f"  - model: {n}\n" for n in ["base", *experts])
        models = "".join(f"  - model: {n}\n" for n in experts)
        table = Table(title="tiny GPT-2 (random experts): ‖merged τ − expert τ‖ / ‖expert τ‖")
        table.add_column("method")
        table.add_column("seconds", justify="right")
        for e in experts:
            table.add_column(e, justify="right")
        for method, template in RECIPES.items():
            recipe = root / f"{method}.yaml"
            recipe.write_text(template.format(models=models, models_all=models_all))
            start = time.perf_counter()
            out = merge(recipe, root / f"merged-{method}").path
            seconds = time.perf_counter() - start
            row = [f"{task_vector_distance(root, out, e):.3f}" for e in experts]
            table.add_row(method, f"{seconds:.2f}", *row)
        console.print(table)


if __name__ == "__main__":
    main()
