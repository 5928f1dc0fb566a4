"""``extract-lora``: a fine-tuned model as a PEFT LoRA adapter of its base, by truncated SVD.

For each selected 2-D weight, with Δ = W_model − W_base = U Σ Vᵀ, the rank-k adapter is

    B = U_k Σ_k^½,   A = Σ_k^½ V_kᵀ,   B·A = U_k Σ_k V_kᵀ

(scale 1: ``lora_alpha`` = r per module). By Eckart–Young it is the best rank-k approximation
in Frobenius norm, and its error is the energy of the dropped singular values:
‖Δ − B·A‖_F = (Σ_{i>k} σ_i²)^½. ``rank`` fixes k (a rank above min(out, in) is an error);
``energy`` picks per tensor the smallest k keeping that share of Σσ².
``svd_clamp`` q clips both factors to ±(the q-quantile of their joint values), peft's
``svd_clamp`` (mergekit-extract-lora 0.1.5 has no clamp; its ``--sv-epsilon`` is a rank
cut-off), and the reported error is then the clamped factors'; ``svd_driver`` and ``device``
choose where and how the SVD runs (:mod:`modelalloy.lora.svd`).

As mergekit-extract-lora: linear weights get ``lora_A``/``lora_B``; the input embeddings
(names with ``embed``, ``wte``, ``wpe``, ``word_embeddings``) and the output head
(``lm_head``) are saved whole as ``modules_to_save`` unless ``embed_lora``, which decomposes
them (embeddings as ``lora_embedding_A``/``_B``, in peft's transposed layout; the head as a
linear weight). Other changed weights (norms, 1-D tensors) are saved whole as
``modules_to_save`` unless ``skip_other``; unchanged ones are left out (the base has them;
mergekit saves them anyway). Changed biases of adapted modules go to ``lora_B.bias`` with
``lora_bias`` when every adapted linear module has a bias (peft can merge them only then);
otherwise they are dropped and counted in the report. GPT-2-style models (Conv1D weights
stored in × out) are written with ``fan_in_fan_out``.

Tensors are read one pair at a time; only the factors (r·(in + out) per module) are held.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelalloy.engine.progress import merge_progress
from modelalloy.errors import AdapterError
from modelalloy.io.checkpoint import Checkpoint, open_checkpoint
from modelalloy.io.dtypes import parse_dtype
from modelalloy.io.lora.adapter import PEFT_PREFIX
from modelalloy.io.lora.files import adapter_config, lora_key, write_adapter_folder
from modelalloy.lora.svd import check_svd_options, clamp_factors, svd
from modelalloy.threads import ordered_map

EMBEDDING = re.compile(r"(^|\.)(embed[^.]*|wte|wpe|word_embeddings|position_embeddings)\.weight$")
OUTPUT_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
CONV1D_MODEL_TYPES = {"gpt2"}  # transformers' Conv1D: weights stored as (in, out)


@dataclass
class ModuleReport:
    name: str
    rank: int
    full_rank: int
    error: float  # ‖Δ − B·A‖_F
    norm: float  # ‖Δ‖_F
    tail: float  # (Σ_{i>k} σ_i²)^½, the Eckart–Young bound


@dataclass
class ExtractReport:
    modules: list[ModuleReport] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # modules_to_save
    dropped: list[str] = field(default_factory=list)  # changed tensors LoRA cannot hold
    adapter_bytes: int = 0
    model_bytes: int = 0

    @property
    def relative_error(self) -> float:
        """‖Δ − B·A‖_F / ‖Δ‖_F over all adapted weights together."""
        num = math.sqrt(sum(m.error ** 2 for m in self.modules))
        den = math.sqrt(sum(m.norm ** 2 for m in self.modules))
        return num / den if den else 0.0


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """k: ``rank``, or the smallest k with Σ_{i<k} σ_i² ≥ energy·Σσ²; 0 for an unchanged
    weight (Δ = 0: nothing to adapt, whatever the rank asked)."""
    power = s.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 0
    if rank is not None:
        return rank
    kept = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(kept, torch.tensor([energy], dtype=kept.dtype) - 1e-12)) + 1


def low_rank(delta: torch.Tensor, rank: int | None, energy: float | None, *,
             clamp: float | None = None, driver: str | None = None, device: str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, A, σ) of the truncated SVD of ``delta`` (float32), the factors clamped at ``clamp``."""
    u, s, vh = svd(delta, driver=driver, device=device)
    k = min(choose_rank(s, rank, energy), s.numel())
    root = s[:k].sqrt()
    b, a = clamp_factors(u[:, :k] * root, root[:, None] * vh[:k], clamp)
    return b, a, s


