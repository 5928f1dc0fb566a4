"""RegMean++ statistics: Grams collected through the already-merged earlier blocks.

Nguyen et al. 2025, "RegMean++" (reference: nthehai01/RegMean-plusplus,
``fusion_bench/method/regmean_plusplus/regmean.py``, ``clip_regmean.py``). RegMean collects each
layer's Gram on the candidate's own model; RegMean++ feeds block l of candidate k with hidden
states produced by the **merged** blocks 0..l-1 (cross-layer dependency), while modules inside
block l still see the candidate's own block (intra-layer dependency). So the merge is sequential:

1. the block stack is found from parameter names (the children of a ``ModuleList`` or
   ``Sequential`` are named by integers; the stack with most blocks wins) — no per-architecture
   code; everything outside the stack is "pre" or "post" by the order modules run in;
2. "pre" linear maps (run before block 0) get their Grams from the candidate's own model, and
   every non-block parameter is merged first (RegMean for pre linear maps, the weighted average
   otherwise — the reference averages embeddings and pre-LN);
3. for block l, for each candidate k: a working copy of the model holds the merged parameters
   of everything before block l and candidate k's block l; task k's batches run forward until
   block l returns (an exception stops the pass early), with Gram hooks on block l's linear
   maps. Block l is then merged (RegMean on linear weights, weighted average for the rest) and
   loaded into the working copy;
4. "post" linear maps (e.g. a classifier head after the stack) get their Grams from the full
   merged model with the candidate's own post weights.

The Grams are returned per expert as ``gram_pp`` statistics, so the engine reproduces the same
weights with the per-tensor ``regmean_pp`` method (this driver merges with that same function).
Linear maps whose weight is tied to another parameter (GPT-2's ``lm_head`` and ``wte``) get no
Gram and are averaged, like embeddings.

Cost: per block, one forward pass through blocks 0..l for each candidate (the reference caches
hidden states and runs only block l; we recompute the prefix because a cached block input needs
per-architecture knowledge of the block's other arguments — masks, position embeddings). That
is O(L²/2) block passes instead of O(L); fine for small models, the price of generality.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from modelalloy.methods.regmean import regmean_merge
from modelalloy.plan.layers import split_layer
from modelalloy.stats.collect import Statistic, _as_predicate, _first_input, _TokenRows
from modelalloy.stats.hooks import (
    HookedWeight,
    call_model,
    linear_modules,
    progress,
    split_batch,
    to_device,
    token_mask,
)


class _StopForward(Exception):
    pass


def find_block_stack(model: nn.Module) -> tuple[str, list[str]]:
    """(stack prefix, block module names in order) of the longest stack of numbered blocks."""
    stacks: dict[str, set[int]] = {}
    for name, _ in model.named_parameters():
        found = split_layer(name)
        if found is not None:
            stacks.setdefault(found[0], set()).add(found[1])
    if not stacks:
        raise ValueError("no stack of numbered blocks (ModuleList/Sequential) in this model")
    prefix = max(stacks, key=lambda s: len(stacks[s]))
    blocks = [f"{prefix}.{i}" if prefix else str(i) for i in sorted(stacks[prefix])]
    return prefix, blocks


def _owner(module_name: str, blocks: Sequence[str]) -> int | None:
    for i, b in enumerate(blocks):
        if module_name == b or module_name.startswith(b + "."):
            return i
    return None


def _call_order(model: nn.Module, modules: dict[str, nn.Module], batch: Any,
                device: torch.device | None) -> dict[str, int]:
    order: dict[str, int] = {}
    handles = []
    for name, mod in modules.items():
        def hook(_m: nn.Module, _a: Any, name: str = name) -> None:
            order.setdefault(name, len(order))
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        inputs, _ = split_batch(batch)
        if device is not None:
            inputs = to_device(inputs, device)
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return order


def _grams_through(work: nn.Module, hooked: list[HookedWeight], batches: Iterable[Any],
                   stop_at: nn.Module | None, mask_padding: bool,
                   device: torch.device | None) -> dict[str, tuple[torch.Tensor, int]]:
    rows = _TokenRows(mask_padding)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for hw in hooked:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, key: str = hw.module_name) -> None:
            x = _first_input(args, kwargs)
            if x is None:
                return
            r = rows.rows(x).float()
            sums[key] = sums[key] + r.T @ r if key in sums else r.T @ r
            counts[key] = counts.get(key, 0) + r.shape[0]
        handles.append(hw.module.register_forward_pre_hook(hook, with_kwargs=True))
    if stop_at is not None:
        def stop(_m: nn.Module, _a: Any, _o: Any) -> None:
            raise _StopForward
        handles.append(stop_at.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for batch in batches:
                inputs, _ = split_batch(batch)
                if device is not None:
                    inputs = to_device(inputs, device)
                rows.mask = token_mask(inputs)
                try:
                    call_model(work, inputs)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {k: (sums[k] / max(counts[k], 1), counts[k]) for k in sums}


def collect_regmean_pp_grams(models: Sequence[nn.Module], batches: Sequence[Sequence[Any]], *,
                             alpha: float = 1.0, weight: Sequence[float] | None = None,
                             include: Any = None, mask_padding: bool = True,
                             device: str | torch.device | None = None,
                             show_progress: bool = False
                             ) -> tuple[list[Statistic], dict[str, torch.Tensor]]:
    """Sequential RegMean++ over ``models`` (same architecture), task k's data in
    ``batches[k]`` (a re-iterable sequence of batches).

    Returns (one ``gram_pp`` :class:`Statistic` per model, the merged state dict). Pass the
    statistics to ``merge_state_dicts("regmean_pp", None, experts, stats={"gram_pp": stats},
    alpha=alpha)`` (or save them) to reproduce the weights through the engine. Defaults: α = 1
    (the reference uses 0.95 for CLIP-ViT), equal model weights, mask-aware Grams.
    """
    k_models = len(models)
    if len(batches) != k_models:
        raise ValueError("give one sequence of batches per model")
    coeff = list(weight) if weight is not None else [1.0] * k_models
    dev = torch.device(device) if device is not None else None
    predicate = _as_predicate(include)
    sds = [{n: t.detach().float() for n, t in m.state_dict().items()} for m in models]
    ref_sd = models[0].state_dict()
    work = copy.deepcopy(models[0]).eval()
    if dev is not None:
        work.to(dev)
    _, blocks = find_block_stack(work)
    hooked_all = [hw for hw in linear_modules(work, predicate) if len(hw.param_names) == 1]
    by_block: dict[int | None, list[HookedWeight]] = {}
    for hw in hooked_all:
        by_block.setdefault(_owner(hw.module_name, blocks), []).append(hw)
    outside = {hw.module_name: hw.module for hw in by_block.get(None, [])}
    order = _call_order(work, {**outside, "__block0__": work.get_submodule(blocks[0])},
                        batches[0][0], dev)
    first_block = order.get("__block0__", len(order))
    pre = [hw for hw in by_block.get(None, []) if order.get(hw.module_name, 10**9) < first_block]
    post = [hw for hw in by_block.get(None, []) if hw not in pre]
    block_prefixes = [b + "." for b in blocks]

    def in_block(name: str) -> int | None:
        for i, b in enumerate(block_prefixes):
            if name.startswith(b):
                return i
        return None

    float_names = [n for n, t in ref_sd.items() if t.is_floating_point()]
    grams: list[dict[str, torch.Tensor]] = [{} for _ in models]
    counts: list[dict[str, int]] = [{} for _ in models]
    dims: dict[str, str] = {}
    merged: dict[str, torch.Tensor] = {}
    params = {"alpha": alpha, "weight": coeff, "ridge": 0.0, "input_dim": "auto"}

    def merge_names(names: list[str], layouts: dict[str, str]) -> None:
        for name in names:
            experts = [sd[name] for sd in sds]
            g = [grams[k].get(name) for k in range(k_models)]
            p = dict(params, input_dim=layouts.get(name, "auto"))
            merged[name] = regmean_merge(experts, g if g[0] is not None else [None] * k_models,
                                         p, name)

    def load(names: list[str], values: dict[str, torch.Tensor]) -> None:
        current = work.state_dict()
        for name in names:
            current[name].copy_(values[name].to(current[name].dtype))

    def collect(hooked: list[HookedWeight], k: int, stop_at: nn.Module | None) -> None:
        for mod_name, (g, n) in _grams_through(work, hooked, batches[k], stop_at,
                                               mask_padding, dev).items():
            hw = next(h for h in hooked if h.module_name == mod_name)
            pname = hw.param_names[0]
            grams[k][pname] = g.to("cpu", torch.float32)
            counts[k][pname] = n
            dims[pname] = hw.input_dim

    # 1. pre-stack linear maps on each candidate's own model; then every non-block tensor
    outside_names = [n for n in float_names if in_block(n) is None]
    block0 = work.get_submodule(blocks[0])
    for k in range(k_models):
        load(outside_names, sds[k])
        collect(pre, k, block0)
    layouts = {hw.param_names[0]: hw.input_dim for hw in hooked_all}
    merge_names(outside_names, layouts)
    load(outside_names, merged)
    # 2. blocks in order, inputs from the merged prefix
    for i in progress(range(len(blocks)), show_progress, "regmean++", total=len(blocks)):
        names = [n for n in float_names if in_block(n) == i]
        module = work.get_submodule(blocks[i])
        for k in range(k_models):
            load(names, sds[k])
            collect(by_block.get(i, []), k, module)
        merge_names(names, layouts)
        load(names, merged)
    # 3. post-stack linear maps through the whole merged model
    if post:
        post_names = [hw.param_names[0] for hw in post]
        for k in range(k_models):
            load(post_names, sds[k])
            collect(post, k, None)
        merge_names(post_names, layouts)
        load(post_names, merged)
    out_state = {n: (merged[n].to(t.dtype) if n in merged else t.clone())
                 for n, t in ref_sd.items()}
    stats = [Statistic("gram_pp", grams[k], {n: dims[n] for n in grams[k]}, counts[k],
                       {"alpha": str(alpha), "mask_padding": str(mask_padding).lower(),
                        "models": str(k_models), "model_index": str(k)})
             for k in range(k_models)]
    return stats, out_state
