"""Read and validate a recipe: YAML text -> :class:`Recipe`, every check before any model opens.

Every error is one line that names the recipe, the field (``models[1].parameters.density``) and
how to fix it: :class:`RecipeError` for the recipe's shape, :class:`MethodError` for what the
method's parameter schema rejects (unknown method, out-of-range value, wrong model count).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal, overload

import yaml
from pydantic import ValidationError

from modelalloy.errors import MethodError, RecipeError, did_you_mean
from modelalloy.io.safe_read import read_regular_file
from modelalloy.methods.registry import CONVENTIONS, MethodSpec, Param, get_method, list_methods
from modelalloy.recipe.model import (
    DTYPES,
    Calibration,
    Conditional,
    ModelEntry,
    ModuleSpec,
    Recipe,
    SliceSource,
    SliceSpec,
    TokenizerSpec,
    TokenSource,
    TokenSpec,
    is_number,
)
from modelalloy.recipe.safe_yaml import MAX_BYTES, LimitedSafeLoader


class RecipeWarning(UserWarning):
    """Something in a recipe is ignored (e.g. ``chat_template``); the merge still runs."""


# Keys modelalloy reads. The order is the documented order.
SUPPORTED_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer", "chat_template", "name", "seed",
                  "allow_negative_weights", "calibration", "conventions", "slices", "modules")
# mergekit keys with no support yet: a clear one-liner instead of a silent misread.
UNSUPPORTED_KEYS: dict[str, str] = {}
# mergekit parameters that only tune mergekit's own execution: accepted and ignored.
IGNORED_PARAMS = {
    "int8_mask": "mergekit's int8 mask storage is a memory optimisation; modelalloy's masks "
                 "already use little memory",
}
MODEL_ENTRY_KEYS = ("model", "adapter", "parameters")
SLICE_KEYS = ("sources", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("slices", "models", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
COND_KEYS = ("filter", "value")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate the recipe file at ``path``; model paths resolve against its folder."""
    p = Path(path)
    return parse_recipe(read_recipe_text(p), source=str(p), base_dir=p.resolve().parent)


def read_recipe_text(p: Path) -> str:
    """The text of a recipe file, or a one-line RecipeError saying why it cannot be read."""
    if p.is_dir():
        raise RecipeError(f"{p}: is a folder; give the path of a recipe YAML file")
    if "\0" not in str(p) and not p.exists() and not p.is_symlink():
        raise RecipeError(f"{p}: recipe file not found; check the path")
    raw = read_regular_file(p, MAX_BYTES, RecipeError, "the recipe")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: cannot read the recipe ({e}); give a UTF-8 YAML file") from None


