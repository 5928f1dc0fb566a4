"""The TALL-masks compression bundle: θ_0, τ_MTL and one packed binary mask per task.

Storing T fine-tuned experts costs T full models. The bundle stores the base, one merged task
vector τ_MTL (task-arithmetic sum or TIES dis-sum, unscaled) and, per task, the TALL mask
m_t = 1[|τ_t| > λ_t·|τ_MTL − τ_t|] packed 8 coordinates to a byte. Expert t is rebuilt as
θ̂_t = θ_0 + m_t ⊙ τ_MTL (the paper recovers > 99% of each expert's accuracy on 8-20 CLIP tasks).

On disk (a folder; every part is standard safetensors, sharded like a model when large)::

    bundle.json   format, tasks, config, the masked tensors' shapes, and every file's size
                  and SHA-256 (checked on read: io/tall_manifest.py)
    base/         θ_0, every tensor in its own dtype, plus the base's config/tokenizer files:
                  a loadable model folder
    merged/       τ_MTL for every floating-point tensor (``merged_dtype``, float32)
    masks/        "<task index>/<tensor name>" -> packed uint8 bits

:func:`compress_to` and :func:`rebuild_to` stream tensor by tensor (memory: one tensor of each
model); :func:`compress` / :class:`TallBundle` hold a bundle in memory for the Python API.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelalloy.bundle._checkpoint import side_files
from modelalloy.engine.execute import run_plan
from modelalloy.engine.sources import StateDictSource, TallExpertSource, open_tall_expert
from modelalloy.errors import CheckpointError, MethodError, PlanError
from modelalloy.io.model_files import copy_model_files
from modelalloy.io.tall_bundle import TallBundleFolder, mask_key, unpack_bits
from modelalloy.io.tall_manifest import FORMAT, MANIFEST, describe_files
from modelalloy.io.writer import AtomicOutputDir, ShardedSafetensorsWriter
from modelalloy.methods.consensus import (
    check_mtl_options,
    multitask_vector,
    tall_masks,
    ties_stats,
)
from modelalloy.methods.registry import Execution, MergeContext, MethodSpec, Prepare
from modelalloy.plan.planner import build_plan
from modelalloy.plan.sources import TensorSource

SHARD_BYTES = 5 * 1000 ** 3


@dataclass(frozen=True)
class PackedMask:
    """A boolean tensor packed 8 coordinates to a byte (numpy bit order, big-endian)."""

    bits: torch.Tensor  # uint8, 1-D, ceil(numel/8) bytes
    shape: tuple[int, ...]

    @classmethod
    def pack(cls, mask: torch.Tensor) -> PackedMask:
        flat = mask.detach().to("cpu", torch.bool).flatten().numpy()
        return cls(bits=torch.from_numpy(np.packbits(flat)), shape=tuple(mask.shape))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def unpack(self) -> torch.Tensor:
        return unpack_bits(self.bits, self.numel).reshape(self.shape)

    def density(self) -> float:
        return float(self.unpack().float().mean()) if self.numel else 0.0


@dataclass(frozen=True)
class TallConfig:
    """How τ_MTL and the masks were built (recorded in bundle.json)."""

    base_merge: str = "task_arithmetic"  # or "ties" (dis-sum)
    mask_lambda: tuple[float, ...] = ()  # λ_t, one per task
    density: float = 0.2  # TIES trim: fraction kept
    scope: str = "global"  # TIES thresholds: whole model or per tensor


@dataclass(frozen=True)
class StorageReport:
    """Bytes of the bundle against storing the base and every expert separately."""

    bundle_bytes: int
    base_bytes: int
    merged_bytes: int
    mask_bytes: int
    separate_bytes: int  # base + T experts, each at the base's dtypes

    @property
    def ratio(self) -> float:
        """bundle / (base + T experts): the fraction of the storage the bundle needs."""
        return self.bundle_bytes / self.separate_bytes if self.separate_bytes else 0.0

    def __str__(self) -> str:
        mib = 1024 * 1024
        return (f"bundle {self.bundle_bytes / mib:.2f} MiB (base {self.base_bytes / mib:.2f}, "
                f"τ_MTL {self.merged_bytes / mib:.2f}, masks {self.mask_bytes / mib:.2f}) vs "
                f"{self.separate_bytes / mib:.2f} MiB for base + experts: ratio {self.ratio:.3f}")


@dataclass
class TallBundle:
    """Base + multi-task vector + packed per-task masks; :meth:`rebuild` gives any expert."""

    base: dict[str, torch.Tensor]
    merged: dict[str, torch.Tensor]  # τ_MTL per floating-point tensor name
    masks: dict[str, dict[str, PackedMask]]  # task -> tensor name -> mask
    tasks: list[str]
    config: TallConfig
    files: dict[str, bytes] = field(default_factory=dict)  # side files of the base folder

    def mask(self, task: str | int, name: str) -> torch.Tensor:
        return self.masks[self._task(task)][name].unpack()

    def expert(self, task: str | int) -> TallExpertSource:
        """Expert ``task`` as a tensor source (the one rebuild: θ̂_t = θ_0 + m_t ⊙ τ_MTL, read
        tensor by tensor or a slice at a time); holds no copy. A recipe merges a bundle
        folder's experts as ``BUNDLE#TASK``."""
        key = self._task(task)
        index = self.tasks.index(key)
        masks = {mask_key(index, n): m.bits for n, m in self.masks[key].items()}
        return TallExpertSource(f"in-memory bundle#{key}", StateDictSource("base", self.base),
                                StateDictSource("τ_MTL", self.merged),
                                StateDictSource(f"masks of '{key}'", masks),
                                {n: tuple(t.shape) for n, t in self.merged.items()}, index)

    def rebuild(self, task: str | int) -> dict[str, torch.Tensor]:
        """θ̂_t = θ_0 + m_t ⊙ τ_MTL for every float tensor; other tensors are the base's
        (copies: the result shares no storage with the bundle)."""
        source = self.expert(task)
        out = {}
        for name in source.names():
            tensor = source.get(name)
            out[name] = tensor.clone() if name not in self.merged else tensor
        return out

    def mask_densities(self) -> dict[str, float]:
        """Fraction of coordinates each task's mask keeps (over all float tensors)."""
        out = {}
        for task in self.tasks:
            kept = sum(int(m.unpack().sum()) for m in self.masks[task].values())
            total = sum(m.numel for m in self.masks[task].values())
            out[task] = kept / total if total else 0.0
        return out

    def storage(self) -> StorageReport:
        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        base_b = sum(nbytes(t) for t in self.base.values())
        merged_b = sum(nbytes(t) for t in self.merged.values())
        mask_b = sum(nbytes(m.bits) for task in self.masks.values() for m in task.values())
        return StorageReport(bundle_bytes=base_b + merged_b + mask_b, base_bytes=base_b,
                             merged_bytes=merged_b, mask_bytes=mask_b,
                             separate_bytes=base_b * (1 + len(self.tasks)))

    def save(self, path: str | Path, shard_bytes: int = SHARD_BYTES) -> Path:
        """Write the bundle folder atomically (see the module docstring for the layout)."""
        shapes = {n: tuple(t.shape) for n, t in self.merged.items()}
        with _BundleWriter(Path(path), self.tasks, self.config,
                           [(n, tuple(t.shape), t.dtype) for n, t in self.base.items()],
                           shapes, next(iter(self.merged.values())).dtype
                           if self.merged else torch.float32, shard_bytes) as w:
            for n, b in self.base.items():
                w.write(n, b, self.merged.get(n),
                        [self.masks[t][n] for t in self.tasks] if n in self.merged else None)
            w.add_files(self.files)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> TallBundle:
        """Read a whole bundle into memory (use :func:`rebuild_to` to stream one expert)."""
        with _BundleReader(Path(path)) as r:
            base = {n: r.base.get(n) for n in r.base.names()}
            merged = {n: r.merged.get(n) for n in r.merged.names()}
            masks = {t: {n: r.mask(i, n) for n in merged} for i, t in enumerate(r.tasks)}
            return cls(base=base, merged=merged, masks=masks, tasks=r.tasks,
                       config=r.tall_config, files=r.files())

    def _task(self, task: str | int) -> str:
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise MethodError(f"task index {task} out of range: the bundle has "
                                  f"{len(self.tasks)} tasks ({', '.join(self.tasks)})")
            return self.tasks[task]
        if task not in self.masks:
            raise MethodError(f"unknown task '{task}'; the bundle has: {', '.join(self.tasks)}")
        return task


