"""What a search maximises: ``--objective`` strings turned into scorers of merged state dicts.

==============================================  =============================================
``suite:tiny-vision`` / ``suite:tiny-lm``       mean accuracy over the suite's merged tasks on
                                                its validation split (``?split=test``,
                                                ``?size=smoke``, ``?limit=N`` examples per
                                                task); the per-task accuracies are kept too.
                                                The learners read the suite's unlabeled
                                                (``test`` inputs) or labeled (``val``) data.
``lm-eval:TASK[,TASK]``                         lm-evaluation-harness on the candidate, in
                                                memory (the template's reference model,
                                                ``from_config``, with the candidate's weights
                                                loaded), mean of each task's first metric;
                                                ``?include=DIR`` (local task YAMLs),
                                                ``limit=N``, ``batch_size=N``
``python:package.module:function``              ``function(state_dict) -> float`` or a
                                                mapping of named scores (``score`` is the one
                                                maximised; else their mean)
==============================================  =============================================

The suites and lm-eval score a live model: each worker keeps one model per objective (and per
depth, for data-flow paths), and every candidate is merged into its parameters in place, only
the tensors that changed since the previous candidate written again
(:func:`modelalloy.optimize.candidate.merge_into`). A ``python:`` objective receives a state
dict instead, which is **read-only**: its tensors are shared with the next candidates
(unchanged tensors are not merged again); copy a tensor before changing it.

Several objectives combine as Σ wᵢ·scoreᵢ (weights from ``--weights``, default 1 each); the
multi-objective algorithms read every score of every objective.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch

from modelalloy.errors import ModelAlloyError, OptimizeError
from modelalloy.optimize.candidate import LiveModel, Shapes

KINDS = ("suite", "lm-eval", "python")
SUITE_OPTIONS = ("size", "split", "limit")
LM_EVAL_OPTIONS = ("include", "limit", "batch_size")


class Objective:
    """A scorer: ``score(state_dict)`` gives named numbers, higher is better; ``score`` is the
    one a single-objective search maximises."""

    spec: str

    def prepare(self) -> None:
        """Build or load what scoring needs (in the driver, before any worker starts)."""

    def bind(self, reference: Any) -> None:
        """The template's reference model folder (for objectives that build the model)."""

    def score(self, state_dict: Mapping[str, torch.Tensor], fidelity: float = 1.0
              ) -> dict[str, float]:
        """``fidelity`` in (0, 1]: the share of the data to score on (multi-fidelity
        searches); objectives that cannot subsample ignore it."""
        raise NotImplementedError

    def live_models(self) -> LiveModels | None:
        """The live models this objective scores candidates in (None: it takes state
        dicts)."""
        return None

    def score_module(self, module: torch.nn.Module, fidelity: float = 1.0) -> dict[str, float]:
        """:meth:`score` of a candidate already merged into one of :meth:`live_models`."""
        raise NotImplementedError


class LiveModels:
    """An objective's live models, one per depth (a data-flow path changes the layer count),
    built on first use; objectives with the same ``key`` (the same model) share them."""

    def __init__(self, key: Any, depth: Callable[[Shapes], int | None],
                 build: Callable[[int | None], torch.nn.Module],
                 check: Callable[[Shapes, torch.nn.Module], None] | None = None) -> None:
        self.key, self._depth, self._build, self._check = key, depth, build, check
        self._models: dict[int | None, LiveModel] = {}

    def __call__(self, shapes: Shapes) -> LiveModel:
        depth = self._depth(shapes)
        if depth not in self._models:
            self._models[depth] = LiveModel(self._build(depth), self._check)
        model = self._models[depth]
        model.fit(shapes)
        return model

    def forget(self) -> None:
        for model in self._models.values():
            model.forget()


