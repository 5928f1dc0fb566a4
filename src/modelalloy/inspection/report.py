"""Rendering an inspection: rows of numbers, a terminal table, PNG heatmaps, one HTML page."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from modelalloy.inspection.collect import Inspection
from modelalloy.inspection.metrics import TensorSums
from modelalloy.io.writer import AtomicOutputDir


def labels(inspection: Inspection) -> list[str]:
    """Short expert labels: the folder name (``+adapter`` kept), numbered when they clash."""
    names = [os.path.basename(m.rstrip("/")) or m for m in inspection.experts]
    return names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]


def row(sums: TensorSums) -> dict[str, object]:
    """The measures of one group, as plain numbers."""
    pairs = sums.pairs()
    mean = (lambda xs: sum(xs) / len(xs) if xs else 0.0)  # noqa: E731
    return {
        "norms": sums.norms(),
        "cosines": {f"{i}-{j}": sums.cosine(i, j) for i, j in pairs},
        "mean_cosine": mean([sums.cosine(i, j) for i, j in pairs]),
        "sign_conflict_rate": sums.conflict_rate(),
        "ties_overlap": mean([sums.ties_overlap(i, j) for i, j in pairs]),
        "tall_overlap": mean([sums.tall_overlap(i, j) for i, j in pairs]),
        "surviving": [sums.surviving(i) for i in range(sums.n)],
        "elements": sums.numel,
    }


def _layer_key(k: object) -> tuple[int, int]:
    return (1, 0) if k is None else (0, int(k))


def tables(inspection: Inspection) -> dict[str, list[tuple[str, dict]]]:
    by_layer = inspection.grouped("layer")
    by_family = inspection.grouped("family")
    return {
        "layer": [("other" if k is None else str(k), row(by_layer[k]))
                  for k in sorted(by_layer, key=_layer_key)],
        "family": [(str(k), row(v)) for k, v in sorted(by_family.items())],
        "total": [("all", row(inspection.total()))],
    }


def print_tables(inspection: Inspection, console) -> None:
    from rich.table import Table

    names = labels(inspection)
    for title, rows in tables(inspection).items():
        if title == "total":
            continue
        table = Table(title=f"task-vector interference per {title} ({inspection.method})")
        table.add_column(title)
        for n in names:
            table.add_column(f"‖τ‖ {n}", justify="right")
        for col in ("mean cos", "sign conflict", "TIES overlap", "TALL overlap"):
            table.add_column(col, justify="right")
        for n in names:
            table.add_column(f"kept {n}", justify="right")
        for key, r in rows + tables(inspection)["total"]:
            table.add_row(key, *[f"{x:.3g}" for x in r["norms"]], f"{r['mean_cosine']:+.3f}",
                          f"{r['sign_conflict_rate']:.1%}", f"{r['ties_overlap']:.1%}",
                          f"{r['tall_overlap']:.1%}", *[f"{x:.1%}" for x in r["surviving"]])
        console.print(table)


def _heatmap(path: Path, values: list[list[float]], rows: list[str], cols: list[str],
             title: str, cmap: str, vmin: float | None = None, vmax: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(cols) + 2.5),
                                    max(2.0, 0.35 * len(rows) + 1.2)))
    image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), cols, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heatmaps(inspection: Inspection, folder: Path) -> list[Path]:
    """PNGs: per layer × (expert pair | family | expert) grids of the measures."""
    layers = sorted({r.layer for r in inspection.records}, key=_layer_key)
    cols = ["other" if k is None else str(k) for k in layers]
    families = sorted({r.family for r in inspection.records if r.layer is not None})
    names = labels(inspection)
    cells: dict[tuple, TensorSums] = {}
    for r in inspection.records:
        for key in ((r.layer, r.family), (r.layer, None)):
            cells.setdefault(key, TensorSums.zeros(len(names))).add(r.sums)

    def grid(keys, measure) -> list[list[float]]:
        return [[measure(cells[(layer, k)]) if (layer, k) in cells else float("nan")
                 for layer in layers] for k in keys]

    total = inspection.total()
    out = []
    pairs = total.pairs()
    specs = [
        ("cosine.png", [(None, p) for p in pairs], [f"{names[i]} · {names[j]}" for i, j in pairs],
         lambda s, p: s.cosine(*p), "cosine of task vectors", "coolwarm", -1, 1),
        ("norms.png", [(None, i) for i in range(len(names))], names,
         lambda s, i: s.norms()[i], "‖τ‖ per layer", "viridis", None, None),
        ("surviving.png", [(None, i) for i in range(len(names))], names,
         lambda s, i: s.surviving(i), f"share of ‖τ‖² surviving {inspection.method}",
         "viridis", 0, 1),
    ]
    for name, keys, rows, measure, title, cmap, lo, hi in specs:
        values = [[measure(cells[(layer, None)], k[1]) for layer in layers] for k in keys]
        if rows:
            _heatmap(folder / name, values, rows, cols, title, cmap, lo, hi)
            out.append(folder / name)
    for name, measure, title in (
        ("sign_conflicts.png", TensorSums.conflict_rate, "sign-conflict rate"),
        ("ties_overlap.png", lambda s: _mean_pairs(s, s.ties_overlap), "TIES mask overlap"),
        ("tall_overlap.png", lambda s: _mean_pairs(s, s.tall_overlap), "TALL mask overlap"),
    ):
        if families:
            _heatmap(folder / name, grid(families, measure), families, cols, title, "magma", 0, 1)
            out.append(folder / name)
    return out


def _mean_pairs(s: TensorSums, f) -> float:
    pairs = s.pairs()
    return sum(f(i, j) for i, j in pairs) / len(pairs) if pairs else 0.0


def write_report(inspection: Inspection, out: Path, force: bool = False) -> Path:
    """``out/`` with report.json, the heatmaps and report.html (appears when complete)."""
    with AtomicOutputDir(Path(out), force=force) as tmp:
        folder = Path(tmp)
        data = {
            "recipe": str(inspection.recipe.source), "method": inspection.method,
            "experts": inspection.experts, "seconds": inspection.seconds,
            "tables": {k: dict(v) for k, v in tables(inspection).items()},
            "tensors": {r.name: {"layer": r.layer, "family": r.family, **row(r.sums)}
                        for r in inspection.records},
        }
        (folder / "report.json").write_text(json.dumps(data, indent=1))
        pngs = heatmaps(inspection, folder)
        (folder / "report.html").write_text(_html(inspection, pngs))
    return Path(out)


def _html(inspection: Inspection, pngs: list[Path]) -> str:
    names = labels(inspection)
    parts = ["<html><head><meta charset='utf-8'><title>modelalloy inspect</title>"
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "</style></head><body>",
             f"<h1>Interference of {len(names)} experts ({html.escape(inspection.method)})</h1>",
             f"<p>Recipe <code>{html.escape(str(inspection.recipe.source))}</code>; experts: "
             + ", ".join(f"<code>{html.escape(n)}</code>" for n in inspection.experts) + "</p>"]
    for png in pngs:
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"<h3>{html.escape(png.stem.replace('_', ' '))}</h3>"
                     f"<img src='data:image/png;base64,{data}'>")
    for title, rows in tables(inspection).items():
        head = "".join(f"<th>{h}</th>" for h in [title, *[f"‖τ‖ {n}" for n in names],
                                                    "mean cos", "sign conflict", "TIES overlap",
                                                    "TALL overlap",
                                                    *[f"kept {n}" for n in names]])
        body = "".join(
            "<tr><td>" + html.escape(k) + "</td>"
            + "".join(f"<td>{x:.3g}</td>" for x in r["norms"])
            + f"<td>{r['mean_cosine']:+.3f}</td><td>{r['sign_conflict_rate']:.1%}</td>"
            + f"<td>{r['ties_overlap']:.1%}</td><td>{r['tall_overlap']:.1%}</td>"
            + "".join(f"<td>{x:.1%}</td>" for x in r["surviving"]) + "</tr>"
            for k, r in rows)
        parts.append(f"<h2>per {title}</h2><table><tr>{head}</tr>{body}</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
