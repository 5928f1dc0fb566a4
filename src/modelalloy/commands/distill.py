"""`modelalloy distill`: merge experts (of any architecture) by distilling them into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelalloy.commands._console import cli_message
from modelalloy.errors import ModelAlloyError


def register(app: typer.Typer) -> None:
    @app.command("distill")
    def distill_cmd(
        recipe: Annotated[Path, typer.Argument(
            help="recipe: the teachers (models), base_model and merge_method (warm start)")],
        data: Annotated[str, typer.Option(
            help="a .txt / .jsonl file of texts, or suite:tiny-lm[:SIZE] (teacher-labelled "
                 "prompts)")],
        out: Annotated[Path, typer.Option("--out", "-o", help="student folder to create")],
        student: Annotated[str, typer.Option(
            help="merge (the recipe's merge as warm start), base, or a model folder")
                           ] = "merge",
        steps: Annotated[int, typer.Option(help="training steps")] = 200,
        lr: Annotated[float, typer.Option(help="Adam learning rate")] = 1e-3,
        batch: Annotated[int, typer.Option(help="examples per step")] = 16,
        lam: Annotated[float, typer.Option("--lambda", help="λ of λ·CE + (1−λ)·KL")] = 0.9,
        temperature: Annotated[float, typer.Option(help="distillation temperature")] = 1.0,
        feature_weight: Annotated[float, typer.Option(
            help="β of the hidden-feature term (teachers of the student's width)")] = 0.0,
        fusion: Annotated[str, typer.Option(help="min_ce, inverse_ce or mean")] = "min_ce",
        styles: Annotated[bool, typer.Option(
            help="DMM: a style-promptable student, one learned style vector per teacher "
                 "(styles.safetensors next to the model)")] = False,
        alignment: Annotated[str, typer.Option(
            help="heterogeneous tokenizers: exact (string match) or edit (then minimum edit "
                 "distance; the distill extra)")] = "exact",
        per_task: Annotated[int, typer.Option(help="suite data: prompts per task")] = 64,
        teacher: Annotated[list[Path] | None, typer.Option(
            help="an extra teacher folder (any architecture); repeatable")] = None,
        checkpoint_dir: Annotated[Path | None, typer.Option(
            help="checkpoint folder (default OUT.ckpt)")] = None,
        checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")
                                    ] = 100,
        resume: Annotated[bool, typer.Option(help="continue from the checkpoint")] = False,
        seed: Annotated[int, typer.Option(help="batch order seed")] = 0,
        threads: Annotated[int | None, typer.Option(
            help="torch threads (1 is fastest for tiny models on a busy machine)")] = None,
        force: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    ) -> None:
        """Train one student to match several teachers' logits (KL) on unlabeled data."""
        from modelalloy.distill.run import run_distill
        from modelalloy.distill.train import DistillConfig

        cfg = DistillConfig(steps=steps, lr=lr, batch=batch, lam=lam, temperature=temperature,
                            feature_weight=feature_weight,
                            checkpoint_every=checkpoint_every, seed=seed,
                            threads=threads, alignment=alignment, styles=styles)
        try:
            report = run_distill(
                recipe, data, out, student=student, cfg=cfg, fusion=fusion, per_task=per_task,
                checkpoint_dir=checkpoint_dir or out.with_name(out.name + ".ckpt"),
                resume=resume, force=force,
                extra_teachers={p.name: p for p in teacher or []},
                log=lambda m: typer.echo(m, err=True))
        except ModelAlloyError as err:
            typer.echo(f"error: {cli_message(err)}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"wrote {out}: {report['examples']} examples, {steps} steps in "
                   f"{report['train_seconds']} s (targets {report['label_seconds']} s); KL "
                   f"{report['kl_before']:.4f} -> {report['kl_after']:.4f}")
