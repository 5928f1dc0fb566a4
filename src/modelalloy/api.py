"""The Python API: merge from a recipe to a folder, or merge state dicts in memory."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from modelalloy.errors import PlanError
from modelalloy.methods.registry import MergeContext, TensorGroup, get_method
from modelalloy.plan.layers import LayerIndexer


def merge_state_dicts(method: str, base: Mapping[str, torch.Tensor] | None,
                      experts: list[Mapping[str, torch.Tensor]], *, seed: int = 0,
                      device: str | torch.device = "cpu",
                      stats: dict[str, list[Mapping[str, torch.Tensor]]] | None = None,
                      **params: Any) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts of any torch module with a registered method.

    ``params`` are the method's parameters: scalars, or for per-model parameters (``weight``,
    ``density``, ...) a list with one value per expert. Float tensors are merged in float32
    and cast back to the base's (or first expert's) dtype; integer and bool tensors are copied
    from the base (or the first expert). Example::

        merged = merge_state_dicts("ties", base.state_dict(),
                                   [a.state_dict(), b.state_dict()], density=0.2)
        model.load_state_dict(merged)

    ``stats`` (data-informed methods) maps a statistic kind ("gram", "fisher", ...) to one
    mapping per expert, parameter name -> tensor (see modelalloy.stats); the method finds them
    in ``ctx.stats[kind]`` (None where an expert has no entry for the tensor).
    """
    spec = get_method(method)
    spec.check_model_count(len(experts), base is not None)
    reference = base if base is not None else experts[0]
    names = list(reference.keys())
    for i, sd in enumerate(experts):
        missing = [n for n in names if n not in sd]
        extra = [n for n in sd if n not in reference]
        if missing or extra:
            raise PlanError(f"expert {i}: tensors missing {missing[:3]} / extra {extra[:3]} "
                            "compared with the reference model")
    # `lambda` is a Python keyword: accept `lambda_=` (any trailing underscore is dropped).
    params = {key.rstrip("_"): value for key, value in params.items()}
    resolved = spec.resolve(len(experts), params, where=f"method '{method}'")
    dev = torch.device(device)
    indexer = LayerIndexer(names)

    # --- statistics for data-informed methods (added by the datainformed branch) ---
    stats = dict(stats or {})
    missing_kinds = [k for k in spec.stats if k not in stats]
    if missing_kinds:
        raise PlanError(f"method '{method}' needs statistics {missing_kinds}: pass "
                        "stats={kind: [one mapping per expert]} (see `modelalloy stats`)")
    for kind, per_expert in stats.items():
        if len(per_expert) != len(experts):
            raise PlanError(f"stats['{kind}'] has {len(per_expert)} entries but there are "
                            f"{len(experts)} experts")

    def stats_for(name: str) -> dict[str, list[torch.Tensor | None]]:
        return {kind: [None if m is None or name not in m
                       else m[name].to(dev, torch.float32) for m in per_expert]
                for kind, per_expert in stats.items()}
    # --- end of statistics ---

    def ctx_for(name: str) -> MergeContext:
        layer, count = indexer.lookup(name)
        return MergeContext(name=name, seed=seed, layer_index=layer, num_layers=count,
                            device=dev, stats=stats_for(name))

    def mergeable(name: str) -> bool:
        return reference[name].is_floating_point()

    def groups() -> Iterator[TensorGroup]:
        for name in names:
            if mergeable(name):
                yield TensorGroup(
                    name=name,
                    base=None if base is None else base[name].to(dev, torch.float32),
                    experts=[sd[name].to(dev, torch.float32) for sd in experts],
                    params=resolved, ctx=ctx_for(name))

    global_stats = spec.prepare(groups) if spec.prepare is not None else None
    out: dict[str, torch.Tensor] = {}
    for name in names:
        ref = reference[name]
        if not mergeable(name):
            out[name] = ref.clone()
            continue
        shapes = {tuple(sd[name].shape) for sd in experts} | {tuple(ref.shape)}
        if len(shapes) != 1:
            raise PlanError(f"tensor '{name}': shapes differ across models: {sorted(shapes)}")
        ctx = ctx_for(name)
        ctx.global_stats = global_stats
        merged = spec(None if base is None else base[name].to(dev, torch.float32),
                      [sd[name].to(dev, torch.float32) for sd in experts], resolved, ctx)
        out[name] = merged.to(device=ref.device, dtype=ref.dtype)
    return out


def merge(recipe: str | Path | Mapping[str, Any] | Any, out_dir: str | Path | None = None, *,
          sources: Mapping[str, Mapping[str, torch.Tensor] | torch.nn.Module] | None = None,
          into: torch.nn.Module | None = None, **options: Any) -> Any:
    """Run a recipe (a YAML path, YAML text, a dict or a Recipe).

    With ``out_dir``: write the merged model there as a complete HF folder, as ``modelalloy
    merge`` does; options are the command's: device, seed, threads, memory_budget,
    shard_size, force, allow_nonfinite. Returns a MergeResult (``.path`` is the folder).

    Without it, merge in memory, through the same engine (the recipe's per-tensor parameters,
    the same checks, seeds and bits): ``sources`` maps each model reference, exactly as the
    recipe writes it, to a state dict or a live torch module (without ``sources`` the recipe's
    checkpoints are read from disk). Returns the merged state dict, or fills ``into``'s
    parameters and buffers in place (``torch.no_grad``, their storage and dtype kept) and
    returns ``into``. Options: device (default: where the reference model's tensors are),
    seed, threads, allow_nonfinite, and ``stats`` for data-informed methods ({kind: {model
    reference: {tensor name: tensor}}})::

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
