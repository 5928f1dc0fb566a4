"""Merging LoRA adapters of one base *as adapters*, with peft's ``add_weighted_adapter``
combinations, written as a new PEFT adapter (peft not needed).

For adapter i with weight w_i, scale s_i and factors A_i (r × in), B_i (out × r):

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (equal ranks)
  merge the A's and the B's separately with the same rule f,
  ``A = f({A_i}, {sign(w_i s_i)·√|w_i s_i|})``, ``B = f({B_i}, {√|w_i s_i|})``, where
  f = Σ_i c_i·T_i (linear); Σ_i c_i·top_k(T_i) (magnitude_prune, k = ⌊density·numel⌋);
  Σ_i c_i·m_i⊙T_i / density (dare_linear, m_i ~ Bernoulli(density)); and for the TIES
  forms the pruned T_i vote a sign per element (``total``: sign of Σ_i T_i, zero counts as +;
  ``frequency``: of Σ_i sign(T_i)) and f = Σ_i c_i·T_i·[sign T_i = γ] / max(1, #agreeing)
  (Yadav et al. 2023; Yu et al. 2024 for DARE). The result has scale 1 (``lora_alpha`` = r).
- ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: exactly Σ w_i s_i B_i A_i,
  at rank Σ r_i.
- ``svd`` (and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``):
  ΔW = f({s_i B_i A_i}, {w_i}) on whole deltas, then U Σ Vᵀ = ΔW, B = U_k Σ_k, A = V_kᵀ with
  k = ``svd_rank`` (default: the largest adapter rank); ``svd_clamp`` q then clips both factors
  to ±(the q-quantile of their values), and ``svd_driver`` picks cuSOLVER's routine on CUDA, as
  peft's options of the same names (:mod:`modelalloy.lora.svd`).

DARE's keep masks come from generators seeded by (seed, module, factor, adapter index), so a
merge is reproducible; peft draws them from torch's global generator instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from modelalloy.errors import AdapterError
from modelalloy.io.lora.adapter import LoraAdapter, open_adapter
from modelalloy.io.lora.files import adapter_config, lora_key, write_adapter_folder
from modelalloy.lora.svd import check_svd_options, clamp_factors, svd
from modelalloy.methods.registry import MergeContext

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = (*FACTOR_WISE, "cat", *SVD)


# -- the combination rules on lists of tensors (T_i, c_i) -------------------------------------


def magnitude_keep(t: torch.Tensor, density: float) -> torch.Tensor:
    """T with all but its ⌊density·numel⌋ largest magnitudes zeroed (density ≥ 1: T)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * mask.reshape(t.shape)


def random_keep(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: T⊙m/density with m ~ Bernoulli(density) (density ≥ 1: T)."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def elect_and_merge(stack: torch.Tensor, coeffs: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES' disjoint merge: Σ_i c_i T_i [sign T_i = γ] / max(1, #{i: sign T_i = γ})."""
    sign = stack.sign()
    votes = stack.sum(0) if sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0)
    weighted = stack * coeffs.view(-1, *([1] * (stack.dim() - 1)))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine(kind: str, tensors: list[torch.Tensor], coeffs: list[float], density: float,
            sign_method: str, generator: Callable[[int], torch.Generator]) -> torch.Tensor:
    """f({T_i}, {c_i}) for one of the factor-wise rules (``kind`` without ``_svd``)."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [magnitude_keep(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [random_keep(t, density, generator(i)) for i, t in enumerate(tensors)]
    stack = torch.stack(tensors)
    c = torch.tensor(coeffs, dtype=stack.dtype)
    if kind in ("ties", "dare_ties"):
        return elect_and_merge(stack, c, sign_method)
    return (stack * c.view(-1, *([1] * (stack.dim() - 1)))).sum(0)


# -- adapters ------------------------------------------------------------------------------------


def _rank_of(adapter: LoraAdapter) -> int:
    """peft's rank of an adapter for add_weighted_adapter: r, or the largest in rank_pattern."""
    cfg = adapter.config
    return max([int(cfg.get("r", 8)), *map(int, (cfg.get("rank_pattern") or {}).values())])


