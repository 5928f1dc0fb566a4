"""The Twin-Merging bundle on disk: shared model, low-rank factors, router, manifest.

A folder, written into a temporary sibling and renamed when complete::

    twin.json             manifest: format, tasks, build config, every factor's name and rank,
                          sizes (bundle vs the experts stored separately), sha256 of each file
    shared/               θ*: model.safetensors (sharded when large) + the base's config and
                          tokenizer files, a loadable model folder
    factors.safetensors   "<task>::<tensor>::up" (m×r = U_rΣ_r), "::down" (r×n = V_rᵀ),
                          "::dense" (1-D and other tensors, kept whole)
    router.safetensors    the router MLP (its BatchNorm statistics included)

:meth:`TwinBundle.load` checks the manifest, that every listed factor is there with the shape
it records, that the router predicts exactly the bundle's tasks, and the checksums.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from modelalloy.errors import CheckpointError
from modelalloy.io.checkpoint import read_state_dict
from modelalloy.io.writer import AtomicOutputDir, ShardedSafetensorsWriter
from modelalloy.twin.lowrank import LowRank
from modelalloy.twin.router import TwinRouter
from modelalloy.twin.runtime import Factor, TwinModel

FORMAT = "modelalloy.twin_bundle/1"
MANIFEST = "twin.json"
SHARD_BYTES = 5 * 1000 ** 3


class TwinBundleError(CheckpointError):
    """A Twin-Merging bundle folder is incomplete, corrupt or does not fit its model."""


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _factor_tensors(factors: Mapping[str, Mapping[str, Factor]]) -> dict[str, torch.Tensor]:
    out = {}
    for task, per in factors.items():
        for name, f in per.items():
            if isinstance(f, LowRank):
                out[f"{task}::{name}::up"] = f.up.contiguous()
                out[f"{task}::{name}::down"] = f.down.contiguous()
            else:
                out[f"{task}::{name}::dense"] = f.contiguous()
    return out


@dataclass
class TwinBundle:
    """θ*, the per-task factors δ̂_k, the router, and how they were made."""

    tasks: list[str]
    shared: dict[str, torch.Tensor]
    factors: dict[str, dict[str, Factor]]
    router: TwinRouter
    config: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, Any] = field(default_factory=dict)

    def model(self, module: nn.Module, routing: str = "sample") -> TwinModel:
        """The routed model on ``module`` (an instance of the architecture; θ* is loaded)."""
        missing, unexpected = module.load_state_dict(self.shared, strict=False)
        params = {n for n, _ in module.named_parameters()}
        bad = [m for m in missing if m in params and not _tied(module, m, self.shared)]
        if bad or unexpected:
            raise TwinBundleError(f"the bundle's shared model does not fit this module: missing "
                                  f"{bad[:3]}, unexpected {list(unexpected)[:3]}")
        if hasattr(module, "tie_weights"):
            module.tie_weights()
        return TwinModel(module, self.router, self.tasks, self.factors, routing=routing)

    def save(self, path: str | Path, *, files: Mapping[str, bytes] | None = None,
             experts_bytes: int | None = None, force: bool = False) -> Path:
        """Write the bundle atomically; ``files`` are the shared model's side files
        (config.json, tokenizer), ``experts_bytes`` the experts' total stored size."""
        path = Path(path)
        with AtomicOutputDir(path, force=force) as tmp:
            (tmp / "shared").mkdir()
            entries = [(n, tuple(t.shape), t.dtype) for n, t in self.shared.items()]
            writer = ShardedSafetensorsWriter(tmp / "shared", entries, SHARD_BYTES)
            for n, t in self.shared.items():
                writer.write(n, t)
            writer.close()
            for fname, data in (files or {}).items():
                (tmp / "shared" / fname).write_bytes(data)
            save_file(_factor_tensors(self.factors), str(tmp / "factors.safetensors"))
            save_file({k: v.detach().contiguous() for k, v in self.router.state_dict().items()},
                      str(tmp / "router.safetensors"))
            listed = sorted(p for p in tmp.rglob("*") if p.is_file())
            checksums = {str(p.relative_to(tmp)): _sha256(p) for p in listed}
            sizes = {"shared_bytes": sum(p.stat().st_size for p in listed
                                         if p.parent.name == "shared"),
                     "factors_bytes": (tmp / "factors.safetensors").stat().st_size,
                     "router_bytes": (tmp / "router.safetensors").stat().st_size}
            sizes["bundle_bytes"] = sum(p.stat().st_size for p in listed)
            if experts_bytes:
                sizes["experts_bytes"] = int(experts_bytes)
                sizes["ratio"] = round(sizes["bundle_bytes"] / experts_bytes, 4)
            self.sizes = sizes
            manifest = {"format": FORMAT, "tasks": self.tasks, "config": self.config,
                        "factors": {t: {n: (f.rank if isinstance(f, LowRank) else "dense")
                                        for n, f in per.items()}
                                    for t, per in self.factors.items()},
                        "shapes": {n: list(t.shape) for n, t in self.shared.items()},
                        "router": {"dim": self.router.dim, "hidden": self.router.hidden,
                                   "tasks": self.router.num_tasks},
                        "sizes": sizes, "files": checksums}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> TwinBundle:
        path = Path(path)
        meta = read_manifest(path)
        for rel in meta["files"]:
            if not (path / rel).is_file():
                raise TwinBundleError(f"{path}: file '{rel}' listed in {MANIFEST} is missing")
        tasks = list(meta["tasks"])
        stored = read_state_dict(path / "factors.safetensors")
        router_state = read_state_dict(path / "router.safetensors")
        factors = _read_factors(path, meta, stored)
        router = _read_router(path, meta, router_state, tasks)
        if verify:
            for rel, digest in meta["files"].items():
                if _sha256(path / rel) != digest:
                    raise TwinBundleError(f"{path}: '{rel}' does not match its checksum in "
                                          f"{MANIFEST}; the bundle was modified or is corrupt")
        shared = read_state_dict(path / "shared")
        return cls(tasks=tasks, shared=shared, factors=factors, router=router,
                   config=meta.get("config", {}), sizes=meta.get("sizes", {}))