def _selected(name: str, include: list[str], exclude: list[str]) -> bool:
    if include and not any(re.search(p, name) for p in include):
        return False
    return not any(re.search(p, name) for p in exclude)


def _check_pair(model: Checkpoint, base: Checkpoint) -> None:
    missing = [n for n in model.names() if n not in base]
    if missing:
        raise AdapterError(f"{base.path}: lacks {len(missing)} tensor(s) of {model.path}, e.g. "
                           f"{missing[0]!r}; give the base model this one was fine-tuned from")
    for name in model.names():
        a, b = model.info(name).shape, base.info(name).shape
        if a != b:
            raise AdapterError(f"tensor {name!r}: shape {list(a)} in {model.path} but "
                               f"{list(b)} in {base.path}; give the base model this one was "
                               "fine-tuned from")


def extract_lora(model_path: Path, base_path: Path, out: Path, *, rank: int | None = None,
                 energy: float | None = None, include: list[str] | None = None,
                 exclude: list[str] | None = None, skip_other: bool = False,
                 embed_lora: bool = False, dtype: str | None = None, force: bool = False,
                 threads: int | None = None, progress: bool = False,
                 svd_clamp: float | None = None, svd_driver: str | None = None,
                 device: str = "cpu") -> ExtractReport:
    """Write ``out`` (a PEFT adapter of ``base_path``) approximating ``model_path``."""
    check_svd_options(svd_driver, svd_clamp, device)
    if (rank is None) == (energy is None):
        raise AdapterError("give exactly one of rank=R and energy=E", options=("rank", "energy"))
    if rank is not None and rank < 1:
        raise AdapterError(f"rank={rank}: must be at least 1", options=("rank",))
    if energy is not None and not 0 < energy <= 1:
        raise AdapterError(f"energy={energy}: must be in (0, 1], the share of Σσ² to keep",
                           options=("energy",))
    include, exclude = include or [], exclude or []
    report = ExtractReport()
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    bias_deltas: dict[str, torch.Tensor] = {}
    with open_checkpoint(model_path) as model, open_checkpoint(base_path) as base:
        _check_pair(model, base)
        conv1d = (model.config or {}).get("model_type") in CONV1D_MODEL_TYPES
        out_dtype = parse_dtype(dtype) if dtype else None
        if out_dtype is not None and not out_dtype.is_floating_point:
            raise AdapterError(f"dtype={dtype}: LoRA factors are floating point; use "
                               "float32, float16 or bfloat16", options=("dtype",))
        # embeddings and the output head: decomposed with --embed-lora, else saved whole
        vocab = {n for n in model.names() if EMBEDDING.search(n) or OUTPUT_HEAD.search(n)}
        weights = {n for n in model.names() if n.endswith(".weight")
                   and len(model.info(n).shape) == 2 and _selected(n, include, exclude)
                   and (embed_lora or n not in vocab)}
        adapted_modules = {n[: -len(".weight")] for n in weights}
        if rank is not None:
            for n in sorted(weights):
                if rank > min(model.info(n).shape):
                    raise AdapterError(f"rank={rank} is above the rank of {n!r} "
                                       f"({list(model.info(n).shape)}: at most "
                                       f"{min(model.info(n).shape)}); use a smaller rank, "
                                       "energy=E, or leave it out with exclude=REGEX",
                                       options=("rank", "energy", "exclude"))
        names = model.names()

        def work(name: str) -> tuple[torch.Tensor, tuple | None]:
            """Δ, and for a decomposed weight its (B, A, σ, ‖Δ − BA‖, ‖Δ‖) in peft's layout."""
            delta = model.get(name).to(torch.float32) - base.get(name).to(torch.float32)
            if name not in weights:
                return delta, None
            # peft's layouts: Linear Δ = B·A (out × in); Embedding and Conv1D Δ = (B·A)ᵀ
            target = delta.T if (EMBEDDING.search(name) or conv1d) else delta
            b, a, s = low_rank(target, rank, energy, clamp=svd_clamp, driver=svd_driver,
                               device=device)
            return delta, (b, a, s, float(torch.linalg.matrix_norm(target - b @ a)),
                           float(torch.linalg.matrix_norm(target)))

        floats = [n for n in names if model.info(n).dtype.is_floating_point]
        report.model_bytes = model.total_nbytes
        with merge_progress("extract", len(floats), model.total_nbytes + base.total_nbytes,
                            progress) as sink:
            for name, (delta, svd) in ordered_map(work, floats, threads):
                info = model.info(name)
                sink.advance(2 * info.nbytes)
                if svd is None:
                    module = name.rsplit(".", 1)[0]
                    if module in adapted_modules and name.endswith(".bias"):
                        bias_deltas[module] = delta  # lora_B.bias, if every module has one
                        continue
                    if not bool(delta.any()):
                        continue
                    whole = name in vocab or not skip_other  # vocab: as mergekit, always
                    if module in adapted_modules or not whole \
                            or not _selected(name, include, exclude):
                        report.dropped.append(name)
                    else:
                        report.saved.append(module)
                    continue
                module = name[: -len(".weight")]
                embedding = bool(EMBEDDING.search(name))
                b, a, s, err, norm = svd
                k = a.shape[0]
                report.modules.append(ModuleReport(module, k, s.numel(), err, norm,
                                                   float(s[k:].double().pow(2).sum().sqrt())))
                if k == 0:
                    continue  # unchanged: nothing to adapt
                cast = out_dtype or info.dtype
                tensors[lora_key(module, "A", embedding)] = a.to(cast)
                tensors[lora_key(module, "B", embedding)] = b.to(cast)
                ranks[module] = k
        # lora_bias (peft: b' = b + s·lora_B.bias) when every linear LoRA module has a bias
        # and some bias changed; otherwise those changes cannot be held and are reported
        linear = [m for m in ranks if not EMBEDDING.search(m + ".weight")]
        lora_bias = bool(linear) and all(m in bias_deltas for m in linear) \
            and any(bool(d.any()) for d in bias_deltas.values())
        for module, d in bias_deltas.items():
            if lora_bias and module in ranks:
                tensors[f"{PEFT_PREFIX}{module}.lora_B.bias"] = d.to(
                    out_dtype or model.info(module + ".bias").dtype)
            elif bool(d.any()):
                report.dropped.append(module + ".bias")
        # modules_to_save: every tensor of a saved module, as peft saves them
        saved = sorted(set(report.saved))
        for name in names:
            if name.rsplit(".", 1)[0] in saved:
                t = model.get(name)
                tensors[f"{PEFT_PREFIX}{name}"] = t.to(out_dtype) if out_dtype else t
        report.saved = saved
    if not ranks and not saved:
        raise AdapterError(f"{model_path}: no selected tensor differs from {base_path}; "
                           "nothing to extract")
    config = adapter_config(ranks=ranks, alphas={m: float(k) for m, k in ranks.items()},
                            modules_to_save=saved, fan_in_fan_out=conv1d,
                            base_model=str(base_path), lora_bias=lora_bias)
    how = f"rank {rank}" if rank is not None else f"{energy:.0%} of the energy per tensor"
    if svd_clamp is not None:
        how += f", factors clamped at their {svd_clamp} quantile"
    card = (f"# LoRA adapter extracted by modelalloy\n\nTruncated SVD ({how}) of "
            f"`{model_path}` minus `{base_path}`: {len(ranks)} modules, relative Frobenius "
            f"error {report.relative_error:.4g}; {len(saved)} modules saved whole.\n")
    write_adapter_folder(out, tensors, config, card, inputs=[Path(model_path), Path(base_path)],
                         force=force)
    report.adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return report
