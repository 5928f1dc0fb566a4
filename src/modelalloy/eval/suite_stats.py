"""A built suite as a torch module, its batches, and the statistics registry methods need on
it (:class:`BenchStats`): what the harness (``modelalloy bench``) and the data-informed rows
(:mod:`modelalloy.eval.informed`) both use, so neither imports the other for it.

:class:`SuiteModule` presents a suite body with its per-task heads as one ``nn.Module`` (the
body's top-level children as ``layers.0 .. layers.N-1`` where a method walks a numbered block
stack); :func:`to_body_names` maps statistics and coefficients back to the body's own names.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelalloy.plan.layers import split_layer

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
