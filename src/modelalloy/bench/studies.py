"""The seed papers' studies, one command each: ``modelalloy bench --study NAME``.

- ``experts``: merge k = 2..N experts (random subsets): held-in against held-out accuracy.
- ``held-out``: does a merge generalise to tasks it never saw better than the base, or than any
  single expert? (held-out accuracy, paired difference from the base).
- ``long-to-short`` (tiny-lm): a chain-of-thought expert merged with a direct-answer one:
  final-answer accuracy against response length, and the difference from the long expert.
- ``scale``: the suite at three model sizes (about 0.5×, 1× and 4× the parameters).
- ``base-quality``: the suite on bases pre-trained for three lengths.

"What Matters for Model Merging at Scale" (Yadav et al. 2024) claims that larger models and
stronger bases merge better (normalised accuracy up), that merges generalise to held-out tasks,
and that methods converge at scale (the spread between methods shrinks); the last two studies
report exactly those quantities, each size/base a cached suite of its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelalloy.bench.variant_claims import claim_rows, method_changes, same_test_examples
from modelalloy.eval.harness import (
    EvalError,
    SuiteScorer,
    long_to_short,
    run_bench,
    summarize,
    sweep_num_experts,
)
from modelalloy.eval.intervals import difference_interval, mean_interval, significant
from modelalloy.eval.plotting import new_figure, save_figure
from modelalloy.eval.report import row_label

STUDY_NAMES = ("experts", "held-out", "long-to-short", "scale", "base-quality",
               "cpt-chat-vector")
DEFAULT_METHODS: dict[str, list[str]] = {
    "experts": ["task_arithmetic"],
    "held-out": ["linear", "task_arithmetic", "ties"],
    "long-to-short": ["linear", "task_arithmetic", "ties", "slerp"],
    "scale": ["linear", "task_arithmetic", "ties"],
    "base-quality": ["linear", "task_arithmetic", "ties"],
    "cpt-chat-vector": ["task_arithmetic", "ties", "widen", "linear"],
}
# Suite variants per study, suite and size. Scale changes the width (tiny-vision: convolution
# channels; tiny-lm: the embedding size) for about 0.5×, 1× and 4× the parameters (the tables
# give the exact counts); base quality the pre-training length (the suite's own is the longest).
_SCALE = {("tiny-vision", "full"): ("width", 8, 56), ("tiny-vision", "smoke"): ("width", 2, 14),
          ("tiny-lm", "full"): ("n_embd", 96, 256), ("tiny-lm", "smoke"): ("n_embd", 22, 64)}
# tiny-vision's base saturates by 100 steps (a probe on its features: 57% after 0 steps, 64%
# after 15, 71% from 100 on), so the weak bases are pre-trained for a few steps only.
_PRETRAIN_STEPS = {("tiny-vision", "full"): (5, 20, 800),
                   ("tiny-vision", "smoke"): (40, 80, 150),
                   ("tiny-lm", "full"): (600, 1200, 2400), ("tiny-lm", "smoke"): (30, 60, 120)}


def _variants() -> dict[tuple[str, str, str], list[tuple[str, dict[str, Any]]]]:
    """(label, build-config overrides) per (study, suite, size); {} is the suite itself."""
    out: dict[tuple[str, str, str], list[tuple[str, dict[str, Any]]]] = {}
    for (suite, size), (key, small, large) in _SCALE.items():
        out[("scale", suite, size)] = [("0.5×", {key: small}), ("1×", {}), ("4×", {key: large})]
    for (suite, size), steps in _PRETRAIN_STEPS.items():
        out[("base-quality", suite, size)] = [
            (f"{n} steps", {"pretrain_steps": n} if n != steps[-1] else {}) for n in steps]
    return out


VARIANTS = _variants()


@dataclass
class Study:
    name: str
    title: str
    rows: list[dict[str, Any]]
    table: str
    note: str = ""
    findings: list[str] = field(default_factory=list)
    plot: Callable[[Path], Path] | None = None


def _pm(x: float | None, ci: Sequence[float] | None) -> str:
    if x is None or x != x:
        return "—"
    return f"{100 * x:.1f}" + (f" ± {50 * (ci[1] - ci[0]):.1f}" if ci else "")


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def _delta_text(value: float, low: float, high: float) -> str:
    return f"{100 * value:+.1f} ± {50 * (high - low):.1f}" + (" *" if significant(low, high)
                                                               else "")


# ---------------------------------------------------------------------------------------------


def experts_study(suite: Any, methods: list[str], seed: int, log: Callable[[str], None]
                  ) -> Study:
    from modelalloy.eval.sweeps import plot_sweep, sweep_markdown

    repeats = 2 if len(suite.info.merged_tasks) <= 8 else 1
    rows = [r for m in methods for r in sweep_num_experts(suite, m, repeats=repeats, seed=seed,
                                                           log=log)]
    note = (f"Merging k = 2..N experts ({repeats} random subsets per k, the papers' default "
            "parameters): *held-in* = the k merged tasks, *held-out* = tasks never merged, "
            "*unmerged* = the suite's tasks this subset left out.")
    return Study("experts", "number of experts merged", rows, sweep_markdown(rows), note,
                 plot=lambda p: plot_sweep(rows, p, "experts merged"))


def held_out_study(suite: Any, methods: list[str], seed: int, log: Callable[[str], None]
                   ) -> Study:
    """Held-out accuracy of each merge against the base's (paired) and each single expert's."""
    result = run_bench(suite, methods, seed=seed, log=log)
    scorer = SuiteScorer(suite)
    held = suite.info.held_out_tasks
    if not held:
        raise EvalError(f"{suite.info.name} ({suite.info.size}) has no held-out tasks")
    records = list(result.records)
    for task in suite.info.merged_tasks:  # a single expert, on the tasks nobody merged
        records += scorer.records(f"expert:{task}", suite.expert_state_dict(task),
                                  variant="single", tasks=held)
    hits = {(r["method"], r["variant"], r["task"]): r["correct"] for r in records}
    base = [hits[("base", "reference", t)] for t in held]
    rows: list[dict[str, Any]] = []
    for row in summarize(records):
        if row["method"] in ("expert",):
            continue
        vecs = [hits[(row["method"], row["variant"], t)] for t in held]
        d, lo, hi = difference_interval(vecs, base)
        rows.append({"method": row["method"], "variant": row["variant"],
                     "params": row["params"], "held_in_accuracy": row["accuracy"],
                     "held_in_ci": row.get("accuracy_ci"),
                     "held_out_accuracy": row["held_out_accuracy"],
                     "held_out_ci": list(mean_interval(vecs)[1:]),
                     "vs_base": d, "vs_base_ci": [lo, hi]})
    singles = [r for r in rows if r["variant"] == "single"]
    best_single = max(singles, key=lambda r: r["held_out_accuracy"])
    body = [[row_label(r), "—" if r["variant"] == "single" else
             _pm(r["held_in_accuracy"], r["held_in_ci"]),
             _pm(r["held_out_accuracy"], r["held_out_ci"]),
             "ref" if r["method"] == "base" else _delta_text(r["vs_base"], *r["vs_base_ci"])]
            for r in rows]
    merges = [r for r in rows if r["variant"] in ("default", "tuned")]
    findings = []
    for r in merges:
        lo, hi = r["vs_base_ci"]
        word = "above" if lo > 0 else "below" if hi < 0 else "not distinguishable from"
        findings.append(f"{row_label(r)}: held-out {100 * r['held_out_accuracy']:.1f}, {word} the "
                        f"base ({100 * r['vs_base']:+.1f}); best single expert "
                        f"{best_single['method']} {100 * best_single['held_out_accuracy']:.1f}")
    note = (f"Held-out tasks ({', '.join(held)}) are never merged. *Δ vs base*: held-out mean "
            "minus the base's, paired over the same examples (95% bootstrap, `*` = excludes 0). "
            "`expert:TASK` rows are one expert alone on the held-out tasks.")
    return Study("held-out", "held-in vs held-out", rows,
                 _markdown(["model", "held-in acc", "held-out acc", "Δ held-out vs base"], body),
                 note, findings, plot=lambda p: _plot_held_out(rows, p))


def long_to_short_study(suite: Any, methods: list[str] | None, seed: int,
                        log: Callable[[str], None]) -> Study:
    """The L2S pair rebuilt from one shared parent (:mod:`modelalloy.bench.lm_l2s`) merged by
    ``methods`` (None: every two-model method): accuracy, length and the paired difference from
    the long expert."""
    from modelalloy.bench.lm_l2s import L2SCase

    if suite.info.name != "tiny-lm":
        raise EvalError("study long-to-short needs the tiny-lm suite")
    # The pair rebuilt from one shared parent, as the L2S paper's models relate (the suite's
    # own pair is fine-tuned far apart and every merge of it collapses: findings).
    rows = long_to_short(L2SCase.build(suite, log=log), methods, seed=seed, log=log)
    long_row = rows[1]
    body, findings = [], []
    for r in rows:
        d, lo, hi = difference_interval([r["correct"]], [long_row["correct"]])
        r["vs_long"], r["vs_long_ci"] = d, [lo, hi]
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "—"
        body.append([r["method"], params, _pm(r["accuracy"], [r["ci_low"], r["ci_high"]]),
                     "ref" if r is long_row else _delta_text(d, lo, hi),
                     f"{r['mean_length']:.1f}"])
        if r is not long_row and not r["method"].startswith(("expert", "base")) and \
                lo > -0.02 and r["mean_length"] < 0.8 * long_row["mean_length"]:
            findings.append(f"{r['method']} {params}: within 2 points of the long expert "
                            f"({100 * d:+.1f}, interval {100 * lo:+.1f}..{100 * hi:+.1f}) at "
                            f"{r['mean_length']:.1f} tokens against {long_row['mean_length']:.1f}")
    if not findings:
        findings.append("no merge keeps the long expert's accuracy within 2 points (interval "
                        "lower bound) at a response under 80% of its length")
    note = ("θ_P = the tiny-lm base fine-tuned on digit sums in both formats; the long and "
            "short experts = θ_P fine-tuned 200 small steps on one format each; merges over "
            "θ_P. Final-answer accuracy on the pair's shared test prompts and mean response "
            "length (characters + EOS); *Δ vs long*: paired difference from the long "
            "(chain-of-thought) expert (95% bootstrap, `*` = excludes 0).")
    from modelalloy.eval.sweeps import plot_long_to_short

    return Study("long-to-short", "long-to-short merging", rows,
                 _markdown(["model", "parameters", "accuracy", "Δ vs long", "mean length"],
                           body), note, findings,
                 plot=lambda p: plot_long_to_short(rows, p))


def cpt_chat_vector_study(suite: Any, methods: list[str], seed: int,
                          log: Callable[[str], None]) -> Study:
    """Merge a continually pre-trained model with an instruct model of the same base
    (:mod:`modelalloy.bench.lm_cpt`): skills on the old alphabets (held-in) and on the new one
    (domain), each merge's difference from the chat-vector recipe paired."""
    from modelalloy.bench.lm_cpt import CptCase
    from modelalloy.eval.harness import merge_experts, paper_settings, resolve_methods

    if suite.info.name != "tiny-lm":
        raise EvalError("study cpt-chat-vector needs the tiny-lm suite")
    case = CptCase.build(suite, log=log)
    base = case.state_dict("base")
    models = [case.state_dict("cpt"), case.state_dict("instruct")]
    entries: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("base", {}, base), ("cpt", {}, models[0]), ("instruct", {}, models[1])]
    for spec in resolve_methods(methods):
        settings = ([{"lambda": 1.0}, {"lambda": 0.5}] if spec.name == "task_arithmetic"
                    else [paper_settings(spec)])
        for given in settings:
            name = "chat vector (TA λ=1)" if given == {"lambda": 1.0} else spec.name
            entries.append((name, given, merge_experts(spec, base, models, given, seed)))
            log(f"cpt-chat-vector: {name} merged")
    held = suite.info.merged_tasks
    rows: list[dict[str, Any]] = []
    for name, given, sd in entries:
        res = case.evaluate(sd)
        old = [res[t]["correct"] for t in held]
        new = [res[f"domain:{t}"]["correct"] for t in case.tasks]
        rows.append({"method": name, "params": given, "old": old, "new": new,
                     "old_accuracy": mean_interval(old), "new_accuracy": mean_interval(new)})
    ref = next(r for r in rows if r["method"].startswith("chat vector"))
    body, findings = [], []
    for r in rows:
        dn = difference_interval(r["new"], ref["new"])
        do = difference_interval(r["old"], ref["old"])
        r["new_vs_chat_vector"], r["old_vs_chat_vector"] = list(dn), list(do)
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "—"
        body.append([r["method"], params, _pm(r["old_accuracy"][0], r["old_accuracy"][1:]),
                     _pm(r["new_accuracy"][0], r["new_accuracy"][1:]),
                     "ref" if r is ref else _delta_text(*do),
                     "ref" if r is ref else _delta_text(*dn)])
    by = {r["method"]: r for r in rows}
    best = max(rows, key=lambda r: r["new_accuracy"][0])
    findings.append(f"best on the new alphabet: {best['method']} "
                    f"({100 * best['new_accuracy'][0]:.1f}); CPT alone "
                    f"{100 * by['cpt']['new_accuracy'][0]:.1f}, instruct alone "
                    f"{100 * by['instruct']['new_accuracy'][0]:.1f}")
    if "widen" in by:
        d, lo, hi = by["widen"]["new_vs_chat_vector"]
        word = "above" if lo > 0 else "below" if hi < 0 else "not distinguishable from"
        findings.append(f"WIDEN on the new alphabet: {100 * by['widen']['new_accuracy'][0]:.1f}"
                        f", {word} the chat vector ({100 * d:+.1f})")
    for r in rows:
        for key in ("old", "new"):
            r.pop(key)
    note = ("θ_0 = the tiny-lm base; *instruct* = θ_0 fine-tuned on the 8 held-in tasks; *cpt* "
            "= θ_0 continually pre-trained on the task formats over a new alphabet (upper-case "
            "inputs, answers right half the time); merges of [cpt, instruct] over θ_0. *old*: "
            "the held-in tasks; *new*: the same skills on the new alphabet (neither model was "
            "trained for them). Δ: paired difference from the chat vector θ_C + (θ_I − θ_0).")
    return Study("cpt-chat-vector", "continual pre-training + chat vector", rows,
                 _markdown(["model", "parameters", "old acc", "new acc", "Δ old vs chat vector",
                            "Δ new vs chat vector"], body), note, findings,
                 plot=lambda p: _plot_two_skills(rows, p))