def _tied(module: nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> bool:
    """A parameter absent from the state because it is the same tensor as one present."""
    params = dict(module.named_parameters(remove_duplicate=False))
    return any(params[n] is params[name] for n in state if n in params)


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise TwinBundleError(f"{path}: not a folder; pass a Twin-Merging bundle folder")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise TwinBundleError(f"{path}: no {MANIFEST}; not a Twin-Merging bundle "
                              "(make one with `modelalloy twin build`)")
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise TwinBundleError(f"{manifest}: not valid JSON ({err.msg})") from None
    if meta.get("format") != FORMAT:
        raise TwinBundleError(f"{manifest}: format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def is_twin_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _read_factors(path: Path, meta: dict[str, Any], stored: dict[str, torch.Tensor]
                  ) -> dict[str, dict[str, Factor]]:
    shapes = meta["shapes"]
    factors: dict[str, dict[str, Factor]] = {}
    for task, per in meta["factors"].items():
        factors[task] = {}
        for name, rank in per.items():
            parts = ("dense",) if rank == "dense" else ("up", "down")
            for part in parts:
                if f"{task}::{name}::{part}" not in stored:
                    raise TwinBundleError(f"{path}: factor '{part}' of tensor '{name}' for task "
                                          f"'{task}' is missing from factors.safetensors")
            if rank == "dense":
                f: Factor = stored[f"{task}::{name}::dense"]
                shape = tuple(f.shape)
            else:
                f = LowRank(stored[f"{task}::{name}::up"], stored[f"{task}::{name}::down"])
                shape = (f.up.shape[0], f.down.shape[1])
                if f.rank != rank or f.down.shape[0] != rank:
                    raise TwinBundleError(f"{path}: factors of '{name}' for task '{task}' have "
                                          f"rank {f.rank}, the manifest says {rank}")
            if list(shape) != shapes.get(name):
                raise TwinBundleError(f"{path}: factors of '{name}' for task '{task}' make a "
                                      f"{list(shape)} tensor, the shared model's is "
                                      f"{shapes.get(name)}")
            factors[task][name] = f
    return factors


def _read_router(path: Path, meta: dict[str, Any], state: dict[str, torch.Tensor],
                 tasks: list[str]) -> TwinRouter:
    need = ("fc1.weight", "out.weight")
    if any(k not in state for k in need):
        raise TwinBundleError(f"{path}: router.safetensors is not a Twin-Merging router")
    k = int(state["out.weight"].shape[0])
    if k != len(tasks):
        raise TwinBundleError(f"{path}: the router predicts {k} tasks but the bundle has "
                              f"{len(tasks)} experts ({', '.join(tasks)}); they do not match")
    try:
        return TwinRouter.from_state_dict(state)
    except (RuntimeError, KeyError) as err:
        raise TwinBundleError(f"{path}: router.safetensors does not load "
                              f"({str(err).splitlines()[0]})") from None
