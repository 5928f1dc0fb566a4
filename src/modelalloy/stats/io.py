"""Statistics on disk: one safetensors file per kind, next to the model (or in a statistics
folder of the user's choosing: modelalloy.stats.store), written and read with its format check.

Format (version 1), written down in docs/statistics.md::

    <model_dir>/stats/<kind>.safetensors

- keys are **parameter names** of the model's state dict: the Gram of the inputs of
  ``x.weight`` is stored under ``x.weight`` (not under the module name ``x``);
- values are float32, CPU, contiguous: gram ``(d_in, d_in)``; activations ``(d_in,)``;
  fisher and exp_avg_sq: the parameter's own shape;
- the safetensors header metadata (all strings) holds::

      format      "modelalloy.stats"
      version     "1"
      kind        gram | activations | fisher | exp_avg_sq | gram_pp | ...
      input_dims  JSON {name: "last" | "first"} (gram, activations): the weight dimension the
                  statistic's channels run along; "first" for the transposed Conv1D of GPT-2
      counts      JSON {name: number of tokens (gram, activations) or examples (fisher)}
      plus any collector options (reduce, mask_padding, mode, ...), as strings.

The engine reads entries one tensor at a time (:class:`StatsReader`, memory-mapped through
``safe_open``), so a merge that uses statistics stays streaming.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelalloy.errors import CheckpointError, OutputError
from modelalloy.io.atomic_dir import LeftoverNotice, human_size
from modelalloy.io.faults import fault_point
from modelalloy.stats.collect import Statistic

FORMAT = "modelalloy.stats"
VERSION = "1"


STATS_FOLDER = "stats"


def stats_path(model: str | Path, kind: str) -> Path:
    """Where statistics of ``kind`` for a model live by default: ``<model folder>/stats/`` (a
    model given as its weight file: that file's folder). modelalloy.stats.store also finds them
    in a statistics folder of the user's choosing."""
    path = Path(model)
    folder = path.parent if path.is_file() else path
    return folder / STATS_FOLDER / f"{kind}.safetensors"


def save_stats(stat: Statistic | Mapping[str, torch.Tensor], target: str | Path,
               kind: str | None = None) -> Path:
    """Write ``stat`` to ``target``: a ``.safetensors`` path, or a model folder (then
    ``<target>/stats/<kind>.safetensors``). Written to a temporary sibling and renamed."""
    kind = kind or getattr(stat, "kind", None)
    if kind is None:
        raise ValueError("kind is needed to save a plain mapping of statistics")
    target = Path(target)
    path = target if target.suffix == ".safetensors" else stats_path(target, kind)
    meta = {"format": FORMAT, "version": VERSION, "kind": kind}
    if isinstance(stat, Statistic):
        meta.update({k: str(v) for k, v in stat.meta.items()})
        if stat.input_dims:
            meta["input_dims"] = json.dumps(stat.input_dims, sort_keys=True)
        if stat.counts:
            meta["counts"] = json.dumps(stat.counts, sort_keys=True)
    # Tied parameters share one tensor; safetensors refuses shared storage, so clone.
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
               for k, v in stat.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        save_file(tensors, str(tmp), metadata=meta)
        fault_point("stats.save")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # a full disk can show only here
        os.replace(tmp, path)
    except Exception as err:  # OSError, or safetensors' own error for a failed write
        tmp.unlink(missing_ok=True)
        raise OutputError(_write_failure(path, tensors, err), options=("out",)) from None
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of ``path`` whose writer (the pid in the name) is no longer running: a run
    that was killed while writing. Removed, with a one-line notice."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _running(int(pid)):
            continue
        size = tmp.stat().st_size
        tmp.unlink(missing_ok=True)
        warnings.warn(f"{tmp}: removed a stale temporary file ({human_size(size)}) left by "
                      f"process {pid}, which is no longer running", LeftoverNotice, stacklevel=3)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_failure(path: Path, tensors: Mapping[str, torch.Tensor], err: Exception) -> str:
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    folder = path.parent if path.parent.is_dir() else path.parent.parent
    try:
        free = f"{human_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    reason = " ".join(str(getattr(err, "strerror", None) or err).split())
    if getattr(err, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{path}: cannot write the statistics ({reason}): the folder is read-only "
                "for this user; save them elsewhere (out=PATH), or for a merge copy the "
                "model to a writable folder (statistics live in MODEL/stats/)")
    return (f"{path}: cannot write the statistics ({reason}; they need "
            f"{human_size(needed)}, {free} on that disk); free some space or save them "
            "elsewhere (out=PATH)")


def check_metadata(path: Path, meta: Mapping[str, str], kind: str | None = None) -> None:
    """The header metadata says this is modelalloy statistics (of ``kind``, when given) in the
    version this modelalloy reads; anything else would be used as if it were."""
    again = f"; collect them again with `modelalloy stats ... --kind {kind or 'KIND'}`"
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a modelalloy statistics file (metadata format="
                              f"{meta.get('format')!r}, expected {FORMAT!r}){again}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: statistics format version {meta.get('version')!r}; "
                              f"this modelalloy reads {VERSION}{again}")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path}: holds {meta.get('kind')!r} statistics, not {kind!r}"
                              f"{again}")


class StatsReader(Mapping[str, torch.Tensor]):
    """Lazy, per-tensor access to one statistics file (what the engine should use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no statistics file; collect it with "
                                  "`modelalloy stats MODEL --data FILE --kind KIND`")
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({err})") from err
        meta = self._handle.metadata() or {}
        check_metadata(self.path, meta)
        self.metadata: dict[str, str] = dict(meta)
        self.kind = meta.get("kind", "")
        self.input_dims: dict[str, str] = json.loads(meta.get("input_dims", "{}"))
        self.counts: dict[str, int] = json.loads(meta.get("counts", "{}"))
        self._keys = list(self._handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._keys:
            raise KeyError(name)
        return self._handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys


def load_stats(source: str | Path, kind: str | None = None) -> Statistic:
    """Read a whole statistics file into memory (a ``.safetensors`` path, or a model folder
    plus ``kind``)."""
    source = Path(source)
    if source.suffix != ".safetensors":
        if kind is None:
            raise ValueError("kind is needed to load statistics from a model folder")
        source = stats_path(source, kind)
    reader = StatsReader(source)
    tensors = {k: reader[k] for k in reader}
    extra = {k: v for k, v in reader.metadata.items()
             if k not in ("format", "version", "kind", "input_dims", "counts")}
    return Statistic(reader.kind, tensors, reader.input_dims, reader.counts, extra)
