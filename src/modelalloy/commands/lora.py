"""`modelalloy extract-lora`: a fine-tuned model as a PEFT LoRA adapter of its base."""

from __future__ import annotations

import sys
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
        embed_lora: Annotated[bool, typer.Option(
            help="decompose the embeddings and output head too (default: saved whole, as "
                 "mergekit)")] = False,
        dtype: Annotated[str | None, typer.Option(
            help="dtype of the factors (default: the model's)")] = None,
        threads: Annotated[int | None, typer.Option(help="worker threads (default: ≤4)")] = None,
        svd_clamp: Annotated[float | None, typer.Option(
            help="clip both factors to ±(this quantile of their values), e.g. 0.99 (peft's "
                 "svd_clamp)")] = None,
        svd_driver: Annotated[str | None, typer.Option(
            help="cuSOLVER's gesvd, gesvdj or gesvda (CUDA only; the CPU runs LAPACK's "
                 "gesdd)")] = None,
        device: Annotated[str, typer.Option(help="where the SVDs run: cpu or cuda")] = "cpu",
        force: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    ) -> None:
        """Truncated SVD of (MODEL − BASE) per weight, written as a PEFT LoRA adapter.

        Prints the reconstruction error: ‖Δ − B·A‖_F / ‖Δ‖_F over the adapted weights (by
        Eckart–Young, the energy of the dropped singular values).
        """
        from modelalloy.commands._options import device_option, regex_option
        from modelalloy.lora.extract import extract_lora

        regex_option("--include", include)
        regex_option("--exclude", exclude)
        device_option("--device", device)
        report = extract_lora(model, base, out, rank=rank, energy=energy, include=include,
                              exclude=exclude, skip_other=skip_undecomposable,
                              embed_lora=embed_lora, dtype=dtype,
                              force=force, threads=threads, progress=sys.stderr.isatty(),
                              svd_clamp=svd_clamp, svd_driver=svd_driver, device=device)
        ranks = [m.rank for m in report.modules if m.rank]
        share = report.adapter_bytes / max(1, report.model_bytes)
        typer.echo(f"wrote {out}: {len(ranks)} LoRA modules (rank {min(ranks, default=0)}-"
                   f"{max(ranks, default=0)}), {len(report.saved)} saved whole, "
                   f"{report.adapter_bytes / 1e6:.2f} MB ({share:.1%} "
                   f"of the model)")
        typer.echo(f"relative reconstruction error ‖Δ − B·A‖_F / ‖Δ‖_F: "
                   f"{report.relative_error:.4g} (SVD: {_svd_used(svd_driver, device)})")
        if report.dropped:
            typer.echo(f"warning: {len(report.dropped)} changed tensor(s) not in the adapter "
                       f"(biases of adapted modules, excluded or skipped), e.g. "
                       f"{report.dropped[0]}", err=True)

    @app.command("merge-adapters")
    def merge_adapters_cmd(
        adapters: Annotated[list[str], typer.Argument(
            help="PEFT LoRA adapter folders of one base, each optionally FOLDER:WEIGHT")],
        out: Annotated[Path, typer.Option("--out", "-o", help="adapter folder to create")],
        combination: Annotated[str, typer.Option(
            help="linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune (and the "
                 "*_svd forms): peft's add_weighted_adapter rules")] = "linear",
        density: Annotated[float, typer.Option(help="ties/dare/magnitude_prune: share kept")
                           ] = 1.0,
        majority_sign: Annotated[str, typer.Option(help="ties: total or frequency")
                                 ] = "total",
        svd_rank: Annotated[int | None, typer.Option(
            help="svd forms: rank of the result (default: the largest input rank)")] = None,
        seed: Annotated[int, typer.Option(help="seeds the DARE masks")] = 0,
        svd_clamp: Annotated[float | None, typer.Option(
            help="clip both factors to ±(this quantile of their values), e.g. 0.99 (peft's "
                 "svd_clamp)")] = None,
        svd_driver: Annotated[str | None, typer.Option(
            help="cuSOLVER's gesvd, gesvdj or gesvda (CUDA only; the CPU runs LAPACK's "
                 "gesdd)")] = None,
        device: Annotated[str, typer.Option(help="where the SVDs run: cpu or cuda")] = "cpu",
        force: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    ) -> None:
        """Merge LoRA adapters into one adapter (no model is read or written)."""
        from modelalloy.commands._options import device_option
        from modelalloy.errors import AdapterError
        from modelalloy.lora.combine import merge_adapters

        device_option("--device", device)
        folders, weights = [], []
        for item in adapters:
            folder, _, weight = item.rpartition(":") if ":" in item else (item, "", "1")
            try:
                weights.append(float(weight))
            except ValueError:
                raise AdapterError(f"{item}: the weight after ':' must be a number") from None
            folders.append(Path(folder))
        merge_adapters(folders, weights, out, combination, density=density,
                       sign_method=majority_sign, svd_rank=svd_rank, seed=seed, force=force,
                       svd_clamp=svd_clamp, svd_driver=svd_driver, device=device)
        how = f" (SVD: {_svd_used(svd_driver, device)})" if "svd" in combination else ""
        typer.echo(f"wrote {out}: {len(folders)} adapters merged with '{combination}'{how}")


def _svd_used(driver: str | None, device: str) -> str:
    """The routine torch.linalg.svd ran: the CPU has one (LAPACK gesdd); CUDA the chosen one."""
    from modelalloy.lora.svd import CPU_DRIVER

    if not device.startswith("cuda"):
        return f"LAPACK {CPU_DRIVER} on the CPU"
    return f"cuSOLVER {driver or 'default'} on {device}"