class _BundleWriter:
    """Writes the three parts of a bundle tensor by tensor into a temporary sibling folder."""

    def __init__(self, path: Path, tasks: list[str], config: TallConfig,
                 base_entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 masked_shapes: Mapping[str, tuple[int, ...]], merged_dtype: torch.dtype,
                 shard_bytes: int = SHARD_BYTES):
        if path.exists():
            raise CheckpointError(f"{path}: already exists; choose a new bundle folder")
        self.path = path
        self.tasks = tasks
        self.config = config
        self._atomic = AtomicOutputDir(path)
        tmp = self._atomic.__enter__()
        try:
            for sub in ("base", "merged", "masks"):
                (tmp / sub).mkdir()
            self.base = ShardedSafetensorsWriter(tmp / "base", base_entries, shard_bytes)
            self.merged = ShardedSafetensorsWriter(
                tmp / "merged", [(n, s, merged_dtype) for n, s in masked_shapes.items()],
                shard_bytes)
            self.masks = ShardedSafetensorsWriter(
                tmp / "masks", [(f"{i}/{n}", (math.ceil(math.prod(s) / 8),), torch.uint8)
                                for i in range(len(tasks)) for n, s in masked_shapes.items()],
                shard_bytes)
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        self.tmp = tmp
        self.shapes = dict(masked_shapes)

    def write(self, name: str, base: torch.Tensor, merged: torch.Tensor | None,
              masks: list[PackedMask] | None) -> None:
        self.base.write(name, base.detach().cpu())
        if merged is not None and masks is not None:
            self.merged.write(name, merged.detach().cpu())
            for i, m in enumerate(masks):
                self.masks.write(f"{i}/{name}", m.bits)

    def add_files(self, files: Mapping[str, bytes]) -> None:
        for fname, data in files.items():
            (self.tmp / "base" / fname).write_bytes(data)

    def __enter__(self) -> _BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for writer in (self.base, self.merged, self.masks):
                try:
                    writer.abort()
                except Exception:  # the original error matters, not a cleanup one
                    pass
        try:
            if exc_type is None:
                self.base.close()
                self.merged.close()
                self.masks.close()
                meta = {"format": FORMAT, "tasks": self.tasks, "config": asdict(self.config),
                        "shapes": {n: list(s) for n, s in self.shapes.items()},
                        "files": describe_files(self.tmp)}
                (self.tmp / MANIFEST).write_text(json.dumps(meta, indent=2))
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        self._atomic.__exit__(exc_type, exc, tb)