@dataclass
class SuiteObjective(Objective):
    spec: str
    name: str
    size: str = "full"
    split: str = "val"
    limit: int | None = None
    _suite: Any = field(default=None, repr=False)
    _live: LiveModels | None = field(default=None, repr=False)

    @property
    def suite(self) -> Any:
        if self._suite is None:
            from modelalloy.bench import load_suite

            self._suite = load_suite(self.name, self.size)
        return self._suite

    @property
    def tasks(self) -> list[str]:
        return self.suite.info.merged_tasks

    def prepare(self) -> None:
        """Builds the suite once (in the driver, and in each Ray worker before its first
        trial), and its model once: its imports (transformers' GPT-2 for tiny-lm: seconds on a
        busy machine) are then not paid inside a trial."""
        self.suite.new_model()

    def _limit(self, fidelity: float) -> int | None:
        limit = self.limit
        if fidelity < 1.0:
            full = min(len(self.suite.labeled(t, self.split)[0]) for t in self.tasks)
            limit = max(1, math.ceil(fidelity * min(full, limit or full)))
        return limit

    @staticmethod
    def _scores(res: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
        accs = {t: float(r["accuracy"]) for t, r in res.items()}
        return {"score": sum(accs.values()) / len(accs), **accs}

    def score(self, state_dict: Mapping[str, torch.Tensor], fidelity: float = 1.0
              ) -> dict[str, float]:
        return self._scores(self.suite.evaluate(dict(state_dict), self.tasks, split=self.split,
                                                limit=self._limit(fidelity)))

    def live_models(self) -> LiveModels:
        if self._live is None:
            suite = self.suite
            self._live = LiveModels(("suite", self.name, self.size), suite.model_depth,
                                    suite.new_model, suite.check_fit)
        return self._live

    def score_module(self, module: torch.nn.Module, fidelity: float = 1.0) -> dict[str, float]:
        return self._scores(self.suite.evaluate_model(module, self.tasks, split=self.split,
                                                      limit=self._limit(fidelity)))

    def __getstate__(self) -> dict[str, Any]:  # to Ray workers: the spec, not the suite
        return {**self.__dict__, "_suite": None, "_live": None}


@dataclass
class PythonObjective(Objective):
    spec: str
    module: str
    function: str
    _fn: Callable[..., Any] | None = field(default=None, repr=False)

    def prepare(self) -> None:
        self._load()

    def _load(self) -> Callable[..., Any]:
        if self._fn is None:
            try:
                mod = importlib.import_module(self.module)
            except ImportError as err:
                raise OptimizeError(f"objective '{self.spec}': cannot import module "
                                    f"'{self.module}' ({err})") from None
            fn = getattr(mod, self.function, None)
            if not callable(fn):
                raise OptimizeError(f"objective '{self.spec}': module '{self.module}' has no "
                                    f"function '{self.function}'")
            self._fn = fn
        return self._fn

    def score(self, state_dict: Mapping[str, torch.Tensor], fidelity: float = 1.0
              ) -> dict[str, float]:
        fn = self._load()
        takes = "fidelity" in inspect.signature(fn).parameters
        value = fn(dict(state_dict), fidelity=fidelity) if takes else fn(dict(state_dict))
        if isinstance(value, Mapping):
            scores = {str(k): float(v) for k, v in value.items()}
            if not scores:
                raise OptimizeError(f"objective '{self.spec}' returned no score")
            scores.setdefault("score", sum(scores.values()) / len(scores))
            return scores
        return {"score": float(value)}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fn": None}


@dataclass
class LmEvalObjective(Objective):
    """lm-eval tasks on the candidate, in memory: one HF model built from the reference
    folder's config and tokenizer, the candidate's weights copied into it for each trial."""

    spec: str
    tasks: list[str]
    include: str | None = None
    limit: int | None = None
    batch_size: int = 8
    reference: str | None = None
    _lms: dict[int | None, Any] = field(default_factory=dict, repr=False)
    _live: LiveModels | None = field(default=None, repr=False)

    def bind(self, reference: Any) -> None:
        self.reference = str(reference)

    def prepare(self) -> None:
        from modelalloy.eval.lm_eval_adapter import INSTALL_HINT, available

        if not available():
            raise OptimizeError(f"objective '{self.spec}': {INSTALL_HINT}")
        if self.include is not None and not Path(self.include).is_dir():
            raise OptimizeError(f"objective '{self.spec}': include folder {self.include} "
                                "not found")

    def _model(self, layers: int | None = None) -> Any:
        """The HF model (wrapped for lm-eval) of the reference's config, with ``layers``
        decoder layers when given (a data-flow path changes the depth): one per depth."""
        if layers not in self._lms:
            from lm_eval.models.huggingface import HFLM
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            if self.reference is None:
                raise OptimizeError(f"objective '{self.spec}' has no reference model")
            config = AutoConfig.from_pretrained(self.reference, local_files_only=True)
            if layers is not None:
                with_depth(config, layers, self.spec)
            model = AutoModelForCausalLM.from_config(config).eval()
            tok = AutoTokenizer.from_pretrained(self.reference, local_files_only=True)
            self._lms[layers] = HFLM(pretrained=model, tokenizer=tok,
                                     batch_size=self.batch_size, device="cpu")
        return self._lms[layers]

    def score(self, state_dict: Mapping[str, torch.Tensor], fidelity: float = 1.0
              ) -> dict[str, float]:
        lm = self._model(stack_depth(state_dict))
        model = lm.model
        missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
        if unexpected:
            raise OptimizeError(f"objective '{self.spec}': the candidate has tensors the "
                                f"model does not: {unexpected[:3]}")
        return self._evaluate(lm, fidelity)

    def live_models(self) -> LiveModels:
        if self._live is None:
            self._live = LiveModels(("lm-eval", self.reference), stack_depth,
                                    lambda depth: self._model(depth).model, self._check)
        return self._live

    def _check(self, shapes: Shapes, model: torch.nn.Module) -> None:
        unexpected = [n for n in shapes if n not in model.state_dict()]
        if unexpected:
            raise OptimizeError(f"objective '{self.spec}': the candidate has tensors the "
                                f"model does not: {unexpected[:3]}")

    def score_module(self, module: torch.nn.Module, fidelity: float = 1.0) -> dict[str, float]:
        lm = next((lm for lm in self._lms.values() if lm.model is module), None)
        if lm is None:
            raise OptimizeError(f"objective '{self.spec}': not one of its live models")
        return self._evaluate(lm, fidelity)

    def _evaluate(self, lm: Any, fidelity: float) -> dict[str, float]:
        import lm_eval
        from lm_eval.tasks import TaskManager

        if hasattr(lm.model, "tie_weights"):
            lm.model.tie_weights()
        limit = self.limit
        if fidelity < 1.0 and limit is not None:
            limit = max(1, math.ceil(fidelity * limit))
        manager = TaskManager(include_path=self.include)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(self.tasks), task_manager=manager,
                                      limit=limit, log_samples=False)
        if res is None:
            raise OptimizeError(f"objective '{self.spec}': lm-eval returned no results")
        out: dict[str, float] = {}
        for task, metrics in res["results"].items():
            # the task's own metrics, in its order (the results also hold counts, aliases)
            better = res.get("higher_is_better", {}).get(task, {})
            for metric, higher in better.items():
                key = next((k for k in metrics if k.split(",")[0] == metric), None)
                if key is not None and isinstance(metrics[key], (int, float)):
                    out[task] = float(metrics[key]) * (1.0 if higher else -1.0)
                    break
        if not out:
            raise OptimizeError(f"objective '{self.spec}': lm-eval gave no metric")
        return {"score": sum(out.values()) / len(out), **out}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lms": {}, "_live": None}


