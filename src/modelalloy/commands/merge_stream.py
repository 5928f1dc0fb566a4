"""`modelalloy merge-stream`: continual merging (OPCM) of models given one after another."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelalloy.commands._console import cli_message
from modelalloy.errors import ModelAlloyError


def register(app: typer.Typer) -> None:
    @app.command("merge-stream")
    def merge_stream_cmd(
        base: Annotated[Path, typer.Argument(help="base model folder or .safetensors file")],
        models: Annotated[list[Path], typer.Argument(help="fine-tuned models, in arrival "
                                                     "order")],
        out: Annotated[Path, typer.Option("--out", "-o", help="output model folder")],
        alpha: Annotated[float, typer.Option(help="OPCM energy fraction α")] = 0.5,
        exclude: Annotated[str, typer.Option(
            help="regex of 2-D tensors that are not projected (embeddings)")] =
            r"(embed|wte|wpe|position|token_type|shared)",
        device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
        shuffle: Annotated[bool, typer.Option(
            help="shuffle the arrival order (the paper reports means over orders)")] = False,
        seed: Annotated[int, typer.Option(help="seed of --shuffle")] = 0,
        allow_nonfinite: Annotated[bool, typer.Option(
            help="merge even if a model holds NaN/Inf values (a warning names them)")] = False,
    ) -> None:
        """Merge models arriving one at a time with OPCM (continual merging).

        Tang et al., 2025. Runs the recipe method `opcm` over the models in arrival order
        through the merge engine (the checks and output folder of `modelalloy merge`). Memory
        stays at the running merge and one tensor of the base and the incoming model, however
        many models arrive.
        """
        from modelalloy.commands._options import device_option, regex_option
        from modelalloy.engine.stream import merge_stream

        try:
            regex_option("--exclude", exclude)
            device_option("--device", device)
            if out.exists():
                raise ModelAlloyError(f"{out}: already exists; choose a new output folder")
            if not models:
                raise ModelAlloyError("merge-stream needs at least one model after the base")
            if shuffle:
                import random

                models = list(models)
                random.Random(seed).shuffle(models)
            done = merge_stream(base, models, out, alpha=alpha, exclude=exclude, device=device,
                                allow_nonfinite=allow_nonfinite)
        except ModelAlloyError as err:
            typer.echo(f"error: {cli_message(err)}", err=True)
            raise typer.Exit(1) from None
        for warning in done.merge.warnings:
            typer.echo(f"warning: {warning}", err=True)
        for step, (path, norm) in enumerate(zip(models, done.task_norms, strict=True), 1):
            typer.echo(f"[{step}/{len(models)}] {path}: ‖τ‖ = {norm:.4g}")
        typer.echo(f"merged ‖Δ‖ = {done.merged_norm:.4g} (the mean ‖τ‖)")
        typer.echo(f"wrote {out}")