def _plot_two_skills(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = new_figure((6.5, 4.5))
    for r in rows:
        (x, xl, xh), (y, yl, yh) = r["old_accuracy"], r["new_accuracy"]
        ax.errorbar([100 * x], [100 * y], xerr=[[100 * (x - xl)], [100 * (xh - x)]],
                    yerr=[[100 * (y - yl)], [100 * (yh - y)]], fmt="o", capsize=2)
        ax.annotate(r["method"], (100 * x, 100 * y), fontsize=7)
    ax.set_xlabel("old alphabets: held-in tasks (%)")
    ax.set_ylabel("new alphabet: the same tasks (%)")
    ax.set_title("continual pre-training + chat vector")
    return save_figure(fig, path)


def variant_study(name: str, suite_name: str, size: str, methods: list[str], seed: int,
                  log: Callable[[str], None], rebuild: bool = False,
                  settings: Sequence[str] | None = None) -> Study:
    """The suite built at each variant of :data:`VARIANTS` (or only the ``settings`` labels
    given, e.g. ``["0.5×", "1×"]`` where the largest is too costly to build), the methods
    run on each."""
    from modelalloy.bench import load_suite

    variants = VARIANTS.get((name, suite_name, size))
    if variants is None:
        raise EvalError(f"study {name}: no variants defined for {suite_name} ({size})")
    if settings is not None:
        labels = [label for label, _ in variants]
        unknown = [s for s in settings if s not in labels]
        if unknown or len(settings) < 2:
            raise EvalError(f"study {name}: settings must be two or more of "
                            f"{', '.join(labels)} for {suite_name} ({size}); got "
                            f"{', '.join(settings) or 'none'}")
        variants = [v for v in variants if v[0] in settings]
    rows: list[dict[str, Any]] = []
    hits: list[tuple[str, dict[tuple[str, str, str], str]]] = []
    folders, merged = [], None
    for label, overrides in variants:
        suite = load_suite(suite_name, size, overrides=overrides or None, log=log,
                           rebuild=rebuild)
        n_params = sum(v.numel() for v in suite.base_state_dict().values())
        result = run_bench(suite, methods, seed=seed, log=log)
        merged = merged or list(suite.info.merged_tasks)
        folders.append(suite.info.path)
        hits.append((label, {(r["method"], r["variant"], r["task"]): r["correct"]
                             for r in result.records}))
        held = suite.info.held_out_tasks
        for row in summarize(result.records):
            rows.append({"setting": label, "overrides": overrides, "parameters": n_params,
                         "build_seconds": suite.info.build_seconds,
                         **{k: row.get(k) for k in (
                             "method", "variant", "params", "accuracy", "accuracy_ci",
                             "normalized_accuracy", "normalized_ci", "held_out_accuracy",
                             "held_out_ci", "delta")},
                         "held_out_vs_base": _held_out_vs_base(hits[-1][1], row, held)})
        log(f"study {name}: {label} done")
    assert merged is not None
    keys = [(r["method"], r["variant"]) for r in _best_rows(rows)
            if r["setting"] == variants[0][0]]
    paired = same_test_examples(folders, merged + held)
    claims = claim_rows(name, hits, keys, merged, paired)
    changes = method_changes(hits, keys, merged) if paired else {}
    body = [[r["setting"], f"{r['parameters']:,}", row_label(r),
             _pm(r["accuracy"], r["accuracy_ci"]),
             _pm(r["normalized_accuracy"], r["normalized_ci"]),
             _pm(r["held_out_accuracy"], r["held_out_ci"]),
             "ref" if r["method"] == "base" else "—" if not r["held_out_vs_base"] else
             _delta_text(*r["held_out_vs_base"]),
             "ref" if r["method"] == "task_arithmetic" or not r["delta"] else
             _delta_text(r["delta"]["value"], *r["delta"]["ci"])]
            for r in rows]
    findings = []
    for label, _ in variants:
        base = next(r for r in rows if r["setting"] == label and r["method"] == "base")
        expert = next(r for r in rows if r["setting"] == label and r["method"] == "expert")
        findings.append(f"{label} ({base['parameters']:,} parameters): base "
                        f"{100 * base['accuracy']:.1f}, experts {100 * expert['accuracy']:.1f}")
    first, last = variants[0][0], variants[-1][0]
    for key, (d, lo, hi) in changes.items():
        findings.append(f"{key[0]} ({key[1]}): normalised accuracy {last} − {first} "
                        f"{_delta_text(d, lo, hi)}")
    for c in claims:
        change = (f": {c['to']} − {c['from']} {_delta_text(*c['change'])}" if "change" in c
                  else ": the settings' test examples differ, no paired change")
        reason = f" ({c['reason']})" if "reason" in c else ""
        findings.append(f"**{c['claim']}** — {c['verdict']}{reason}{change}")
    for r in rows:
        if r["setting"] == first:
            r["claims"] = claims  # the JSON keeps them on the first setting's rows
            break
    title = "model scale" if name == "scale" else "base quality"
    note = ("Each setting is a suite of its own (cached), built from the same data seed, so "
            "the settings share their test examples" + (" (checked) and every interval is "
            "paired over them" if paired else " — here they differ, so no change between "
            "settings is paired") + ". *norm acc* = mean over the held-in tasks of merged ÷ "
            "the task's expert (Yadav et al. 2024); *Δ held-out vs base*: held-out mean minus "
            "the base's; *Δ vs TA*: held-in mean minus task arithmetic's (95% bootstrap, `*` "
            "= excludes 0). *spread* = best − worst method's normalised accuracy (tuned "
            "variants where a method has one). Verdicts from the paired interval of the change "
            "from the first setting to the last: a claimed rise *shows* above 0, *does not "
            "show* below +1 point, else *cannot tell* (a claimed fall: mirrored). The "
            "intervals hold the test-set noise, not the fine-tuning run's.")
    claim_table = _markdown(
        ["claim"] + [f"{label}" for label, _ in variants] + [f"{last} − {first}", "verdict"],
        [[c["claim"]] + [_pm(v[0], v[1:]) for v in c["per_setting"].values()]
         + [_delta_text(*c["change"]) if "change" in c else "—", c["verdict"]]
         for c in claims])
    table = _markdown(["setting", "parameters", "method", "mean acc", "norm acc",
                       "held-out acc", "Δ held-out vs base", "Δ vs TA"], body)
    return Study(name, title, rows, table + "\n\n" + claim_table, note, findings,
                 plot=lambda p: _plot_variants(rows, claims, p, title))


def _held_out_vs_base(hits: dict[tuple[str, str, str], str], row: dict[str, Any],
                      held: list[str]) -> list[float] | None:
    """A row's held-out mean minus the base's, paired (None for the experts and the base)."""
    if not held or row["method"] in ("base", "expert"):
        return None
    key = (row["method"], row["variant"])
    return list(difference_interval([hits[(*key, t)] for t in held],
                                    [hits[("base", "reference", t)] for t in held]))


def _best_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge rows, the tuned variant where a method has one."""
    tuned = {(r["setting"], r["method"]) for r in rows if r["variant"] == "tuned"}
    return [r for r in rows if r["method"] not in ("base", "expert")
            and (r["variant"] == "tuned" or (r["setting"], r["method"]) not in tuned)]


# ---------------------------------------------------------------------------------------------


def _plot_held_out(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = new_figure((7, 4))
    shown = [r for r in rows if r["variant"] != "single"]
    for i, r in enumerate(shown):
        y, ci = 100 * r["held_out_accuracy"], r["held_out_ci"]
        ax.errorbar([i], [y], yerr=[[y - 100 * ci[0]], [100 * ci[1] - y]], fmt="o", capsize=3)
    singles = [100 * r["held_out_accuracy"] for r in rows if r["variant"] == "single"]
    if singles:
        ax.axhspan(min(singles), max(singles), color="grey", alpha=0.2,
                   label="single experts (range)")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([row_label(r) for r in shown], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("held-out tasks (95% bootstrap intervals)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _plot_variants(rows: list[dict[str, Any]], claims: list[dict[str, Any]], path: Path,
                   title: str) -> Path:
    """Left: each method's normalised accuracy per setting; right: the methods' spread."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    params = {r["setting"]: r["parameters"] for r in rows}
    ticks = [f"{s}\n{params[s] / 1e6:.2f}M" for s in settings]
    fig, (ax, ax2) = new_figure((10, 4), ncols=2)
    best = _best_rows(rows)
    for method in dict.fromkeys(r["method"] for r in best):
        at = {r["setting"]: r for r in best if r["method"] == method and r["normalized_ci"]}
        xs = [i for i, s in enumerate(settings) if s in at]
        pts = [at[settings[i]] for i in xs]
        _errorbar(ax, xs, [p["normalized_accuracy"] for p in pts],
                  [p["normalized_ci"] for p in pts], label=method)
    spread = next((c for c in claims if c["aggregate"] == "spread"), None)
    if spread is not None:
        vals = [spread["per_setting"][s] for s in settings]
        _errorbar(ax2, list(range(len(settings))), [v[0] for v in vals],
                  [v[1:] for v in vals], label="best − worst method", color="black")
    for a, ylabel in ((ax, "normalised accuracy (%)"), (ax2, "spread between methods (points)")):
        a.set_xticks(range(len(settings)))
        a.set_xticklabels(ticks)
        a.set_ylabel(ylabel)
        a.legend(fontsize=7)
    ax.set_title(f"{title}: merged ÷ expert (95% intervals)")
    ax2.set_title(f"{title}: methods' spread (95% intervals)")
    return save_figure(fig, path)


def _errorbar(ax: Any, xs: list[int], ys: list[float], cis: list[Sequence[float]],
              **kw: Any) -> None:
    ys_pct = [100 * y for y in ys]
    err = [[y - 100 * c[0] for y, c in zip(ys_pct, cis, strict=True)],
           [100 * c[1] - y for y, c in zip(ys_pct, cis, strict=True)]]
    ax.errorbar(xs, ys_pct, yerr=err, marker="o", capsize=3, **kw)


# ---------------------------------------------------------------------------------------------


def run_study(name: str, suite_name: str, size: str, methods: Sequence[str] | None = None, *,
              seed: int = 0, rebuild: bool = False,
              log: Callable[[str], None] | None = None,
              settings: Sequence[str] | None = None) -> Study:
    """Run study ``name`` (:data:`STUDY_NAMES`) on a suite; ``methods`` default to
    :data:`DEFAULT_METHODS`; ``settings`` picks variants of ``scale`` / ``base-quality``."""
    from modelalloy.bench import load_suite

    log = log or (lambda _m: None)
    if name not in STUDY_NAMES:
        raise EvalError(f"unknown study '{name}'; available: {', '.join(STUDY_NAMES)}")
    chosen = list(methods) if methods else DEFAULT_METHODS[name]
    if name in ("scale", "base-quality"):
        return variant_study(name, suite_name, size, chosen, seed, log, rebuild, settings)
    if settings is not None:
        raise EvalError(f"study {name} has no settings (only scale and base-quality do)")
    suite = load_suite(suite_name, size, rebuild=rebuild, log=log)
    fn = {"experts": experts_study, "held-out": held_out_study,
          "long-to-short": long_to_short_study, "cpt-chat-vector": cpt_chat_vector_study}[name]
    try:
        return fn(suite, chosen, seed, log)
    except KeyError as err:  # a method that produced no rows (skipped)
        raise EvalError(f"study {name}: no result for {err}") from err


def study_markdown(study: Study, suite_name: str, size: str) -> str:
    out = [f"# {suite_name} ({size}): {study.title}", "", study.note, "", study.table, ""]
    if study.findings:
        out += ["Findings:", ""] + [f"- {f}" for f in study.findings] + [""]
    out += [f"![{study.title}](study-{study.name}.png)", ""]
    return "\n".join(out)


def write_study(study: Study, out_dir: Path, suite_name: str, size: str) -> dict[str, Path]:
    """DIR/study-NAME.{json,md,png}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"study-{study.name}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md"),
             "png": stem.with_suffix(".png")}
    rows = [{k: v for k, v in r.items() if k != "correct"} for r in study.rows]
    paths["json"].write_text(json.dumps({"study": study.name, "suite": suite_name,
                                         "size": size, "findings": study.findings,
                                         "rows": rows}, indent=1))
    paths["md"].write_text(study_markdown(study, suite_name, size))
    if study.plot is not None:
        study.plot(paths["png"])
    return paths


__all__ = ["STUDY_NAMES", "Study", "run_study", "write_study"]
