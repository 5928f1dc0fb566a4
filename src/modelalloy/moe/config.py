"""The MoE recipe: mergekit-moe's YAML format, validated up front with one-line errors.

```yaml
base_model: ./llama            # attention, embeddings, norms come from here
gate_mode: hidden              # hidden | hidden_avg | cheap_embed | random | uniform_random
dtype: bfloat16
experts_per_token: 2
experts:
  - source_model: ./llama-math # its MLP becomes expert 0 of every layer (model+lora works)
    positive_prompts: ["Solve 3x + 1 = 7"]
    negative_prompts: ["Write a poem"]   # optional
    residual_scale: 1.0                  # optional: scales the expert's down_proj
shared_experts:                          # optional, exactly one: Qwen2-MoE output
  - source_model: ./llama-chat
    positive_prompts: ["Hello"]
```
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelalloy.errors import RecipeError
from modelalloy.recipe.load import read_recipe_text
from modelalloy.recipe.safe_yaml import LimitedSafeLoader

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_model: str
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    residual_scale: float | None = None
    noise_scale: float | None = None


class MoERecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    seed: int = 0  # modelalloy addition: random gates and noise
    source: str = "<string>"
    base_dir: Path = Field(default_factory=Path.cwd)

    def path(self, model: str) -> Path:
        p = Path(model).expanduser()
        p = p if p.is_absolute() else self.base_dir / p
        if not p.exists():
            raise RecipeError(f"{self.source}: model folder '{model}' not found (looked in "
                              f"{p}); give a local folder")
        return p

    def paths(self, model: str) -> tuple[Path, Path | None]:
        """(model folder, LoRA adapter folder or None) of ``model`` or ``model+adapter``."""
        whole = Path(model).expanduser()
        if "+" not in model or (whole if whole.is_absolute() else self.base_dir / whole).exists():
            return self.path(model), None
        head, tail = model.split("+", 1)
        return self.path(head), self.path(tail)


def load_moe_recipe(path: str | Path) -> MoERecipe:
    path = Path(path)
    text = read_recipe_text(path)  # a regular file of plausible size, UTF-8
    try:
        # depth, alias and expanded-size limits, as a merge recipe's
        raw = yaml.load(text, Loader=LimitedSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: cannot read the MoE recipe "
                          f"({' '.join(str(e).split())[:160]})") from None
    return parse_moe_recipe(raw, source=str(path), base_dir=path.resolve().parent)


def parse_moe_recipe(raw: object, source: str = "<dict>", base_dir: Path | None = None
                     ) -> MoERecipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: an MoE recipe is a mapping with base_model and experts")
    try:
        recipe = MoERecipe(**raw, source=source, base_dir=base_dir or Path.cwd())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"{source}: {where}: {first['msg']}") from None
    if recipe.gate_mode not in GATE_MODES:
        raise RecipeError(f"{source}: gate_mode '{recipe.gate_mode}' is unknown; use one of "
                          f"{', '.join(GATE_MODES)}")
    if not recipe.experts:
        raise RecipeError(f"{source}: experts: list at least one expert")
    if not 1 <= recipe.experts_per_token <= len(recipe.experts):
        raise RecipeError(f"{source}: experts_per_token {recipe.experts_per_token} must be "
                          f"between 1 and the number of experts ({len(recipe.experts)})")
    if recipe.gate_mode not in ("random", "uniform_random"):
        for i, expert in enumerate(recipe.experts):
            if not expert.positive_prompts:
                raise RecipeError(f"{source}: experts[{i}].positive_prompts: gate_mode "
                                  f"'{recipe.gate_mode}' needs prompts for every expert")
        prompts = {(tuple(e.positive_prompts), tuple(e.negative_prompts))
                   for e in recipe.experts}
        if len(recipe.experts) > 1 and len(prompts) == 1:
            raise RecipeError(f"{source}: every expert has the same prompts, so the router "
                              "cannot tell them apart; give each its own positive_prompts")
    if recipe.shared_experts is not None and len(recipe.shared_experts) != 1:
        raise RecipeError(f"{source}: shared_experts: Qwen2-MoE output takes exactly one "
                          f"shared expert, got {len(recipe.shared_experts)}")
    if recipe.shared_experts and recipe.gate_mode not in ("random", "uniform_random") \
            and not recipe.shared_experts[0].positive_prompts:
        raise RecipeError(f"{source}: shared_experts[0].positive_prompts: gate_mode "
                          f"'{recipe.gate_mode}' needs prompts for the shared expert's gate")
    wanted = "qwen2_moe" if recipe.shared_experts else "mixtral"
    if recipe.architecture not in (None, wanted, "qwen" if recipe.shared_experts else wanted):
        raise RecipeError(f"{source}: architecture '{recipe.architecture}' does not fit: "
                          "mixtral without shared_experts, qwen2_moe (or qwen) with one")
    return recipe
