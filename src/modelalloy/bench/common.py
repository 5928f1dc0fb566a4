"""What every built-in suite shares: the cache, the on-disk layout, and the Suite interface.

A suite is a folder::

    <cache>/<suite>-<size>-<hash>/
      suite.json                 name, size, config, task list (held-out flags), build time
      base/                      config.json + model.safetensors (HF-style)
      experts/<task>/            config.json + model.safetensors + optimizer.safetensors
                                 (Adam exp_avg / exp_avg_sq per parameter, and the step count)
      data/<task>/val.safetensors     small labeled validation split (for tuning and for
                                      data-informed methods)
      data/<task>/test.safetensors    unlabeled test inputs (for data-informed methods)
      data/<task>/labels.safetensors  the test labels: used by the evaluation harness only

The folder name carries a content hash of the build config and of the suite's code version
(``BUILD_VERSION`` in the suite's module), so a change to either builds a fresh suite; a build
writes to a temporary sibling and renames it when
complete, so an interrupted build never leaves a half suite behind.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from modelalloy.errors import ModelAlloyError
from modelalloy.io.checkpoint import read_state_dict

SUITE_FORMAT = 1  # the folder layout; the suites' own code versions are their BUILD_VERSION


class SuiteError(ModelAlloyError):
    """A suite name, size or cached suite folder is unusable."""


def cache_root() -> Path:
    """``$MODELALLOY_CACHE`` or ``~/.cache/modelalloy``; suites live under ``suites/``."""
    env = os.environ.get("MODELALLOY_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "modelalloy"
    return root / "suites"


def content_hash(config: Any, *modules: Any) -> str:
    """A short hash of a JSON-able config and the code version of the given modules.

    A module's code version is its ``BUILD_VERSION`` (bump it whenever a change alters what a
    build produces); a module without one contributes its whole source text.
    """
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(f"format={SUITE_FORMAT}".encode())
    for mod in modules:
        version = getattr(mod, "BUILD_VERSION", None)
        text = f"{mod.__name__}={version}" if version is not None else inspect.getsource(mod)
        h.update(text.encode())
    return h.hexdigest()[:12]


@dataclass
class TaskInfo:
    name: str
    held_out: bool = False
    description: str = ""


@dataclass
class SuiteInfo:
    """The parsed suite.json."""

    name: str
    size: str
    path: Path
    tasks: list[TaskInfo]
    config: dict[str, Any]
    build_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def merged_tasks(self) -> list[str]:
        return [t.name for t in self.tasks if not t.held_out]

    @property
    def held_out_tasks(self) -> list[str]:
        return [t.name for t in self.tasks if t.held_out]

    def expert_dir(self, task: str) -> Path:
        return self.path / "experts" / task

    @property
    def base_dir(self) -> Path:
        return self.path / "base"

    def data_file(self, task: str, split: str) -> Path:
        return self.path / "data" / task / f"{split}.safetensors"


def save_model_folder(folder: Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any],
                      optimizer: torch.optim.Optimizer | None = None,
                      names: dict[int, str] | None = None) -> None:
    """Write an HF-style folder: config.json, model.safetensors, optimizer.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    if optimizer is not None and names is not None:
        save_file(adam_state_tensors(optimizer, names), str(folder / "optimizer.safetensors"),
                  metadata={"format": "pt", "optimizer": type(optimizer).__name__})


