"""`modelalloy compress` and `modelalloy rebuild`: TALL-mask compression bundles."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from modelalloy.commands._console import cli_message
from modelalloy.errors import ModelAlloyError


def _task_names(experts: list[Path], names: str | None) -> list[str]:
    if names:
        out = [n.strip() for n in names.split(",") if n.strip()]
        if len(out) != len(experts):
            raise typer.BadParameter(f"--names has {len(out)} names for {len(experts)} experts")
    else:
        out = [p.name or str(p) for p in experts]
    if len(set(out)) != len(out):
        raise typer.BadParameter("task names must be unique; pass --names a,b,c")
    return out


def _lambdas(text: str) -> float | list[float]:
    """--mask-lambda: one number, or one per task (comma-separated), each finite and >= 0."""
    from modelalloy.errors import MethodError

    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise MethodError(f"--mask-lambda: {part.strip()!r} is not a number; give one "
                              "value or one per task, comma-separated (e.g. 0.6)") from None
        if not math.isfinite(value) or value < 0:
            raise MethodError(f"--mask-lambda: {part.strip()} must be a finite number >= 0")
        values.append(value)
    return values[0] if len(values) == 1 else values


def register(app: typer.Typer) -> None:
    @app.command("compress")
    def compress_cmd(
        base: Annotated[Path, typer.Argument(help="base model folder or .safetensors file")],
        experts: Annotated[list[Path], typer.Argument(help="expert folders, one per task")],
        out: Annotated[Path, typer.Option("--out", "-o", help="bundle folder to create")],
        names: Annotated[str | None, typer.Option(
            help="comma-separated task names (default: the expert folder names)")] = None,
        base_merge: Annotated[str, typer.Option(
            help="τ_MTL: task_arithmetic or ties")] = "task_arithmetic",
        mask_lambda: Annotated[str, typer.Option(
            help="λ of the TALL masks: one value or one per task, comma-separated")] = "0.6",
        density: Annotated[float, typer.Option(
            help="TIES: fraction of each task vector kept")] = 0.2,
        scope: Annotated[str, typer.Option(
            help="TIES thresholds: global or per_tensor")] = "global",
    ) -> None:
        """Compress experts into a TALL-mask bundle (base + τ_MTL + one bit per weight per task).

        Wang, Dimitriadis et al., ICML 2024. Prints the storage report and each mask's density.
        """
        from modelalloy.bundle import compress_to
        from modelalloy.bundle._checkpoint import lazy_state, side_files

        try:
            tasks = _task_names(experts, names)
            lam = _lambdas(mask_lambda)
            base_sd = lazy_state(base)
            expert_sds = {t: lazy_state(p) for t, p in zip(tasks, experts, strict=True)}
            files = {p.name: p.read_bytes() for p in side_files(base)}
            try:
                report, densities = compress_to(out, base_sd, expert_sds, base_merge=base_merge,
                                                mask_lambda=lam, density=density, scope=scope,
                                                files=files)
            finally:
                for sd in (base_sd, *expert_sds.values()):
                    sd.checkpoint.close()
        except ModelAlloyError as err:
            typer.echo(f"error: {cli_message(err)}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"wrote {out}: {len(tasks)} tasks ({', '.join(tasks)})")
        typer.echo(str(report))
        for task, d in densities.items():
            typer.echo(f"  mask {task}: keeps {100 * d:.1f}% of the weights")

    @app.command("rebuild")
    def rebuild_cmd(
        bundle_dir: Annotated[Path, typer.Argument(help="a bundle folder made by `compress`")],
        task: Annotated[str, typer.Option("--task", "-t", help="task name (or 0-based index)")],
        out: Annotated[Path, typer.Option("--out", "-o", help="model folder to create")],
    ) -> None:
        """Rebuild one expert from a TALL bundle: θ_0 + m_t ⊙ τ_MTL."""
        from modelalloy.bundle import rebuild_to

        try:
            rebuild_to(bundle_dir, int(task) if task.isdigit() else task, out)
        except ModelAlloyError as err:
            typer.echo(f"error: {cli_message(err)}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"wrote {out}: expert '{task}' rebuilt from {bundle_dir}")
