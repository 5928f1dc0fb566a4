"""From a recipe to a finished output folder: open, plan, execute, write, summarize."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from modelalloy.engine.allocator import return_freed_blocks
from modelalloy.engine.budget import ByteBudget
from modelalloy.engine.direct_reads import use_direct_io
from modelalloy.engine.execute import PlanExecutor, run_plan
from modelalloy.engine.sources import TallExpertSource, open_tall_expert
from modelalloy.errors import ModelAlloyError
from modelalloy.io.chat_template import choose_template, write_template
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.dtypes import parse_dtype
from modelalloy.io.layout import in_transformers_layout
from modelalloy.io.lora.source import open_model
from modelalloy.io.model_files import (
    copy_model_files,
    set_config_dtype,
    set_vocab_size,
    update_config,
    write_model_card,
)
from modelalloy.io.vocabulary import Vocabulary, build_vocabulary, model_key
from modelalloy.io.writer import (
    AtomicOutputDir,
    ShardedSafetensorsWriter,
    check_output_path,
    parse_size,
)
from modelalloy.methods.registry import get_method
from modelalloy.plan.notes import plan_notes
from modelalloy.plan.planner import MergePlan, PlanEntry, build_plan
from modelalloy.plan.sources import TensorSource
from modelalloy.plan.vocabulary import align_vocabulary
from modelalloy.recipe import Recipe, load_recipe, parse_recipe, recipe_from_dict

DEFAULT_SHARD_SIZE = "5GB"


@dataclass
class MergeResult:
    """What a merge did, for the closing summary."""

    path: Path
    seconds: float
    bytes_read: int
    bytes_written: int
    tensors: int
    peak_rss: int
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def default_threads(direct: bool = False) -> int:
    """Merge threads: one per core, at most 4. With direct I/O (inputs larger than the memory)
    twice that, still at most 4: a thread then often waits for the disk (a method with passes
    reads a whole tensor before them, with no kernel read-ahead), and another thread keeps its
    core busy meanwhile (3B on 2 cores: ties 17.1 -> 15.3 s, dare_ties 14.1 -> 13.0 s,
    linear 7.7 -> 7.3 s; docs/direct_io.md)."""
    cores = os.cpu_count() or 1
    return max(1, min(4, 2 * cores if direct else cores))


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ModelAlloyError(f"device {device!r}: not a device modelalloy merges on; use cpu, "
                              "cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelAlloyError(f"device={str(device)!r}: CUDA is not available on this "
                              "machine; use device='cpu'", options=("device",))
    return dev


def size_option(option: str, value: str | int) -> int:
    """A size such as 5GB, as a one-line error naming the argument ``option`` (``shard_size``)
    when it is not one."""
    try:
        return parse_size(value)
    except ValueError as error:
        raise ModelAlloyError(f"{option}={value!r}: {error}", options=(option,)) from None


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's ``VmHWM`` first: ``ru_maxrss`` keeps the
    peak of the process before ``exec`` (a merge started by a 7 GB parent reported 7 GB)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def as_recipe(recipe: str | Path | Mapping[str, Any] | Recipe) -> Recipe:
    """A Recipe from a Recipe, a dict (the YAML's structure), a YAML file's path, or YAML text
    (a string of several lines, or one that names ``merge_method:``)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return recipe_from_dict(dict(recipe))
    if isinstance(recipe, str) and ("\n" in recipe or "merge_method:" in recipe):
        return parse_recipe(recipe)
    return load_recipe(recipe)


def open_models(recipe: Recipe, stack: ExitStack
                ) -> tuple[TensorSource | None, Sequence[TensorSource]]:
    """Open the base (if the method uses one) and the experts, closed when ``stack`` exits."""
    if recipe.slices:  # layer ranges of the sources, composed (plan/slices.py)
        from modelalloy.plan.slices import open_slices

        if any(recipe.split_bundle_task(m)[1] is not None for m in recipe.all_models()):
            # a bundle's experts share its folder: each reference is its own source
            return open_slices(recipe, stack, opener=lambda ref: in_transformers_layout(
                stack.enter_context(open_recipe_model(recipe, ref))))
        return open_slices(recipe, stack)
    spec = get_method(recipe.merge_method)
    base = None
    if recipe.base_model is not None and spec.base != "none":
        base = in_transformers_layout(
            stack.enter_context(open_recipe_model(recipe, recipe.base_model)))
    experts = [in_transformers_layout(stack.enter_context(open_recipe_model(recipe, e.model)))
               for e in recipe.expert_entries()]
    return base, experts


def merged_vocabulary(recipe: Recipe) -> Vocabulary | None:
    """The output vocabulary of a recipe with ``tokenizer_source`` / ``tokenizer:``."""
    if recipe.tokenizer is None:
        return None
    models = [recipe.model_path(m) for m in recipe.all_models()]  # the base first
    source = recipe.tokenizer.source
    where = source if source in ("union", "base") else recipe.model_path(source)
    return build_vocabulary(models, where, list(recipe.tokenizer.tokens),
                            recipe.tokenizer.pad_to_multiple_of)


def open_recipe_model(recipe: Recipe, model: str) -> Checkpoint | TallExpertSource:
    """A recipe's model, with its LoRA adapter applied tensor by tensor (``model+adapter``),
    or an expert rebuilt from a TALL-masks bundle tensor by tensor (``bundle#task``)."""
    task = recipe.split_bundle_task(model)[1]
    if task is not None:
        return open_tall_expert(recipe.model_path(model), task, label=model)
    return open_model(recipe.model_path(model), recipe.adapter_path(model))


def make_plan(recipe: Recipe, stack: ExitStack) -> MergePlan:
    spec = get_method(recipe.merge_method)
    base, experts = open_models(recipe, stack)
    vocabulary = merged_vocabulary(recipe)
    if vocabulary is not None:  # embedding rows in the merged vocabulary's order
        assert recipe.tokenizer is not None
        tokens = recipe.tokenizer.tokens
        token_models = {s.source.model: model_key(recipe.model_path(s.source.model))
                        for s in tokens.values() if s.source and s.source.model}
        base, experts = align_vocabulary(vocabulary, base, list(experts), tokens, token_models)
    out_name = recipe.out_dtype or recipe.dtype
    out_dtype = parse_dtype(out_name) if out_name else None
    plan = build_plan(recipe, spec, base, experts, out_dtype)
    plan.vocabulary = vocabulary
    return plan


def input_paths(recipe: Recipe) -> list[Path]:
    names = [e.model for e in recipe.models]
    if recipe.base_model is not None:
        names.append(recipe.base_model)
    return [recipe.model_path(n) for n in names]


def run_recipe(recipe: str | Path | Mapping[str, Any] | Recipe, out_dir: Path, *,
               device: str = "cpu",
               seed: int | None = None, threads: int | None = None,
               memory_budget: str | int | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE,
               force: bool = False, allow_nonfinite: bool = False,
               progress: bool = False, stats_dir: str | Path | None = None,
               prepared: Callable[[Any], None] | None = None,
               direct_io: str | bool = "auto") -> MergeResult:
    """Merge as the recipe says and write a complete HF folder to ``out_dir`` (atomically).

    ``direct_io``: read the inputs with O_DIRECT (``on``), through the page cache (``off``),
    or ``auto``: direct when they exceed the memory available (docs/direct_io.md).

    ``stats_dir``: the statistics folder for models without statistics of their own (over the
    recipe's ``calibration.stats_dir``; default: next to each model). ``prepared``: given what
    the method's whole-model pass found (``run_plan``)."""
    start = time.perf_counter()
    recipe = as_recipe(recipe)
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    check_output_path(out_dir, input_paths(recipe), force)
    shard_bytes = size_option("shard_size", shard_size)
    use_direct_io(direct_io, 0)  # a bad value is refused before anything is opened
    budget_bytes = size_option("memory_budget", memory_budget) \
        if memory_budget is not None else None

    spec = get_method(recipe.merge_method)
    if spec.stats:
        # imported only for data-informed methods: the statistics package costs every other
        # merge ~0.1 s of start-up
        from modelalloy.stats.store import StatsFiles, collect_missing, recipe_stats_dir

        stats_folder = recipe_stats_dir(recipe, stats_dir)
        collect_missing(recipe, spec, device=str(dev), stats_dir=stats_folder)
    with ExitStack() as stack:
        plan = make_plan(recipe, stack)
        plan.raise_if_problems()
        # The budget covers the whole process: what the interpreter and torch already hold
        # is subtracted, and the rest is what tensors in flight may use.
        in_flight = None
        if budget_bytes is not None:
            return_freed_blocks()  # freed tensors leave the process (engine/allocator.py)
            in_flight = in_flight_budget(plan, budget_bytes, sliced=dev.type == "cpu")
        stats_loader = StatsFiles.for_plan(plan, stack, stats_folder) if spec.stats else None
        entries = [(e.name, e.shape, e.out_dtype) for e in plan.entries]
        direct = use_direct_io(direct_io, plan.bytes_read)
        threads = threads or default_threads(direct)
        with AtomicOutputDir(out_dir, force=force) as tmp:
            # the output goes around the page cache too when the inputs do (direct_writes.py)
            writer = ShardedSafetensorsWriter(
                tmp, entries, shard_bytes,
                metadata={"format": "pt", "merge_method": plan.spec.name}, direct=direct)
            warnings = run_plan(plan, writer, device=dev,
                                seed=recipe.seed if seed is None else seed, threads=threads,
                                allow_nonfinite=allow_nonfinite, stats_loader=stats_loader,
                                budget=ByteBudget(in_flight), progress=progress,
                                prepared=prepared,
                                direct=direct)
            files = writer.close()
            finish_folder(recipe, plan, tmp)
        return MergeResult(path=out_dir, seconds=time.perf_counter() - start,
                           bytes_read=plan.bytes_read, bytes_written=plan.bytes_written,
                           tensors=len(plan.entries), peak_rss=peak_rss_bytes(),
                           files=[out_dir / f.name for f in files],
                           warnings=warnings)


def in_flight_budget(plan: MergePlan, budget_bytes: int, sliced: bool = True) -> int:
    """Bytes tensors in flight may hold under ``--memory-budget``: the budget less what the
    process holds already (interpreter, torch). A budget that cannot hold the largest tensor's
    working set is refused up front rather than silently exceeded.

    What the process holds already is measured, plus what it will take on first use and not
    give back (:data:`FIRST_USE_BYTES`)."""
    fused = _load_kernels(plan, sliced)
    baseline = (psutil.Process().memory_info().rss + FIRST_USE_BYTES
                + (KERNEL_FIRST_USE_BYTES if fused else 0))

    def need_of(entry: PlanEntry) -> int:
        return entry.working_bytes(len(plan.sources), sliced=entry.sliced and sliced)

    largest = max(plan.entries, key=need_of, default=None)
    need = 0 if largest is None else need_of(largest)
    if largest is not None and budget_bytes < baseline + need:
        raise ModelAlloyError(
            f"memory_budget='{budget_bytes / 1e9:.2f}GB' is too small: tensor "
            f"'{largest.name}' needs {need / 1e9:.2f} GB while it is merged (its "
            f"{len(plan.sources)} inputs in float32 plus temporaries), on top of "
            f"{baseline / 1e9:.2f} GB that Python and torch hold; use at least "
            f"{(baseline + need) / 1e9 + 0.01:.2f}GB", options=("memory_budget",))
    return budget_bytes - baseline


# Memory a merge takes on its first tensors and keeps: the allocator's cached blocks and the
# per-thread slice buffers on the torch path, plus as much again for the fused kernels'
# machine code, loaded on their first call. Measured as peak RSS less the baseline less one
# tensor's working set, 3 x 100 MB bf16 models, 24 tensors of 2048 x 1024, 1 and 2 threads:
# torch path 16 MB (task_arithmetic) to 27 MB (ties); kernels 46 to 64 MB. A quarter more than
# the largest, since a budget is a promise: at exactly 32 MB a loaded machine measured ties
# 4 MB over the smallest accepted budget.
FIRST_USE_BYTES = 40 * 1000**2
# What the fused kernels take on first use once :func:`_load_kernels` has compiled (or loaded)
# them before the baseline: their per-tensor state (histograms, a slice of candidate values:
# up to a few MB per merge thread). Compiling on a cold numba cache during the merge took up
# to 210 MB more (dare_ties, every kernel compiled afresh), which the baseline now measures:
# with this allowance at 0, the smallest accepted budgets (3 x 100 MB, 2 threads, fresh
# NUMBA_CACHE_DIRs) still held 114 MB (ties) and 147 MB (dare_ties) to spare.
KERNEL_FIRST_USE_BYTES = 16 * 1000**2


def _load_kernels(plan: MergePlan, sliced: bool) -> bool:
    """Import the fused kernels and compile (or load from numba's cache) those the merge will
    use, before the baseline is measured: numba and LLVM add about 120 MB to the process on
    import and more while they compile, which the budget must count as already held (it went
    unnoticed, and a budget was exceeded by that much); True when kernels will run."""
    from modelalloy import kernels

    execution = plan.spec.execution
    if not (sliced and execution.kernel is not None and kernels.available()):
        return False
    used = False
    warmed: set[str] = set()
    for entry in plan.entries:
        name = execution.kernel_for(entry.params) if entry.sliced else None
        dtypes = [ckpt.info(entry.name).dtype for ckpt in plan.sources] if name else []
        if name is None or not kernels.supports(dtypes, entry.out_dtype):
            continue
        from modelalloy.kernels import slices

        used = True
        # the compiled code depends on the dtypes and on which passes the parameters ask for
        key = repr((name, dtypes[0], entry.out_dtype, sorted(entry.params.items())))
        if key not in warmed:
            warmed.add(key)
            slices.warm(name, entry.params, len(dtypes), dtypes[0], entry.out_dtype)
    return used


def finish_folder(recipe: Recipe, plan: MergePlan, folder: Path) -> None:
    """Config, tokenizer, model card and the recipe itself, next to the weights."""
    # a bundle's expert: the config and tokenizer files of the bundle's base folder
    where = getattr(plan.reference, "model_files_dir", plan.reference.path)
    reference_dir = where if isinstance(where, Path) and where.is_dir() else None
    tokenizer_dir = recipe.tokenizer_path()
    rebuilt = _rebuilt_tokenizer(plan.vocabulary, tokenizer_dir)
    if reference_dir is not None:
        copy_model_files(reference_dir, folder, tokenizer_source=tokenizer_dir,
                         copy_tokenizer=not rebuilt)
        updates = getattr(plan.reference, "config_updates", None)  # slices: the new depth
        if updates and (folder / "config.json").exists():
            update_config(folder, updates)
        if plan.vocabulary is not None:
            set_vocab_size(folder, plan.vocabulary.size)
    if rebuilt:
        plan.vocabulary.tokenizer.save_pretrained(str(folder))
    dtypes = {e.out_dtype for e in plan.entries if e.merge}
    if len(dtypes) == 1 and (folder / "config.json").exists():
        set_config_dtype(folder, dtypes.pop())
    if recipe.chat_template is not None:
        template = choose_template(recipe.chat_template,
                                   [recipe.model_path(m) for m in recipe.all_models()])
        if template is not None:
            write_template(folder, template)
    recipe_yaml = recipe.to_yaml()
    (folder / "modelalloy_recipe.yaml").write_text(recipe_yaml)
    write_model_card(folder, recipe_yaml=recipe_yaml, method=plan.spec.name,
                     base_model=recipe.base_model,
                     models=[e.model for e in recipe.expert_entries()])


def _rebuilt_tokenizer(vocabulary: Vocabulary | None, source: Path | None) -> bool:
    """Whether the output tokenizer is written anew (a union, or one that gained ``tokens``)
    rather than copied from its folder."""
    if vocabulary is None:
        return False
    return source is None or vocabulary.vocab != vocabulary.tokenizer_vocab_of(source)


def describe(plan: MergePlan, threads: int, memory_budget: int | None,
             direct: bool = False) -> dict[str, Any]:
    """The numbers `modelalloy plan` prints. With ``direct`` (the merge would read with
    O_DIRECT) the peak includes each thread's largest direct windows, held tensors included."""
    merged = sum(1 for e in plan.entries if e.merge)
    windows = 0
    if direct:
        executor = PlanExecutor(plan, device=torch.device("cpu"), seed=0, threads=threads,
                                budget=ByteBudget(memory_budget), allow_nonfinite=False,
                                direct=True)
        windows = max(1, threads) * max((executor.direct_bytes(e) for e in plan.entries),
                                        default=0)
    return {
        "method": plan.spec.name,
        "models": [str(c.path) for c in plan.sources],
        "tensors": len(plan.entries),
        "merged": merged,
        "copied": len(plan.entries) - merged,
        "layers": max((e.num_layers or 0 for e in plan.entries), default=0),
        "bytes_read": plan.bytes_read,
        "bytes_written": plan.bytes_written,
        "direct_io": direct,
        "estimated_peak_bytes": plan.estimated_peak_bytes(threads, memory_budget) + windows
        + psutil.Process().memory_info().rss,
        "problems": list(plan.problems),
        "notes": plan_notes(plan),
    }
