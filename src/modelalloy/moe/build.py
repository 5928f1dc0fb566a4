"""Write the sparse model: the base's attention, embeddings and norms, each expert's MLP, and
a router per layer (Mixtral's tensor names, as transformers saves MixtralForCausalLM):

    model.layers.L.mlp.gate_proj  -> model.layers.L.block_sparse_moe.experts.E.w1
    model.layers.L.mlp.down_proj  -> model.layers.L.block_sparse_moe.experts.E.w2
    model.layers.L.mlp.up_proj    -> model.layers.L.block_sparse_moe.experts.E.w3
    (router)                      -> model.layers.L.block_sparse_moe.gate.weight

Tensors are copied one at a time into preallocated shards; the folder appears when complete.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from modelalloy.errors import PlanError
from modelalloy.io.checkpoint import Checkpoint, open_checkpoint
from modelalloy.io.dtypes import parse_dtype
from modelalloy.io.model_files import copy_model_files, write_model_card
from modelalloy.io.writer import (
    AtomicOutputDir,
    ShardedSafetensorsWriter,
    check_output_path,
    parse_size,
)
from modelalloy.moe.config import MoERecipe, load_moe_recipe
from modelalloy.moe.gates import gate_weights

MLP_NAMES = {".mlp.gate_proj.": "w1", ".mlp.down_proj.": "w2", ".mlp.up_proj.": "w3"}
DENSE_TYPES = ("llama", "mistral")


@dataclass
class MoEResult:
    path: Path
    experts: int
    layers: int
    tensors: int


def expert_name(name: str, index: int) -> str | None:
    """The Mixtral name of expert ``index``'s copy of a dense MLP tensor; None for others."""
    for needle, w in MLP_NAMES.items():
        if needle in name:
            layer = name.split(needle)[0]
            return f"{layer}.block_sparse_moe.experts.{index}.{w}.weight"
    return None


def _check(base: Checkpoint, experts: list[Checkpoint], source: str) -> None:
    model_type = (base.config or {}).get("model_type")
    if model_type not in DENSE_TYPES:
        raise PlanError(f"{source}: base model {base.path} is '{model_type}'; Mixtral assembly "
                        f"needs a {' or '.join(DENSE_TYPES)} model")
    mlp = [n for n in base.names() if expert_name(n, 0)]
    if not mlp:
        raise PlanError(f"{source}: {base.path} has no mlp.gate_proj/up_proj/down_proj weights")
    for ckpt in experts:
        for name in mlp:
            if name not in ckpt:
                raise PlanError(f"{source}: expert {ckpt.path} has no tensor '{name}'; experts "
                                "must be fine-tunes of the base")
            a, b = ckpt.info(name).shape, base.info(name).shape
            if a != b:
                raise PlanError(f"{source}: experts differ in shape: '{name}' is {list(a)} in "
                                f"{ckpt.path} but {list(b)} in the base {base.path}")


def mixtral_config(base_config: dict, recipe: MoERecipe, dtype: torch.dtype) -> dict:
    config = {k: v for k, v in base_config.items() if k not in ("architectures", "model_type")}
    config.update({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "num_local_experts": len(recipe.experts),
        "num_experts_per_tok": recipe.experts_per_token, "sliding_window": None,
        "output_router_logits": False, "router_aux_loss_coef": 0.001,
        "dtype": str(dtype).removeprefix("torch."),
    })
    for key in ("mlp_bias", "attention_bias", "pretraining_tp", "torch_dtype"):
        config.pop(key, None)
    return config


def build_moe(recipe_path: str | Path | MoERecipe, out: Path, *, force: bool = False,
              shard_size: str = "5GB") -> MoEResult:
    recipe = recipe_path if isinstance(recipe_path, MoERecipe) else load_moe_recipe(recipe_path)
    base_dir = recipe.path(recipe.base_model)
    expert_dirs = [recipe.path(e.source_model) for e in recipe.experts]
    out = Path(out)
    check_output_path(out, [base_dir, *expert_dirs], force)
    with ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(base_dir))
        experts = [stack.enter_context(open_checkpoint(d)) for d in expert_dirs]
        _check(base, experts, recipe.source)
        cfg = base.config or {}
        layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
        gates = gate_weights(recipe.gate_mode, base, base_dir, recipe.experts, layers, hidden,
                             seed=recipe.seed)
        float_dtype = parse_dtype(recipe.dtype) if recipe.dtype else None

        def out_dtype(info_dtype: torch.dtype) -> torch.dtype:
            return float_dtype if (float_dtype and info_dtype.is_floating_point) else info_dtype

        plan: list[tuple[str, Checkpoint, str, int | None]] = []  # out name, source, name, e
        for name in base.names():
            if expert_name(name, 0) is None:
                plan.append((name, base, name, None))
            else:
                plan += [(expert_name(name, e), ckpt, name, e) for e, ckpt in enumerate(experts)]
        # routers take the dtype of the base's MLP weights (or the recipe's)
        mlp_dtype = next(base.info(n).dtype for n in base.names() if expert_name(n, 0))
        entries = [(o, src.info(n).shape, out_dtype(src.info(n).dtype)) for o, src, n, _ in plan]
        entries += [(f"model.layers.{i}.block_sparse_moe.gate.weight", (len(experts), hidden),
                     out_dtype(mlp_dtype)) for i in range(layers)]
        noise = torch.Generator().manual_seed(recipe.seed + 1)
        with AtomicOutputDir(out, force=force) as tmp:
            writer = ShardedSafetensorsWriter(Path(tmp), entries, parse_size(shard_size),
                                              metadata={"merge_method": "moe"})
            for (o, src, name, e), (_, _, dtype) in zip(plan, entries, strict=False):
                t = src.get(name)
                if e is not None:
                    spec = recipe.experts[e]
                    if spec.residual_scale is not None and ".mlp.down_proj." in name:
                        t = t.float() * spec.residual_scale
                    if spec.noise_scale:
                        t = t.float() + torch.randn(t.shape, generator=noise) * spec.noise_scale
                writer.write(o, t.to(dtype).contiguous())
            for i in range(layers):
                name, _, dtype = entries[len(plan) + i]
                writer.write(name, gates[i].to(dtype).contiguous())
            writer.close()
            copy_model_files(base_dir, Path(tmp))
            config = mixtral_config(cfg, recipe, entries[-1][2])
            (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            write_model_card(Path(tmp), recipe_yaml=_recipe_yaml(recipe), method="moe",
                             base_model=recipe.base_model,
                             models=[e.source_model for e in recipe.experts])
    return MoEResult(out, len(experts), layers, len(entries))


def _recipe_yaml(recipe: MoERecipe) -> str:
    import yaml

    data = recipe.model_dump(exclude={"source", "base_dir"}, exclude_defaults=True)
    data["base_model"] = recipe.base_model
    return yaml.safe_dump(data, sort_keys=False)