def stack_depth(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The layer count of a state dict's (deepest) layer stack; None without one."""
    from modelalloy.plan.layers import split_layer

    stacks: dict[str, set[int]] = {}
    for name in state_dict:
        found = split_layer(name)
        if found is not None:
            stacks.setdefault(found[0], set()).add(found[1])
    return max((len(v) for v in stacks.values()), default=None)


def with_depth(config: Any, layers: int, where: str) -> None:
    """An HF config changed in place to ``layers`` decoder layers, as ``modelalloy merge``
    writes a ``slices:`` merge's config (plan/slices.py): every layer-count key it has, and a
    ``layer_types`` list when its layers are all of one type."""
    from modelalloy.plan.slices import LAYER_COUNT_KEYS

    for key in LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, layers)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) != layers:
        if len(set(types)) > 1:
            raise OptimizeError(f"objective '{where}': the candidate has {layers} layers and "
                                "the reference config mixes layer types; score it from a "
                                "merged folder (its config holds the path's types)")
        config.layer_types = types[:1] * layers


def parse_objective(spec: str) -> Objective:
    """An :class:`Objective` from its ``--objective`` string (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "suite":
        name, _, query = rest.partition("?")
        from modelalloy.bench import SUITE_NAMES

        if name not in SUITE_NAMES:
            raise OptimizeError(f"objective '{spec}': unknown suite '{name}'; use "
                                f"{', '.join(f'suite:{s}' for s in SUITE_NAMES)}")
        opts = dict(parse_qsl(query, keep_blank_values=True))
        bad = [k for k in opts if k not in SUITE_OPTIONS]
        if bad:
            raise OptimizeError(f"objective '{spec}': unknown option '{bad[0]}'; use "
                                f"{', '.join(SUITE_OPTIONS)}")
        if opts.get("split", "val") not in ("val", "test"):
            raise OptimizeError(f"objective '{spec}': split must be val or test")
        limit = opts.get("limit")
        if limit is not None and not limit.isdigit():
            raise OptimizeError(f"objective '{spec}': limit must be a whole number")
        return SuiteObjective(spec, name, opts.get("size", "full"), opts.get("split", "val"),
                              int(limit) if limit else None)
    if kind == "lm-eval":
        names, _, query = rest.partition("?")
        tasks = [t for t in names.split(",") if t]
        if not tasks:
            raise OptimizeError(f"objective '{spec}': name the tasks, lm-eval:TASK[,TASK]")
        opts = dict(parse_qsl(query, keep_blank_values=True))
        bad = [k for k in opts if k not in LM_EVAL_OPTIONS]
        if bad:
            raise OptimizeError(f"objective '{spec}': unknown option '{bad[0]}'; use "
                                f"{', '.join(LM_EVAL_OPTIONS)}")
        for key in ("limit", "batch_size"):
            if key in opts and not opts[key].isdigit():
                raise OptimizeError(f"objective '{spec}': {key} must be a whole number")
        return LmEvalObjective(spec, tasks, opts.get("include"),
                               int(opts["limit"]) if "limit" in opts else None,
                               int(opts.get("batch_size", 8)))
    if kind == "python":
        module, _, function = rest.rpartition(":")
        if not module or not function:
            raise OptimizeError(f"objective '{spec}': write python:package.module:function")
        return PythonObjective(spec, module, function)
    raise OptimizeError(f"unknown objective '{spec}'; use suite:tiny-vision, suite:tiny-lm, "
                        "lm-eval:TASK or python:package.module:function")


@dataclass
class Objectives:
    """The objectives of a run and their weights."""

    items: list[Objective]
    weights: list[float]
    # score live models that candidates are merged into (False: merged state dicts, as
    # python: objectives always get; the scores are the same bits either way)
    in_place: bool = True

    @classmethod
    def parse(cls, specs: Sequence[str], weights: Sequence[float] | None = None) -> Objectives:
        if not specs:
            raise OptimizeError("give at least one objective, e.g. "
                                "objectives=['suite:tiny-vision']", options=("objectives",))
        items = [parse_objective(s) for s in specs]
        w = [1.0] * len(items) if weights is None else [float(x) for x in weights]
        if len(w) != len(items):
            raise OptimizeError(f"{len(w)} weights for {len(items)} objectives")
        return cls(items, w)

    @property
    def specs(self) -> list[str]:
        return [o.spec for o in self.items]

    def bind(self, reference: Any) -> None:
        for o in self.items:
            o.bind(reference)

    def prepare(self) -> None:
        for o in self.items:
            try:
                o.prepare()
            except ModelAlloyError:
                raise
            except Exception as err:  # a suite that cannot be built, a user module that fails
                raise OptimizeError(f"objective '{o.spec}' cannot be prepared: "
                                    f"{type(err).__name__}: {err}") from err

    @property
    def takes_modules(self) -> bool:
        """Every objective scores a live model (a ``python:`` one takes a state dict)."""
        return self.in_place and all(o.live_models() is not None for o in self.items)

    def score(self, state_dict: Mapping[str, torch.Tensor], fidelity: float = 1.0
              ) -> dict[str, float]:
        """Every objective's scores, prefixed ``<i>:`` when there are several, and ``fitness``
        = Σ wᵢ·scoreᵢ."""
        return self._combine([o.score(state_dict, fidelity) for o in self.items])

    def score_live(self, merge: Callable[[Callable[[Shapes], LiveModel]], torch.nn.Module],
                   fidelity: float = 1.0) -> dict[str, float]:
        """:meth:`score` of a candidate that ``merge(live_for)`` writes into the live model
        ``live_for`` picks for its layout: once per distinct model (objectives on one suite
        share it), before that model's objectives score it."""
        groups = self._groups()
        modules: dict[Any, torch.nn.Module] = {}
        out = []
        for o in self.items:
            key = o.live_models().key  # type: ignore[union-attr]
            if key not in modules:
                modules[key] = merge(groups[key])
            out.append(o.score_module(modules[key], fidelity))
        return self._combine(out)

    def forget(self) -> None:
        """Every live model's tensors count as unknown (the next candidate writes all)."""
        for group in self.live_groups():
            group.forget()

    def live_groups(self) -> list[LiveModels]:
        """The distinct live models' sets of the objectives."""
        return list(self._groups().values())

    def _groups(self) -> dict[Any, LiveModels]:
        groups: dict[Any, LiveModels] = {}
        for o in self.items:
            live = o.live_models()
            if live is not None:
                groups.setdefault(live.key, live)
        return groups

    def _combine(self, per_objective: list[dict[str, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        fitness = 0.0
        for i, (scores, w) in enumerate(zip(per_objective, self.weights, strict=True)):
            fitness += w * scores["score"]
            prefix = f"{i}:" if len(self.items) > 1 else ""
            out.update({f"{prefix}{k}": v for k, v in scores.items()})
        out["fitness"] = fitness
        return out

    def suite(self, algorithm: str) -> SuiteObjective:
        """The suite objective a learner reads its data from."""
        for o in self.items:
            if isinstance(o, SuiteObjective):
                return o
        raise OptimizeError(f"{algorithm} learns from a suite's data: give a suite "
                            "objective, objectives=['suite:tiny-vision'] (or suite:tiny-lm)",
                            options=("objectives",))


def suite_template(template: str, method: str = "task_arithmetic",
                   search: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A template recipe over the base and merged experts of the suite ``template`` names
    (``suite:tiny-vision?size=smoke``; the command line's ``modelalloy optimize
    --template``)."""
    obj = parse_objective(template)
    if not isinstance(obj, SuiteObjective):
        raise OptimizeError(f"template='{template}': not a suite objective; give "
                            "suite:tiny-vision or suite:tiny-lm", options=("template",))
    info = obj.suite.info
    from modelalloy.methods import get_method

    spec_m = get_method(method)
    names = {p.name for p in spec_m.params}
    params: dict[str, Any] = {"weight": [0.0, 1.0]} if "weight" in names else {}
    if "density" in names:
        params["density"] = [0.1, 1.0]
    data: dict[str, Any] = {"merge_method": method}
    if spec_m.base != "none":
        data["base_model"] = str(info.base_dir)
    data["models"] = [{"model": str(info.expert_dir(t))} for t in info.merged_tasks]
    if "normalize" in names and method != "linear":
        data["parameters"] = {"normalize": False}
    if "lambda" in names:
        data.setdefault("parameters", {})["lambda"] = 1.0
    data["dtype"] = "float32"
    data["search"] = dict(search or {"granularity": "task", "parameters": params})
    return data
