"""One streaming pass over a recipe's models: each tensor's task vectors, then its sums.

Models are read a tensor at a time (``model+adapter`` references included), so memory is
that of a whole-tensor merge of the largest tensor: the n task vectors in float32 and a few
masks. Parameters (weights, densities, ``mask_lambda``, ``vote``) are the recipe's, resolved
per tensor as the merge would resolve them; a method without a density is inspected at
``density`` (default 0.2, TIES' usual setting).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelalloy.engine.progress import merge_progress
from modelalloy.errors import ModelAlloyError, RecipeError
from modelalloy.inspection.metrics import CHUNK, ChunkSource, TensorSums, streamed_sums
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.plan.layers import LayerIndexer, split_layer
from modelalloy.recipe import Recipe, load_recipe, resolve_tensor_params
from modelalloy.threads import ordered_map


@dataclass
class TensorRecord:
    name: str
    layer: int | None
    family: str
    sums: TensorSums


@dataclass
class Inspection:
    recipe: Recipe
    experts: list[str]
    method: str
    records: list[TensorRecord] = field(default_factory=list)
    seconds: float = 0.0

    def total(self) -> TensorSums:
        out = TensorSums.zeros(len(self.experts))
        for r in self.records:
            out.add(r.sums)
        return out

    def grouped(self, key: str) -> dict[object, TensorSums]:
        """Sums per layer (``key="layer"``; None: outside the stack) or per family."""
        out: dict[object, TensorSums] = {}
        for r in self.records:
            k = getattr(r, key)
            out.setdefault(k, TensorSums.zeros(len(self.experts))).add(r.sums)
        return out


def family_of(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``mlp.up_proj.weight`` (what follows the layer
    index, the rule of :func:`split_layer`); outside the stack, the name itself."""
    if split_layer(name) is None:
        return name
    parts = name.split(".")
    index = next(i for i, p in enumerate(parts[:-1]) if p.isdigit())
    return ".".join(parts[index + 1:])


def read_chunks(base: Checkpoint, models: list[Checkpoint], name: str) -> ChunkSource:
    """τ of tensor ``name`` as (n × CHUNK) float32 chunks, read a slice at a time from every
    model (``get_slice`` into reused buffers, τ_i = θ_i − θ_0 written into one reused chunk
    buffer): memory stays chunk-sized however large the tensor."""
    numel = math.prod(base.info(name).shape)

    def chunks() -> Iterator[torch.Tensor]:
        size = min(CHUNK, numel)
        raws = [torch.empty(size, dtype=c.info(name).dtype) for c in (base, *models)]
        base32 = torch.empty(size, dtype=torch.float32)
        buffer = torch.empty(len(models), size, dtype=torch.float32)
        for start in range(0, numel, CHUNK):
            count = min(CHUNK, numel - start)
            x = buffer if count == size else torch.empty(len(models), count)
            b = base32[:count].copy_(base.get_slice(name, start, raws[0][:count]))
            for i, (m, raw) in enumerate(zip(models, raws[1:], strict=True)):
                theta = m.get_slice(name, start, raw[:count])
                if theta.dtype == torch.float64:  # rounded to float32 first, as the merge
                    theta = theta.to(torch.float32)
                torch.sub(theta, b, out=x[i])
            yield x
    return chunks


def inspect_recipe(recipe: str | Path | Recipe, *, density: float = 0.2,
                   threads: int | None = None, progress: bool = False) -> Inspection:
    from modelalloy.engine.run import open_recipe_model

    start = time.perf_counter()
    if not 0 < density <= 1:  # also NaN
        raise ModelAlloyError(f"density={density}: must be in (0, 1], the share of each "
                              "task vector TIES keeps", options=("density",))
    if threads is not None and threads < 1:
        raise ModelAlloyError(f"threads={threads}: must be at least 1 (leave it out for "
                              "the default)", options=("threads",))
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if recipe.base_model is None:
        raise RecipeError(f"{recipe.source}: inspect compares task vectors θ_i − θ_base; add "
                          "`base_model` to the recipe")
    spec = recipe.method_spec()
    experts = [e for e in recipe.models if not recipe.same_model(e.model, recipe.base_model)]
    if not experts:
        raise RecipeError(f"{recipe.source}: no model besides the base to inspect")
    result = Inspection(recipe, [e.model for e in experts], spec.name)
    names_of = {p.name for p in spec.params}
    with ExitStack() as stack:
        base = stack.enter_context(open_recipe_model(recipe, recipe.base_model))
        models = [stack.enter_context(open_recipe_model(recipe, e.model)) for e in experts]
        indexer = LayerIndexer(base.names())
        names = [n for n in base.names() if base.info(n).dtype.is_floating_point]
        for ckpt in models:
            for n in names:
                if n not in ckpt or ckpt.info(n).shape != base.info(n).shape:
                    raise RecipeError(f"{ckpt.path}: tensor '{n}' is missing or has another "
                                      f"shape than in {base.path}; inspect models of one base")
        # per-tensor parameters, as the merge resolves them (for base methods: expert order)
        same_order = [e.model for e in recipe.expert_entries()] == result.experts
        per_tensor = {n: sum(c.info(n).nbytes for c in (base, *models)) for n in names}
        bar = stack.enter_context(merge_progress("inspect", len(names),
                                                 sum(per_tensor.values()), progress))

        def sums_of(name: str) -> TensorRecord:
            layer, count = indexer.lookup(name)
            params = resolve_tensor_params(recipe, name, layer, count) if same_order else {}
            n = len(models)
            weights = list(params.get("weight", [1.0] * n)) if "weight" in names_of \
                else [1.0] * n
            dens = params.get("density", [density] * n) if "density" in names_of \
                else [density] * n
            dens = list(dens) if isinstance(dens, list) else [dens] * n
            lam = params.get("mask_lambda", 0.6)
            lam = lam[0] if isinstance(lam, list) else lam
            sums = streamed_sums(read_chunks(base, models, name), len(models),
                                 weights=weights, densities=dens, mask_lambda=float(lam),
                                 method=spec.name, vote=str(params.get("vote", "paper")))
            return TensorRecord(name, layer, family_of(name), sums)

        # a tensor per thread (torch releases the GIL), one intra-op thread each
        for name, record in ordered_map(sums_of, names, threads):
            result.records.append(record)
            bar.advance(per_tensor[name])
    result.seconds = time.perf_counter() - start
    return result
