"""`modelalloy extract-lora`: a fine-tuned model as a PEFT LoRA adapter of its base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("extract-lora")
    def extract_lora_cmd(
        model: Annotated[Path, typer.Argument(help="the fine-tuned model folder")],
        base: Annotated[Path, typer.Option("--base", help="the base model it was tuned from")],
        out: Annotated[Path, typer.Option("--out", "-o", help="adapter folder to create")],
        rank: Annotated[int | None, typer.Option(help="rank of every adapted weight")] = None,
        energy: Annotated[float | None, typer.Option(
            help="instead of --rank: keep this share of each Δ's Σσ² (0-1], rank per tensor")
        ] = None,
        include: Annotated[list[str] | None, typer.Option(
            help="only tensors whose name matches this regex (repeatable)")] = None,
        exclude: Annotated[list[str] | None, typer.Option(
            help="leave out tensors whose name matches this regex (repeatable)")] = None,
        skip_undecomposable: Annotated[bool, typer.Option(
            help="leave out changed norms and other non-matrix weights instead of saving "
                 "them whole (modules_to_save)")] = False,
        dtype: Annotated[str | None, typer.Option(
            help="dtype of the factors (default: the model's)")] = None,
        force: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    ) -> None:
        """Truncated SVD of (MODEL − BASE) per weight, written as a PEFT LoRA adapter.

        Prints the reconstruction error: ‖Δ − B·A‖_F / ‖Δ‖_F over the adapted weights (by
        Eckart–Young, the energy of the dropped singular values).
        """
        from modelalloy.lora.extract import extract_lora

        report = extract_lora(model, base, out, rank=rank, energy=energy, include=include,
                              exclude=exclude, skip_other=skip_undecomposable, dtype=dtype,
                              force=force)
        ranks = [m.rank for m in report.modules if m.rank]
        share = report.adapter_bytes / max(1, report.model_bytes)
        typer.echo(f"wrote {out}: {len(ranks)} LoRA modules (rank {min(ranks, default=0)}-"
                   f"{max(ranks, default=0)}), {len(report.saved)} saved whole, "
                   f"{report.adapter_bytes / 1e6:.2f} MB ({share:.1%} "
                   f"of the model)")
        typer.echo(f"relative reconstruction error ‖Δ − B·A‖_F / ‖Δ‖_F: "
                   f"{report.relative_error:.4g}")
        if report.dropped:
            typer.echo(f"warning: {len(report.dropped)} changed tensor(s) not in the adapter "
                       f"(biases of adapted modules, excluded or skipped), e.g. "
                       f"{report.dropped[0]}", err=True)
