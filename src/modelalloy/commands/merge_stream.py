"""`modelalloy merge-stream`: continual merging (OPCM) of models given one after another."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    ) -> None:
        """Merge models arriving one at a time with OPCM (continual merging).

        Tang et al., 2025. Memory stays at the base, the running merge and the incoming model,
        however many models arrive.
        """
        from modelalloy.bundle._checkpoint import lazy_state, load_state_dict, save_model_folder
        from modelalloy.commands._options import device_option, regex_option
        from modelalloy.continual import OPCM

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
            merger = OPCM(load_state_dict(base), alpha=alpha, exclude=exclude, device=device)
            for path in models:
                incoming = lazy_state(path)  # read tensor by tensor inside add()
                try:
                    norm = merger.add(incoming)
                finally:
                    incoming.checkpoint.close()
                typer.echo(f"[{merger.count}/{len(models)}] {path}: ‖τ‖ = "
                           f"{merger.norms[-1]:.4g}, merged ‖Δ‖ = {norm:.4g}")
            save_model_folder(merger.merged(), out, model_files_from=base)
        except ModelAlloyError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"wrote {out}")
