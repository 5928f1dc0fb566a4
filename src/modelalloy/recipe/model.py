"""The recipe data model and mergekit's rule for evaluating a parameter setting.

A parameter value (:data:`ParamValue`) is, exactly as in mergekit's ``config.py``:

- a scalar (number, bool or string);
- a *gradient*: a list of scalars. A list of numbers is interpolated piecewise-linearly over
  the layer position ``t`` in [0, 1]; any other list of scalars is stepped (no interpolation);
- a list of conditional entries ``{filter: str, value: scalar | gradient}``: the *first* entry
  in list order whose ``filter`` is absent, ``"*"``, or a substring of the tensor name wins.
  When no entry matches, the setting gives nothing and the lookup falls through to the next
  level (a model's own ``parameters``, then the top-level ``parameters``, then the method's
  default).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Union, cast

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

from modelalloy.errors import RecipeError

Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]  # noqa: UP007


class Conditional(BaseModel):
    """One entry of a conditional parameter list: ``{filter: "self_attn", value: 0.5}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filter: str | None = None
    value: Union[Scalar, list[Scalar]]  # noqa: UP007

    def matches(self, tensor_name: str) -> bool:
        # mergekit: (cond.filter is None) or (cond.filter == "*") or
        #           (tensor_name and cond.filter in tensor_name)
        return (self.filter is None or self.filter == "*"
                or (bool(tensor_name) and self.filter in tensor_name))


ParamValue = Union[Scalar, list[Scalar], list[Conditional]]  # noqa: UP007