class _BundleReader(TallBundleFolder):
    """A bundle folder's checked parts (io/tall_bundle.py), its config as a TallConfig."""

    def __init__(self, path: Path):
        super().__init__(path)
        cfg = dict(self.config)
        cfg["mask_lambda"] = tuple(cfg["mask_lambda"])
        self.tall_config = TallConfig(**cfg)

    def mask(self, index: int, name: str) -> PackedMask:
        return PackedMask(bits=self.masks.get(mask_key(index, name)), shape=self.shapes[name])

    def files(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in side_files(self.path / "base")}


def rebuild_to(bundle_dir: str | Path, task: str | int, out: str | Path,
               shard_bytes: int = SHARD_BYTES) -> Path:
    """Stream expert ``task`` out of a bundle folder into a new model folder (atomic).

    θ̂_t = θ_0 + m_t ⊙ τ_MTL tensor by tensor; the base's config/tokenizer files are copied.
    """
    out = Path(out)
    with open_tall_expert(bundle_dir, task) as expert:
        entries = [(n, expert.info(n).shape, expert.info(n).dtype) for n in expert.names()]
        with AtomicOutputDir(out) as tmp:
            writer = ShardedSafetensorsWriter(tmp, entries, shard_bytes)
            for n in expert.names():
                writer.write(n, expert.get(n))
            writer.close()
            copy_model_files(Path(bundle_dir) / "base", tmp)
    return out


def load_expert(bundle_dir: str | Path, task: str | int) -> dict[str, torch.Tensor]:
    """Expert ``task`` (its name or 0-based index) of a bundle folder, rebuilt in memory
    through the engine's source (:class:`modelalloy.engine.sources.TallExpertSource`)."""
    with open_tall_expert(bundle_dir, task) as expert:
        return {n: expert.get(n) for n in expert.names()}


