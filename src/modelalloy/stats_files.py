"""Feed data-informed methods their statistics, tensor by tensor, from files next to models.

A statistic of kind K for model M lives in ``M/stats/K.safetensors``; its keys are the
*parameter* names it belongs to (the input Gram matrix of ``x.weight`` is stored under
``x.weight``). The engine opens these lazily like weights, so merging stays streaming.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from modelalloy.errors import CheckpointError
from modelalloy.io.checkpoint import Checkpoint, open_checkpoint, read_safetensors_header

if TYPE_CHECKING:
    from modelalloy.methods.registry import MethodSpec
    from modelalloy.plan.planner import MergePlan
    from modelalloy.recipe import Recipe

STATS_FOLDER = "stats"


def stats_path(model_path: Path, kind: str) -> Path:
    folder = model_path if model_path.is_dir() else model_path.parent
    return folder / STATS_FOLDER / f"{kind}.safetensors"


def collect_missing(recipe: Recipe, spec: MethodSpec, device: str = "cpu") -> list[Path]:
    """Collect the statistics ``spec`` needs that an expert lacks, on the recipe's
    ``calibration`` data; returns the files written. Adam second moments (``exp_avg_sq``, OTA)
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
    owners = [e.model for e in recipe.expert_entries()]
    if spec.stats_from == "base" and recipe.base_model is not None:
        owners = [recipe.base_model]
    written = []
    for owner in owners:
        if recipe.adapter_path(owner) is not None:
            # statistics belong to a model folder; an adapted model has none of its own
            raise CheckpointError(
                f"{recipe.source}: method '{spec.name}' needs statistics of '{owner}', a model "
                "with a LoRA adapter; merge the adapter into its model first (`modelalloy "
                "merge` of that one model) and use that folder")
        model = recipe.model_path(owner)
        for kind in spec.stats:
            if stats_path(model, kind).exists():
                continue
            if kind == "exp_avg_sq":
                if any((Path(model) / f).is_file() for f in OPTIMIZER_FILES):
                    written.append(moments_for_model_dir(model))
                continue  # none saved: the merge names what is missing
            if data is None:
                continue
            if kind not in KINDS:
                raise CheckpointError(
                    f"{model}: method '{spec.name}' needs '{kind}' statistics, which cannot "
                    f"be collected from calibration data (collectable: {', '.join(KINDS)}); "
                    "see docs/statistics.md")
            options = ({"token_fraction": cal.gram_token_fraction}
                       if kind == "gram" and cal.gram_token_fraction < 1.0 else {})
            path, _ = collect_for_model_dir(
                model, data, kind, batch_size=cal.batch_size, max_length=cal.max_length,
                limit=cal.limit, field=cal.field, device=device, show_progress=False,
                **options)
            written.append(path)
    return written


class StatsFiles:
    """Per-expert statistic files for one plan; call it with a tensor name."""

    def __init__(self, files: dict[str, list[Checkpoint]]):
        self.files = files
        self._names = {kind: [set(c.names()) for c in ckpts] for kind, ckpts in files.items()}

    @classmethod
    def for_plan(cls, plan: MergePlan, stack: ExitStack) -> StatsFiles | None:
        from modelalloy.stats.io import check_metadata

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
                path = stats_path(owner.path, kind)
                if not path.exists():
                    raise CheckpointError(
                        f"{owner.path}: method '{plan.spec.name}' needs '{kind}' statistics "
                        f"but {path} does not exist; run `modelalloy stats {owner.path} "
                        f"--kind {kind} --data FILE` first, or give the recipe "
                        "`calibration: FILE`")
                files[kind].append(stack.enter_context(open_checkpoint(path)))
                check_metadata(path, read_safetensors_header(path)[1], kind)
        return cls(files)

    def __call__(self, name: str) -> dict[str, list[torch.Tensor | None]]:
        return {kind: [c.get(name).to(torch.float32) if name in names else None
                       for c, names in zip(ckpts, self._names[kind], strict=True)]
                for kind, ckpts in self.files.items()}
