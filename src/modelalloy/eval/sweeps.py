"""Study sweeps from the papers: how many experts are merged, held-in against held-out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelalloy.eval.plotting import new_figure, save_figure


def _pm(x: float, ci: list[float] | None) -> str:
    """``81.5 ± 1.2`` (95% bootstrap half-width) when the row has an interval."""
    return f"{100 * x:.1f}" + (f" ± {50 * (ci[1] - ci[0]):.1f}" if ci else "")


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | k | held-in acc | held-in norm | held-out acc | unmerged acc |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['k']} | "
                     f"{_pm(r['held_in_accuracy'], r.get('held_in_ci'))} | "
                     f"{100 * r['held_in_normalized']:.1f} | "
                     f"{_pm(r['held_out_accuracy'], r.get('held_out_ci'))} | "
                     + ("—" if r["unmerged_accuracy"] != r["unmerged_accuracy"]
                        else f"{100 * r['unmerged_accuracy']:.1f}") + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    ks = sorted({r["k"] for r in rows})

    def mean_at(k: int, key: str) -> float:
        vals = [r[key] for r in rows if r["k"] == k and r[key] == r[key]]
        return 100 * sum(vals) / len(vals) if vals else float("nan")

    fig, ax = new_figure((6, 4))
    for key, label in (("held_in_accuracy", "held-in (merged tasks)"),
                       ("held_out_accuracy", "held-out (never merged)"),
                       ("unmerged_accuracy", "suite tasks left out of the subset")):
        ax.plot(ks, [mean_at(k, key) for k in ks], marker="o", label=label)
    ax.set_xlabel("number of experts merged")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_sweep(rows: list[dict[str, Any]], out_dir: Path, method: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"sweep-{method}.json", "md": out_dir / f"sweep-{method}.md",
             "png": out_dir / f"sweep-{method}.png"}
    paths["json"].write_text(json.dumps(rows, indent=1))
    paths["md"].write_text(f"# Number of experts merged: {method}\n\n{sweep_markdown(rows)}\n")
    plot_sweep(rows, paths["png"], f"{method}: experts merged")
    return paths


def long_to_short_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | parameters | accuracy | mean response length |", "|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "—"
        ci = [r["ci_low"], r["ci_high"]] if "ci_low" in r else None
        lines.append(f"| {r['method']} | {params} | {_pm(r['accuracy'], ci)} | "
                     f"{r['mean_length']:.1f} |")
    return "\n".join(lines)


def plot_long_to_short(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = new_figure((6, 4))
    for r in rows:
        ax.scatter(r["mean_length"], 100 * r["accuracy"])
        label = r["method"] + "".join(f" {k}={v}" for k, v in r["params"].items()
                                      if k in ("lambda", "t"))
        ax.annotate(label, (r["mean_length"], 100 * r["accuracy"]), fontsize=6)
    ax.set_xlabel("mean response length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("long-to-short merging")
    return save_figure(fig, path)
