"""Write the sparse model: the base's attention, embeddings and norms, each expert's MLP, and
a router per layer, under the tensor names transformers saves.

Mixtral (``MixtralForCausalLM``)::

    model.layers.L.mlp.gate_proj  -> model.layers.L.block_sparse_moe.experts.E.w1
    model.layers.L.mlp.down_proj  -> model.layers.L.block_sparse_moe.experts.E.w2
    model.layers.L.mlp.up_proj    -> model.layers.L.block_sparse_moe.experts.E.w3
    (router, experts × hidden)    -> model.layers.L.block_sparse_moe.gate.weight

Qwen2-MoE (``Qwen2MoeForCausalLM``, with ``shared_experts``: exactly one)::

    model.layers.L.mlp.X          -> model.layers.L.mlp.experts.E.X
    (the shared expert's) mlp.X   -> model.layers.L.mlp.shared_expert.X
    (router, experts × hidden)    -> model.layers.L.mlp.gate.weight
    (shared gate, 1 × hidden)     -> model.layers.L.mlp.shared_expert_gate.weight

Qwen2-MoE attention has q/k/v biases: a Llama/Mistral base gets zero biases (as mergekit).
Tensors are copied one at a time into preallocated shards; the folder appears when complete.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from modelalloy.engine.progress import merge_progress
from modelalloy.engine.run import size_option
from modelalloy.errors import PlanError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.dtypes import parse_dtype
from modelalloy.io.lora import open_model
from modelalloy.io.model_files import copy_model_files, write_model_card
from modelalloy.io.writer import (
    AtomicOutputDir,
    ShardedSafetensorsWriter,
    check_output_path,
)
from modelalloy.moe.config import MoERecipe, load_moe_recipe
from modelalloy.moe.gates import gate_weights

MLP = re.compile(r"^(.*)\.mlp\.(gate_proj|down_proj|up_proj)\.weight$")
MIXTRAL_W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
DENSE_TYPES = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("llama", "mistral", "qwen2")}


@dataclass
class MoEResult:
    path: Path
    architecture: str
    experts: int
    layers: int
    tensors: int


def expert_name(name: str, index: int | str, arch: str = "mixtral") -> str | None:
    """The output name of expert ``index``'s copy ("shared": the shared expert's) of a dense
    MLP weight; None for tensors that are not MLP weights."""
    m = MLP.match(name)
    if m is None:
        return None
    layer, proj = m.groups()
    if arch == "mixtral":
        return f"{layer}.block_sparse_moe.experts.{index}.{MIXTRAL_W[proj]}.weight"
    if index == "shared":
        return f"{layer}.mlp.shared_expert.{proj}.weight"
    return f"{layer}.mlp.experts.{index}.{proj}.weight"


def _architecture(recipe: MoERecipe) -> str:
    return "qwen2_moe" if recipe.shared_experts else "mixtral"


def _check(base: Checkpoint, experts: list[Checkpoint], source: str, arch: str) -> None:
    model_type = (base.config or {}).get("model_type")
    if model_type not in DENSE_TYPES[arch]:
        raise PlanError(f"{source}: base model {base.path} is '{model_type}'; {arch} assembly "
                        f"needs a {' or '.join(DENSE_TYPES[arch])} model")
    mlp = [n for n in base.names() if MLP.match(n)]
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


def moe_config(base_config: dict, recipe: MoERecipe, arch: str, dtype: torch.dtype) -> dict:
    drop = ("architectures", "model_type", "mlp_bias", "attention_bias", "pretraining_tp",
            "torch_dtype", "sliding_window")
    config = {k: v for k, v in base_config.items() if k not in drop}
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["num_experts_per_tok"] = recipe.experts_per_token
    config["output_router_logits"] = False
    config["router_aux_loss_coef"] = 0.001
    if arch == "mixtral":
        config.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                       "num_local_experts": len(recipe.experts), "sliding_window": None})
    else:
        size = base_config["intermediate_size"]
        config.update({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                       "num_experts": len(recipe.experts), "decoder_sparse_step": 1,
                       "mlp_only_layers": [], "norm_topk_prob": True, "sliding_window": None,
                       "use_sliding_window": False, "qkv_bias": True,
                       "moe_intermediate_size": size, "shared_expert_intermediate_size": size})
    return config


def _zero_biases(base: Checkpoint, cfg: dict, layers: int) -> list[tuple[str, int]]:
    """Qwen2-MoE's q/k/v biases that a Llama/Mistral base lacks: (name, length)."""
    heads, kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or
                                                       cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    out = []
    for i in range(layers):
        for proj, n in (("q_proj", heads), ("k_proj", kv), ("v_proj", kv)):
            name = f"model.layers.{i}.self_attn.{proj}.bias"
            if name not in base:
                out.append((name, n * head_dim))
    return out


