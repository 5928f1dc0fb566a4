"""`modelalloy twin build` and `modelalloy twin bench`: Twin-Merging bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from modelalloy.commands._console import cli_message
from modelalloy.errors import ModelAlloyError, RecipeError


def _file_router_data(path: Path, tasks: list[str], base: Path, batch: int) -> dict[str, list]:
    """JSONL lines {"task": name, "text": ...} tokenized with the base's tokenizer."""
    from transformers import AutoTokenizer

    from modelalloy.io.safe_read import open_regular
    from modelalloy.stats.data import token_batches

    # A FIFO or device named as data is refused before it is read (it would block or never end).
    with open(open_regular(path, RecipeError, "router data file"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    texts: dict[str, list[str]] = {t: [] for t in tasks}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task, text = row["task"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RecipeError(f"{path}:{n}: expected a JSON object with 'task' and 'text'"
                              ) from None
        if task not in texts:
            raise RecipeError(f"{path}:{n}: task '{task}' is not one of the experts "
                              f"({', '.join(tasks)})")
        texts[task].append(text)
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return {t: token_batches(v, tok, batch_size=batch, pad_token_id=pad)
            for t, v in texts.items() if v}


def _load_models(recipe: Any, names: str | None) -> tuple[Path, dict[str, Path]]:
    from modelalloy.twin.shared import SHARED_METHODS

    if recipe.merge_method not in SHARED_METHODS:
        raise RecipeError(f"{recipe.source}: merge_method '{recipe.merge_method}': the shared "
                          f"expert of Twin-Merging is one of {', '.join(SHARED_METHODS)}")
    if recipe.base_model is None:
        raise RecipeError(f"{recipe.source}: base_model is required for Twin-Merging")
    paths = [recipe.model_path(e.model) for e in recipe.expert_entries()]
    tasks = [n.strip() for n in names.split(",")] if names else [p.name for p in paths]
    if len(tasks) != len(paths) or len(set(tasks)) != len(tasks):
        raise RecipeError(f"{recipe.source}: need one unique task name per expert "
                          f"(got {tasks}); pass --names a,b,c")
    return recipe.model_path(recipe.base_model), dict(zip(tasks, paths, strict=True))


def _table(records: list[dict[str, Any]]) -> list[str]:
    from modelalloy.eval.harness import summarize

    lines = ["| method | setting | mean acc | norm acc | held-out acc |", "|---|---|---|---|---|"]
    for row in summarize(records):
        lines.append(f"| {row['method']} | {row['variant']} | {100 * row['accuracy']:.1f} | "
                     f"{100 * row['normalized_accuracy']:.1f} | "
                     f"{100 * row['held_out_accuracy']:.1f} |")
    return lines


def register(app: typer.Typer) -> None:
    twin = typer.Typer(no_args_is_help=True,
                       help="Twin-Merging: shared merge + low-rank exclusive knowledge + router.")
    app.add_typer(twin, name="twin")

    @twin.command("build")
    def build_cmd(
        recipe_path: Annotated[Path, typer.Argument(
            metavar="RECIPE", help="recipe: merge_method task_arithmetic or ties (the shared "
                                   "expert), base_model, the experts")],
        out: Annotated[Path, typer.Option("--out", "-o", help="bundle folder to create")],
        data: Annotated[str, typer.Option(
            help="router data: suite:NAME[:SIZE] (its validation split) or a JSONL file of "
                 '{"task": ..., "text": ...}')],
        names: Annotated[str | None, typer.Option(
            help="task names, comma-separated (default: the expert folder names)")] = None,
        density: Annotated[float, typer.Option(help="rank = density × min(m, n)")] = 0.1,
        router_epochs: Annotated[int, typer.Option(help="router training epochs")] = 50,
        router_batch: Annotated[int, typer.Option(min=1, help="router batch size")] = 1024,
        router_hidden: Annotated[int | None, typer.Option(
            help="router MLP width (default 2 × the hidden size, the paper's)")] = None,
        seed: Annotated[int, typer.Option(help="router seed")] = 0,
        force: Annotated[bool, typer.Option(help="replace an existing bundle")] = False,
    ) -> None:
        """Build a Twin-Merging bundle (shared model, factors, router, twin.json)."""
        from modelalloy.bundle._checkpoint import side_files
        from modelalloy.io.checkpoint import read_state_dict
        from modelalloy.recipe.load import load_recipe
        from modelalloy.twin import build_bundle
        from modelalloy.twin.bundle import state_bytes
        from modelalloy.twin.folders import module_for_folder
        from modelalloy.twin.shared import recipe_params

        def log(msg: str) -> None:
            typer.echo(msg, err=True)

        try:
            recipe = load_recipe(recipe_path)
            base_path, expert_paths = _load_models(recipe, names)
            tasks = list(expert_paths)
            if data.startswith("suite:"):
                from modelalloy.bench import load_suite
                from modelalloy.twin.suite_bench import router_data

                _, name, *size = data.split(":")
                suite = load_suite(name, size[0] if size else "full", log=log)
                router = router_data(suite, tasks)
            else:
                router = _file_router_data(Path(data), tasks, base_path, 32)
            base = read_state_dict(base_path)
            experts = {t: read_state_dict(p) for t, p in expert_paths.items()}
            bundle = build_bundle(base, experts, module_for_folder(base_path), router,
                                  shared_method=recipe.merge_method,
                                  shared_params=recipe_params(recipe), density=density,
                                  router_epochs=router_epochs, router_batch=router_batch,
                                  router_hidden=router_hidden, seed=seed, log=log)
            files = {p.name: p.read_bytes() for p in side_files(base_path)}
            bundle.save(out, files=files, force=force,
                        experts_bytes=sum(state_bytes(sd) for sd in experts.values()))
        except ModelAlloyError as err:
            typer.echo(f"error: {cli_message(err)}", err=True)
            raise typer.Exit(1) from None
        s = bundle.sizes
        typer.echo(f"wrote {out}: {len(tasks)} experts ({', '.join(tasks)}); "
                   f"{s['bundle_bytes']} bytes = {s.get('ratio')} × the experts' "
                   f"{s.get('experts_bytes')} (shared {s['shared_bytes']}, factors "
                   f"{s['factors_bytes']}, router {s['router_bytes']})")

    @twin.command("bench")
    def bench_cmd(
        suite: Annotated[str, typer.Option(help="tiny-vision or tiny-lm")] = "tiny-vision",
        size: Annotated[str, typer.Option(help="smoke or full")] = "full",
        out: Annotated[Path, typer.Option(help="folder for twin-results.{json,md}")
                       ] = Path("bench-out"),
        density: Annotated[str, typer.Option(help="densities, comma-separated")] = "0.1",
        shared: Annotated[str, typer.Option(help="shared merges, comma-separated")
                          ] = "task_arithmetic,ties",
        routing: Annotated[str, typer.Option(help="sample, top1, batch (comma-separated)")
                           ] = "sample,top1",
        router_epochs: Annotated[int, typer.Option(help="router training epochs")] = 50,
        router_batch: Annotated[int, typer.Option(min=1, help="router batch size")] = 1024,
        router_hidden: Annotated[int | None, typer.Option(
            help="router MLP width (default 2 × the hidden size)")] = None,
        threads: Annotated[int, typer.Option(
            help="torch threads (1: the suites' models are tiny)")] = 1,
    ) -> None:
        """Twin-Merging on a suite against its shared merges: table, JSON, storage."""
        from modelalloy.bench import load_suite
        from modelalloy.twin.suite_bench import twin_bench

        def log(msg: str) -> None:
            typer.echo(msg, err=True)

        import torch

        torch.set_num_threads(threads)
        try:
            s = load_suite(suite, size, log=log)
            result = twin_bench(s, densities=tuple(float(d) for d in density.split(",")),
                                shared_methods=tuple(shared.split(",")),
                                routings=tuple(routing.split(",")),
                                router_epochs=router_epochs, router_batch=router_batch,
                                router_hidden=router_hidden, log=log)
        except ModelAlloyError as err:
            typer.echo(f"error: {cli_message(err)}", err=True)
            raise typer.Exit(1) from None
        out.mkdir(parents=True, exist_ok=True)
        (out / "twin-results.json").write_text(json.dumps(result, indent=1))
        lines = _table(result["records"])
        (out / "twin-results.md").write_text("\n".join(lines) + "\n")
        typer.echo("\n".join(lines))
        for key, b in result["bundles"].items():
            typer.echo(f"{key}: bundle {b['bundle_bytes']} B = {b.get('ratio')} × experts; "
                       f"router held-out acc {b['router']['holdout_accuracy']:.3f}; "
                       f"eval {b['eval_seconds']} s (the shared model alone: "
                       f"{b['shared_eval_seconds']} s)")
