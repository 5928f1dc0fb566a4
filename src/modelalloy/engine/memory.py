"""The in-memory paths through the engine: recipe + in-memory models -> state dict or module.

The same planner and executor as ``modelalloy merge`` (``engine/run.py``), with other sources
and sinks::

    sources                      strategy (per tensor)          sinks
    checkpoints on disk  --\\                                /-- sharded safetensors writer
    state dicts          ---+-> plan -> whole | sliced | fused +--- state dict
    live torch modules   --/                                \\-- a live module, in place

so an in-memory merge has the recipe's per-tensor parameters (filters, gradients), the same
checks (missing tensors, shapes, NaN/Inf inputs, the method's output shape), the whole-model
pass only when it has work, the same seeds and the same bits as the merge written to disk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from modelalloy.engine.execute import StatsLoader, run_plan
from modelalloy.engine.run import as_recipe, default_threads, make_plan, resolve_device
from modelalloy.engine.sinks import ModuleSink, StateDictSink
from modelalloy.engine.sources import StateDictSource, state_of
from modelalloy.errors import PlanError
from modelalloy.io.dtypes import parse_dtype
from modelalloy.methods.registry import MethodSpec
from modelalloy.plan.planner import MergePlan, build_plan
from modelalloy.plan.sources import TensorSource

Model = Mapping[str, torch.Tensor] | torch.nn.Module
# statistics by kind: one mapping (parameter name -> tensor) per owner, in owner order, or
# keyed by the owner's model reference
StatsGiven = Mapping[str, Sequence[Mapping[str, torch.Tensor] | None]
                     | Mapping[str, Mapping[str, torch.Tensor]]]


def memory_label(reference: str) -> str:
    return f"in-memory model '{reference}'"


class MemoryStats:
    """Per-expert statistics held in memory, served tensor by tensor like ``StatsFiles``."""

    def __init__(self, per_kind: Mapping[str, Sequence[Mapping[str, torch.Tensor] | None]],
                 device: torch.device):
        self.per_kind = per_kind
        self.device = device

    def __call__(self, name: str) -> dict[str, list[torch.Tensor | None]]:
        return {kind: [None if m is None or name not in m
                       else m[name].to(self.device, torch.float32) for m in owners]
                for kind, owners in self.per_kind.items()}


def stats_by_owner(spec: MethodSpec, stats: StatsGiven | None, owners: list[str]
                   ) -> dict[str, list[Mapping[str, torch.Tensor] | None]]:
    """``stats`` as one list per kind in owner order (the experts', or the base's alone for a
    method whose statistics are the base's); a one-line error for what is missing."""
    stats = dict(stats or {})
    whose = "the base model" if spec.stats_from == "base" else "each expert"
    missing = [k for k in spec.stats if k not in stats]
    if missing:
        raise PlanError(f"method '{spec.name}' needs statistics {missing} of {whose}: pass "
                        "stats={kind: {model reference: {tensor name: tensor}}} (see "
                        "`modelalloy stats` and modelalloy.stats)")
    out: dict[str, list[Mapping[str, torch.Tensor] | None]] = {}
    for kind, given in stats.items():
        if isinstance(given, Mapping):
            absent = [o for o in owners if o not in given]
            if absent:
                raise PlanError(f"stats['{kind}'] has nothing for model '{absent[0]}'; method "
                                f"'{spec.name}' reads it from {whose} ({', '.join(owners)})")
            out[kind] = [given[o] for o in owners]
        else:
            if len(given) != len(owners):
                raise PlanError(f"stats['{kind}'] has {len(given)} entries but method "
                                f"'{spec.name}' reads it from {whose}: {len(owners)} "
                                f"model(s)")
            out[kind] = list(given)
    return out


def reference_device(model: TensorSource) -> torch.device:
    """Where the reference model's floating-point tensors live: the CPU for a checkpoint on
    disk, or when it has none."""
    if isinstance(model, StateDictSource):
        for name in model.names():
            tensor = model.get(name)
            if tensor.is_floating_point():
                return tensor.device
    return torch.device("cpu")


# Below this many input bytes an in-memory merge runs in the calling thread: handing small
# tensors to a pool costs more than merging them (a 60-tensor model of 1 MB: 1.8 ms in one
# thread, 3.4 ms through the pool of two; the machine's measurements, min of 200).
POOL_MIN_BYTES = 64 << 20


def memory_threads(plan: MergePlan) -> int:
    """Threads for an in-memory merge when the caller gives none."""
    return 1 if plan.bytes_read < POOL_MIN_BYTES else default_threads()


def memory_sink(plan: MergePlan, into: torch.nn.Module | None) -> StateDictSink | ModuleSink:
    """A live module's parameters (``into``) or a new state dict on the reference's devices."""
    layout = [(e.name, e.shape, e.out_dtype) for e in plan.entries]
    inputs = {src.get(e.name).untyped_storage().data_ptr(): src.path for src in plan.sources
              if isinstance(src, StateDictSource) for e in plan.entries}
    if into is not None:
        for name, tensor in into.state_dict().items():
            shared = inputs.get(tensor.untyped_storage().data_ptr())
            if shared is not None:
                # a source read after the sink wrote into it (a tied weight) would be wrong
                raise PlanError(f"into: tensor '{name}' shares its storage with {shared}; "
                                "merge into a separate module (the sources are read while "
                                "it is written)")
        return ModuleSink(into, layout)
    reference = plan.reference
    cpu = torch.device("cpu")
    devices = {e.name: reference.get(e.name).device if isinstance(reference, StateDictSource)
               else cpu for e in plan.entries}
    return StateDictSink(layout, devices, set(inputs))


def check_references(recipe: Any, sources: Mapping[str, Model]) -> None:
    """Every key of ``sources`` is a model the recipe names (``slices:`` recipes list their
    sources' models in ``models``)."""
    named = [recipe.base_model] if recipe.base_model is not None else []
    named += [e.model for e in recipe.models]
    unknown = [key for key in sources if key not in named]
    if unknown:
        raise PlanError(f"sources['{unknown[0]}']: the recipe names no such model (it names "
                        f"{', '.join(repr(n) for n in dict.fromkeys(named))}); key sources by "
                        "the references exactly as the recipe writes them")


def in_memory_sources(recipe: Any, sources: Mapping[str, Model]
                      ) -> tuple[StateDictSource | None, list[StateDictSource]]:
    """The recipe's base (when its method uses one) and experts, looked up in ``sources`` by
    the model references exactly as the recipe writes them."""
    check_references(recipe, sources)

    def source(reference: str) -> StateDictSource:
        return memory_source(recipe, sources, reference)

    base = source(recipe.base_model) if recipe.uses_base() else None
    return base, [source(e.model) for e in recipe.expert_entries()]


def memory_source(recipe: Any, sources: Mapping[str, Model], reference: str
                  ) -> StateDictSource:
    """The in-memory model ``reference`` (as the recipe writes it) as a tensor source."""
    if reference not in sources:
        raise PlanError(f"{recipe.source}: model '{reference}' is not in sources (given: "
                        f"{', '.join(repr(k) for k in sources) or 'none'}); pass "
                        f"sources={{'{reference}': state_dict_or_module, ...}}")
    try:
        state = state_of(sources[reference])
    except TypeError as err:
        raise PlanError(f"sources['{reference}']: {err}") from None
    return StateDictSource(memory_label(reference), state)


def merge_recipe_in_memory(recipe: Any, sources: Mapping[str, Model] | None = None,
                           into: torch.nn.Module | None = None, *,
                           device: str | torch.device | None = None, seed: int | None = None,
                           threads: int | None = None, allow_nonfinite: bool = False,
                           stats: StatsGiven | None = None,
                           stats_dir: str | Path | None = None
                           ) -> dict[str, torch.Tensor] | torch.nn.Module:
    """Merge as ``recipe`` says, from in-memory models (``sources``, keyed by the recipe's
    model references) or, without ``sources``, from the checkpoints it names; fill ``into``'s
    parameters in place and return it, or return the merged state dict."""
    recipe = as_recipe(recipe)
    spec = recipe.method_spec()
    if spec.stats or stats:
        # imported only for data-informed methods (as in engine/run.py)
        from modelalloy.stats.store import (
            StatsFiles,
            collect_missing,
            recipe_stats_dir,
            stat_owners,
        )

        stats_folder = recipe_stats_dir(recipe, stats_dir)
    with ExitStack() as stack:
        if sources is None:  # the recipe's checkpoints, as `modelalloy merge` reads them
            if stats is None and spec.stats:
                collect_missing(recipe, spec, device=str(device or "cpu"),
                                stats_dir=stats_folder)
            plan = make_plan(recipe, stack)
        else:
            base: TensorSource | None
            experts: Sequence[TensorSource]
            if recipe.slices:  # layer ranges of the in-memory models, composed
                from modelalloy.plan.slices import open_slices

                check_references(recipe, sources)
                base, experts = open_slices(
                    recipe, stack, opener=lambda ref: memory_source(recipe, sources, ref))
            else:
                base, experts = in_memory_sources(recipe, sources)
            out_name = recipe.out_dtype or recipe.dtype
            plan = build_plan(recipe, spec, base, experts,
                              parse_dtype(out_name) if out_name else None)
        plan.raise_if_problems()
        dev = resolve_device(device) if device is not None \
            else reference_device(plan.reference)
        loader: StatsLoader | None = None
        if spec.stats and sources is None and stats is None:
            loader = StatsFiles.for_plan(plan, stack, stats_folder)
        elif spec.stats or stats:
            loader = MemoryStats(stats_by_owner(spec, stats, stat_owners(recipe, spec)), dev)
        return run_in_memory(plan, into, device=dev,
                             seed=recipe.seed if seed is None else seed,
                             threads=threads or memory_threads(plan),
                             allow_nonfinite=allow_nonfinite, stats_loader=loader)


def run_in_memory(plan: MergePlan, into: torch.nn.Module | None, *, device: torch.device,
                  seed: int, threads: int, allow_nonfinite: bool,
                  stats_loader: StatsLoader | None, slicing: bool = True
                  ) -> dict[str, torch.Tensor] | torch.nn.Module:
    """Run ``plan`` into ``into``'s parameters (returned) or into a new state dict."""
    sink = memory_sink(plan, into)
    run_plan(plan, sink, device=device, seed=seed, threads=threads,
             allow_nonfinite=allow_nonfinite, stats_loader=stats_loader, slicing=slicing)
    if isinstance(sink, ModuleSink):
        return sink.module
    return sink.result()


def merge_models_in_memory(spec: MethodSpec, base: Model | None, experts: Sequence[Model],
                           params: dict[str, Any], *, seed: int = 0,
                           device: str | torch.device = "cpu", threads: int | None = None,
                           allow_nonfinite: bool = False, stats: StatsGiven | None = None,
                           into: torch.nn.Module | None = None, slicing: bool = True,
                           conventions: str = "mergekit"
                           ) -> dict[str, torch.Tensor] | torch.nn.Module:
    """The engine's in-memory path with the parameters given in code, the same for every
    tensor (``merge_state_dicts``): per-model ones as lists or scalars, as
    :meth:`MethodSpec.resolve` takes them. ``slicing=False`` merges every tensor whole."""
    spec.check_model_count(len(experts), base is not None)
    resolved = spec.resolve(len(experts), params, where=f"method '{spec.name}'",
                            conventions=conventions)
    base_source = None if base is None else StateDictSource(memory_label("base"), base)
    expert_sources = [StateDictSource(memory_label(f"expert {i}"), e)
                      for i, e in enumerate(experts)]
    plan = build_plan(None, spec, base_source, expert_sources, None,
                      resolve_params=lambda name, layer, count: resolved)
    plan.raise_if_problems()
    dev = torch.device(device)
    loader = None
    if spec.stats or stats:
        owners = [f"expert {i}" for i in range(len(experts))]
        if spec.stats_from == "base" and base is not None:
            owners = ["base"]
        loader = MemoryStats(stats_by_owner(spec, stats, owners), dev)
    return run_in_memory(plan, into, device=dev, seed=seed, threads=threads or memory_threads(plan),
                         allow_nonfinite=allow_nonfinite, stats_loader=loader, slicing=slicing)