def adam_state_tensors(optimizer: torch.optim.Optimizer,
                       names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Adam's moments by parameter name: ``<name>.exp_avg``, ``<name>.exp_avg_sq``, ``.step``."""
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            name = names[id(p)]
            out[f"{name}.exp_avg"] = state["exp_avg"].detach().clone().contiguous()
            out[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].detach().clone().contiguous()
            out[f"{name}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    return out


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a suite's model folder (its ``model.safetensors``): see :func:`load_split`."""
    return load_split(folder / "model.safetensors")


def save_split(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def load_split(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one file of a suite, read by io's validated reader (``read_state_dict``:
    a truncated or corrupt file is its one-line ``CheckpointError``); a file the suite should
    hold but does not is a :class:`SuiteError` that says to rebuild it."""
    if not path.is_file():
        raise SuiteError(f"{path}: missing; rebuild the suite with `modelalloy bench --rebuild`")
    return read_state_dict(path)


def build_cached(name: str, size: str, config: dict[str, Any], code_hash_modules: tuple[Any, ...],
                 builder: Callable[[Path, Callable[[str], None]], dict[str, Any]],
                 *, rebuild: bool = False, cache_dir: Path | None = None,
                 log: Callable[[str], None] | None = None) -> Path:
    """Return the cached suite folder, building it (atomically) when absent.

    ``builder(tmp_dir, log)`` writes everything but suite.json and returns the suite.json
    fields ``tasks`` (list of dicts) and optionally ``extra``.
    """
    log = log or (lambda _msg: None)
    root = cache_dir if cache_dir is not None else cache_root()
    digest = content_hash(config, *code_hash_modules)
    final = root / f"{name}-{size}-{digest}"
    if (final / "suite.json").is_file() and not rebuild:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # Tiny models train fastest on one thread; on a shared machine several threads thrash.
    torch.set_num_threads(1)
    try:
        meta = builder(tmp, log)
        meta_out = {"format": SUITE_FORMAT, "name": name, "size": size, "hash": digest,
                    "config": config, "tasks": meta["tasks"], "extra": meta.get("extra", {}),
                    "build_seconds": round(time.perf_counter() - start, 2),
                    "torch_threads": 1}
        (tmp / "suite.json").write_text(json.dumps(meta_out, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {name} ({size}) in {time.perf_counter() - start:.1f}s -> {final}")
    return final


def load_sized_suite(kind: str, size: str, sizes: dict[str, dict[str, Any]],
                     builder: Callable[[Path, dict[str, Any], Callable[[str], None]],
                                       dict[str, Any]],
                     module: Any, *, rebuild: bool = False, cache_dir: Path | None = None,
                     log: Callable[[str], None] | None = None,
                     overrides: dict[str, Any] | None = None) -> SuiteInfo:
    """Check ``size``, apply ``overrides`` to its config, build or find the cached suite."""
    if size not in sizes:
        raise SuiteError(f"{kind}: unknown size '{size}'; use one of {', '.join(sizes)}")
    cfg = {**sizes[size], **(overrides or {})}
    path = build_cached(kind, size, cfg, (module,), lambda out, lg: builder(out, cfg, lg),
                        rebuild=rebuild, cache_dir=cache_dir, log=log)
    return read_suite_info(path)


class SizedSuite:
    """A suite class whose module defines ``SIZES`` (configs by size) and ``build(out, cfg,
    log)``: ``build`` here builds or finds the cached suite of one size."""

    kind: str

    def __init__(self, info: SuiteInfo) -> None:
        self.info = info

    @classmethod
    def build(cls, size: str = "full", *, rebuild: bool = False, cache_dir: Path | None = None,
              log: Callable[[str], None] | None = None,
              overrides: dict[str, Any] | None = None) -> Any:
        module = sys.modules[cls.__module__]
        return cls(load_sized_suite(cls.kind, size, module.SIZES, module.build, module,
                                    rebuild=rebuild, cache_dir=cache_dir, log=log,
                                    overrides=overrides))


def read_suite_info(path: Path) -> SuiteInfo:
    meta_path = path / "suite.json"
    if not meta_path.is_file():
        raise SuiteError(f"{path}: not a modelalloy suite folder (no suite.json)")
    meta = json.loads(meta_path.read_text())
    return SuiteInfo(name=meta["name"], size=meta["size"], path=path,
                     tasks=[TaskInfo(**t) for t in meta["tasks"]], config=meta["config"],
                     build_seconds=meta.get("build_seconds", 0.0), extra=meta.get("extra", {}))


def task_dicts(tasks: list[TaskInfo]) -> list[dict[str, Any]]:
    return [asdict(t) for t in tasks]


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def finetune_seed(cfg: dict[str, Any], seed: int) -> int:
    """The seed of one expert's fine-tuning run: ``seed`` itself for the suite's default
    ``finetune_seed`` 0 (so the default build is unchanged), another stream for each other
    value (``modelalloy bench --seeds N`` rebuilds the experts from seeds 0..N-1; the base, the
    data and the heads stay the same)."""
    extra = int(cfg.get("finetune_seed", 0))
    return seed if extra == 0 else seed + 1_000_003 * extra
