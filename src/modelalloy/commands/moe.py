"""`modelalloy moe`: dense experts of one base assembled into a Mixtral-style sparse model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("moe")
    def moe_cmd(
        recipe: Annotated[Path, typer.Argument(help="MoE recipe YAML (mergekit-moe format)")],
        out: Annotated[Path, typer.Option("--out", "-o", help="model folder to create")],
        shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 5GB")] = "5GB",
        force: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    ) -> None:
        """Build a sparse MoE model (Mixtral; Qwen2-MoE with a shared expert): the base's
        attention, each expert's MLP, routers from prompts (gate_mode hidden, hidden_avg,
        cheap_embed) or random."""
        from modelalloy.moe import build_moe

        result = build_moe(recipe, out, force=force, shard_size=shard_size,
                           progress=sys.stderr.isatty())
        typer.echo(f"wrote {result.path} ({result.architecture}): {result.experts} experts x "
                   f"{result.layers} layers, "
                   f"{result.tensors} tensors")
