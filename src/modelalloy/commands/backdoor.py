"""`modelalloy backdoor`: merges with a backdoored expert, clean accuracy and attack success."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from modelalloy.commands._console import cli_message
from modelalloy.errors import ModelAlloyError


def register(app: typer.Typer) -> None:
    @app.command("backdoor")
    def backdoor_cmd(
        suite: Annotated[str, typer.Option(help="tiny-vision or tiny-lm")] = "tiny-vision",
        size: Annotated[str, typer.Option(help="smoke or full")] = "full",
        task: Annotated[str | None, typer.Option(
            help="the task whose expert is backdoored (default: the first held-in task)")
                        ] = None,
        methods: Annotated[str, typer.Option(help="comma-separated")
                           ] = "task_arithmetic,ties,adamerging,dam",
        out: Annotated[Path, typer.Option(help="folder for backdoor.{json,md}")
                       ] = Path("bench-out"),
        adamerging_steps: Annotated[int, typer.Option(help="AdaMerging steps")] = 1000,
        dam_mask_steps: Annotated[int, typer.Option(help="DAM mask steps")] = 1000,
        dam_adamerging_steps: Annotated[int, typer.Option(
            help="DAM's final AdaMerging steps")] = 1000,
        granularity: Annotated[str, typer.Option(
            help="layer or task: AdaMerging's and DAM's coefficients")] = "layer",
        dam_final_mask: Annotated[str, typer.Option(
            help="sample (one concrete sample of the mask, as the official code) or "
                 "expected (sigmoid of the logits)")] = "sample",
        threads: Annotated[int, typer.Option(help="torch threads")] = 1,
    ) -> None:
        """Clean accuracy and attack success rate (ASR) of merges with a backdoored expert."""
        import torch

        from modelalloy.bench import load_suite
        from modelalloy.bench.backdoor_bench import BackdoorConfig, backdoor_bench, markdown

        torch.set_num_threads(threads)

        def log(msg: str) -> None:
            typer.echo(msg, err=True)

        try:
            s = load_suite(suite, size, log=log)
            cfg = BackdoorConfig(adamerging_steps=adamerging_steps,
                                 dam_mask_steps=dam_mask_steps,
                                 dam_adamerging_steps=dam_adamerging_steps,
                                 granularity=granularity, dam_final_mask=dam_final_mask)
            result = backdoor_bench(s, task, [m.strip() for m in methods.split(",")], cfg,
                                    log=log)
        except ModelAlloyError as err:
            typer.echo(f"error: {cli_message(err)}", err=True)
            raise typer.Exit(1) from None
        out.mkdir(parents=True, exist_ok=True)
        (out / "backdoor.json").write_text(json.dumps(result, indent=1))
        text = markdown(result)
        (out / "backdoor.md").write_text(text + "\n")
        typer.echo(text)