def build_moe(recipe_path: str | Path | MoERecipe, out: Path, *, force: bool = False,
              shard_size: str = "5GB", progress: bool = False) -> MoEResult:
    shard_bytes = size_option("shard_size", shard_size)
    recipe = recipe_path if isinstance(recipe_path, MoERecipe) else load_moe_recipe(recipe_path)
    arch = _architecture(recipe)
    specs = list(recipe.experts) + list(recipe.shared_experts or [])
    base_dir, base_adapter = recipe.paths(recipe.base_model)
    if base_adapter is not None:
        raise PlanError(f"{recipe.source}: base_model '{recipe.base_model}' has a LoRA adapter; "
                        "the base gives attention, embeddings and the prompt gates as it is: "
                        "merge the adapter into it first (experts may carry adapters)")
    sources = [recipe.paths(e.source_model) for e in specs]  # (model, adapter or None)
    out = Path(out)
    check_output_path(out, [base_dir, *(d for d, _ in sources)], force)
    with ExitStack() as stack:
        base = stack.enter_context(open_model(base_dir))
        ckpts = [stack.enter_context(open_model(d, a)) for d, a in sources]
        _check(base, ckpts, recipe.source, arch)
        cfg = base.config or {}
        layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
        routers = {"gate": gate_weights(recipe.gate_mode, base, base_dir, recipe.experts,
                                        layers, hidden, seed=recipe.seed)}
        if recipe.shared_experts:
            routers["shared_expert_gate"] = gate_weights(
                recipe.gate_mode, base, base_dir, recipe.shared_experts, layers, hidden,
                seed=recipe.seed + 2)
        float_dtype = parse_dtype(recipe.dtype) if recipe.dtype else None

        def out_dtype(info_dtype: torch.dtype) -> torch.dtype:
            return float_dtype if (float_dtype and info_dtype.is_floating_point) else info_dtype

        # (out name, source checkpoint, source name, expert spec or None)
        plan: list[tuple[str, Checkpoint, str, int | None]] = []
        for name in base.names():
            if not MLP.match(name):
                plan.append((name, base, name, None))
                continue
            for e, ckpt in enumerate(ckpts):
                index = "shared" if e >= len(recipe.experts) else e
                plan.append((expert_name(name, index, arch), ckpt, name, e))
        mlp_dtype = out_dtype(next(base.info(n).dtype for n in base.names() if MLP.match(n)))
        entries = [(o, src.info(n).shape, out_dtype(src.info(n).dtype)) for o, src, n, _ in plan]
        prefix = "block_sparse_moe" if arch == "mixtral" else "mlp"
        extra: list[tuple[str, torch.Tensor]] = []
        for kind, weights in routers.items():
            extra += [(f"model.layers.{i}.{prefix}.{kind}.weight", weights[i])
                      for i in range(layers)]
        if arch == "qwen2_moe":
            extra += [(n, torch.zeros(size)) for n, size in _zero_biases(base, cfg, layers)]
        entries += [(n, tuple(t.shape), mlp_dtype) for n, t in extra]
        noise = torch.Generator().manual_seed(recipe.seed + 1)
        with AtomicOutputDir(out, force=force) as tmp:
            writer = ShardedSafetensorsWriter(Path(tmp), entries, shard_bytes,
                                              metadata={"merge_method": "moe"})
            bar = stack.enter_context(merge_progress(
                "moe", len(plan), sum(src.info(n).nbytes for _, src, n, _ in plan), progress))
            for (o, src, name, e), (_, _, dtype) in zip(plan, entries, strict=False):
                bar.advance(src.info(name).nbytes)
                t = src.get(name)
                if e is not None:
                    spec = specs[e]
                    if spec.residual_scale is not None and ".mlp.down_proj." in name:
                        t = t.float() * spec.residual_scale
                    if spec.noise_scale:
                        t = t.float() + torch.randn(t.shape, generator=noise) * spec.noise_scale
                writer.write(o, t.to(dtype).contiguous())
            for name, t in extra:
                writer.write(name, t.to(mlp_dtype).contiguous())
            writer.close()
            copy_model_files(base_dir, Path(tmp))
            config = moe_config(cfg, recipe, arch, mlp_dtype)
            (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            write_model_card(Path(tmp), recipe_yaml=_recipe_yaml(recipe), method="moe",
                             base_model=recipe.base_model,
                             models=[e.source_model for e in specs])
    return MoEResult(out, arch, len(recipe.experts), layers, len(entries))


def _recipe_yaml(recipe: MoERecipe) -> str:
    import yaml

    data = recipe.model_dump(exclude={"source", "base_dir"}, exclude_defaults=True)
    data["base_model"] = recipe.base_model
    return yaml.safe_dump(data, sort_keys=False)
