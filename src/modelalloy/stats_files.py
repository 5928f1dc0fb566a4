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
from modelalloy.io.checkpoint import Checkpoint, open_checkpoint

if TYPE_CHECKING:
    from modelalloy.plan.planner import MergePlan

STATS_FOLDER = "stats"


def stats_path(model_path: Path, kind: str) -> Path:
    folder = model_path if model_path.is_dir() else model_path.parent
    return folder / STATS_FOLDER / f"{kind}.safetensors"


class StatsFiles:
    """Per-expert statistic files for one plan; call it with a tensor name."""

    def __init__(self, files: dict[str, list[Checkpoint]]):
        self.files = files
        self._names = {kind: [set(c.names()) for c in ckpts] for kind, ckpts in files.items()}

    @classmethod
    def for_plan(cls, plan: MergePlan, stack: ExitStack) -> StatsFiles | None:
        kinds = plan.spec.stats
        if not kinds:
            return None
        files: dict[str, list[Checkpoint]] = {}
        for kind in kinds:
            files[kind] = []
            for expert in plan.experts:
                path = stats_path(expert.path, kind)
                if not path.exists():
                    raise CheckpointError(
                        f"{expert.path}: method '{plan.spec.name}' needs '{kind}' statistics "
                        f"but {path} does not exist; run `modelalloy stats {expert.path} "
                        f"--kind {kind} --data FILE` first")
                files[kind].append(stack.enter_context(open_checkpoint(path)))
        return cls(files)

    def __call__(self, name: str) -> dict[str, list[torch.Tensor | None]]:
        return {kind: [c.get(name).to(torch.float32) if name in names else None
                       for c, names in zip(ckpts, self._names[kind], strict=True)]
                for kind, ckpts in self.files.items()}
