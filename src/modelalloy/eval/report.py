"""Render bench results: a terminal/markdown table, results.json and a per-task accuracy plot.

The table and the plot compare merges (and the base and expert references); bundle records
(variant "bundle": experts rebuilt from a compression bundle, not merges) get a table of their
own, "bundles", with each rebuilt expert's accuracy on its own task and the storage ratio.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from modelalloy.eval.harness import (
    BUNDLE_VARIANT,
    REFERENCE_METHOD,
    BenchResult,
    summarize,
)
from modelalloy.eval.plotting import new_figure, save_figure

BUNDLE_TITLE = "bundles, not merges: rebuilt experts, each on its own task"
BUNDLE_NOTE = ("A bundle stores the base, one merged task vector and a small per-task part "
               "(TALL: a 1-bit mask per weight) and rebuilds each expert from them; it is not "
               "one multi-task model, so it is not in the table above. *kept* = rebuilt ÷ the "
               "original expert on its task; *storage ratio* = the bundle's bytes ÷ base + "
               "experts stored separately.")


INTERVAL_NOTE = ("`x ± h`: the value and the half-width of its 95% percentile-bootstrap "
                 "interval over the test examples (2000 resamples, seed 0; the exact bounds are "
                 "`ci_low`/`ci_high` in results.json). *Δ vs TA*: the held-in mean minus task "
                 "arithmetic's (same variant), resampled over the same examples; `*` marks an "
                 "interval that excludes 0.")


ASR_NOTE = ("*ASR succession*: the attack success rate (share of triggered test inputs, true "
            "label ≠ target, answered with the target) on the backdoored expert's task; *ASR "
            "transfer*: its mean on the other merged tasks; `± h` as for accuracy.")


def has_asr(records: list[dict[str, Any]]) -> bool:
    """Whether the records come from a backdoored suite (they carry attack success)."""
    return any("asr" in r for r in records)


def row_label(row: dict[str, Any]) -> str:
    if row["variant"] == "tuned":
        if "lambda" in row["params"]:
            return f"{row['method']} (λ={row['params']['lambda']} on val)"
        knob = _scale_of(row["method"])
        return f"{row['method']} ({knob}={row['params'].get(knob)} on val)"
    return row["method"]


def _scale_of(method: str) -> str | None:
    """The parameter a tuned row of ``method`` chose (its spec's ``facts.scale``)."""
    from modelalloy.errors import MethodError
    from modelalloy.methods import get_method

    try:
        return get_method(method).facts.scale
    except MethodError:  # a row that is not a registry method
        return None


def _pct(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ci(x: float | None, ci: list[float] | None) -> str:
    """``81.5 ± 1.2``: the value and the half-width of its 95% interval, in points."""
    if ci is None or x is None or (isinstance(x, float) and math.isnan(x)):
        return _pct(x)
    return f"{100 * x:.1f} ± {50 * (ci[1] - ci[0]):.1f}"


def delta_cell(row: dict[str, Any], reference: str = REFERENCE_METHOD) -> str:
    """The difference from the reference in points, ``±`` its paired 95% half-width, and
    ``*`` where the interval excludes 0; "ref" on the reference's own rows."""
    if row["method"] == reference:
        return "ref"
    d = row.get("delta")
    if not d:
        return "—"
    mark = " *" if d["significant"] else ""
    return f"{100 * d['value']:+.1f} ± {50 * (d['ci'][1] - d['ci'][0]):.1f}{mark}"


def verdict(row: dict[str, Any], margin: float = 0.01) -> str:
    """Whether the row shows a gain over the reference: "shows" (the paired interval lies
    above 0), "does not show" (it lies below ``margin``: no gain of a point or more is
    compatible with the data), or "cannot tell" (it straddles both)."""
    d = row.get("delta")
    if not d:
        return "—"
    return interval_verdict(*d["ci"], margin=margin)


def interval_verdict(low: float, high: float, margin: float = 0.01) -> str:
    """A claimed increase judged from its 95% interval [low, high]: "shows" (above 0), "does
    not show" (below ``margin``), "cannot tell" (it straddles both). A claimed decrease: pass
    the interval negated, ``(-high, -low)``."""
    if low > 0:
        return "shows"
    if high < margin:
        return "does not show"
    return "cannot tell"


def _order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ref = {"base": 0, "expert": 1}
    return sorted(rows, key=lambda r: (ref.get(r["method"], 2), r["method"],
                                       r["variant"] != "default"))


def merge_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records the merge table and the plot compare: merges, base and experts."""
    return [r for r in records if r["variant"] != BUNDLE_VARIANT]


def bundle_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["variant"] == BUNDLE_VARIANT]


def _tasks(records: list[dict[str, Any]]) -> tuple[list[str], dict[str, bool]]:
    """Task names in first-seen order, and whether each is held out."""
    held: dict[str, bool] = {}
    for r in records:
        held.setdefault(r["task"], r["held_out"])
    return list(held), held


def table_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The merge table: one row per (method, variant), bundle records left out."""
    records = merge_records(records)
    tasks, held = _tasks(records)
    asr = has_asr(records)
    header = (["method", "mean acc", "Δ vs TA", "norm acc", "held-out acc", "mean len"]
              + (["ASR succession", "ASR transfer"] if asr else [])
              + [t + (" (held-out)" if held[t] else "") for t in tasks])
    body = []
    for row in _order(summarize(records)):
        cis = row.get("per_task_ci", {})
        body.append([row_label(row), _ci(row["accuracy"], row.get("accuracy_ci")),
                     delta_cell(row), _ci(row["normalized_accuracy"], row.get("normalized_ci")),
                     _ci(row["held_out_accuracy"], row.get("held_out_ci")),
                     f"{row['mean_length']:.1f}"]
                    + ([_ci(row.get(f"asr_{e}"), row.get(f"asr_{e}_ci"))
                        for e in ("succession", "transfer")] if asr else [])
                    + [_ci(row["per_task"].get(t), cis.get(t)) for t in tasks])
    return header, body


def bundle_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The bundles table: per bundle method, the mean over its rebuilt experts, the fraction of
    the experts' accuracy kept, the storage ratio and each rebuilt expert on its own task."""
    records = bundle_records(records)
    tasks, _ = _tasks(records)
    header = ["bundle", "mean acc", "kept", "storage ratio"] + tasks
    body = []
    for row in summarize(records):
        ratio = next(r.get("storage_ratio") for r in records if r["method"] == row["method"])
        body.append([row["method"], _ci(row["accuracy"], row.get("accuracy_ci")),
                     _ci(row["normalized_accuracy"], row.get("normalized_ci")),
                     "—" if ratio is None else f"{ratio:.3f}"]
                    + [_ci(row["per_task"].get(t), row.get("per_task_ci", {}).get(t))
                       for t in tasks])
    return header, body


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The merge table (bundles are in :func:`bundle_markdown_table`)."""
    return _markdown(*table_rows(records))


def bundle_markdown_table(records: list[dict[str, Any]]) -> str:
    """The bundles table, or "" when no bundle method ran."""
    header, body = bundle_rows(records)
    return _markdown(header, body) if body else ""


def results_markdown(result: BenchResult) -> str:
    out = [f"# {result.suite} ({result.size}): merging methods compared", "",
           "Accuracy in %, on each task's test split. *mean acc* and *norm acc* (merged ÷ the "
           "task's own expert) average the merged (held-in) tasks; *held-out acc* averages the "
           "tasks that were never merged. The expert row shows each expert on its own task. "
           + INTERVAL_NOTE + (" " + ASR_NOTE if has_asr(result.records) else ""), "",
           markdown_table(result.records), ""]
    if result.tuning:
        out += ["Scaling coefficient chosen on the validation split:", ""]
        for name, t in result.tuning.items():
            if "skipped" in t:
                out.append(f"- {name}: {t['skipped']}")
                continue
            scores = ", ".join(f"{k}: {100 * v:.1f}" for k, v in t["val_scores"].items())
            out.append(f"- {name}: {t['param']} = {t['chosen']} (validation accuracy {scores})")
        out.append("")
    if result.skipped:
        out += ["Skipped:", ""] + [f"- {k}: {v}" for k, v in result.skipped.items()] + [""]
    if result.build_seconds:
        out += [f"Suite build time: {result.build_seconds:.1f}s (cached at "
                f"`{result.suite_path}`).", ""]
    bundles = bundle_markdown_table(result.records)
    if bundles:
        out += ["## Bundles (not merges)", "", "Each expert rebuilt from the bundle, scored on "
                "its own task. " + BUNDLE_NOTE, "", bundles, ""]
    return "\n".join(out).rstrip("\n") + "\n"


def print_table(records: list[dict[str, Any]], title: str = "") -> None:
    """The merge table on the terminal, then the bundles table when a bundle method ran."""
    _print(*table_rows(records), title)
    header, body = bundle_rows(records)
    if body:
        _print(header, body, BUNDLE_TITLE)


def _print(header: list[str], body: list[list[str]], title: str) -> None:
    """A rich table (plain text when rich is unavailable)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a core dependency
        print(title)
        for row in [header, *body]:
            print("  ".join(row))
        return
    table = Table(title=title or None)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in body:
        table.add_row(*row)
    Console(width=max(120, 15 * len(header))).print(table)


def plot_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The plot's bar groups: the merge table's rows (no bundles), tuned variants where a method
    has one (they are the comparable ones), defaults only for methods without."""
    rows = _order(summarize(merge_records(records)))
    tuned = {r["method"] for r in rows if r["variant"] == "tuned"}
    return [r for r in rows if r["variant"] != "default" or r["method"] not in tuned]


def plot(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Grouped bars: per-task accuracy per row of :func:`plot_rows`."""
    rows = plot_rows(records)
    tasks, held = _tasks(merge_records(records))
    fig, ax = new_figure((max(8.0, 1.1 * len(tasks) + 2), 4.8))
    width = 0.8 / max(1, len(rows))
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(tasks))]
        ys = [100 * (row["per_task"].get(t) or 0.0) for t in tasks]
        cis = [row.get("per_task_ci", {}).get(t) for t in tasks]
        err = None if None in cis else [[y - 100 * c[0] for y, c in zip(ys, cis, strict=True)],
                                        [100 * c[1] - y for y, c in zip(ys, cis, strict=True)]]
        ax.bar(xs, ys, width, yerr=err, label=row_label(row), color=cmap(i % 20),
               error_kw={"elinewidth": 0.6, "capsize": 0})
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([t + ("\n(held-out)" if held[t] else "") for t in tasks], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "per-task accuracy")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def write_results(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    """DIR/results.json (the records list), DIR/summary.json (one row per method and variant,
    with the intervals and the verdict), DIR/results.md, DIR/results.png, DIR/run.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md",
             "png": out_dir / "results.png", "run": out_dir / "run.json",
             "summary": out_dir / "summary.json"}
    paths["json"].write_text(json.dumps(result.records, indent=1))
    paths["summary"].write_text(json.dumps([{**row, "verdict": verdict(row)}
                                            for row in summarize(result.records)], indent=1))
    paths["run"].write_text(json.dumps({k: v for k, v in result.to_json().items()
                                        if k != "records"}, indent=1))
    paths["md"].write_text(results_markdown(result))
    plot(result.records, paths["png"], f"{result.suite} ({result.size})")
    return paths