def is_number(v: Any) -> bool:
    # bool is an int subclass in Python; mergekit's isinstance(e, (int, float)) counts it as a
    # number, but a bool parameter never makes sense interpolated, so we step bool lists.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def evaluate_setting(tensor_name: str, setting: ParamValue, t: float = 0.0) -> Any:
    """The value of ``setting`` for one tensor at layer position ``t``; None if no entry matches.

    Same arithmetic as mergekit's ``evaluate_setting`` (so results agree bit for bit):
    ``scaled = t * (n - 1); i0 = int(scaled); i1 = min(n - 1, i0 + 1);
    value = (1 - frac) * g[i0] + frac * g[i1]`` with ``frac = scaled - i0``.
    """
    if not isinstance(setting, list):
        if isinstance(setting, Conditional):  # a lone entry: treated as a one-entry list
            return evaluate_setting(tensor_name, cast(list[Conditional], [setting]), t)
        return setting
    if setting and all(is_number(e) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        # numbers (checked above): mergekit's arithmetic on them as they are
        lo, hi = cast(float, setting[i0]), cast(float, setting[i1])
        return (1 - frac) * lo + frac * hi
    if setting and all(not isinstance(e, (list, dict, Conditional)) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        if isinstance(cond, Conditional) and cond.matches(tensor_name):
            return evaluate_setting(tensor_name, cond.value, t)
    return None


def layer_position(layer_index: int | None, num_layers: int | None) -> float:
    """mergekit's ``t`` for a tensor: ``idx / (num_layers - 1)``, 1 for a one-layer stack.

    Tensors outside the layer stack (embeddings, final norm, lm_head) get ``t = 0``: current
    mergekit (``MergePlanner.plan_module``) evaluates both its pre- and post-weights with the
    module's ``ConfigReader(t=0)``. (Releases before the ``modules:`` rework used t=1 for the
    post-weights; see docs/recipes.md.)
    """
    if layer_index is None:
        return 0.0
    if num_layers is None:
        raise RecipeError(f"layer index {layer_index} given without a layer count; pass "
                          "num_layers (the number of blocks in the tensor's stack)")
    if not 0 <= layer_index < num_layers:
        raise RecipeError(f"layer index {layer_index} is outside a stack of {num_layers} layers")
    if num_layers > 1:
        return layer_index / (num_layers - 1)
    return 1.0


class ModelEntry(BaseModel):
    """One ``models:`` entry: a local checkpoint folder and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One source of an output slice: layers ``layer_range[0] .. layer_range[1] - 1`` of a model."""

    model_config = ConfigDict(extra="forbid")

    model: str
    # None: every layer of the module's stack (an entry of a module's ``models:``)
    layer_range: tuple[int, int] | None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @property
    def length(self) -> int | None:
        return None if self.layer_range is None else self.layer_range[1] - self.layer_range[0]


class SliceSpec(BaseModel):
    """One ``slices:`` entry: output layers merged from its sources' layer ranges (mergekit's
    ``OutputSliceDefinition``)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    module: str | None = None  # the ``modules:`` entry it belongs to

    @property
    def length(self) -> int | None:
        return self.sources[0].length


class ModuleSpec(BaseModel):
    """One ``modules:`` entry's own settings (its slices are in ``Recipe.slices``)."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    whole: bool = False  # written as ``models:`` (whole stacks) rather than ``slices:``


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Spellings accepted for dtype / out_dtype (mergekit takes torch names, optionally "torch.").
DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}


class Calibration(BaseModel):
    """Calibration data for data-informed methods (modelalloy addition, not in mergekit).

    When a method needs statistics an expert does not have yet (``<model>/stats/<kind>``, or
    in ``stats_dir``), ``modelalloy merge`` collects them on this data first.
    """

    model_config = ConfigDict(extra="forbid")

    data: str  # a .txt (one prompt per line) or .jsonl file; relative to the recipe's folder
    batch_size: int = 8
    max_length: int = 512
    limit: int | None = None  # at most this many examples
    field: str | None = None  # the JSONL field holding the text
    # Grams from a seeded random share of the tokens (each kept with this probability, the sum
    # divided by it: unbiased); 1 = every token (exact). See docs/statistics.md.
    gram_token_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    # Where collected statistics go, for models without their own (``<model>/stats/``, the
    # default, needs a writable model folder); relative to the recipe's folder. See
    # modelalloy.stats.store.
    stats_dir: str | None = None


class TokenSource(BaseModel):
    """Where a token's embedding row comes from (mergekit's ``tokens.<token>.source``).

    ``kind``: ``model`` (that model's row for the same token), ``model_token`` (that model's
    row of another token, by text or id), ``zero`` (a row of zeros)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str  # "model" | "model_token" | "zero"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


class TokenSpec(BaseModel):
    """One entry of ``tokenizer.tokens``: its row's source, and whether it replaces the row
    of models that have the token (``force``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: TokenSource | None = None
    force: bool = False


class TokenizerSpec(BaseModel):
    """mergekit's ``tokenizer:`` block (``tokenizer_source: X`` is ``{source: X}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str  # "union", "base" or a model folder
    tokens: dict[str, TokenSpec] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    def to_yaml_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source}
        if self.tokens:
            out["tokens"] = {k: _dump_token(v) for k, v in self.tokens.items()}
        if self.pad_to_multiple_of is not None:
            out["pad_to_multiple_of"] = self.pad_to_multiple_of
        return out


def _dump_token(spec: TokenSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    src = spec.source
    if src is not None:
        if src.kind == "model":
            out["source"] = src.model
        else:
            out["source"] = {k: v for k, v in src.model_dump().items() if v is not None}
    if spec.force:
        out["force"] = True
    return out


class Recipe(BaseModel):
    """A validated merge recipe (build with :func:`parse_recipe` / :func:`load_recipe`)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    # mergekit's ``slices:`` (frankenmerges, layer ranges); ``models`` then lists each source
    # model once, without parameters (plan/slices.py builds the output's layers).
    slices: list[SliceSpec] | None = None
    # mergekit's ``modules:`` (VLMs: a text decoder and a vision tower): their slices are in
    # ``slices``, each naming its module
    modules: dict[str, ModuleSpec] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    # the full ``tokenizer:`` block; set whenever tokenizer_source is (its ``source``)
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None  # auto, a built-in name, or Jinja (io/chat_template.py)
    seed: int = 0
    calibration: Calibration | None = None
    name: str | None = None
    allow_negative_weights: bool = False
    # "mergekit" (default): mergekit's defaults and variants; "paper": each method's paper's
    # (methods.registry.CONVENTIONS, docs/recipes.md).
    conventions: str = "mergekit"
    source: str = "<string>"
    base_dir: Path = Field(default_factory=Path.cwd)
    warnings: list[str] = Field(default_factory=list)
    _experts: tuple[tuple, list[ModelEntry]] | None = PrivateAttr(default=None)

    # -- models ------------------------------------------------------------------------------

    def _candidates(self, model: str) -> list[Path]:
        p = Path(os.path.expanduser(model))
        if p.is_absolute():
            return [p]
        out = [self.base_dir / p]
        cwd = Path.cwd() / p
        if cwd.resolve() != out[0].resolve():
            out.append(cwd)
        return out

    def calibration_path(self) -> Path | None:
        """The calibration data file, resolved against the recipe's folder."""
        if self.calibration is None:
            return None
        path = Path(self.calibration.data).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def split_adapter(self, model: str) -> tuple[str, str | None]:
        """``(model, adapter)`` of a ``model+adapter`` string (mergekit's LoRA syntax; the
        first ``+`` whose left part is an existing folder, or the first ``+``); ``(model,
        None)`` when the whole string is a path or has no ``+``."""
        if "+" not in model or any(c.exists() for c in self._candidates(model)):
            return model, None
        parts = model.split("+")
        for i in range(1, len(parts)):
            left = "+".join(parts[:i])
            if any(c.exists() for c in self._candidates(left)):
                return left, "+".join(parts[i:])
        return parts[0], "+".join(parts[1:])

    def split_bundle_task(self, model: str) -> tuple[str, str | None]:
        """``(bundle folder, task)`` of a ``bundle#task`` reference (expert ``task``, by name
        or 0-based index, rebuilt from a TALL-masks bundle folder: the text after the last
        ``#``); ``(model, None)`` when the whole string is a path or has no ``#``."""
        if "#" not in model or any(c.exists() for c in self._candidates(model)):
            return model, None
        folder, task = model.rsplit("#", 1)
        return folder, task

    def adapter_path(self, model: str) -> Path | None:
        """The LoRA adapter folder of a ``model+adapter`` string, None for a plain model."""
        adapter = self.split_adapter(model)[1]
        if adapter is None:
            return None
        tried = self._candidates(adapter)
        for cand in tried:
            if cand.exists():
                return cand.resolve()
        raise RecipeError(f"{self.source}: LoRA adapter folder '{adapter}' of '{model}' not "
                          f"found (looked in {' and '.join(str(c) for c in tried)}); give a "
                          "local PEFT adapter folder")

    def model_path(self, model: str) -> Path:
        """The local folder of ``model``: relative paths try the recipe's folder, then cwd.
        For ``model+adapter``, the model's folder (see :meth:`adapter_path`); for
        ``bundle#task``, the bundle's folder (see :meth:`split_bundle_task`)."""
        model = self.split_adapter(self.split_bundle_task(model)[0])[0]
        tried = self._candidates(model)
        for cand in tried:
            if cand.exists():
                return cand.resolve()
        looked = " and ".join(str(c) for c in tried)
        if _HUB_ID.match(model) and not model.startswith("."):
            raise RecipeError(
                f"{self.source}: model '{model}' is not a local folder (looked in {looked}); it "
                "looks like a Hugging Face Hub id, and modelalloy never downloads: fetch it "
                f"first (e.g. `huggingface-cli download {model} --local-dir <folder>`) and put "
                "that local folder in the recipe")
        raise RecipeError(f"{self.source}: model folder '{model}' not found (looked in "
                          f"{looked}); give the path of a local checkpoint folder")

    def model_reference(self, model: str) -> str:
        """``model`` as a recipe written anywhere names it: its folder absolute, its
        ``#task`` (a bundle's expert) or ``+adapter`` (made absolute too) kept."""
        ref = str(self.model_path(model))
        task = self.split_bundle_task(model)[1]
        if task is not None:
            return f"{ref}#{task}"
        adapter = self.adapter_path(model)
        return f"{ref}+{adapter}" if adapter is not None else ref

    def check_paths(self) -> None:
        """Raise a RecipeError for the first model or base_model that is not a local folder."""
        for m in self.all_models():
            self.model_path(m)
            self.adapter_path(m)
        if self.tokenizer_source not in (None, "base", "union"):
            self.model_path(self.tokenizer_source)
        for spec in (self.tokenizer.tokens.values() if self.tokenizer else ()):
            if spec.source is not None and spec.source.model is not None:
                self.model_path(spec.source.model)

    def same_model(self, a: str, b: str) -> bool:
        """Whether two model strings name the same checkpoint (same text or same folder)."""
        if a == b:
            return True
        return self._candidates(a)[0].resolve() == self._candidates(b)[0].resolve()

    def all_models(self) -> list[str]:
        """Every referenced model: base first (when set), then the listed ones, no repeats."""
        out: list[str] = []
        for m in ([self.base_model] if self.base_model else []) + [e.model for e in self.models]:
            if not any(self.same_model(m, o) for o in out):
                out.append(m)
        return out

    def method_spec(self):
        from modelalloy.methods.registry import get_method

        return get_method(self.merge_method)

    def uses_base(self) -> bool:
        """True when the method takes a base and the recipe names one."""
        return self.base_model is not None and self.method_spec().base != "none"

    def expert_entries(self) -> list[ModelEntry]:
        """The models being merged, in recipe order.

        For methods whose base is required/optional, the listed models minus the base_model
        (mergekit lets the base appear in ``models``); for base="none" methods, all of them.
        """
        # Cached: the engine asks once per tensor, and same_model may touch the file system.
        key = (self.merge_method, self.base_model, self.base_dir,
               tuple((id(e), e.model) for e in self.models))
        if self._experts is None or self._experts[0] != key:
            base = self.base_model
            if not self.uses_base() or base is None:
                experts = list(self.models)
            else:
                experts = [e for e in self.models if not self.same_model(e.model, base)]
            self._experts = (key, experts)
        return list(self._experts[1])

    def base_entry(self) -> ModelEntry | None:
        """The ``models`` entry of the base model, when the base is also listed there."""
        if self.base_model is None:
            return None
        for e in self.models:
            if self.same_model(e.model, self.base_model):
                return e
        return None

    # -- other settings ----------------------------------------------------------------------

    @property
    def output_dtype(self) -> str | None:
        """The dtype to write: ``out_dtype``, else ``dtype`` (as mergekit), else None (keep)."""
        return self.out_dtype or self.dtype

    def tokenizer_path(self) -> Path | None:
        """Folder whose tokenizer the output gets: base_model for "base", else the given path."""
        if self.tokenizer_source in (None, "union"):
            return None
        if self.tokenizer_source == "base":
            return self.model_path(cast(str, self.base_model))  # validated: base_model is set
        return self.model_path(self.tokenizer_source)

    def to_yaml(self) -> str:
        """Canonical YAML of the recipe (for the model card); parses back to the same recipe."""
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        out["merge_method"] = self.merge_method
        if self.base_model is not None:
            out["base_model"] = self.base_model
        if self.modules:
            out["modules"] = {name: _dump_module(
                module, [sl for sl in self.slices or [] if sl.module == name])
                for name, module in self.modules.items()}
        elif self.slices:
            out["slices"] = _dump_slices(self.slices)
        else:
            out["models"] = [
                {"model": e.model, **({"parameters": _dump_params(e.parameters)}
                                      if e.parameters else {})}
                for e in self.models]
        if self.parameters:
            out["parameters"] = _dump_params(self.parameters)
        for key in ("dtype", "out_dtype"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tokenizer is not None and (self.tokenizer.tokens
                                           or self.tokenizer.pad_to_multiple_of):
            out["tokenizer"] = self.tokenizer.to_yaml_dict()
        elif self.tokenizer_source is not None:
            out["tokenizer_source"] = self.tokenizer_source
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        out["seed"] = self.seed
        if self.conventions != "mergekit":
            out["conventions"] = self.conventions
        if self.allow_negative_weights:
            out["allow_negative_weights"] = True
        if self.calibration is not None:
            out["calibration"] = self.calibration.model_dump(exclude_defaults=True)
        return yaml.dump(out, Dumper=_Dumper, sort_keys=False, allow_unicode=True).rstrip() + "\n"


def _dump_source(s: SliceSource) -> dict[str, Any]:
    return {"model": s.model,
            **({"layer_range": list(s.layer_range)} if s.layer_range is not None else {}),
            **({"parameters": _dump_params(s.parameters)} if s.parameters else {})}


def _dump_slices(slices: list[SliceSpec]) -> list[dict[str, Any]]:
    return [{"sources": [_dump_source(s) for s in sl.sources],
             **({"parameters": _dump_params(sl.parameters)} if sl.parameters else {})}
            for sl in slices]


def _dump_module(module: ModuleSpec, slices: list[SliceSpec]) -> dict[str, Any]:
    out: dict[str, Any] = ({"models": [_dump_source(s) for s in slices[0].sources]}
                           if module.whole else {"slices": _dump_slices(slices)})
    if module.parameters:
        out["parameters"] = _dump_params(module.parameters)
    return out


def _dump_value(v: Any) -> Any:
    if isinstance(v, Conditional):
        d: dict[str, Any] = {}
        if v.filter is not None:
            d["filter"] = v.filter
        d["value"] = _dump_value(v.value)
        return d
    if isinstance(v, list):
        return [_dump_value(x) for x in v]
    return v


def _dump_params(params: dict[str, ParamValue]) -> dict[str, Any]:
    return {k: _dump_value(v) for k, v in params.items()}


class _Dumper(yaml.SafeDumper):
    """Lists of scalars (gradients) in flow style, like mergekit's ConfigYamlDumper."""

    def represent_list(self, data):
        flow = all(not isinstance(e, (list, dict)) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _Dumper.represent_list)