def parse_recipe(text: str, source: str = "<string>", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe given as YAML text. ``base_dir`` (default: cwd) anchors model paths."""
    raw = _load_yaml(text, source)
    return _Validator(source, _field_lines(text)).build(raw, Path(base_dir) if base_dir
                                                         else Path.cwd())


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>",
                     base_dir: Path | None = None) -> Recipe:
    """Validate a recipe built in code (search, optimisers) exactly as a YAML one would be.

    ``data`` has the YAML's plain structure (dicts, lists, scalars); it is not modified.
    """
    import copy

    return _Validator(source).build(copy.deepcopy(data), Path(base_dir) if base_dir
                                    else Path.cwd())


# -- YAML -----------------------------------------------------------------------------------


class _StrictLoader(LimitedSafeLoader):
    """SafeLoader (with size limits) that refuses a key given twice in one mapping (PyYAML
    keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:  # the keys written here; `<<: *anchor` may be overridden
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is given twice in the same mapping", key_node.start_mark)
        seen[key] = True
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(text: str, source: str) -> Any:
    if len(text) > MAX_BYTES:
        raise RecipeError(f"{source}: the recipe is {len(text)} characters long, over the "
                          f"{MAX_BYTES} a recipe can plausibly need; check the file")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{source}: YAML syntax error{where}: {problem}; fix the YAML "
                          "(indentation, quotes, colons)") from None


def _field_lines(text: str) -> dict[str, int]:
    """1-based line of every field path (``models[1].parameters.density``) in the YAML text."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
                    continue
                child = f"{path}.{key.value}" if path else str(key.value)
                lines.setdefault(child, key.start_mark.line + 1)
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                child = f"{path}[{i}]"
                lines.setdefault(child, item.start_mark.line + 1)
                walk(item, child)

    try:
        root = yaml.compose(text, Loader=LimitedSafeLoader)
    except yaml.YAMLError:  # pragma: no cover - the text was loaded already
        return {}
    if root is not None:
        walk(root, "")
    return lines


# -- validation -----------------------------------------------------------------------------


def _closest(word: str, options) -> str:
    return did_you_mean(word, options) or f"valid keys: {', '.join(options)}"


def _kind(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


class _Validator:
    def __init__(self, source: str, lines: dict[str, int] | None = None):
        self.source = source
        self.lines = lines or {}
        self.warnings: list[str] = []
        self.conventions = "mergekit"

    def at(self, field: str) -> str:
        """``source: field (line N)``: the line of the field, or of its closest parent."""
        probe = field
        while probe and probe not in self.lines:
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        line = f" (line {self.lines[probe]})" if probe else ""
        return f"{self.source}: {field}{line}"

    def fail(self, field: str, msg: str) -> RecipeError:
        return RecipeError(f"{self.at(field)}: {msg}" if field else f"{self.source}: {msg}")

    def warn(self, msg: str, field: str = "") -> None:
        msg = f"{self.at(field)}: {msg}" if field else f"{self.source}: {msg}"
        self.warnings.append(msg)
        warnings.warn(msg, RecipeWarning, stacklevel=4)

    # -- top level ---------------------------------------------------------------------------

    def build(self, raw: Any, base_dir: Path) -> Recipe:
        if raw is None:
            raise self.fail("", "the recipe is empty; it needs at least `merge_method` and "
                                "`models`")
        if not isinstance(raw, dict):
            raise self.fail("", f"the recipe must be a YAML mapping of keys (merge_method, "
                                f"models, ...), got {_kind(raw)}")
        for key in raw:
            if key in UNSUPPORTED_KEYS:
                raise self.fail(str(key), UNSUPPORTED_KEYS[key])
            if key not in SUPPORTED_KEYS:
                raise self.fail(str(key), f"unknown key; {_closest(key, SUPPORTED_KEYS)}")

        method = self.method(raw)
        self.conventions = self.choice(raw.get("conventions", "mergekit"), "conventions",
                                       CONVENTIONS)
        base_model = self.model_string(raw.get("base_model"), "base_model", base_dir,
                                       optional=True)
        fields: dict[str, Any] = {"merge_method": raw["merge_method"], "base_model": base_model}
        if "modules" in raw:
            for other in ("slices", "models"):
                if raw.get(other) is not None:
                    raise self.fail("modules", f"give either `modules` or `{other}`, not both")
            fields["modules"], fields["slices"] = self.modules(raw["modules"], base_dir, method,
                                                               base_model)
            fields["models"] = [ModelEntry(model=m) for m in dict.fromkeys(
                s.model for sl in fields["slices"] for s in sl.sources)]
        elif "slices" in raw:
            if raw.get("models") is not None:
                raise self.fail("slices", "give either `slices` or `models`, not both")
            fields["slices"] = self.slices(raw["slices"], base_dir, method)
            fields["models"] = [ModelEntry(model=m) for m in dict.fromkeys(
                s.model for sl in fields["slices"] for s in sl.sources)]
        else:
            fields["models"] = self.models(raw, base_dir, method)
        fields["parameters"] = self.params(raw.get("parameters"), "parameters", method,
                                           per_model_level=False)
        for key in ("dtype", "out_dtype"):
            fields[key] = self.dtype(raw.get(key), key)
        fields["name"] = self.opt_str(raw.get("name"), "name")
        fields["seed"] = self.seed(raw.get("seed", 0))
        fields["allow_negative_weights"] = self.flag(raw.get("allow_negative_weights", False),
                                                     "allow_negative_weights")
        fields["tokenizer"] = self.tokenizer(raw, base_model, base_dir)
        fields["tokenizer_source"] = fields["tokenizer"].source if fields["tokenizer"] else None
        fields["calibration"] = self.calibration(raw.get("calibration"), base_dir)
        fields["conventions"] = self.conventions
        fields["chat_template"] = self.chat_template(raw.get("chat_template"))

        try:
            recipe = Recipe(**fields, source=self.source, base_dir=base_dir)
        except ValidationError as e:  # pragma: no cover - the checks above come first
            raise self.pydantic(e) from None
        self.negative_weights(recipe, method)
        self.required(recipe, method)
        if recipe.slices:
            self.slice_counts(recipe, method)
        else:
            self.counts(recipe, method)
        self.duplicates(recipe)
        recipe.warnings = self.warnings
        return recipe

    def calibration(self, raw: Any, base_dir: Path) -> Calibration | None:
        if raw is None:
            return None
        if isinstance(raw, str):
            raw = {"data": raw}
        if not isinstance(raw, dict) or "data" not in raw:
            raise self.fail("calibration", "must be a mapping with at least `data: FILE` (a "
                                           ".txt or .jsonl file of prompts)")
        try:
            calibration = Calibration(**raw)
        except ValidationError as e:
            raise pydantic_error(e, self.source, prefix="calibration.") from None
        path = Path(calibration.data).expanduser()
        if not (path if path.is_absolute() else base_dir / path).is_file():
            raise self.fail("calibration.data", f"file '{calibration.data}' not found; give a "
                                                ".txt or .jsonl file of prompts")
        return calibration

    def pydantic(self, e: ValidationError) -> RecipeError:
        return pydantic_error(e, self.source)

    def method(self, raw: dict) -> MethodSpec:
        name = raw.get("merge_method")
        if name is None:
            raise self.fail("merge_method", "missing; name the merge method, e.g. "
                                            "`merge_method: ties` (see `modelalloy methods`)")
        if not isinstance(name, str):
            raise self.fail("merge_method", f"must be a method name, got {_kind(name)}")
        try:
            return get_method(name)
        except MethodError as e:
            raise MethodError(f"{self.at('merge_method')}: {e}") from None

    def models(self, raw: dict, base_dir: Path, method: MethodSpec,
               prefix: str = "") -> list[ModelEntry]:
        models = raw.get("models")
        field = f"{prefix}models"
        if models is None:
            raise self.fail(field, "missing; list the models to merge, e.g. "
                                   "`models: [{model: ./expert-a}, {model: ./expert-b}]`")
        if not isinstance(models, list) or not models:
            raise self.fail(field, f"must be a non-empty list of `- model: <folder>` "
                                   f"entries, got {_kind(models) if models != [] else '[]'}")
        out = []
        for i, item in enumerate(models):
            where = f"{field}[{i}]"
            if isinstance(item, str):  # convenience: a bare path
                item = {"model": item}
                models[i] = item
            if not isinstance(item, dict):
                raise self.fail(where, f"must be a mapping like `{{model: ./folder}}`, got "
                                       f"{_kind(item)}")
            for key in item:
                if key == "layer_range":
                    raise self.fail(f"{where}.layer_range", "layer ranges are not supported "
                                                            "yet; remove it to merge whole "
                                                            "models")
                if key not in MODEL_ENTRY_KEYS:
                    raise self.fail(f"{where}.{key}",
                                    f"unknown key; {_closest(key, MODEL_ENTRY_KEYS)}")
            if "model" not in item:
                raise self.fail(f"{where}.model", "missing; give the model's local folder")
            model = self.model_string(item["model"], f"{where}.model", base_dir)
            if item.get("adapter") is not None:  # modelalloy: {model: .., adapter: ..}
                model = self.with_adapter(model, item["adapter"], f"{where}.adapter", base_dir)
            params = self.params(item.get("parameters"), f"{where}.parameters", method,
                                 per_model_level=True)
            out.append(ModelEntry(model=model, parameters=params))
        return out

    def slices(self, raw: Any, base_dir: Path, method: MethodSpec,
               prefix: str = "") -> list[SliceSpec]:
        if not isinstance(raw, list) or not raw:
            raise self.fail(f"{prefix}slices", "must be a non-empty list of `- sources: [...]` "
                                               "entries")
        out = []
        for i, item in enumerate(raw):
            where = f"{prefix}slices[{i}]"
            if not isinstance(item, dict) or "sources" not in item:
                raise self.fail(where, "must be a mapping with `sources: [{model, layer_range}]`")
            for key in item:
                if key not in SLICE_KEYS:
                    raise self.fail(f"{where}.{key}", "not supported" if key in (
                        "base_model", "residual_weight") else
                        f"unknown key; {_closest(key, SLICE_KEYS)}")
            sources = item["sources"]
            if not isinstance(sources, list) or not sources:
                raise self.fail(f"{where}.sources", "must be a non-empty list of "
                                                    "`{model, layer_range: [start, end]}`")
            srcs = [self.slice_source(s, f"{where}.sources[{j}]", base_dir, method)
                    for j, s in enumerate(sources)]
            lengths = {s.length for s in srcs}
            if len(lengths) > 1:
                raise self.fail(f"{where}.sources", "every source of a slice must have the "
                                f"same number of layers, got "
                                f"{sorted(lengths, key=lambda n: -1 if n is None else n)}")
            params = self.params(item.get("parameters"), f"{where}.parameters", method,
                                 per_model_level=False)
            out.append(SliceSpec(sources=srcs, parameters=params))
        return out

    def modules(self, raw: Any, base_dir: Path, method: MethodSpec, base_model: str | None
                ) -> tuple[dict[str, ModuleSpec], list[SliceSpec]]:
        """mergekit's ``modules:``: per module (a layer stack: the text decoder, the vision
        tower), ``slices`` or ``models`` and ``parameters``. Returns the modules and their
        slices laid end to end (each slice knows its module; a module's ``models`` are one
        slice over every layer of its stack, the base added as mergekit adds it)."""
        if not isinstance(raw, dict) or not raw:
            raise self.fail("modules", "must be a mapping of module name -> {slices | models, "
                                       "parameters}")
        modules: dict[str, ModuleSpec] = {}
        slices: list[SliceSpec] = []
        for name, item in raw.items():
            where = f"modules.{name}"
            if not isinstance(item, dict):
                raise self.fail(where, f"must be a mapping with `slices` or `models`, got "
                                       f"{_kind(item)}")
            for key in item:
                if key not in MODULE_KEYS:
                    raise self.fail(f"{where}.{key}", f"unknown key; {_closest(key, MODULE_KEYS)}")
            if ("slices" in item) == ("models" in item):
                raise self.fail(where, "give either `slices` or `models`")
            params = self.params(item.get("parameters"), f"{where}.parameters", method,
                                 per_model_level=False)
            if "slices" in item:
                own = self.slices(item["slices"], base_dir, method, prefix=f"{where}.")
            else:
                entries = self.models(item, base_dir, method, prefix=f"{where}.")
                sources = [SliceSource(model=e.model, layer_range=None, parameters=e.parameters)
                           for e in entries]
                if base_model is not None and method.base != "none" and not any(
                        _same(s.model, base_model, base_dir) for s in sources):
                    sources.append(SliceSource(model=base_model, layer_range=None))
                own = [SliceSpec(sources=sources)]
            modules[str(name)] = ModuleSpec(parameters=params, whole="models" in item)
            slices += [sl.model_copy(update={"module": str(name)}) for sl in own]
        return modules, slices

    def slice_source(self, item: Any, where: str, base_dir: Path,
                     method: MethodSpec) -> SliceSource:
        if not isinstance(item, dict):
            raise self.fail(where, "must be a mapping like `{model: ./folder, layer_range: "
                                   "[0, 8]}`")
        for key in item:
            if key not in SOURCE_KEYS:
                raise self.fail(f"{where}.{key}", f"unknown key; {_closest(key, SOURCE_KEYS)}")
        if "model" not in item:
            raise self.fail(f"{where}.model", "missing; give the model's local folder")
        model = self.model_string(item["model"], f"{where}.model", base_dir)
        rng = item.get("layer_range")
        if not (isinstance(rng, list) and len(rng) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
                and 0 <= rng[0] < rng[1]):
            raise self.fail(f"{where}.layer_range", f"must be [start, end] with 0 <= start < "
                                                    f"end (end excluded), got {rng!r}")
        params = self.params(item.get("parameters"), f"{where}.parameters", method,
                             per_model_level=True)
        return SliceSource(model=model, layer_range=(rng[0], rng[1]), parameters=params)

    def slice_counts(self, recipe: Recipe, method: MethodSpec) -> None:
        """Every slice gives the method the same roles: the base (when the method uses one,
        among each slice's sources, as mergekit needs) and the same number of others."""
        uses_base = recipe.uses_base()
        counts = set()
        base = recipe.base_model
        for i, sl in enumerate(recipe.slices or ()):
            bases = [s for s in sl.sources
                     if uses_base and base is not None and recipe.same_model(s.model, base)]
            if uses_base and len(bases) != 1:
                raise self.fail(f"slices[{i}].sources", f"base_model '{recipe.base_model}' "
                                "must be one of this slice's sources (once), as mergekit needs "
                                "it there")
            counts.add(len(sl.sources) - len(bases))
        if len(counts) > 1:
            raise self.fail("slices", "every slice must merge the same number of models "
                                      f"(besides the base); got {sorted(counts)}")
        try:
            method.check_model_count(counts.pop(), uses_base)
        except MethodError as e:
            raise MethodError(f"{self.at('slices')}: {e}") from None

    @overload
    def model_string(self, value: Any, field: str, base_dir: Path,
                     optional: Literal[False] = False) -> str: ...

    @overload
    def model_string(self, value: Any, field: str, base_dir: Path,
                     optional: bool) -> str | None: ...

    def model_string(self, value: Any, field: str, base_dir: Path,
                     optional: bool = False) -> str | None:
        """A model reference as a string (``model+adapter`` for an adapted model); None only
        for an ``optional`` one that is absent."""
        if value is None and optional:
            return None
        if isinstance(value, dict) and "model" in value:
            # mergekit's structured ModelReference: {model: {path: ..}, lora: {path: ..}},
            # or modelalloy's {model: .., adapter: ..}: kept as the string "model+adapter"
            adapter = value.get("adapter") or value.get("lora")
            if adapter is not None:
                adapter = adapter.get("path") if isinstance(adapter, dict) else adapter
                model = self.model_string({"model": value["model"]}, field, base_dir)
                return self.with_adapter(model, adapter, field, base_dir)
            inner = value["model"]
            if isinstance(inner, dict):
                if inner.get("revision"):
                    raise self.fail(field, "revisions are not supported: modelalloy never "
                                           "downloads; give a local folder")
                inner = inner.get("path")
            value = inner
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field, f"must be the path of a local model folder, got "
                                   f"{_kind(value)}")
        exists = (base_dir / Path(value).expanduser()).exists() or Path(value).expanduser() \
            .exists()
        if "+" in value and not exists:
            model, adapter = value.split("+", 1)
            return self.with_adapter(model, adapter, field, base_dir)
        if "@" in value and not exists:
            raise self.fail(field, f"'{value}': '@revision' is not supported: modelalloy never "
                                   "downloads; give a local folder")
        return value

    def with_adapter(self, model: str, adapter: Any, field: str, base_dir: Path) -> str:
        """``model+adapter`` (mergekit's LoRA syntax); folders are checked when opened."""
        if not isinstance(adapter, str) or not adapter.strip():
            raise self.fail(field, f"the LoRA adapter must be the path of a local PEFT adapter "
                                   f"folder, got {_kind(adapter)}")
        return f"{model}+{adapter}"

    # -- parameters --------------------------------------------------------------------------

    def params(self, raw_params: Any, field: str, method: MethodSpec, *,
               per_model_level: bool) -> dict[str, Any]:
        if raw_params is None:
            return {}
        if not isinstance(raw_params, dict):
            raise self.fail(field, f"must be a mapping of parameter names to values, got "
                                   f"{_kind(raw_params)}")
        out: dict[str, Any] = {}
        names = {p.name: p for p in method.params}
        for key, value in raw_params.items():
            where = f"{field}.{key}"
            if not isinstance(key, str):
                raise self.fail(where, "parameter names must be strings")
            if key not in names:
                if key in IGNORED_PARAMS:
                    self.warn(f"ignored ({IGNORED_PARAMS[key]})", where)
                    continue
                if key in _known_params():  # mergekit accepts it for any method
                    self.warn(f"ignored: method '{method.name}' does not use '{key}'", where)
                    continue
                takes = ", ".join(names) or "no parameters"
                hint = _closest(key, list(names) or _known_params())
                hint = f"{hint} " if hint.startswith("did you mean") else ""
                raise MethodError(f"{self.at(where)}: method '{method.name}' has no "
                                  f"parameter '{key}'; {hint}it takes: {takes}")
            param = names[key]
            if per_model_level and not param.per_model:
                self.warn(f"ignored: '{key}' is a global parameter of method "
                          f"'{method.name}' (one value for all models), read only from the "
                          "top-level `parameters`, as in mergekit", where)
                continue
            out[key] = self.value(value, where, param)
        return out

    def value(self, v: Any, where: str, param: Param) -> Any:
        """Parse one parameter setting into its canonical form and check every leaf."""
        if isinstance(v, dict):
            return [self.conditional(v, where, param)]
        if isinstance(v, list):
            if not v:
                raise self.fail(where, "empty list; give a value, a gradient like [0, 0.5, 1], "
                                       "or a list of {filter, value} entries")
            if all(isinstance(e, dict) for e in v):
                return [self.conditional(e, f"{where}[{i}]", param) for i, e in enumerate(v)]
            if any(isinstance(e, (dict, list)) for e in v):
                raise self.fail(where, "a list must be either a gradient of plain values "
                                       "[0, 0.5, 1] or a list of {filter, value} entries, not "
                                       "a mix or nested lists")
            return self.gradient(v, where, param)
        return self.leaf(v, where, param)

    def conditional(self, e: dict, where: str, param: Param) -> Conditional:
        for key in e:
            if key not in COND_KEYS:
                raise self.fail(f"{where}.{key}", f"unknown key in a conditional entry; "
                                                  f"{_closest(key, COND_KEYS)}")
        if "value" not in e:
            raise self.fail(where, "conditional entry without `value`; write "
                                   "`{filter: self_attn, value: 0.5}`")
        flt = e.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise self.fail(f"{where}.filter", f"must be a string (a part of tensor names such "
                                               f"as self_attn or mlp), got {_kind(flt)}")
        v = e["value"]
        vw = f"{where}.value"
        if isinstance(v, list):
            if not v or any(isinstance(x, (dict, list)) for x in v):
                raise self.fail(vw, "must be a value or a gradient of plain values like "
                                    "[0, 0.5, 1]; conditional entries do not nest")
            value = self.gradient(v, vw, param)
        elif isinstance(v, dict):
            raise self.fail(vw, "must be a value or a gradient of plain values like "
                                "[0, 0.5, 1]; conditional entries do not nest")
        else:
            value = self.leaf(v, vw, param)
        return Conditional(filter=flt, value=value)

    def gradient(self, v: list, where: str, param: Param) -> list:
        out = [self.leaf(x, f"{where}[{i}]", param) for i, x in enumerate(v)]
        if param.type in (int, float) and len(out) > 1 and not all(is_number(x) for x in out):
            raise self.fail(where, f"gradient for numeric parameter '{param.name}' must hold "
                                   "numbers only")
        return out

    def leaf(self, x: Any, where: str, param: Param) -> Any:
        if x is None:
            raise self.fail(where, f"no value given for '{param.name}'; give one or remove "
                                   "the key")
        if param.type in (int, float) and isinstance(x, str):
            # PyYAML reads 1e-3 (no dot) as a string; mergekit would pass the string on.
            try:
                x = float(x)
            except ValueError:
                raise MethodError(f"{self.at(where)}: parameter '{param.name}' must be a "
                                  f"number, got {x!r}") from None
        if is_number(x) and not math.isfinite(x):
            raise MethodError(f"{self.at(where)}: parameter '{param.name}' must be "
                              f"finite, got {x}")
        if param.type is int and is_number(x) and not float(x).is_integer():
            raise MethodError(f"{self.at(where)}: parameter '{param.name}' must be a "
                              f"whole number, got {x}")
        return param.check(x, self.at(where))

    def chat_template(self, v: Any) -> str | None:
        from modelalloy.io.chat_template import BUILTIN, is_valid_setting

        if v is None:
            return None
        if not isinstance(v, str) or not is_valid_setting(v):
            raise self.fail("chat_template", f"must be auto, a built-in name ("
                                             f"{', '.join(sorted(BUILTIN))}) or a Jinja "
                                             f"template, got {v!r}")
        return v

    def choice(self, v: Any, field: str, options: tuple[str, ...]) -> str:
        if v not in options:
            raise self.fail(field, f"must be one of {', '.join(options)}, got {v!r}")
        return v

    def required(self, recipe: Recipe, method: MethodSpec) -> None:
        """A parameter without a default (slerp's ``t``) must be set somewhere."""
        for p in method.params:
            levels = [recipe.parameters] + [e.parameters for e in recipe.models] + [
                level for sl in recipe.slices or []
                for level in [sl.parameters] + [s.parameters for s in sl.sources]]
            if p.required and not any(p.name in level for level in levels):
                raise MethodError(f"{self.at('parameters')}: method '{method.name}' needs "
                                  f"parameter '{p.name}' ({p.help}); set it under "
                                  "`parameters`, as mergekit requires")

    def negative_weights(self, recipe: Recipe, method: MethodSpec) -> None:
        """Negative weights (task negation): accepted with mergekit's conventions (a one-line
        warning); with ``conventions: paper`` refused unless ``allow_negative_weights``.

        Under the paper conventions a negative weight is far more often a typo than a choice.
        """
        if "weight" not in {p.name for p in method.params}:
            return
        settings = [("parameters.weight", recipe.parameters.get("weight"))]
        settings += [(f"models[{i}].parameters.weight", e.parameters.get("weight"))
                     for i, e in enumerate(recipe.models)]
        for i, sl in enumerate(recipe.slices or []):
            settings.append((f"slices[{i}].parameters.weight", sl.parameters.get("weight")))
            settings += [(f"slices[{i}].sources[{j}].parameters.weight",
                          s.parameters.get("weight")) for j, s in enumerate(sl.sources)]
        for where, s in settings:
            for path, leaf in _leaves(s, where):
                if is_number(leaf) and leaf < 0:
                    if not recipe.allow_negative_weights and recipe.conventions == "paper":
                        raise self.fail(path, f"negative weight {leaf}; weights must be >= 0 "
                                              "(to subtract a model on purpose, e.g. task "
                                              "negation, add `allow_negative_weights: true`)")
                    self.warn(f"negative weight {leaf} subtracts that model's "
                              "contribution", path)
                    break

    def duplicates(self, recipe: Recipe) -> None:
        for i, e in enumerate(recipe.models):
            for j in range(i):
                if recipe.same_model(e.model, recipe.models[j].model):
                    raise self.fail(f"models[{i}].model", f"'{e.model}' is already listed as "
                                    f"models[{j}]; list each model once")

    def counts(self, recipe: Recipe, method: MethodSpec) -> None:
        if recipe.base_model is not None and method.base == "none":
            if recipe.base_entry() is None:
                self.warn(f"ignored, method '{method.name}' does not use a base "
                          "model; list it under `models` to merge it too", "base_model")
        try:
            method.check_model_count(len(recipe.expert_entries()), recipe.uses_base())
        except MethodError as e:
            raise MethodError(f"{self.at('models')}: {e}") from None

    # -- scalars -----------------------------------------------------------------------------

    def dtype(self, v: Any, field: str) -> str | None:
        if v is None:
            return None
        name = v[len("torch."):] if isinstance(v, str) and v.startswith("torch.") else v
        if not isinstance(name, str) or name not in DTYPES:
            raise self.fail(field, f"unknown dtype {v!r}; use one of float32, float16, "
                                   "bfloat16 (or fp32, fp16, bf16, float64)")
        return DTYPES[name]

    def opt_str(self, v: Any, field: str) -> str | None:
        if v is not None and not isinstance(v, str):
            raise self.fail(field, f"must be a string, got {_kind(v)}")
        return v

    def seed(self, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
            raise self.fail("seed", f"must be an integer from 0 to 2**63-1, got {v!r}")
        return v

    def flag(self, v: Any, field: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(field, f"must be true or false, got {v!r}")
        return v

    def tokenizer(self, raw: dict, base_model: str | None,
                  base_dir: Path) -> TokenizerSpec | None:
        """``tokenizer_source: X`` or the ``tokenizer:`` block, as one :class:`TokenizerSpec`."""
        src = raw.get("tokenizer_source")
        field = "tokenizer_source"
        block = raw.get("tokenizer")
        tokens: dict[str, TokenSpec] = {}
        pad = None
        if block is not None:
            if src is not None:
                raise self.fail("tokenizer", "give either `tokenizer_source` or a `tokenizer` "
                                             "block, not both")
            if not isinstance(block, dict):
                raise self.fail("tokenizer", f"must be a mapping, got {_kind(block)}")
            for key in block:
                if key not in TOKENIZER_KEYS:
                    raise self.fail(f"tokenizer.{key}",
                                    f"unknown key; {_closest(key, TOKENIZER_KEYS)}")
            src, field = block.get("source", "union"), "tokenizer.source"
            tokens = self.tokens(block.get("tokens"), base_dir)
            pad = block.get("pad_to_multiple_of")
            if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)
                                    or pad < 1):
                raise self.fail("tokenizer.pad_to_multiple_of",
                                f"must be a positive integer, got {pad!r}")
        if src is None:
            return None
        if src not in ("union", "base"):
            src = self.model_string(src, field, base_dir)
        elif src == "base" and base_model is None:
            raise self.fail(field, "'base' needs `base_model`; set base_model or give the "
                                   "folder of the model whose tokenizer to keep")
        return TokenizerSpec(source=src, tokens=tokens, pad_to_multiple_of=pad)

    def tokens(self, raw: Any, base_dir: Path) -> dict[str, TokenSpec]:
        """``tokenizer.tokens``: token text -> {source, force} (mergekit's TokenEmbeddingConfig)."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail("tokenizer.tokens", f"must be a mapping of token -> {{source, "
                                                f"force}}, got {_kind(raw)}")
        out = {}
        for token, entry in raw.items():
            field = f"tokenizer.tokens.{token}"
            entry = {} if entry is None else entry
            if not isinstance(entry, dict):
                raise self.fail(field, f"must be a mapping {{source, force}}, got {_kind(entry)}")
            for key in entry:
                if key not in ("source", "force"):
                    raise self.fail(f"{field}.{key}", f"unknown key; "
                                    f"{_closest(key, ('source', 'force'))}")
            force = self.flag(entry.get("force", False), f"{field}.force")
            out[str(token)] = TokenSpec(source=self.token_source(entry.get("source"), field,
                                                                 base_dir), force=force)
        return out

    def token_source(self, raw: Any, field: str, base_dir: Path) -> TokenSource | None:
        field += ".source"
        if raw is None:
            return None
        if isinstance(raw, str):
            return TokenSource(kind="model", model=self.model_string(raw, field, base_dir))
        if not isinstance(raw, dict):
            raise self.fail(field, f"must be a model folder or a mapping with `kind` (zero, "
                                   f"model_token), got {_kind(raw)}")
        kind = raw.get("kind")
        if kind == "zero":
            if set(raw) != {"kind"}:
                raise self.fail(field, "`kind: zero` takes no other key")
            return TokenSource(kind="zero")
        if kind != "model_token":
            raise self.fail(f"{field}.kind", f"must be 'zero' or 'model_token', got {kind!r}")
        extra = sorted(set(raw) - {"kind", "model", "token", "token_id"})
        if extra:
            raise self.fail(f"{field}.{extra[0]}", "unknown key; a model_token source takes "
                                                   "model and one of token, token_id")
        if ("token" in raw) == ("token_id" in raw):
            raise self.fail(field, "give exactly one of `token` and `token_id`")
        token_id = raw.get("token_id")
        if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)
                                     or token_id < 0):
            raise self.fail(f"{field}.token_id", f"must be a token id (an integer >= 0), got "
                                                 f"{token_id!r}")
        token = raw.get("token")
        if token is not None and not isinstance(token, str):
            raise self.fail(f"{field}.token", f"must be a string, got {_kind(token)}")
        return TokenSource(kind="model_token", token=token, token_id=token_id,
                           model=self.model_string(raw.get("model"), f"{field}.model", base_dir))


def _same(a: str, b: str, base_dir: Path) -> bool:
    """Two model strings naming one folder (as written, or resolved against the recipe)."""
    return a == b or (base_dir / Path(a).expanduser()).resolve() == \
        (base_dir / Path(b).expanduser()).resolve()


def _known_params() -> list[str]:
    """Every parameter name some method takes (mergekit accepts any of them for any method)."""
    return sorted({p.name for spec in list_methods() for p in spec.params})


def pydantic_error(e: ValidationError, source: str, prefix: str = "") -> RecipeError:
    """One line from pydantic's first error: ``source: models[1].parameters.density: msg``."""
    err = e.errors()[0]
    path = prefix.rstrip(".")
    for part in err["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    got = err.get("input")
    got = "" if isinstance(got, dict) else f" (got {got!r})"
    return RecipeError(f"{source}: {path or 'recipe'}: {err['msg'].lower()}{got}")


def _leaves(setting: Any, where: str):
    """(path, value) for every plain value in a canonical setting."""
    if setting is None:
        return
    if isinstance(setting, Conditional):
        yield from _leaves(setting.value, f"{where}.value")
    elif isinstance(setting, list):
        for i, x in enumerate(setting):
            yield from _leaves(x, f"{where}[{i}]")
    else:
        yield where, setting
