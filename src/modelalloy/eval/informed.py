"""Data-informed merging on a built-in suite: collect each method's statistics on the suite's
own data, merge, score.

This module is the glue that runs data-informed methods on a suite. :class:`BenchStats` makes
the statistics a registry method declares (Grams, RegMean++ Grams, Fishers, activations, Adam
moments) on either kind of suite; the harness (:func:`modelalloy.eval.harness.run_bench`, so
``modelalloy bench`` and ``make demo``) uses it for every such method, and
:func:`run_informed` uses it for its rows (with its own split and limits, not cached).
Everything goes through the library's own, architecture-agnostic code paths —
``modelalloy.stats`` hooks for Grams, Fishers and activations, ``load_adam_moments`` for OTA,
the ``modelalloy.optimize`` learners for coefficients, and ``merge_state_dicts(..., stats=...)``
for the merge — on a plain torch module built from the suite: the suite's body plus its
per-task heads (:class:`SuiteModule`).

Data used (``stats_split``, default the labeled ``val`` split, whose labels only Sens-Merging and
Self-Positioning read; AdaMerging uses the unlabeled ``test`` inputs, as in the paper):

====================  ===========================================================================
``regmean``           input Grams of every linear map of expert k on task k's inputs; the suite's
                      convolutions have no Gram and are averaged (as the reference code does for
                      every non-Linear tensor)
``regmean_pp``        the same, collected through the already-merged earlier layers
``fisher``            diagonal Fisher of expert k (its body + task k's frozen head) on task k's
                      inputs, exact expectation over the 10 classes (the reference default)
``ota`` / ``ota_ffg``  Adam second moments saved with each expert's fine-tuning run; ``ota_ffg``
                      first grafts each expert with Fast Fisher Grafting (density 0.4)
``aim``               the base model's input activations on every task, relaxing a
                      task-arithmetic or TIES merge
``adamerging``        task-wise and layer-wise coefficients, entropy of each task's head on its
                      unlabeled test inputs
``expert_merging``    layer-wise coefficients aligning hidden states and logits with the experts
``sens_merging``      sensitivity-guided layer-wise coefficients
``self_positioning``  task-wise coefficients by SGD on a labeled probe set (the val split)
====================  ===========================================================================

LM suites (tiny-lm) use the language model itself (no heads), prompt batches
``{"input_ids", "attention_mask"}`` (plus answer ``labels`` where a method needs them) and the
sampled Fisher; the rest is the same code.

The suite body has no stack of numbered blocks (RegMean++ and Expert Merging walk one), so
:class:`SuiteModule` can present the body's top-level children as ``layers.0 .. layers.N-1``;
:func:`to_body_names` maps the statistics and coefficients back to the body's own names.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelalloy.api import merge_state_dicts
from modelalloy.eval.harness import SuiteScorer, run_bench, summarize
from modelalloy.optimize.adamerging import CoefficientResult
from modelalloy.plan.layers import split_layer

# Methods this module runs (row names). ``aim`` rows are named after the merge they relax.
INFORMED_METHODS = ("regmean", "regmean_pp", "fisher", "ota", "ota_ffg", "aim",
                    "adamerging_task", "adamerging_layer", "expert_merging", "sens_merging",
                    "self_positioning")
BASELINES = ("linear", "task_arithmetic", "ties")
StateDict = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The suite as one torch module


class SuiteModule(nn.Module):
    """A suite body with its per-task heads: ``forward(images, task=k)`` gives task k's logits.

    The heads are frozen and are **not** registered as sub-modules, so the module's parameters
    (and state dict) are exactly the body's: what the collectors hook and the learners merge.
    With ``stacked`` the body's top-level children are registered as ``layers.<i>`` (a numbered
    block stack, for RegMean++ and Expert Merging); otherwise under their own names.
    """

    def __init__(self, body: nn.Module, heads: Sequence[nn.Module], stacked: bool = False):
        super().__init__()
        object.__setattr__(self, "_body", body)  # run by forward, not registered
        object.__setattr__(self, "_heads", list(heads))
        self.child_names = [n for n, _ in body.named_children()]
        # A body that has its own numbered stack (tiny-vision's ``blocks.<i>``) keeps it: the
        # children here would be one block holding everything.
        self.stacked = stacked and not _has_block_stack(body)
        if self.stacked:
            self.layers = nn.ModuleList([m for _, m in body.named_children()])
        else:
            for name, child in body.named_children():
                self.add_module(name, child)
        for p in (p for h in heads for p in h.parameters()):
            p.requires_grad_(False)

    def forward(self, images: torch.Tensor, task: int = 0) -> torch.Tensor:
        return self._heads[task](self._body(images))

    def to_body_names(self, mapping: Mapping[str, Any]) -> dict[str, Any]:
        """Rename ``layers.<i>.<rest>`` keys back to the body's ``<child_i>.<rest>``."""
        if not self.stacked:
            return dict(mapping)
        out = {}
        for key, value in mapping.items():
            parts = key.split(".")
            if parts[0] == "layers" and len(parts) > 2 and parts[1].isdigit():
                key = ".".join([self.child_names[int(parts[1])]] + parts[2:])
            out[key] = value
        return out

    def to_module_names(self, mapping: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`to_body_names` (body names -> this module's names)."""
        if not self.stacked:
            return dict(mapping)
        index = {n: i for i, n in enumerate(self.child_names)}
        out = {}
        for key, value in mapping.items():
            head, _, rest = key.partition(".")
            out[f"layers.{index[head]}.{rest}" if head in index else key] = value
        return out


def _has_block_stack(body: nn.Module) -> bool:
    """Whether parameter names already hold a stack of at least two numbered blocks."""
    indices: dict[str, set[int]] = {}
    for name, _ in body.named_parameters():
        found = split_layer(name)
        if found is not None:
            indices.setdefault(found[0], set()).add(found[1])
    return any(len(v) >= 2 for v in indices.values())


def is_lm_suite(suite: Any) -> bool:
    """tiny-lm style suites: a causal LM with its own output layer, text prompts."""
    return not hasattr(suite, "head")


def suite_module(suite: Any, state_dict: Mapping[str, torch.Tensor], tasks: Sequence[str],
                 stacked: bool = False) -> nn.Module:
    """The suite's model holding ``state_dict``: a :class:`SuiteModule` (body + per-task heads)
    for classifier suites, the language model itself for LM suites (``stacked`` is ignored: a
    transformer already has its numbered block stack)."""
    if is_lm_suite(suite):
        model = suite.new_model()
        model.load_state_dict(dict(state_dict), strict=False)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return model.eval()
    body = suite.new_model()
    body.load_state_dict(dict(state_dict))
    return SuiteModule(body, [suite.head(t) for t in tasks], stacked=stacked).eval()


def to_body_names(model: nn.Module, mapping: Mapping[str, Any]) -> dict[str, Any]:
    return model.to_body_names(mapping) if isinstance(model, SuiteModule) else dict(mapping)


def to_module_names(model: nn.Module, mapping: Mapping[str, Any]) -> dict[str, Any]:
    return model.to_module_names(mapping) if isinstance(model, SuiteModule) else dict(mapping)


def _lm_batch(suite: Any, prompts: Sequence[str], answers: Sequence[str] | None
              ) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` of prompts (+ answers and ``<eos>``);
    with answers, ``labels`` holds the answer tokens and -100 elsewhere (unshifted)."""
    import importlib

    lm = importlib.import_module(type(suite).__module__)
    pad, eos = lm.STOI[lm.PAD], lm.STOI[lm.EOS]
    seqs, starts = [], []
    for i, p in enumerate(prompts):
        ids = lm.encode(p)
        starts.append(len(ids))
        if answers is not None:
            ids = ids + lm.encode(answers[i]) + [eos]
        seqs.append(ids)
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (x, a) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
        labels[i, a:len(x)] = torch.tensor(x[a:])
    out = {"input_ids": ids, "attention_mask": mask}
    if answers is not None:
        out["labels"] = labels
    return out


def task_batches(suite: Any, tasks: Sequence[str], split: str, batch_size: int, *,
                 limit: int | None = None, labels: bool = False) -> list[list[dict[str, Any]]]:
    """Per task k, batches ``{"images": x, "task": k}`` (plus ``labels`` when asked); for LM
    suites ``{"input_ids", "attention_mask"}`` of the prompts (with ``labels``: prompt + answer,
    labels on the answer tokens)."""
    out = []
    for k, task in enumerate(tasks):
        x, y = suite.labeled(task, split)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        batches = []
        for i in range(0, len(x), batch_size):
            if is_lm_suite(suite):
                batches.append(_lm_batch(suite, x[i:i + batch_size],
                                         y[i:i + batch_size] if labels else None))
                continue
            b: dict[str, Any] = {"images": x[i:i + batch_size], "task": k}
            if labels:
                b["labels"] = y[i:i + batch_size]
            batches.append(b)
        out.append(batches)
    return out


def supervised_loss(output: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """Cross-entropy against ``batch["labels"]``: per example for classifier logits, next-token
    (shifted, -100 ignored) for sequence logits."""
    from modelalloy.stats.hooks import logits_of

    logits = logits_of(output).float()
    labels = batch["labels"]
    if logits.dim() == 3:
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           labels[:, 1:].reshape(-1), ignore_index=-100)
    return nn.functional.cross_entropy(logits, labels)


# ---------------------------------------------------------------------------------------------
# The coefficient learners on a suite: each given the suite's model and data the way its paper
# uses them (AdaMerging: unlabeled test inputs; Expert Merging: a few unlabeled val samples;
# Sens-Merging and Self Positioning: labeled val examples). The rows below and `modelalloy
# optimize` (modelalloy.search.runs) both call these.


def learn_adamerging(suite: Any, tasks: Sequence[str], base: StateDict,
                     experts: Sequence[StateDict], *, granularity: str = "layer",
                     steps: int = 500, lr: float = 1e-3, batch_size: int = 16,
                     init: float = 0.3, ties_density: float | None = None,
                     seed: int = 0) -> CoefficientResult:
    from modelalloy.optimize.adamerging import adamerging

    batches = task_batches(suite, tasks, "test", batch_size)
    return adamerging(suite_module(suite, base, tasks), base, experts, batches,
                      granularity=granularity, steps=steps, lr=lr, init=init,
                      ties_density=ties_density, seed=seed)


def learn_expert_merging(suite: Any, tasks: Sequence[str], base: StateDict,
                         experts: Sequence[StateDict], *, samples: int = 16,
                         split: str = "val", batch_size: int = 16, limit: int | None = None,
                         chunks: Mapping[str, int] | None = None) -> Any:
    """An :class:`ExpertMergingResult` with the suite body's tensor names."""
    from modelalloy.optimize.expert_merging import ExpertMergingResult, expert_merging
    from modelalloy.stats.hooks import batch_size_of, select_example

    model = suite_module(suite, base, tasks, stacked=True)
    batches = task_batches(suite, tasks, split, batch_size, limit=limit)
    per_task = [[select_example(b, i, batch_size_of(b)) for b in bs
                 for i in range(batch_size_of(b))][:samples] for bs in batches]
    res = expert_merging(model, to_module_names(model, base),
                         [to_module_names(model, sd) for sd in experts], per_task,
                         chunks=None if chunks is None else to_module_names(model, chunks))
    return ExpertMergingResult(to_body_names(model, res.alphas), res.history, list(base))


def learn_sens_merging(suite: Any, tasks: Sequence[str], base: StateDict,
                       experts: Sequence[StateDict], *, scale: float = 1.0,
                       temperature: float = 1.0, limit: int = 32, split: str = "val",
                       batch_size: int = 16) -> tuple[CoefficientResult, dict[str, Any]]:
    from modelalloy.optimize.sens_merging import sens_merging

    calib = task_batches(suite, tasks, split, batch_size, limit=limit, labels=True)
    return sens_merging(suite_module(suite, base, tasks), base, experts, calib,
                        scale=scale, temperature=temperature)


def learn_self_positioning(suite: Any, tasks: Sequence[str], base: StateDict,
                           experts: Sequence[StateDict], *, steps: int = 300,
                           lr: float = 5e-3, mu: float = 0.05, split: str = "val",
                           batch_size: int = 16, seed: int = 0) -> CoefficientResult:
    from modelalloy.optimize.self_positioning import self_positioning

    probe = [b for bs in task_batches(suite, tasks, split, batch_size, labels=True)
             for b in bs]

    def ce(forward: Callable[[Any], Any], batch: dict[str, Any]) -> torch.Tensor:
        return supervised_loss(forward({k: v for k, v in batch.items() if k != "labels"}),
                                  batch)

    return self_positioning(suite_module(suite, base, tasks), base, experts, probe, ce,
                            steps=steps, lr=lr, mu=mu, seed=seed)


# ---------------------------------------------------------------------------------------------
# Statistics for registry methods inside the harness (`modelalloy bench`, `make demo`)

# Part of the cache key: bump when a collector or this glue changes what it collects.
BENCH_STATS_VERSION = 1
# A method that relaxes one merged model toward the base (``aim``) relaxes this merge.
RELAX_UNDER = "task_arithmetic"


@dataclass
class BenchStatsConfig:
    """What :class:`BenchStats` collects on. Unlabeled inputs: the suite's ``test`` inputs (the
    split AdaMerging uses; documented as the unlabeled split for data-informed methods); the
    Fisher uses the labeled ``val`` split (exact expectation over classes for classifiers, so the
    labels are not read; sampled for LMs)."""

    unlabeled_split: str = "test"
    fisher_split: str = "val"
    limit: int | None = 256              # examples per task for Grams and activations
    fisher_limit: int | None = 64        # examples per task for the Fisher
    fisher_mode: str = "exact"           # classifiers; LM suites use "sampled"
    batch_size: int = 32
    seed: int = 0
    cache: bool = True                   # keep them on disk in the suite folder
    # Cap of the in-process cache (tensor bytes, or "2GB"; 0 keeps nothing in memory); None:
    # $MODELALLOY_STATS_MEMORY, else DEFAULT_MEMORY_BYTES.
    memory: int | str | None = None


# Not part of a statistic's identity: where it is kept.
_PLACEMENT_FIELDS = ("cache", "memory")
MEMORY_ENV = "MODELALLOY_STATS_MEMORY"
# Grams of a real model's linear maps reach gigabytes; keep at most this many in the process.
DEFAULT_MEMORY_BYTES = 2 * 1000**3


def memory_cap(value: int | str | None = None) -> int:
    """Bytes the in-process statistics cache may hold: ``value``, else the environment's
    ``MODELALLOY_STATS_MEMORY`` ("2GB", "512MiB", bytes), else :data:`DEFAULT_MEMORY_BYTES`."""
    from modelalloy.io.writer import parse_size

    if value is None:
        value = os.environ.get(MEMORY_ENV) or DEFAULT_MEMORY_BYTES
    return 0 if str(value).strip() == "0" else parse_size(value)  # parse_size refuses 0


def stats_nbytes(stats: Sequence[Mapping[str, torch.Tensor]]) -> int:
    """Tensor bytes of one entry: one statistic (name -> tensor) per owner."""
    return sum(t.nbytes for st in stats for t in st.values())


class StatsMemory:
    """The statistics collected in this process, least recently used dropped first once their
    tensor bytes pass the cap (the cap is the caller's, per :meth:`put`). A hit returns the
    cached object itself."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[str, str], tuple[list[Any], int]] = OrderedDict()
        self.nbytes = 0

    def get(self, key: tuple[str, str]) -> list[Any] | None:
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key][0]

    def put(self, key: tuple[str, str], stats: list[Any], cap: int) -> None:
        self._pop(key)
        size = stats_nbytes(stats)
        if size > cap:  # it would push out everything and still not fit
            return
        self._entries[key] = (stats, size)
        self.nbytes += size
        while self.nbytes > cap:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.nbytes -= dropped

    def _pop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[1]

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


_MEMORY = StatsMemory()


def layout_overrides(spec: Any, stats: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """``input_dim: first`` for a method with that parameter when its statistics were taken on
    transposed linear maps (GPT-2's ``Conv1D``, recorded in the statistics' ``input_dims``): the
    registry's ``auto`` cannot tell the layout of a *square* weight from its shape, and an
    explicit ``first`` still follows the shapes where they decide (e.g. an ``nn.Linear`` head)."""
    if not any(p.name == "input_dim" for p in spec.params):
        return {}
    for per_owner in stats.values():
        for st in per_owner:
            if any(v == "first" for v in getattr(st, "input_dims", {}).values()):
                return {"input_dim": "first"}
    return {}


class BenchStats:
    """The statistics a registry method declares (``spec.stats``), made on a built suite by the
    same collectors and module wrapper for every suite (:func:`suite_module`,
    :func:`task_batches`): a plain ``nn.Module`` with per-task heads (tiny-vision) or a
    transformers LM (tiny-lm). Each kind is collected once per suite and options and cached — in
    this process (:class:`StatsMemory`: at most ``config.memory`` bytes, 2 GB by default, least
    recently used dropped first) and, with ``config.cache``, on disk under
    ``<suite>/stats-cache/`` (rebuilt with the suite, since a rebuilt suite is a new folder).

    ==============  =============================================================================
    ``gram``        expert k on task k's unlabeled inputs (RegMean)
    ``gram_pp``     RegMean++'s sequential Grams (depend on ``alpha`` and ``weight``)
    ``activations`` the base model on every merged task's unlabeled inputs (AIM: ``stats_from``
                    base)
    ``fisher``      expert k with task k's head on task k's ``val`` inputs (exact expectation over
                    classes; sampled for LMs)
    ``exp_avg_sq``  the Adam second moments saved next to each expert (``optimizer.safetensors``)
    ==============  =============================================================================
    """

    def __init__(self, suite: Any, tasks: Sequence[str], base: Mapping[str, torch.Tensor],
                 experts: Sequence[Mapping[str, torch.Tensor]],
                 config: BenchStatsConfig | None = None,
                 log: Callable[[str], None] | None = None):
        self.suite, self.tasks = suite, list(tasks)
        self.base, self.experts = base, list(experts)
        self.cfg = config or BenchStatsConfig()
        self.log = log or (lambda _m: None)
        self.seconds: dict[str, float] = {}

    def _digest(self, kind: str, extra: Mapping[str, Any]) -> str:
        import hashlib
        import json
        from dataclasses import asdict

        cfg = {k: v for k, v in asdict(self.cfg).items() if k not in _PLACEMENT_FIELDS}
        blob = json.dumps({"kind": kind, "cfg": cfg, "extra": dict(extra),
                           "tasks": self.tasks, "version": BENCH_STATS_VERSION},
                          sort_keys=True, default=str)
        return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def _owners(self, kind: str) -> list[str]:
        return ["base"] if kind == "activations" else list(self.tasks)

    def get(self, kind: str, extra: Mapping[str, Any] | None = None) -> list[Any]:
        """One statistic per owner (per expert; the base alone for ``activations``)."""
        from modelalloy.stats import load_stats, save_stats

        extra = dict(extra or {})
        key = self._digest(kind, extra)
        mem_key = (str(self.suite.info.path), key)
        cached = _MEMORY.get(mem_key)
        if cached is not None:
            return cached
        folder = self.suite.info.path / "stats-cache" / key
        owners = self._owners(kind)
        files = [folder / f"{o}.safetensors" for o in owners]
        if self.cfg.cache and all(f.is_file() for f in files):
            stats = [load_stats(f) for f in files]
            self.log(f"{kind} statistics: cached ({folder})")
        else:
            start = time.process_time()
            wall = time.perf_counter()
            threads = torch.get_num_threads()
            # The suites' models are tiny: one thread is fastest (the exact Fisher's thousands of
            # small backward passes spend most of a second thread's time spinning), as for the
            # suite builds (bench.common.build_cached).
            torch.set_num_threads(1)
            try:
                stats = self._collect(kind, extra)
            finally:
                torch.set_num_threads(threads)
            self.seconds[kind] = round(time.perf_counter() - wall, 2)
            self.log(f"{kind} statistics: collected in {self.seconds[kind]:.1f}s "
                     f"({time.process_time() - start:.1f} CPU s)")
            if self.cfg.cache:
                try:
                    for f, st in zip(files, stats, strict=True):
                        save_stats(st, f, kind)
                except OSError as err:  # a read-only suite cache: keep them in memory only
                    self.log(f"{kind} statistics not cached on disk: {err}")
        _MEMORY.put(mem_key, stats, memory_cap(self.cfg.memory))
        return stats

    def _collect(self, kind: str, extra: Mapping[str, Any]) -> list[Any]:
        from modelalloy.stats import Statistic, collect_activations, collect_fisher, collect_grams

        cfg, suite, tasks = self.cfg, self.suite, self.tasks
        if kind == "exp_avg_sq":
            from modelalloy.stats.optimizer import load_adam_moments

            names = set(self.base)
            out = []
            for t in tasks:
                m = load_adam_moments(suite.info.expert_dir(t) / "optimizer.safetensors")
                out.append({n: v for n, v in m.items() if n in names})
            return out
        if kind == "fisher":
            batches = task_batches(suite, tasks, cfg.fisher_split, cfg.batch_size,
                                   limit=cfg.fisher_limit)
            mode = "sampled" if is_lm_suite(suite) else cfg.fisher_mode
            return [collect_fisher(suite_module(suite, sd, tasks), batches[k], mode=mode,
                                   max_examples=cfg.fisher_limit, seed=cfg.seed)
                    for k, sd in enumerate(self.experts)]
        batches = task_batches(suite, tasks, cfg.unlabeled_split, cfg.batch_size,
                               limit=cfg.limit)
        if kind == "gram":
            return [collect_grams(suite_module(suite, sd, tasks), batches[k])
                    for k, sd in enumerate(self.experts)]
        if kind == "activations":
            return [collect_activations(suite_module(suite, self.base, tasks),
                                        [b for bs in batches for b in bs])]
        if kind == "gram_pp":
            from modelalloy.stats.regmean_pp import collect_regmean_pp_grams

            models = [suite_module(suite, sd, tasks, stacked=True) for sd in self.experts]
            stats, _ = collect_regmean_pp_grams(models, batches, alpha=extra["alpha"],
                                                weight=extra.get("weight"))
            return [Statistic("gram_pp", to_body_names(models[0], st),
                              to_body_names(models[0], st.input_dims),
                              to_body_names(models[0], st.counts), dict(st.meta))
                    for st in stats]
        raise ValueError(f"the bench cannot make '{kind}' statistics")

    def for_method(self, spec: Any, params: Mapping[str, Any]) -> dict[str, list[Any]]:
        """``stats=`` for ``merge_state_dicts`` of method ``spec`` with resolved ``params``."""
        out = {}
        for kind in spec.stats:
            extra: dict[str, Any] = {}
            if kind == "gram_pp":
                extra = {"alpha": float(params.get("alpha", 1.0)),
                         "weight": [float(w) for w in params["weight"]]
                         if isinstance(params.get("weight"), list) else None}
            out[kind] = self.get(kind, extra)
        return out


# ---------------------------------------------------------------------------------------------
# Coefficients -> weights


def apply_coefficients(result: Any, base: Mapping[str, torch.Tensor],
                       experts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """θ = θ₀ + Σ_k c_{row(n), k} τ_k for the result's tensors, θ₀ elsewhere (what the
    ``task_arithmetic`` recipe of ``result.to_recipe`` computes)."""
    out = {n: t.clone() for n, t in base.items()}
    for name in result.names:
        t = base[name].float().clone()
        for k, sd in enumerate(experts):
            t += result.weight_of(name, k) * (sd[name].float() - base[name].float())
        out[name] = t.to(base[name].dtype)
    return out


def merge_through_recipe(result: Any, suite: Any, tasks: Sequence[str],
                         out_dir: Any) -> dict[str, torch.Tensor]:
    """Write the learned coefficients as a recipe (``out_dir/recipe.yaml``) over the suite's
    model folders and run it through the engine (``modelalloy.merge`` reading those folders,
    in memory: the bits of the merge written to disk); returns the merged state dict."""
    from pathlib import Path

    from modelalloy.api import merge

    recipe = result.save_recipe(Path(out_dir) / "recipe.yaml", str(suite.info.base_dir),
                                [str(suite.info.expert_dir(t)) for t in tasks])
    return merge(recipe)


# ---------------------------------------------------------------------------------------------
# The runner


@dataclass
class InformedConfig:
    """What the rows use. Defaults are the papers' where the suite allows (see the docs)."""

    stats_split: str = "val"
    stats_limit: int | None = None        # examples per task for Grams / Fishers / activations
    batch_size: int = 16                  # AdaMerging's reference batch size
    regmean_alpha: float = 0.95           # the reference CLIP-ViT config (RegMean and RegMean++)
    fisher_mode: str = "exact"            # the reference's expectation over classes
    fisher_limit: int | None = 64         # examples per task for the Fisher
    ffg_density: float = 0.4
    aim_omega: float = 0.4
    adamerging_steps: int = 500
    adamerging_lr: float = 1e-3
    expert_samples: int = 16              # unlabeled samples per domain (batches of one)
    sens_limit: int = 32
    sens_scale: float | None = None       # λ of Sens-Merging; None: task arithmetic's tuned λ
    self_positioning_steps: int = 300
    seed: int = 0
    methods: tuple[str, ...] = INFORMED_METHODS


