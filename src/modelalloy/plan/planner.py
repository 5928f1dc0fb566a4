"""Recipe + sources -> MergePlan: one entry per output tensor, checked before heavy I/O.

Planning reads only headers and configs (checkpoints on disk) or shapes and dtypes (tensors in
memory), through :class:`modelalloy.plan.sources.TensorSource`. It matches tensors across
models by name, checks shapes, dtypes and architectures, finds each tensor's layer from its
name, resolves the method's parameters per tensor, and estimates memory and bytes moved.
Every incompatibility is collected, so ``modelalloy plan`` can show them all at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modelalloy.errors import ModelAlloyError, PlanError
from modelalloy.methods.registry import SLICE_ELEMENTS, MethodSpec
from modelalloy.plan.layers import LayerIndexer
from modelalloy.plan.sources import TensorSource
from modelalloy.recipe import Recipe, resolve_tensor_params

FLOAT32_BYTES = 4
# The most bytes the tensors merged at once may hold in bits their fused passes keep for the
# merge (Execution.kept_bits: DARE's keep masks, 148 MB for a 3B Llama's embedding with three
# experts). Larger ones are recomputed instead, so memory stays bounded at any model size.
KEPT_BYTES_MAX = 512 << 20


@dataclass(frozen=True)
class PlanEntry:
    """One output tensor: merged from every model, or copied from the reference model."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    merge: bool  # False: copied unchanged from the reference model (integer/bool buffers)
    layer_index: int | None
    num_layers: int | None
    params: dict[str, Any]
    bytes_in: int  # stored bytes read from all models
    bytes_out: int
    # Merged a slice at a time on the CPU when > 0 (a tensor of at least two slices, and an
    # elementwise method: 1, or a per-row one: the row length; slices are whole multiples of
    # it): see SLICE_ELEMENTS.
    slice_unit: int = 0
    # Bits per element the method's fused passes may keep for the merge of this sliced
    # tensor (Execution.kept_bits; DARE's keep masks), when the engine grants them.
    kept_bits: int = 0

    @property
    def kept_bytes(self) -> int:
        """Bytes of the kept bits: per bit of an element, a row of ``numel`` bits in whole
        8-byte words."""
        return self.kept_bits * -(-self.numel // 64) * 8

    @property
    def sliced(self) -> bool:
        return self.slice_unit > 0

    @property
    def slice_length(self) -> int:
        """Elements per slice: whole units, about SLICE_ELEMENTS (one unit if it is longer)."""
        unit = max(1, self.slice_unit)
        return max(1, SLICE_ELEMENTS // unit) * unit

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def working_bytes(self, n_inputs: int, sliced: bool | None = None,
                      kept: bool = False) -> int:
        """Bytes held while this tensor is being merged: the stored inputs, their float32
        copies, one float32 temporary per input (task vectors, masks), about four more
        (magnitudes, sign, sums, result), and the output. Measured on TIES, the most
        temporary-hungry of the streaming methods. A sliced merge holds the output and the
        same buffers for one slice only, plus, with ``kept``, the bits its passes keep for
        the merge (:attr:`kept_bytes`). ``sliced`` overrides the entry's own flag (the CUDA
        path never slices)."""
        if not self.merge:
            return self.bytes_in + self.bytes_out
        if self.sliced if sliced is None else sliced:
            per_slice = self.bytes_in // max(1, self.numel) + (2 * n_inputs + 4) * FLOAT32_BYTES
            return (self.slice_length * per_slice + self.bytes_out
                    + (self.kept_bytes if kept else 0))
        return self.bytes_in + (2 * n_inputs + 4) * self.numel * FLOAT32_BYTES + self.bytes_out


def _slice_unit(spec: MethodSpec, params: dict[str, Any], shape: tuple[int, ...],
                numel: int) -> int:
    if numel < 2 * SLICE_ELEMENTS or not params:
        return 0
    sliced = spec.execution.shape_for(params)
    if sliced == "elementwise":
        return 1
    if shape and sliced == "rowwise":
        return shape[-1]
    return 0


# (tensor name, layer index, layer count) -> the method's resolved parameters for that tensor
ParamResolver = Callable[[str, "int | None", "int | None"], dict[str, Any]]


@dataclass
class MergePlan:
    spec: MethodSpec
    recipe: Recipe | None  # None: parameters given in code (merge_state_dicts)
    base: TensorSource | None
    experts: list[TensorSource]
    entries: list[PlanEntry]
    problems: list[str] = field(default_factory=list)
    # the merged vocabulary (io.vocabulary.Vocabulary) when the recipe merges tokenizers
    vocabulary: Any = None

    @property
    def reference(self) -> TensorSource:
        return self.base if self.base is not None else self.experts[0]

    @property
    def sources(self) -> list[TensorSource]:
        return ([self.base] if self.base is not None else []) + self.experts

    @property
    def bytes_read(self) -> int:
        return sum(e.bytes_in for e in self.entries)

    @property
    def bytes_written(self) -> int:
        return sum(e.bytes_out for e in self.entries)

    def largest_working_bytes(self) -> int:
        n = len(self.sources)
        return max((e.working_bytes(n) for e in self.entries), default=0)

    def largest_kept_bytes(self, threads: int) -> int:
        """The most bytes of kept bits (:attr:`PlanEntry.kept_bytes`) one tensor may hold
        while ``threads`` tensors are merged at once (``KEPT_BYTES_MAX`` over all of them)."""
        return max((e.kept_bytes for e in self.entries
                    if e.kept_bytes * max(1, threads) <= KEPT_BYTES_MAX), default=0)

    def estimated_peak_bytes(self, threads: int, memory_budget: int | None) -> int:
        """Bytes in flight at once: ``threads`` of the largest tensors, each with the most
        kept bits a tensor may hold, capped by the budget (the engine never starts a tensor
        that would pass it, unless it is alone)."""
        largest = self.largest_working_bytes()
        in_flight = (largest + self.largest_kept_bytes(threads)) * max(1, threads)
        if memory_budget is not None:
            in_flight = max(largest, min(in_flight, memory_budget))
        return in_flight

    def raise_if_problems(self) -> None:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more; run `modelalloy plan`)" \
                if len(self.problems) > 1 else ""
            raise PlanError(self.problems[0] + more)


def _architecture(ckpt: TensorSource) -> tuple[str, ...] | None:
    cfg = ckpt.config or {}
    arch = cfg.get("architectures") or ([cfg["model_type"]] if "model_type" in cfg else None)
    return tuple(arch) if arch else None


# config.json keys that give the decoder stack's depth (Llama/Mistral/Qwen..., GPT-2/GPT-J).
_LAYER_KEYS = ("num_hidden_layers", "n_layer")


def _layer_count_problem(ckpt: TensorSource, names: Iterable[str]) -> str | None:
    """A config that claims more layers than any stack of the weights holds: transformers
    would load such a folder and fill the missing layers with random weights."""
    cfg = ckpt.config or {}
    key = next((k for k in _LAYER_KEYS if isinstance(cfg.get(k), int)), None)
    held = LayerIndexer(names).max_layers
    if key is None or held is None or cfg[key] <= held:
        return None
    return (f"{ckpt.path}: config.json says {cfg[key]} layers ({key}) but the weights hold "
            f"{held}; the checkpoint is incomplete (transformers would fill the missing "
            "layers with random weights): re-download it or fix the config")


def build_plan(recipe: Recipe | None, spec: MethodSpec, base: TensorSource | None,
               experts: Sequence[TensorSource], out_dtype: torch.dtype | None,
               resolve_params: ParamResolver | None = None) -> MergePlan:
    """Check the models against each other and resolve every output tensor.

    Parameters come from the recipe (per tensor: filters, gradients), or from
    ``resolve_params`` when it is given."""
    if resolve_params is None:
        if recipe is None:
            raise ValueError("build_plan needs a recipe or resolve_params")
        def resolve_params(name: str, layer: int | None, count: int | None) -> dict[str, Any]:
            # slices: the slice and t of the output tensor (plan/slices.py)
            at = reference.slice_position(name) if recipe.slices else None  # type: ignore[attr-defined]
            return resolve_tensor_params(recipe, name, layer, count, slice_at=at)
    plan = MergePlan(spec=spec, recipe=recipe, base=base, experts=list(experts), entries=[])
    reference = plan.reference
    ref_names = reference.names()
    ref_set = set(ref_names)

    name_sets = {id(c): set(c.names()) for c in plan.sources}
    ref_arch = _architecture(reference)
    for ckpt in plan.sources:
        problem = _layer_count_problem(ckpt, name_sets[id(ckpt)])
        if problem is not None:
            plan.problems.append(problem)
        if ckpt is reference:
            continue
        arch = _architecture(ckpt)
        if ref_arch and arch and arch != ref_arch:
            plan.problems.append(f"{ckpt.path}: architecture {list(arch)} differs from "
                                 f"{reference.path}'s {list(ref_arch)}; merge models of one "
                                 "architecture")
        names = name_sets[id(ckpt)]
        missing = [n for n in ref_names if n not in names]
        extra = sorted(names - ref_set)
        if missing:
            plan.problems.append(f"{ckpt.path}: missing {len(missing)} tensor(s) that "
                                 f"{reference.path} has, e.g. '{missing[0]}'")
        if extra:
            plan.problems.append(f"{ckpt.path}: has {len(extra)} tensor(s) that "
                                 f"{reference.path} lacks, e.g. '{extra[0]}'")

    indexer = LayerIndexer(ref_names)
    # tensors a source builds whole (vocabulary rows in a merged tokenizer's order)
    whole: frozenset[str] = getattr(reference, "whole_tensors", frozenset())
    for name in ref_names:
        ref_info = reference.info(name)
        infos = [ref_info]
        for ckpt in plan.sources:
            if ckpt is reference or name not in name_sets[id(ckpt)]:
                continue
            info = ckpt.info(name)
            infos.append(info)
            if info.shape != ref_info.shape:
                plan.problems.append(f"tensor '{name}': shape {list(info.shape)} in {ckpt.path} "
                                     f"but {list(ref_info.shape)} in {reference.path}")
        merge = ref_info.dtype.is_floating_point
        layer, count = indexer.lookup(name)
        params: dict[str, Any] = {}
        if merge:
            try:
                params = resolve_params(name, layer, count)
            except ModelAlloyError as err:
                plan.problems.append(str(err))
        dtype = (out_dtype or ref_info.dtype) if merge else ref_info.dtype
        numel = 1
        for d in ref_info.shape:
            numel *= d
        unit = _slice_unit(spec, params, tuple(ref_info.shape), numel) \
            if merge and name not in whole else 0
        plan.entries.append(PlanEntry(
            name=name, shape=tuple(ref_info.shape), out_dtype=dtype, merge=merge,
            layer_index=layer, num_layers=count, params=params,
            bytes_in=sum(i.nbytes for i in infos) if merge else ref_info.nbytes,
            bytes_out=numel * dtype.itemsize,
            slice_unit=unit, kept_bits=spec.execution.kept_bits_for(params) if unit else 0))
    problem = _uniform_problem(spec, plan.entries)
    if problem:
        plan.problems.append(problem)
    return plan


def _uniform_problem(spec: MethodSpec, entries: list[PlanEntry]) -> str | None:
    """The first tensor whose value of one of ``spec.uniform`` differs from the first merged
    tensor's: a whole-model statistic needs one value (the recipe's filters and gradients
    could give each tensor its own)."""
    ref: dict[str, Any] | None = None
    for entry in entries:
        if not (spec.uniform and entry.merge and entry.params):
            continue  # no parameters: copied, or its resolution failed (already a problem)
        if ref is None:
            ref = entry.params
            continue
        bad = next((k for k in spec.uniform if entry.params.get(k) != ref.get(k)), None)
        if bad is not None:
            return (f"{spec.name}: tensor '{entry.name}': parameter '{bad}' must be the same "
                    "for every tensor (it feeds a whole-model statistic)")
    return None
