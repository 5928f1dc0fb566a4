"""The Python API: merge from a recipe to a folder, or merge state dicts in memory."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch

from modelalloy.errors import PlanError
from modelalloy.methods.registry import get_method


def merge_state_dicts(method: str, base: Mapping[str, torch.Tensor] | None,
                      experts: list[Mapping[str, torch.Tensor]], *, seed: int = 0,
                      device: str | torch.device = "cpu",
                      stats: dict[str, list[Mapping[str, torch.Tensor]]] | None = None,
                      threads: int | None = None, allow_nonfinite: bool = False,
                      conventions: str = "mergekit",
                      **params: Any) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts of any torch module with a registered method.

    ``params`` are the method's parameters: scalars, or for per-model parameters (``weight``,
    ``density``, ...) a list with one value per expert. Float tensors are merged in float32
    and cast back to the base's (or first expert's) dtype; integer and bool tensors are copied
    from the base (or the first expert). ``conventions`` picks the defaults, as a recipe's
    key does: "mergekit" (default) or "paper" (docs/recipes.md). Example::

        merged = merge_state_dicts("ties", base.state_dict(),
                                   [a.state_dict(), b.state_dict()], density=0.2)
        model.load_state_dict(merged)

    ``stats`` (data-informed methods) maps a statistic kind ("gram", "fisher", ...) to one
    mapping per expert, parameter name -> tensor (see modelalloy.stats); the method finds them
    in ``ctx.stats[kind]`` (None where an expert has no entry for the tensor).

    It runs the engine that ``modelalloy merge`` runs (the same checks, seeds and bits), with
    these parameters for every tensor, and every tensor merged whole: it is the reference the
    sliced and fused strategies are tested against (they give the same bits). :func:`merge`
    with ``sources=`` takes a recipe's per-tensor parameters and slices large tensors.
    """
    from modelalloy.engine.memory import merge_models_in_memory

    # `lambda` is a Python keyword: accept `lambda_=` (any trailing underscore is dropped).
    params = {key.rstrip("_"): value for key, value in params.items()}
    merged = merge_models_in_memory(get_method(method), base, experts, params, seed=seed,
                                    device=device, threads=threads,
                                    allow_nonfinite=allow_nonfinite, stats=stats, slicing=False,
                                    conventions=conventions)
    return cast(dict[str, torch.Tensor], merged)  # no `into`: the new state dict


def merge(recipe: str | Path | Mapping[str, Any] | Any, out_dir: str | Path | None = None, *,
          sources: Mapping[str, Mapping[str, torch.Tensor] | torch.nn.Module] | None = None,
          into: torch.nn.Module | None = None, **options: Any) -> Any:
    """Run a recipe (a YAML path, YAML text, a dict or a Recipe).

    With ``out_dir``: write the merged model there as a complete HF folder, as ``modelalloy
    merge`` does; options are the command's: device, seed, threads, memory_budget,
    shard_size, force, allow_nonfinite, stats_dir (where statistics of models without their
    own are collected and found), direct_io ("auto", "on", "off": O_DIRECT reads,
    docs/direct_io.md). Returns a MergeResult (``.path`` is the folder).

    Without it, merge in memory, through the same engine (the recipe's per-tensor parameters,
    the same checks, seeds and bits): ``sources`` maps each model reference, exactly as the
    recipe writes it, to a state dict or a live torch module (without ``sources`` the recipe's
    checkpoints are read from disk). Returns the merged state dict, or fills ``into``'s
    parameters and buffers in place (``torch.no_grad``, their storage and dtype kept) and
    returns ``into``. Options: device (default: where the reference model's tensors are),
    seed, threads (default: the calling thread alone for models under 64 MB, else as the
    command), allow_nonfinite, and for data-informed methods ``stats`` ({kind: {model
    reference: {tensor name: tensor}}}) or ``stats_dir`` (as on disk)::

        merged = modelalloy.merge("ties.yaml", sources={"./base": base, "./math": math,
                                                         "./code": code})
        modelalloy.merge(recipe, sources=models, into=student)  # student's weights replaced
    """
    if out_dir is None:
        from modelalloy.engine.memory import merge_recipe_in_memory

        return merge_recipe_in_memory(recipe, sources, into, **options)
    if sources is not None or into is not None:
        raise PlanError("merge: give out_dir (write the merged model to disk) or "
                        "sources/into (merge in memory), not both")
    from modelalloy.engine.run import run_recipe

    return run_recipe(recipe, Path(out_dir), **options)


def aim_relax(base: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor],
              base_activations: Mapping[str, torch.Tensor], omega: float = 0.4,
              input_dim: str = "auto") -> dict[str, torch.Tensor]:
    """Apply AIM to an in-memory merged state dict, given the base model's activations."""
    return merge_state_dicts("aim", base, [merged], stats={"activations": [base_activations]},
                             omega=omega, input_dim=input_dim)