def _source(label: str, state: Mapping[str, torch.Tensor]) -> TensorSource:
    """A lazy checkpoint mapping (:func:`lazy_state`) reads from its checkpoint; any other
    mapping is read in memory, without copies."""
    checkpoint = getattr(state, "checkpoint", None)
    return checkpoint if checkpoint is not None else StateDictSource(label, state)


class _Compression:
    """The TALL compression of one base and its experts, run by the engine.

    The planner checks the models (names, shapes) before anything is written, the engine reads
    and upcasts each tensor (refusing NaN/Inf), runs the TIES whole-model pass when the global
    scope needs it, and calls :meth:`merge` per tensor, which returns τ_MTL (the engine's
    output, cast to ``merged_dtype``) and keeps the tensor's packed masks for the sink."""

    def __init__(self, base: Mapping[str, torch.Tensor],
                 experts: Mapping[str, Mapping[str, torch.Tensor]], tasks: list[str],
                 lambdas: list[float], base_merge: str, density: float, scope: str,
                 merged_dtype: torch.dtype):
        self.tasks, self.lambdas = tasks, lambdas
        self.base_merge, self.density = base_merge, density
        self.masks: dict[str, list[PackedMask]] = {}
        self.kept = dict.fromkeys(tasks, 0)
        self.total = 0
        options = {"base_merge": base_merge, "density": density, "scope": scope}
        global_ties = base_merge == "ties" and scope == "global"
        spec = MethodSpec(
            name="tall_masks bundle", fn=self.merge, params=(), base="required",
            paper="Wang, Dimitriadis et al., ICML 2024", summary="τ_MTL and TALL masks",
            execution=Execution(prepare=Prepare(lambda groups: ties_stats(groups, options))
                                if global_ties else None))
        self.base = _source("base model", base)
        sources = [_source(f"expert '{t}'", experts[t]) for t in tasks]
        self.plan = build_plan(None, spec, self.base, sources, merged_dtype,
                               resolve_params=lambda name, layer, count: {"scope": scope})
        try:
            self.plan.raise_if_problems()
        except PlanError as err:  # the bundle API's error for models that do not fit
            raise CheckpointError(str(err)) from None
        self.masked = {e.name: e.shape for e in self.plan.entries if e.merge}

    def merge(self, base: torch.Tensor | None, experts: list[torch.Tensor],
              params: dict[str, Any], ctx: MergeContext) -> torch.Tensor:
        assert base is not None
        tvs = torch.stack([e - base for e in experts])
        mtl = multitask_vector(tvs, self.base_merge, self.density, ctx.global_stats)
        masks = tall_masks(tvs, mtl, self.lambdas)
        self.masks[ctx.name] = [PackedMask.pack(m) for m in masks]
        self.total += masks[0].numel()  # one merge thread: no lock needed
        for i, t in enumerate(self.tasks):
            self.kept[t] += int(masks[i].sum())
        return mtl

    def run(self, sink: Any) -> None:
        # one thread: memory is one tensor of each model, as the bundle promises
        run_plan(self.plan, sink, device=torch.device("cpu"), seed=0, threads=1)

    def densities(self) -> dict[str, float]:
        return {t: (self.kept[t] / self.total if self.total else 0.0) for t in self.tasks}


class _FolderSink:
    """Engine sink: each tensor's base, τ_MTL and masks into the bundle folder's writers."""

    def __init__(self, job: _Compression, writer: _BundleWriter):
        self.job, self.writer = job, writer

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.job.masked:
            self.writer.write(name, self.job.base.get(name), tensor, self.job.masks.pop(name))
        else:
            self.writer.write(name, tensor, None, None)


class _MemorySink:
    """Engine sink: the bundle's parts as in-memory dicts."""

    def __init__(self, job: _Compression):
        self.job = job
        self.kept: dict[str, torch.Tensor] = {}
        self.merged: dict[str, torch.Tensor] = {}
        self.masks: dict[str, dict[str, PackedMask]] = {t: {} for t in job.tasks}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.job.masked:
            self.kept[name] = tensor.detach().clone()
            return
        self.kept[name] = self.job.base.get(name).detach().clone()
        self.merged[name] = tensor
        for t, mask in zip(self.job.tasks, self.job.masks.pop(name), strict=True):
            self.masks[t][name] = mask