def combine_adapters(adapters: list[LoraAdapter], weights: list[float], kind: str, *,
                     density: float = 1.0, sign_method: str = "total",
                     svd_rank: int | None = None, seed: int = 0,
                     svd_clamp: float | None = None, svd_driver: str | None = None,
                     device: str = "cpu"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, int], bool]:
    """The merged adapter's tensors (peft's saved names), module ranks, and fan_in_fan_out."""
    check_svd_options(svd_driver, svd_clamp, device)
    if kind not in COMBINATIONS:
        raise AdapterError(f"combination '{kind}' is unknown; use one of "
                           f"{', '.join(COMBINATIONS)}")
    if (svd_clamp is not None or svd_driver is not None) and kind not in SVD:
        raise AdapterError(f"svd_clamp and svd_driver apply to the svd combinations "
                           f"({', '.join(SVD)}), not '{kind}'")
    if len(weights) != len(adapters):
        raise AdapterError(f"{len(weights)} weights for {len(adapters)} adapters")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise AdapterError(f"adapter weight {bad[0]}: weights must be finite numbers")
    if not 0 < density <= 1:  # NaN too
        raise AdapterError(f"density={density}: must be in (0, 1], the share of each factor "
                           "kept", options=("density",))
    if svd_rank is not None and svd_rank < 1:
        raise AdapterError(f"svd_rank={svd_rank}: must be at least 1 (leave it out for the "
                           "largest input rank)", options=("svd_rank",))
    if sign_method not in ("total", "frequency"):
        raise AdapterError(f"majority sign method '{sign_method}': use total or frequency")
    for a in adapters:
        if a.bias_terms:
            raise AdapterError(f"{a.path}: has LoRA biases (lora_bias); merging those as an "
                               "adapter is not supported: merge them into the model instead")
        trained = [n for n in a.replacements if n not in a.base_copies]
        if trained:
            raise AdapterError(f"{a.path}: saves whole tensors (modules_to_save, "
                               f"e.g. {trained[0]!r}); merging those as an "
                               "adapter is not supported: merge them into the model instead")
    kind = "linear" if len(adapters) == 1 else kind  # as peft
    ranks = [_rank_of(a) for a in adapters]
    if kind in FACTOR_WISE and len(set(ranks)) != 1:
        raise AdapterError(f"combination '{kind}' needs adapters of one rank, got ranks "
                           f"{ranks}; use cat or svd")
    if kind == "cat":
        new_rank = sum(ranks)
    elif kind in SVD:
        new_rank = svd_rank or max(ranks)
    else:
        new_rank = ranks[0]
    modules = list(dict.fromkeys(m for a in adapters for m in a.terms))
    fan_in_fan_out = bool(adapters[0].config.get("fan_in_fan_out", False))
    tensors: dict[str, torch.Tensor] = {}
    out_ranks: dict[str, int] = {}
    for module in modules:
        present = [(i, a, a.terms[module]) for i, a in enumerate(adapters) if module in a.terms]
        embedding = "lora_embedding" in present[0][2].a_name
        factors = [(a.weights.get(t.a_name).to(torch.float32),
                    a.weights.get(t.b_name).to(torch.float32)) for _, a, t in present]
        dtype = adapters[present[0][0]].weights.info(present[0][2].a_name).dtype
        scaled = [weights[i] * t.scale for i, _, t in present]
        if kind == "cat":
            a_new = torch.cat([f[0] * c for f, c in zip(factors, scaled, strict=True)])
            b_new = torch.cat([f[1] for f in factors], dim=1)
            pad = new_rank - a_new.shape[0]  # adapters without this module: zero rows
            a_new = torch.cat([a_new, a_new.new_zeros(pad, a_new.shape[1])])
            b_new = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], pad)], dim=1)
        elif kind in SVD:
            rule = kind.removesuffix("_svd")
            deltas = [t.scale * (b @ a) for (a, b), (_, _, t) in zip(factors, present,
                                                                       strict=True)]
            delta = combine("linear" if rule == "svd" else rule, deltas,
                            [weights[i] for i, _, _ in present], density, sign_method,
                            lambda j, m=module: _generator(seed, m, "delta", j))
            if new_rank > min(delta.shape):
                raise AdapterError(f"svd rank {new_rank} is above the rank of module "
                                   f"{module!r} ({list(delta.shape)}); use a smaller svd_rank")
            u, s, vh = svd(delta, driver=svd_driver, device=device)
            b_new, a_new = clamp_factors(u[:, :new_rank] * s[:new_rank], vh[:new_rank],
                                         svd_clamp)
        else:
            coeff_a = [math.copysign(math.sqrt(abs(c)), c) for c in scaled]
            coeff_b = [math.sqrt(abs(c)) for c in scaled]
            a_new = combine(kind, [f[0] for f in factors], coeff_a, density, sign_method,
                            lambda j, m=module: _generator(seed, m, "A", j))
            b_new = combine(kind, [f[1] for f in factors], coeff_b, density, sign_method,
                            lambda j, m=module: _generator(seed, m, "B", j))
        tensors[lora_key(module, "A", embedding)] = a_new.to(dtype)
        tensors[lora_key(module, "B", embedding)] = b_new.to(dtype)
        out_ranks[module] = a_new.shape[0]
    return tensors, out_ranks, fan_in_fan_out


def _generator(seed: int, module: str, factor: str, index: int) -> torch.Generator:
    """DARE masks: the project's seeding, by (seed, module and factor, adapter index)."""
    return MergeContext(name=f"{module}.{factor}", seed=seed).generator(index)


def merge_adapters(adapter_dirs: list[Path], weights: list[float], out: Path, kind: str, *,
                   density: float = 1.0, sign_method: str = "total",
                   svd_rank: int | None = None, seed: int = 0, force: bool = False,
                   svd_clamp: float | None = None, svd_driver: str | None = None,
                   device: str = "cpu") -> Path:
    """Open the adapters, combine them, write ``out`` (a PEFT adapter folder)."""
    check_svd_options(svd_driver, svd_clamp, device)
    adapters = [open_adapter(d) for d in adapter_dirs]
    try:
        tensors, ranks, fan_in_fan_out = combine_adapters(
            adapters, weights, kind, density=density, sign_method=sign_method,
            svd_rank=svd_rank, seed=seed, svd_clamp=svd_clamp, svd_driver=svd_driver,
            device=device)
        base = adapters[0].config.get("base_model_name_or_path")
    finally:
        for a in adapters:
            a.close()
    config = adapter_config(ranks=ranks, alphas={m: float(k) for m, k in ranks.items()},
                            modules_to_save=[], fan_in_fan_out=fan_in_fan_out, base_model=base)
    listing = "\n".join(f"- `{d}` (weight {w})" for d, w in zip(adapter_dirs, weights,
                                                                 strict=True))
    card = (f"# LoRA adapter merged by modelalloy\n\nCombination `{kind}` (peft's "
            f"add_weighted_adapter rules), density {density}, seed {seed}"
            f"{f', svd_clamp {svd_clamp}' if svd_clamp is not None else ''}, of:\n\n{listing}\n")
    return write_adapter_folder(out, tensors, config, card, inputs=list(adapter_dirs),
                                force=force)
