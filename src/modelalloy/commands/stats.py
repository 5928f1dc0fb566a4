"""`modelalloy stats MODEL --data FILE --kind gram|fisher|activations` and
`modelalloy stats MODEL --kind exp_avg_sq [--compress rank1]` (no data: the saved Adam state)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("stats")
    def stats(
        model: Annotated[Path, typer.Argument(help="Hugging Face model folder.")],
        data: Annotated[Path | None, typer.Option(
            "--data", help="Calibration data: .txt (a prompt per line), .jsonl (text/prompt "
                           "[+response] or input_ids), or .safetensors/.pt input tensor. "
                           "Not used by exp_avg_sq.")] = None,
        kind: Annotated[str, typer.Option(
            "--kind", help="gram (RegMean), fisher (Fisher merging), activations (AIM), or "
                           "exp_avg_sq (OTA / FFG: Adam's second moments saved with the model)"
            )] = "gram",
        out: Annotated[Path | None, typer.Option(
            "--out", help="Output .safetensors (default MODEL/stats/KIND.safetensors).")]
            = None,
        batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass.")] = 8,
        max_length: Annotated[int, typer.Option(min=1, help="Tokens kept per example.")] = 512,
        limit: Annotated[int | None, typer.Option(help="Use the first N examples.")] = None,
        device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
        field: Annotated[str | None, typer.Option(help="JSONL text field.")] = None,
        include: Annotated[str | None, typer.Option(
            help="Regex: only parameters whose name matches.")] = None,
        include_padding: Annotated[bool, typer.Option(
            help="Count padding tokens (reference RegMean does).")] = False,
        fisher_mode: Annotated[str, typer.Option(
            help="Fisher: sampled, exact (classifiers), hard or empirical.")] = "sampled",
        optimizer: Annotated[Path | None, typer.Option(
            help="exp_avg_sq: the optimizer state file (default: MODEL/optimizer.safetensors, "
                 "MODEL/exp_avg_sq.safetensors or MODEL/optimizer.pt).")] = None,
        compress: Annotated[str, typer.Option(
            help="exp_avg_sq: none, or rank1 (AdaFactor-lemma reconstruction r cᵀ/Σv).")]
            = "none",
        gram_token_fraction: Annotated[float, typer.Option(
            help="gram: keep each token with this probability (seeded; the Gram is divided "
                 "by it, so unbiased). 1 = exact.")] = 1.0,
        seed: Annotated[int, typer.Option(help="gram: seed of the token subsample.")] = 0,
    ) -> None:
        """Collect statistics of MODEL on calibration data and save them next to it."""
        from modelalloy.extras import require_extra

        require_extra("hf", "stats")
        from modelalloy.errors import CheckpointError
        from modelalloy.stats.pipeline import collect_for_model_dir

        if kind == "exp_avg_sq":
            from modelalloy.stats.optimizer import moments_for_model_dir

            if compress not in ("none", "rank1"):
                raise CheckpointError(f"--compress must be none or rank1, not {compress!r}")
            path = moments_for_model_dir(model, optimizer, compress=compress, out=out)
            typer.echo(f"wrote {kind} statistics to {path}")
            return
        if data is None:
            raise CheckpointError(f"--kind {kind} collects from calibration data: pass "
                                  "--data FILE")
        options: dict = {"include": include}
        if kind in ("gram", "activations"):
            options["mask_padding"] = not include_padding
        if not 0.0 < gram_token_fraction <= 1.0:
            raise CheckpointError(f"--gram-token-fraction must be in (0, 1], not "
                                  f"{gram_token_fraction}")
        if kind == "gram" and gram_token_fraction < 1.0:
            options["token_fraction"] = gram_token_fraction
            options["seed"] = seed
        if kind == "fisher":
            options["mode"] = fisher_mode
        path, seconds = collect_for_model_dir(model, data, kind, out=out,
                                              batch_size=batch_size, max_length=max_length,
                                              limit=limit, device=device, field=field,
                                              show_progress=sys.stderr.isatty(), **options)
        typer.echo(f"wrote {kind} statistics to {path} ({seconds:.1f} s)")
