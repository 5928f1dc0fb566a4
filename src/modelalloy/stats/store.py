"""The statistics store: where the statistics of a model live, and how a merge finds, collects
and reads them.

A statistic of kind K for model M lives in ``M/stats/K.safetensors`` (:func:`stats_path`,
next to the model). A statistics folder of the user's choosing (``stats_dir``: a recipe's
``calibration: {stats_dir: FOLDER}``, ``modelalloy merge --stats-dir``) holds the statistics of
models that have none of their own, one sub-folder per model
(``FOLDER/<model name>-<hash of its path>/K.safetensors``): a read-only model (a shared cache,
a read-only mount) gets its statistics there. Files are written by
:func:`modelalloy.stats.io.save_stats` and every read checks their format, version and kind
(:func:`modelalloy.stats.io.check_metadata`). The engine opens them lazily like weights, so
merging stays streaming.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from modelalloy.errors import CheckpointError, OutputError
from modelalloy.io.checkpoint import Checkpoint, open_checkpoint, read_safetensors_header
from modelalloy.stats.io import check_metadata, stats_path

if TYPE_CHECKING:
    from modelalloy.methods.registry import MethodSpec
    from modelalloy.plan.planner import MergePlan
    from modelalloy.recipe import Recipe


def chosen_path(model: str | Path, kind: str, stats_dir: str | Path) -> Path:
    """Where statistics of ``kind`` for ``model`` live in the statistics folder ``stats_dir``:
    a sub-folder per model, named after it and a hash of its resolved path (two models of one
    name in different places do not share one)."""
    resolved = Path(model).expanduser().resolve()
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:10]
    return Path(stats_dir) / f"{resolved.name}-{key}" / f"{kind}.safetensors"


def find_stats(model: str | Path, kind: str, stats_dir: str | Path | None = None
               ) -> Path | None:
    """The statistics file of ``kind`` for ``model``: its own (next to it) first, then the one
    in ``stats_dir``; None when neither exists."""
    candidates = [stats_path(model, kind)]
    if stats_dir is not None:
        candidates.append(chosen_path(model, kind, stats_dir))
    return next((p for p in candidates if p.is_file()), None)


def save_path(model: str | Path, kind: str, stats_dir: str | Path | None = None) -> Path:
    """Where newly collected statistics of ``model`` go: ``stats_dir`` when given, else next
    to the model, which must then be writable (a read-only model folder is a one-line error
    naming the way to choose a folder, before anything is collected)."""
    if stats_dir is not None:
        return chosen_path(model, kind, stats_dir)
    path = stats_path(model, kind)
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"{path.parent}: not writable, so the '{kind}' statistics of {model} cannot be "
            "saved next to it; choose a statistics folder: stats_dir=FOLDER, or `stats_dir: "
            "FOLDER` under the recipe's calibration", options=("stats_dir",))
    return path


def recipe_stats_dir(recipe: Recipe, stats_dir: str | Path | None = None) -> Path | None:
    """The statistics folder of a merge: ``stats_dir`` when given, else the recipe's
    ``calibration.stats_dir`` (relative to the recipe's folder), else None (next to each
    model)."""
    if stats_dir is not None:
        return Path(stats_dir).expanduser()
    if recipe.calibration is None or recipe.calibration.stats_dir is None:
        return None
    path = Path(recipe.calibration.stats_dir).expanduser()
    return path if path.is_absolute() else recipe.base_dir / path


def stat_owners(recipe: Recipe, spec: MethodSpec) -> list[str]:
    """The recipe's model references whose statistics ``spec`` reads: every expert, or the
    base alone (``stats_from="base"``, AIM)."""
    if spec.stats_from == "base" and recipe.base_model is not None:
        return [recipe.base_model]
    return [e.model for e in recipe.expert_entries()]


def collect_missing(recipe: Recipe, spec: MethodSpec, device: str = "cpu",
                    stats_dir: str | Path | None = None) -> list[Path]:
    """Collect the statistics ``spec`` needs that an expert lacks, on the recipe's
    ``calibration`` data, into the merge's statistics folder (:func:`recipe_stats_dir`) or
    next to each model; returns the files written. Adam second moments (``exp_avg_sq``, OTA)
    need no data: they are read from the optimizer state saved in the model folder, when there
    is one. Without calibration data nothing else is collected (the merge then names what is
    missing and how to collect it)."""
    data = recipe.calibration_path()
    if not spec.stats:
        return []
    from modelalloy.stats.collect import KINDS
    from modelalloy.stats.optimizer import OPTIMIZER_FILES, moments_for_model_dir
    from modelalloy.stats.pipeline import collect_for_model_dir

    cal = recipe.calibration
    folder = recipe_stats_dir(recipe, stats_dir)
    written = []
    for owner in stat_owners(recipe, spec):
        if recipe.adapter_path(owner) is not None:
            # statistics belong to a model folder; an adapted model has none of its own
            raise CheckpointError(
                f"{recipe.source}: method '{spec.name}' needs statistics of '{owner}', a model "
                "with a LoRA adapter; merge the adapter into its model first (`modelalloy "
                "merge` of that one model) and use that folder")
        if recipe.split_bundle_task(owner)[1] is not None:
            # a bundle's experts share its folder: none has a folder for statistics
            raise CheckpointError(
                f"{recipe.source}: method '{spec.name}' needs statistics of '{owner}', an "
                "expert of a TALL bundle; rebuild it into a folder first (`modelalloy rebuild "
                "BUNDLE --task TASK --out FOLDER`) and use that folder")
        model = recipe.model_path(owner)
        for kind in spec.stats:
            if find_stats(model, kind, folder) is not None:
                continue
            if kind == "exp_avg_sq":
                if any((Path(model) / f).is_file() for f in OPTIMIZER_FILES):
                    written.append(moments_for_model_dir(
                        model, out=save_path(model, kind, folder)))
                continue  # none saved: the merge names what is missing
            if data is None or cal is None:
                continue
            if kind not in KINDS:
                raise CheckpointError(
                    f"{model}: method '{spec.name}' needs '{kind}' statistics, which cannot "
                    f"be collected from calibration data (collectable: {', '.join(KINDS)}); "
                    "see docs/statistics.md")
            options = ({"token_fraction": cal.gram_token_fraction}
                       if kind == "gram" and cal.gram_token_fraction < 1.0 else {})
            path, _ = collect_for_model_dir(
                model, data, kind, out=save_path(model, kind, folder),
                batch_size=cal.batch_size, max_length=cal.max_length, limit=cal.limit,
                field=cal.field, device=device, show_progress=False, **options)
            written.append(path)
    return written


class StatsFiles:
    """Per-expert statistic files for one plan; call it with a tensor name."""

    def __init__(self, files: dict[str, list[Checkpoint]]):
        self.files = files
        self._names = {kind: [set(c.names()) for c in ckpts] for kind, ckpts in files.items()}

    @classmethod
    def for_plan(cls, plan: MergePlan, stack: ExitStack,
                 stats_dir: str | Path | None = None) -> StatsFiles | None:
        """Open the statistics the plan's method reads, for each owner (its own, else those in
        ``stats_dir``), checking each file's format, version and kind first."""
        kinds = plan.spec.stats
        if not kinds:
            return None
        owners = plan.experts
        if plan.spec.stats_from == "base" and plan.base is not None:
            owners = [plan.base]
        files: dict[str, list[Checkpoint]] = {}
        for kind in kinds:
            files[kind] = []
            for owner in owners:
                path = find_stats(owner.path, kind, stats_dir)
                if path is None:
                    own = stats_path(owner.path, kind)
                    where = (f"{own} does not exist" if stats_dir is None else
                             f"neither {own} nor {chosen_path(owner.path, kind, stats_dir)} "
                             "exists")
                    raise CheckpointError(
                        f"{owner.path}: method '{plan.spec.name}' needs '{kind}' statistics "
                        f"but {where}; run `modelalloy stats {owner.path} --kind {kind} "
                        "--data FILE` first, or give the recipe `calibration: FILE`")
                files[kind].append(stack.enter_context(open_checkpoint(path)))
                check_metadata(path, read_safetensors_header(path)[1], kind)
        return cls(files)

    def __call__(self, name: str) -> dict[str, list[torch.Tensor | None]]:
        return {kind: [c.get(name).to(torch.float32) if name in names else None
                       for c, names in zip(ckpts, self._names[kind], strict=True)]
                for kind, ckpts in self.files.items()}