def compress_to(path: str | Path, base: Mapping[str, torch.Tensor],
                experts: Mapping[str, Mapping[str, torch.Tensor]], *,
                base_merge: str = "task_arithmetic",
                mask_lambda: float | list[float] | Mapping[str, float] = 0.6,
                density: float = 0.2, scope: str = "global",
                merged_dtype: torch.dtype = torch.float32,
                files: Mapping[str, bytes] | None = None,
                shard_bytes: int = SHARD_BYTES) -> tuple[StorageReport, dict[str, float]]:
    """Build the TALL bundle of ``experts`` over ``base`` straight into folder ``path``.

    Streams tensor by tensor (lazy mappings such as :func:`lazy_state` are read one tensor at a
    time), so memory is one tensor of each model whatever the model size. Returns the storage
    report and each task's mask density.
    """
    tasks, lambdas = _check_args(experts, base_merge, scope, mask_lambda, density)
    job = _Compression(base, experts, tasks, lambdas, base_merge, density, scope, merged_dtype)
    cfg = TallConfig(base_merge=base_merge, mask_lambda=tuple(lambdas), density=density,
                     scope=scope)
    base_entries = [(e.name, e.shape, job.base.info(e.name).dtype) for e in job.plan.entries]
    with _BundleWriter(Path(path), tasks, cfg, base_entries, job.masked, merged_dtype,
                       shard_bytes) as w:
        job.run(_FolderSink(job, w))
        w.add_files(files or {})
    return _storage_of(Path(path), len(tasks)), job.densities()


def _storage_of(path: Path, n_tasks: int) -> StorageReport:
    def size(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))

    base_b, merged_b, mask_b = size(path / "base"), size(path / "merged"), size(path / "masks")
    return StorageReport(bundle_bytes=base_b + merged_b + mask_b, base_bytes=base_b,
                         merged_bytes=merged_b, mask_bytes=mask_b,
                         separate_bytes=base_b * (1 + n_tasks))


def _check_args(experts: Mapping[str, Mapping[str, torch.Tensor]], base_merge: str, scope: str,
                mask_lambda: float | list[float] | Mapping[str, float], density: float
                ) -> tuple[list[str], list[float]]:
    check_mtl_options(base_merge, scope)
    tasks = list(experts)
    if not tasks:
        raise MethodError("compress needs at least one expert")
    if not 0.0 < density <= 1.0:
        raise MethodError(f"density must be in (0, 1] (the fraction of each task vector "
                          f"kept), got {density}")
    if isinstance(mask_lambda, Mapping):
        lambdas = [float(mask_lambda[t]) for t in tasks]
    elif isinstance(mask_lambda, (list, tuple)):
        lambdas = [float(x) for x in mask_lambda]
    else:
        lambdas = [float(mask_lambda)] * len(tasks)
    if len(lambdas) != len(tasks):
        raise MethodError(f"{len(lambdas)} mask_lambda values for {len(tasks)} tasks")
    return tasks, lambdas


def compress(base: Mapping[str, torch.Tensor], experts: Mapping[str, Mapping[str, torch.Tensor]],
             *, base_merge: str = "task_arithmetic",
             mask_lambda: float | list[float] | Mapping[str, float] = 0.6,
             density: float = 0.2, scope: str = "global",
             merged_dtype: torch.dtype = torch.float32,
             files: Mapping[str, bytes] | None = None) -> TallBundle:
    """Build the TALL bundle of ``experts`` (task name -> state dict) over ``base`` in memory.

    The state dicts may be lazy mappings (:func:`modelalloy.bundle.lazy_state`): tensors are
    read one name at a time. ``mask_lambda`` is one λ for every task, a list in task order, or
    a task -> λ mapping. The paper picks λ_t per task from {0.2, ..., 0.6} by validation
    accuracy; without data, 0.6 (FusionBench's default) is used. For models that do not fit in
    memory twice, use :func:`compress_to`.
    """
    tasks, lambdas = _check_args(experts, base_merge, scope, mask_lambda, density)
    job = _Compression(base, experts, tasks, lambdas, base_merge, density, scope, merged_dtype)
    sink = _MemorySink(job)
    job.run(sink)
    kept, merged, masks = sink.kept, sink.merged, sink.masks
    return TallBundle(base=kept, merged=merged, masks=masks, tasks=tasks,
                      config=TallConfig(base_merge=base_merge, mask_lambda=tuple(lambdas),
                                        density=density, scope=scope),
                      files=dict(files or {}))
