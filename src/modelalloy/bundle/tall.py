"""The TALL-masks compression bundle: θ_0, τ_MTL and one packed binary mask per task.

Storing T fine-tuned experts costs T full models. The bundle stores the base, one merged task
vector τ_MTL (task-arithmetic sum or TIES dis-sum, unscaled) and, per task, the TALL mask
m_t = 1[|τ_t| > λ_t·|τ_MTL − τ_t|] packed 8 coordinates to a byte. Expert t is rebuilt as
θ̂_t = θ_0 + m_t ⊙ τ_MTL (the paper recovers > 99% of each expert's accuracy on 8-20 CLIP tasks).

On disk (a folder)::

    bundle.json          format, tasks, config, tensor names/shapes/dtypes
    base.safetensors     θ_0, every tensor (integer buffers included), in its own dtype
    merged.safetensors   τ_MTL for every floating-point tensor (``merged_dtype``, float32)
    masks.safetensors    "<task index>/<tensor name>" -> packed uint8 bits, one per tensor
    files/               the base folder's side files (config.json, tokenizer, ...), if any
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from modelalloy.errors import CheckpointError, MethodError
from modelalloy.methods._taskvec import TiesStats, check_scope, ties_prepare
from modelalloy.methods.consensus import BASE_MERGES, multitask_vector, tall_masks
from modelalloy.methods.registry import MergeContext, TensorGroup

FORMAT = "modelalloy.tall_bundle/1"


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
        flat = np.unpackbits(self.bits.numpy(), count=self.numel).astype(bool)
        return torch.from_numpy(flat).reshape(self.shape)

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

    def rebuild(self, task: str | int) -> dict[str, torch.Tensor]:
        """θ̂_t = θ_0 + m_t ⊙ τ_MTL for every float tensor; other tensors are the base's."""
        key = self._task(task)
        out: dict[str, torch.Tensor] = {}
        for name, b in self.base.items():
            if name not in self.merged:
                out[name] = b.clone()
                continue
            m = self.masks[key][name].unpack().to(torch.float32)
            out[name] = (b.to(torch.float32) + m * self.merged[name].to(torch.float32)).to(b.dtype)
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

    def save(self, path: str | Path) -> Path:
        """Write the bundle folder (to a temporary sibling, renamed when complete)."""
        path = Path(path)
        if path.exists():
            raise CheckpointError(f"{path}: already exists; choose a new bundle folder")
        tmp = path.with_name(f".{path.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.base.items()}, str(tmp / "base.safetensors"))
        save_file({k: v.contiguous() for k, v in self.merged.items()},
                  str(tmp / "merged.safetensors"))
        save_file({f"{i}/{name}": m.bits for i, task in enumerate(self.tasks)
                   for name, m in self.masks[task].items()}, str(tmp / "masks.safetensors"))
        if self.files:
            (tmp / "files").mkdir()
            for fname, data in self.files.items():
                (tmp / "files" / fname).write_bytes(data)
        meta = {"format": FORMAT, "tasks": self.tasks, "config": asdict(self.config),
                "shapes": {n: list(t.shape) for n, t in self.merged.items()}}
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2))
        tmp.rename(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TallBundle:
        path = Path(path)
        meta_path = path / "bundle.json"
        if not meta_path.is_file():
            raise CheckpointError(f"{path}: not a TALL bundle (no bundle.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: bundle format {meta.get('format')!r} is not "
                                  f"{FORMAT!r}")
        try:
            base = load_file(str(path / "base.safetensors"))
            merged = load_file(str(path / "merged.safetensors"))
            raw = load_file(str(path / "masks.safetensors"))
        except Exception as err:
            raise CheckpointError(f"{path}: unreadable bundle file ({err})") from err
        tasks = list(meta["tasks"])
        masks: dict[str, dict[str, PackedMask]] = {t: {} for t in tasks}
        for key, bits in raw.items():
            idx, name = key.split("/", 1)
            masks[tasks[int(idx)]][name] = PackedMask(bits=bits,
                                                      shape=tuple(meta["shapes"][name]))
        cfg = meta["config"]
        cfg["mask_lambda"] = tuple(cfg["mask_lambda"])
        files = {}
        if (path / "files").is_dir():
            files = {p.name: p.read_bytes() for p in sorted((path / "files").iterdir())}
        return cls(base=base, merged=merged, masks=masks, tasks=tasks, config=TallConfig(**cfg),
                   files=files)

    def _task(self, task: str | int) -> str:
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise MethodError(f"task index {task} out of range: the bundle has "
                                  f"{len(self.tasks)} tasks ({', '.join(self.tasks)})")
            return self.tasks[task]
        if task not in self.masks:
            raise MethodError(f"unknown task '{task}'; the bundle has: {', '.join(self.tasks)}")
        return task


def compress(base: Mapping[str, torch.Tensor], experts: Mapping[str, Mapping[str, torch.Tensor]],
             *, base_merge: str = "task_arithmetic",
             mask_lambda: float | list[float] | Mapping[str, float] = 0.6,
             density: float = 0.2, scope: str = "global",
             merged_dtype: torch.dtype = torch.float32,
             files: Mapping[str, bytes] | None = None) -> TallBundle:
    """Build the TALL bundle of ``experts`` (task name -> state dict) over ``base``.

    ``mask_lambda`` is one λ for every task, a list in task order, or a task -> λ mapping.
    The paper picks λ_t per task from {0.2, ..., 0.6} by validation accuracy; without data,
    0.6 (FusionBench's default) is used.
    """
    if base_merge not in BASE_MERGES:
        raise MethodError(f"base_merge must be one of {', '.join(BASE_MERGES)}")
    check_scope(scope)
    tasks = list(experts)
    if not tasks:
        raise MethodError("compress needs at least one expert")
    if isinstance(mask_lambda, Mapping):
        lambdas = [float(mask_lambda[t]) for t in tasks]
    elif isinstance(mask_lambda, (list, tuple)):
        lambdas = [float(x) for x in mask_lambda]
    else:
        lambdas = [float(mask_lambda)] * len(tasks)
    if len(lambdas) != len(tasks):
        raise MethodError(f"{len(lambdas)} mask_lambda values for {len(tasks)} tasks")
    float_names = [n for n, t in base.items() if t.is_floating_point()]
    for task, sd in experts.items():
        missing = [n for n in base if n not in sd]
        if missing:
            raise CheckpointError(f"expert '{task}': tensor '{missing[0]}' is missing")
        for n in float_names:
            if tuple(sd[n].shape) != tuple(base[n].shape):
                raise CheckpointError(f"expert '{task}': tensor '{n}' has shape "
                                      f"{tuple(sd[n].shape)}, base has {tuple(base[n].shape)}")

    def tvs_of(name: str) -> torch.Tensor:
        b = base[name].to(torch.float32)
        return torch.stack([experts[t][name].to(torch.float32) - b for t in tasks])

    stats: TiesStats | None = None
    if base_merge == "ties" and scope == "global":
        def groups() -> Iterator[TensorGroup]:
            for n in float_names:
                yield TensorGroup(name=n, base=base[n].to(torch.float32),
                                  experts=[experts[t][n].to(torch.float32) for t in tasks],
                                  params={}, ctx=MergeContext(name=n))

        stats = ties_prepare(groups, density)
    merged: dict[str, torch.Tensor] = {}
    masks: dict[str, dict[str, PackedMask]] = {t: {} for t in tasks}
    for n in float_names:
        tvs = tvs_of(n)
        mtl = multitask_vector(tvs, base_merge, density, stats)
        m = tall_masks(tvs, mtl, lambdas)
        merged[n] = mtl.to(merged_dtype)
        for i, t in enumerate(tasks):
            masks[t][n] = PackedMask.pack(m[i])
    return TallBundle(base={n: t.detach().clone() for n, t in base.items()}, merged=merged,
                      masks=masks, tasks=tasks,
                      config=TallConfig(base_merge=base_merge, mask_lambda=tuple(lambdas),
                                        density=density, scope=scope),
                      files=dict(files or {}))
