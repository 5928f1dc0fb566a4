"""`modelalloy eval`: score one model folder on a built-in suite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

SPLITS = ("test", "val")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        model: Annotated[str, typer.Argument(
            help="a model folder (model.safetensors), a Twin-Merging bundle, an expert of a "
                 "TALL-masks bundle (BUNDLE#TASK), or 'base' / 'expert:TASK' of the suite")],
        suite: Annotated[str, typer.Option(help="tiny-vision or tiny-lm")] = "tiny-vision",
        size: Annotated[str, typer.Option(help="smoke or full")] = "full",
        split: Annotated[str, typer.Option(help="test or val")] = "test",
        json_out: Annotated[Path | None, typer.Option("--json", help="write records here")
                            ] = None,
        routing: Annotated[str, typer.Option(
            help="Twin-Merging bundles: sample, top1 or batch")] = "sample",
    ) -> None:
        """Per-task accuracy, normalized accuracy, held-out accuracy, response length."""
        from modelalloy.extras import require_extra

        require_extra("bench", "eval")
        from modelalloy.bench import load_suite
        from modelalloy.errors import ModelAlloyError
        from modelalloy.eval.harness import SuiteScorer, load_model_folder, summarize
        from modelalloy.eval.report import print_table

        if split not in SPLITS:
            raise ModelAlloyError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")

        from modelalloy.twin import is_twin_bundle

        twin_bundle = is_twin_bundle(model)
        suite_model = model == "base" or model.startswith("expert:")
        # a model folder is read (and checked) before the suite is built or loaded
        folder_sd = None if twin_bundle or suite_model else load_model_folder(model)
        s = load_suite(suite, size, log=lambda m: typer.echo(m, err=True))
        scorer = SuiteScorer(s, split=split)
        if twin_bundle:
            from modelalloy import twin
            from modelalloy.twin.suite_bench import module_records

            routed = twin.load(model, s.new_model(), routing=routing)
            records = module_records(scorer, Path(model).name, routed, variant="eval",
                                     params={"routing": routing})
            print_table(records, f"{model} on {suite} ({size}), routing {routing}")
            row = summarize(records)[0]
            typer.echo(f"mean accuracy (held-in): {row['accuracy']:.4f}  normalized: "
                       f"{row['normalized_accuracy']:.4f}  held-out: "
                       f"{row['held_out_accuracy']:.4f}")
            if json_out is not None:
                json_out.write_text(json.dumps({"records": records}, indent=1))
            return
        if model == "base":
            sd = s.base_state_dict()
        elif model.startswith("expert:"):
            sd = s.expert_state_dict(model.split(":", 1)[1])
        else:
            sd = folder_sd
        records = scorer.records(Path(model).name or model, sd, variant="eval")
        print_table(records, f"{model} on {suite} ({size})")
        general = s.general_metrics(sd)
        for key, value in general.items():
            typer.echo(f"{key}: {value:.4f}")
        row = summarize(records)[0]
        typer.echo(f"mean accuracy (held-in): {row['accuracy']:.4f}  normalized: "
                   f"{row['normalized_accuracy']:.4f}  held-out: {row['held_out_accuracy']:.4f}")
        if json_out is not None:
            json_out.write_text(json.dumps({"records": records, "general": general}, indent=1))
