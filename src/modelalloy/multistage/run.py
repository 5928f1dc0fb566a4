"""Running the stages in order: each is an ordinary streaming merge into ``work/<name>``.

``lazy``: a stage whose output exists and whose ``modelalloy_stage.json`` holds the same
recipe hash is skipped. The hash covers the stage's canonical recipe YAML and the hashes of
the stages it uses, so changing a stage re-runs it and everything built on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelalloy.errors import RecipeError
from modelalloy.multistage.graph import Stage, load_stages, order_stages

STAGE_FILE = "modelalloy_stage.json"


@dataclass
class StageOutcome:
    name: str
    output: Path
    ran: bool  # False: skipped (--lazy, up to date)
    seconds: float = 0.0


def stage_hash(stage: Stage, upstream: dict[str, str]) -> str:
    h = hashlib.sha256(stage.recipe.to_yaml().encode())
    for dep in stage.depends:
        h.update(f"\x00{dep}\x00{upstream[dep]}".encode())
    return h.hexdigest()


def _recorded_hash(folder: Path) -> str | None:
    try:
        return json.loads((folder / STAGE_FILE).read_text())["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record(folder: Path, name: str, digest: str) -> None:
    tmp = folder / f".{STAGE_FILE}.tmp"
    tmp.write_text(json.dumps({"stage": name, "hash": digest}) + "\n")
    os.replace(tmp, folder / STAGE_FILE)


def run_stages(recipe: str | Path, work: Path, out: Path | None = None, *, lazy: bool = True,
               force: bool = False, **merge_options: Any) -> list[StageOutcome]:
    """Run every stage of a multi-stage recipe; returns what ran and what was skipped."""
    from modelalloy.engine.run import run_recipe

    work = Path(work)
    stages = order_stages(load_stages(recipe, work))
    if any(s.name is None for s in stages) and out is None:
        raise RecipeError(f"{recipe}: has a final (unnamed) merge; give out=PATH for it",
                          options=("out",))
    threads = merge_options.get("threads")
    if threads is not None and threads < 1:
        raise RecipeError(f"threads={threads}: must be at least 1 (leave it out for the "
                          "default)", options=("threads",))
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a read-only or missing parent
        raise RecipeError(f"{work}: cannot create the work folder there "
                          f"({e.strerror or e}); give a folder path") from None
    hashes: dict[str, str] = {}
    outcomes = []
    for stage in stages:
        target = Path(out) if stage.name is None else work / stage.name
        digest = stage_hash(stage, hashes)
        hashes[stage.name or ""] = digest
        label = stage.name or "final"
        if lazy and target.is_dir() and _recorded_hash(target) == digest:
            outcomes.append(StageOutcome(label, target, ran=False))
            continue
        # our own earlier output (intermediates, or a stale final we recorded) is replaced
        replace = force or stage.name is not None or _recorded_hash(target) is not None
        result = run_recipe(stage.recipe, target, force=replace, **merge_options)
        _record(target, label, digest)
        outcomes.append(StageOutcome(label, target, ran=True, seconds=result.seconds))
    return outcomes