@dataclass
class InformedResult:
    suite: str
    size: str
    records: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        return summarize(self.records)


def _tvs_scale_param(tuning: Mapping[str, Any], method: str, default: float) -> float:
    return float(tuning.get(method, {}).get("chosen", default))


def run_informed(suite: Any, config: InformedConfig | None = None, *,
                 baselines: Sequence[str] = BASELINES,
                 log: Callable[[str], None] | None = None) -> InformedResult:
    """Baseline rows from the harness, then one row per data-informed method."""
    from modelalloy.methods import get_method

    cfg = config or InformedConfig()
    log = log or (lambda _m: None)
    torch.manual_seed(cfg.seed)
    info = suite.info
    tasks = info.merged_tasks
    bench = run_bench(suite, list(baselines), tune=True, seed=cfg.seed, log=log)
    records = list(bench.records)
    result = InformedResult(info.name, info.size, records, dict(bench.timings), {},
                            dict(bench.tuning))
    scorer = SuiteScorer(suite)
    base = suite.base_state_dict()
    experts = [suite.expert_state_dict(t) for t in tasks]
    wanted = set(cfg.methods)
    # Grams, Fishers, activations and Adam moments: the same collection code as the harness
    # (BenchStats), on this config's split and limits, not cached on disk.
    provider = BenchStats(suite, tasks, base, experts, BenchStatsConfig(
        unlabeled_split=cfg.stats_split, fisher_split=cfg.stats_split, limit=cfg.stats_limit,
        fisher_limit=cfg.fisher_limit, fisher_mode=cfg.fisher_mode, batch_size=cfg.batch_size,
        seed=cfg.seed, cache=False), log=log)

    def row(method: str, merged: Mapping[str, torch.Tensor], params: dict[str, Any],
            start: float, variant: str = "informed") -> None:
        result.timings[method] = round(time.perf_counter() - start, 2)
        records.extend(scorer.records(method, dict(merged), variant=variant, params=params))
        acc = [r["accuracy"] for r in records[-len(info.tasks):]
               if not r["held_out"]]
        log(f"{method}: held-in accuracy {sum(acc) / len(acc):.3f} "
            f"({result.timings[method]:.1f}s)")

    def want(name: str) -> bool:
        return name in wanted

    # --- RegMean: Grams of each expert's linear maps on its own task's inputs
    if want("regmean"):
        t0 = time.perf_counter()
        grams = provider.get("gram")
        result.extra["regmean_gram_layers"] = sorted(grams[0].keys())
        merged = merge_state_dicts("regmean", None, experts, stats={"gram": grams},
                                   alpha=cfg.regmean_alpha,
                                   **layout_overrides(get_method("regmean"), {"gram": grams}))
        row("regmean", merged, {"alpha": cfg.regmean_alpha}, t0)

    # --- RegMean++: Grams through the merged earlier layers (a numbered stack is presented)
    if want("regmean_pp"):
        t0 = time.perf_counter()
        stats = provider.get("gram_pp", {"alpha": float(cfg.regmean_alpha), "weight": None})
        merged = merge_state_dicts("regmean_pp", None, experts, stats={"gram_pp": stats},
                                   alpha=cfg.regmean_alpha,
                                   **layout_overrides(get_method("regmean_pp"),
                                                      {"gram_pp": stats}))
        row("regmean_pp", merged, {"alpha": cfg.regmean_alpha}, t0)

    # --- Fisher merging: per-example Fisher of each expert with its task's head
    if want("fisher"):
        t0 = time.perf_counter()
        # the exact expectation needs (batch, classes) outputs; LMs sample one token per position
        fisher_mode = "sampled" if is_lm_suite(suite) else cfg.fisher_mode
        fishers = provider.get("fisher")
        merged = merge_state_dicts("fisher", None, experts, stats={"fisher": fishers})
        row("fisher", merged, {"mode": fisher_mode, "examples": cfg.fisher_limit}, t0)

    # --- OTA (and OTA after Fast Fisher Grafting): the experts' saved Adam second moments
    if want("ota") or want("ota_ffg"):
        moments = provider.get("exp_avg_sq")
        if want("ota"):
            t0 = time.perf_counter()
            merged = merge_state_dicts("ota", base, experts, stats={"exp_avg_sq": moments})
            row("ota", merged, {}, t0)
        if want("ota_ffg"):
            t0 = time.perf_counter()
            grafted = [merge_state_dicts("ffg", base, [sd], stats={"exp_avg_sq": [v]},
                                         density=cfg.ffg_density)
                       for sd, v in zip(experts, moments, strict=True)]
            merged = merge_state_dicts("ota", base, grafted, stats={"exp_avg_sq": moments})
            row("ota_ffg", merged, {"density": cfg.ffg_density}, t0)

    # --- AIM: relax the (tuned) task-arithmetic and TIES merges with the base's activations
    if want("aim"):
        from modelalloy.eval.harness import merge_experts

        t0 = time.perf_counter()
        acts = provider.get("activations")[0]
        result.extra["aim_layers"] = sorted(acts.keys())
        for under in ("task_arithmetic", "ties"):
            lam = _tvs_scale_param(result.tuning, under, 1.0)
            start = time.perf_counter()
            merged_under = merge_experts(get_method(under), base, experts, {"lambda": lam},
                                         cfg.seed)
            relaxed = merge_state_dicts("aim", base, [merged_under],
                                        stats={"activations": [acts]}, omega=cfg.aim_omega,
                                        **layout_overrides(get_method("aim"),
                                                           {"activations": [acts]}))
            row(f"aim({under})", relaxed, {"omega": cfg.aim_omega, "lambda": lam},
                t0 if under == "task_arithmetic" else start)

    # --- AdaMerging: entropy of each task's head on its unlabeled test inputs
    if want("adamerging_task") or want("adamerging_layer"):

        for gran in ("task", "layer"):
            if not want(f"adamerging_{gran}"):
                continue
            t0 = time.perf_counter()
            res = learn_adamerging(suite, tasks, base, experts, granularity=gran,
                                   steps=cfg.adamerging_steps, lr=cfg.adamerging_lr,
                                   batch_size=cfg.batch_size, seed=cfg.seed)
            result.extra[f"adamerging_{gran}"] = res
            result.notes[f"adamerging_{gran}"] = (
                f"summed entropy {res.history[0]:.3f} → {res.history[-1]:.3f}, coefficients in "
                f"[{float(res.coefficients.min()):.2f}, {float(res.coefficients.max()):.2f}]")
            row(f"adamerging_{gran}", apply_coefficients(res, base, experts),
                {"granularity": gran, "steps": cfg.adamerging_steps,
                 "entropy": [round(res.history[0], 4), round(res.history[-1], 4)]}, t0)

    # --- Expert Merging (layer-wise): align with each expert's hidden states and logits
    if want("expert_merging"):

        t0 = time.perf_counter()
        coeffs = learn_expert_merging(suite, tasks, base, experts, samples=cfg.expert_samples,
                                      split=cfg.stats_split, batch_size=cfg.batch_size,
                                      limit=cfg.stats_limit).to_coefficients()
        result.extra["expert_merging"] = coeffs
        row("expert_merging", apply_coefficients(coeffs, base, experts),
            {"samples": cfg.expert_samples}, t0)

    # --- Sens-Merging: sensitivity-guided layer-wise coefficients (labeled calibration)
    if want("sens_merging"):

        t0 = time.perf_counter()
        scale = (cfg.sens_scale if cfg.sens_scale is not None
                 else _tvs_scale_param(result.tuning, "task_arithmetic", 1.0))
        res, diag = learn_sens_merging(suite, tasks, base, experts, scale=scale,
                                       limit=cfg.sens_limit, split=cfg.stats_split,
                                       batch_size=cfg.batch_size)
        result.notes["sens_merging"] = (f"λ = {scale} (task arithmetic's tuned λ), K·σ in "
                                        f"[{diag['k_sigma_min']:.3f}, "
                                        f"{diag['k_sigma_max']:.3f}]")
        row("sens_merging", apply_coefficients(res, base, experts),
            {"lambda": scale,
             "k_sigma": [round(diag["k_sigma_min"], 3), round(diag["k_sigma_max"], 3)]}, t0)

    # --- Self Positioning: task-wise coefficients by SGD on the labeled val split
    if want("self_positioning"):

        t0 = time.perf_counter()
        res = learn_self_positioning(suite, tasks, base, experts,
                                     steps=cfg.self_positioning_steps, split=cfg.stats_split,
                                     batch_size=cfg.batch_size, seed=cfg.seed)
        row("self_positioning", apply_coefficients(res, base, experts),
            {"steps": cfg.self_positioning_steps,
             "weights": [round(float(c), 3) for c in res.coefficients[0]]}, t0)
    return result
