"""Adam second moments (``exp_avg_sq``) read from saved optimizer states, for OTA / FFG.

Two sources:

- a safetensors file whose keys are parameter names (optionally suffixed ``.exp_avg_sq``);
- a torch optimizer state dict (``optimizer.pt`` from a Hugging Face Trainer checkpoint, or
  ``torch.save(opt.state_dict())``), loaded with ``weights_only=True``. Its ``state`` is indexed
  by the position of each parameter in ``param_groups[*]["params"]``; names come from
  ``param_groups[*]["param_names"]`` when torch saved them (torch >= 2.6 with named parameters),
  else from ``param_names`` — the parameter names **in the order the optimizer was built**
  (Trainer builds a decay group then a no-decay group: pass the names in that order).

The result is a :class:`~modelalloy.stats.Statistic` of kind ``exp_avg_sq``, saved like any
statistic (``<model_dir>/stats/exp_avg_sq.safetensors``). ``compress="rank1"`` stores the
AdaFactor-lemma reconstruction r cᵀ/Σv of each matrix (the memory saving of the OTA paper is
in what a trainer has to keep; on disk we keep the parameter's shape so the engine reads it
like any other statistic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from modelalloy.errors import CheckpointError
from modelalloy.io.checkpoint import load_pickle, open_checkpoint, read_state_dict
from modelalloy.methods.ota import rank1_second_moment
from modelalloy.stats.collect import Statistic


def load_adam_moments(path: str | Path, param_names: Sequence[str] | None = None, *,
                      shapes: Mapping[str, torch.Size] | None = None,
                      key: str = "exp_avg_sq", compress: str = "none") -> Statistic:
    """Read ``key`` (default ``exp_avg_sq``) per parameter name from ``path``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no optimizer state file")
    out: dict[str, torch.Tensor] = {}
    if path.suffix == ".safetensors":
        tensors = read_state_dict(path)
        suffix = f".{key}"
        # A file of several moments per parameter (``<name>.exp_avg``, ``<name>.exp_avg_sq``,
        # ``<name>.step``, as the benchmark suites save them): only the ``key`` entries.
        suffixed = any(k.endswith(suffix) for k in tensors)
        for k, v in tensors.items():
            if suffixed and not k.endswith(suffix):
                continue
            out[k[: -len(suffix)] if k.endswith(suffix) else k] = v.float()
    else:
        state = load_pickle(path)  # not a flat state dict: counts, lists, nested states
        if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
            raise CheckpointError(f"{path}: not a torch optimizer state dict (no 'state' / "
                                  "'param_groups')")
        ids: list[int] = []
        saved_names: list[str] = []
        for group in state["param_groups"]:
            ids.extend(group["params"])
            saved_names.extend(group.get("param_names", []))
        names = list(saved_names) if len(saved_names) == len(ids) else (
            list(param_names) if param_names is not None else None)
        if names is None:
            raise CheckpointError(f"{path}: the optimizer state has no parameter names; pass "
                                  "param_names in the order the optimizer was built")
        if len(names) != len(ids):
            raise CheckpointError(f"{path}: {len(ids)} parameters in the optimizer state but "
                                  f"{len(names)} names were given")
        for pid, name in zip(ids, names, strict=True):
            entry = state["state"].get(pid)
            if entry is None or key not in entry:
                continue  # never stepped (frozen) — no curvature recorded
            out[name] = entry[key].float()
    if shapes is not None:
        for name, v in out.items():
            if name in shapes and tuple(shapes[name]) != tuple(v.shape):
                raise CheckpointError(f"{path}: {key} of '{name}' has shape {tuple(v.shape)} "
                                      f"but the parameter has {tuple(shapes[name])}; wrong "
                                      "parameter order?")
    if compress == "rank1":
        out = {k: rank1_second_moment(v) for k, v in out.items()}
    elif compress != "none":
        raise ValueError("compress must be 'none' or 'rank1'")
    return Statistic("exp_avg_sq", out, {}, {}, {"source": path.name, "compress": compress})


# Where `modelalloy stats MODEL --kind exp_avg_sq` looks for the optimizer state, in order.
OPTIMIZER_FILES = ("optimizer.safetensors", "exp_avg_sq.safetensors", "optimizer.pt")


def _model_shapes(model_dir: Path) -> dict[str, torch.Size] | None:
    """Parameter shapes from the folder's safetensors headers (validated; no tensor is read)."""
    if not any(model_dir.glob("model*.safetensors")):
        return None
    with open_checkpoint(model_dir) as ckpt:
        return {name: torch.Size(ckpt.info(name).shape) for name in ckpt.names()}


def moments_for_model_dir(model_dir: str | Path, optimizer: str | Path | None = None, *,
                          compress: str = "none", out: str | Path | None = None,
                          param_names: Sequence[str] | None = None) -> Path:
    """Read the Adam second moments saved with the model in ``model_dir`` and write them as
    statistics (default ``<model_dir>/stats/exp_avg_sq.safetensors``); returns the path.

    ``optimizer`` defaults to the first of :data:`OPTIMIZER_FILES` in the folder. Only the
    model's own parameters are kept when the folder has safetensors weights (their shapes are
    checked). ``compress="rank1"`` stores the AdaFactor-lemma reconstruction.
    """
    from modelalloy.stats.io import save_stats, stats_path

    model_dir = Path(model_dir)
    if optimizer is None:
        found = [model_dir / f for f in OPTIMIZER_FILES if (model_dir / f).is_file()]
        if not found:
            raise CheckpointError(
                f"{model_dir}: no optimizer state to read exp_avg_sq from (looked for "
                f"{', '.join(OPTIMIZER_FILES)}); save Adam's state next to the model or pass "
                "optimizer=FILE", options=("optimizer",))
        optimizer = found[0]
    shapes = _model_shapes(model_dir)
    stat = load_adam_moments(optimizer, param_names, shapes=shapes, compress=compress)
    if shapes is not None:
        kept = {n: v for n, v in stat.items() if n in shapes}
        if not kept:
            raise CheckpointError(f"{optimizer}: none of its exp_avg_sq entries names a "
                                  f"parameter of {model_dir}")
        stat = Statistic("exp_avg_sq", kept, {}, {}, stat.meta)
    if len(stat) == 0:
        raise CheckpointError(f"{optimizer}: no exp_avg_sq entries")
    target = Path(out) if out is not None else stats_path(model_dir, "exp_avg_sq")
    return save_stats(stat, target, "exp_avg_sq")
