"""`modelalloy merge RECIPE OUTPUT_DIR`: run a recipe into a model folder (or a LoRA adapter)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from modelalloy.commands._console import err, human_bytes, out, state


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge(
        recipe: Annotated[Path, typer.Argument(help="Recipe YAML (mergekit format).")],
        output_dir: Annotated[Path, typer.Argument(help="Folder to create for the merged model.")],
        device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
        seed: Annotated[int | None, typer.Option(help="Overrides the recipe's seed.")] = None,
        threads: Annotated[int | None, typer.Option(
            help="Worker threads (default: one per core, at most 4; with direct I/O two per "
                 "core, at most 4).")] = None,
        memory_budget: Annotated[str | None, typer.Option(
            help="Cap on the process's memory, e.g. 8GB.")] = None,
        shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB.")] = "5GB",
        force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
        allow_nonfinite: Annotated[bool, typer.Option(
            help="Warn instead of failing on NaN/Inf in inputs.")] = False,
        direct_io: Annotated[str, typer.Option(
            help="Read inputs with O_DIRECT: auto (when they exceed free memory), on, off.")]
            = "auto",
        debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
            = False,
        as_adapter: Annotated[bool | None, typer.Option(
            help="Write the merged LoRA adapter (peft's combinations) instead of a model; by "
                 "default when every model is base+adapter of one base.")] = None,
        stats_dir: Annotated[Path | None, typer.Option(
            help="Statistics folder for models without their own (data-informed methods; "
                 "default: MODEL/stats/, which a read-only model cannot hold).")] = None,
    ) -> None:
        """Merge the models of RECIPE into OUTPUT_DIR (written atomically)."""
        state["debug"] = state["debug"] or debug
        from modelalloy.lora.from_recipe import adapter_choice, merge_recipe_adapters

        def say(line: str) -> None:
            err.print(Text(line.replace("as_adapter=False", "--no-as-adapter")), soft_wrap=True)

        as_adapter, the_recipe = adapter_choice(recipe, as_adapter, say)
        if as_adapter:
            merge_recipe_adapters(the_recipe, output_dir, force=force, seed=seed)
            out.print(f"merged the adapters of {recipe} into the adapter {output_dir}")
            return
        from modelalloy.engine.run import run_recipe

        result = run_recipe(the_recipe, output_dir, device=device, seed=seed, threads=threads,
                            memory_budget=memory_budget, shard_size=shard_size, force=force,
                            allow_nonfinite=allow_nonfinite, progress=sys.stderr.isatty(),
                            stats_dir=stats_dir, direct_io=direct_io)
        for warning in result.warnings:
            err.print(Text("warning: ", style="yellow") + Text(warning), soft_wrap=True)
        out.print(f"merged {result.tensors} tensors into {result.path} in {result.seconds:.1f} s:"
                  f" read {human_bytes(result.bytes_read)}, wrote "
                  f"{human_bytes(result.bytes_written)} in {len(result.files)} shard(s), "
                  f"peak RSS {human_bytes(result.peak_rss)}")
