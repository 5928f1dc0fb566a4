"""`modelalloy bench`: build a suite (cached) and compare merging methods on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def _split(value: str | None) -> list[str] | None:
    if value is None or value.strip() in ("", "all"):
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _method_names(flag: str, value: str | None) -> list[str] | None:
    """The method names of ``flag`` (None for all), each checked against the registry so a
    typo fails in a second, not after the suite is built."""
    from modelalloy.errors import MethodError
    from modelalloy.methods import get_method

    names = _split(value)
    for name in names or []:
        try:
            get_method(name)
        except MethodError as err:
            raise MethodError(f"{flag}: {err}") from None
    return names


def _params(text: str | None) -> dict | None:
    """--params as {method: {parameter: value}}, or a one-line error."""
    from modelalloy.errors import MethodError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise MethodError(f"--params is not valid JSON ({getattr(err, 'msg', 'too deep')}); "
                          'write e.g. \'{"ties": {"density": 0.2}}\'') from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise MethodError('--params must map method names to parameter objects, e.g. '
                          '\'{"ties": {"density": 0.2}}\'')
    return value


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        suite: Annotated[str, typer.Option(help="tiny-vision or tiny-lm")] = "tiny-vision",
        methods: Annotated[str, typer.Option(help="comma-separated method names, or 'all'")
                           ] = "all",
        size: Annotated[str, typer.Option(help="smoke (seconds) or full (minutes)")] = "full",
        out: Annotated[Path, typer.Option(help="folder for results.{json,md,png}")
                       ] = Path("bench-out"),
        tune: Annotated[bool, typer.Option(help="also choose lambda on the validation split")
                        ] = True,
        params: Annotated[str | None, typer.Option(
            help='per-method parameter overrides as JSON: {"ties": {"density": 0.2}}')] = None,
        sweep: Annotated[str | None, typer.Option(
            help="also sweep the number of experts merged (2..N) for these methods")] = None,
        long_short: Annotated[bool, typer.Option(
            "--long-to-short", help="also run the long-to-short study (tiny-lm; the pair "
                                    "rebuilt from one shared parent)")] = False,
        study: Annotated[str | None, typer.Option(
            help="run one study instead of the comparison: experts, held-out, long-to-short, "
                 "scale, base-quality (methods default to the study's own)")] = None,
        seeds: Annotated[int, typer.Option(
            min=1, help="rebuild the experts from this many fine-tuning seeds (each a cached "
                        "suite), run the --methods comparison on each (every registered "
                        "method unless --methods names some, as without --seeds: name a few, "
                        "each seed is a whole bench) and report the spread over seeds")] = 1,
        backdoor: Annotated[str | None, typer.Option(
            help="replace this held-in task's expert by its backdoored twin and report each "
                 "method's attack success rate (ASR) next to its accuracy")] = None,
        rebuild: Annotated[bool, typer.Option(help="rebuild the suite even if cached")] = False,
        seed: Annotated[int, typer.Option(help="merge seed (DARE/DELLA masks)")] = 0,
        quiet: Annotated[bool, typer.Option(help="no progress lines")] = False,
    ) -> None:
        """Merge the suite's experts with each method; write a table, JSON and a plot."""
        from modelalloy.extras import require_extra

        require_extra("bench", "bench")
        from modelalloy.bench import load_suite
        from modelalloy.eval.harness import run_bench, sweep_num_experts
        from modelalloy.eval.report import print_table, write_results
        from modelalloy.eval.sweeps import write_sweep

        def log(msg: str) -> None:
            if not quiet:
                typer.echo(msg, err=True)

        # Every option is checked before the suite is built (minutes on a cold cache).
        overrides = _params(params)
        chosen, swept = _method_names("--methods", methods), _method_names("--sweep", sweep)
        if backdoor is not None and (seeds > 1 or study is not None):
            from modelalloy.errors import MethodError

            raise MethodError("--backdoor runs one comparison on one seed (no --seeds, "
                              "no --study)")

        def bench_one(s: Any) -> Any:  # the comparison: seed 0's and every --seeds one's
            return run_bench(s, chosen, tune=tune, params=overrides, seed=seed,
                             log=log)

        if long_short and suite != "tiny-lm":
            from modelalloy.eval.harness import EvalError

            raise EvalError(f"--long-to-short needs --suite tiny-lm (the suite with a long/short "
                            f"pair), not {suite}")
        if study is not None:
            from modelalloy.bench.studies import run_study, write_study

            done = run_study(study, suite, size, chosen, seed=seed, rebuild=rebuild,
                             log=log)
            paths = write_study(done, out, suite, size)
            typer.echo(paths["md"].read_text())
            typer.echo(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
            return
        s = plain = load_suite(suite, size, rebuild=rebuild, log=log)
        if backdoor is not None:
            from modelalloy.bench.backdoor import backdoored_suite

            s = backdoored_suite(s, backdoor, log=log)
        result = bench_one(s)
        paths = write_results(result, out)
        print_table(result.records, f"{suite} ({size})")
        for name, reason in result.skipped.items():
            typer.echo(f"skipped {name}: {reason}")
        if seeds > 1:
            from modelalloy.bench.seeds import run_seeds, seed_spread, seeds_markdown, write_seeds

            others = run_seeds(suite, size, seeds, bench_one, rebuild=rebuild, log=log,
                               first=1)
            rows = seed_spread([result, *others])
            write_seeds(rows, out, f"{suite} ({size})")
            typer.echo(seeds_markdown(rows))
        for name in swept or []:
            rows = sweep_num_experts(s, name, seed=seed, log=log)
            write_sweep(rows, out, name)
        if long_short:  # the pair rebuilt from one shared parent, as --study long-to-short
            from modelalloy.bench.studies import long_to_short_study, write_study

            done = long_to_short_study(plain, chosen, seed, log)
            typer.echo(write_study(done, out, suite, size)["md"].read_text())
        typer.echo(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
