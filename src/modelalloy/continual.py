"""Continual merging: models arrive one at a time; only the running merge is kept.

OPCM — orthogonal projection continual merging (Tang et al., 2025, "Merging Models on the Fly
Without Retraining: A Sequential Approach to Scalable Continual Model Merging",
arXiv 2501.09522); official code ``tanganke/fusion_bench`` (``fusion_bench/method/opcm/
opcm.py``). Spec: datafree.md §12.

θ^(1) = θ_1, λ_1 = 1. For each new model t = 2..T, with n̄_t = mean(‖τ_1‖, …, ‖τ_t‖) (global
L2 norms over every floating-point tensor) and P = θ^(t−1) − θ_0:

- linear weights W: from the SVD P_W = U diag(s) Vᵀ, r* = first index with
  cumsum(s)/sum(s) > α; τ̃ = τ − U_r(U_rᵀ τ V_r)V_rᵀ − Σ_{i ≥ r*} u_i(u_iᵀ τ v_i)v_iᵀ, i.e. the
  official full-SVD projection (zero the r*×r* block and the whole diagonal of Uᵀ τ V) in its
  thin-SVD form, which never builds the m×m and n×n factors. P = 0 leaves τ unchanged.
- every other tensor: τ̃ = τ.
- S = λ_{t−1}·P + τ̃;  λ_t = ‖S‖ / n̄_t;  θ^(t) = θ_0 + S / λ_t.

So ‖θ^(t) − θ_0‖ = n̄_t after every step. Memory: the base, the running merge and the incoming
model, whatever T; no earlier expert is kept (:class:`OPCMSteps` alone: the running merge and
one tensor, when the caller streams the base and the model tensor by tensor).

"Linear weight" is decided by name and shape from a state dict: 2-D floating tensors whose name
does not match ``exclude`` (embeddings by default). Pass ``is_linear`` to decide otherwise, for
example from ``linear_weight_names(module)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

import torch

from modelalloy.errors import MethodError, PlanError

DEFAULT_EXCLUDE = r"(embed|wte|wpe|position|token_type|shared)"


def linear_weight_names(module: torch.nn.Module) -> set[str]:
    """The state-dict names of every ``nn.Linear`` weight of a module (the official rule)."""
    return {f"{name}.weight" if name else "weight" for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear)}


def energy_rank(s: torch.Tensor, alpha: float) -> int:
    """r* = first index where cumsum(s)/sum(s) > α (0 if none, as ``argmax`` of all-False)."""
    total = s.sum()
    if float(total) == 0.0:
        return 0
    above = (torch.cumsum(s, 0) / total) > alpha
    return int(torch.argmax(above.to(torch.int8))) if bool(above.any()) else 0


def project_out(p: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """Remove from τ its components in the dominant subspace of P (OPCM's projection)."""
    if not bool(p.any()):
        return tau
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    r = energy_rank(s, alpha)
    ut_tau = u.T @ tau  # (k, n)
    diag = (ut_tau * vh).sum(dim=1)  # u_iᵀ τ v_i
    removed = u[:, r:] @ torch.diag(diag[r:]) @ vh[r:]
    if r > 0:
        block = ut_tau[:r] @ vh[:r].T  # (r, r): U_rᵀ τ V_r
        removed = removed + u[:, :r] @ block @ vh[:r]
    return tau - removed


def task_vector(base: torch.Tensor, expert: torch.Tensor, device: torch.device) -> torch.Tensor:
    """τ = θ_t − θ_0 in float32 on ``device``."""
    return expert.to(device, torch.float32) - base.to(device, torch.float32)


class OPCMSteps:
    """OPCM's running merge alone: the merged task vector θ^(t) − θ_0, the task norms and λ_t.

    Each step takes one model's task vectors τ_t name by name, in the same order every step,
    so a caller can stream them from disk tensor by tensor (the recipe method re-reads the
    base for each tensor instead of keeping it). :class:`OPCM` adds the base model.
    """

    def __init__(self, *, alpha: float = 0.5, exclude: str = DEFAULT_EXCLUDE,
                 is_linear: Callable[[str, torch.Tensor], bool] | None = None,
                 device: str | torch.device = "cpu"):
        if not 0.0 <= alpha <= 1.0:
            raise MethodError(f"opcm: alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.device = torch.device(device)
        self._exclude = re.compile(exclude) if exclude else None
        self._is_linear = is_linear
        self.delta: dict[str, torch.Tensor] = {}
        self.norms: list[float] = []
        self.lam = 1.0

    @property
    def count(self) -> int:
        return len(self.norms)

    def is_linear(self, name: str, t: torch.Tensor) -> bool:
        if self._is_linear is not None:
            return self._is_linear(name, t)
        return t.dim() == 2 and not (self._exclude and self._exclude.search(name))

    def add_task_vectors(self, taus: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Merge one more model, given as (name, float32 τ_t) pairs; returns the norm of the
        merged task vector afterwards. Holds one τ at a time besides the running merge."""
        if not self.norms:
            sq = 0.0
            for n, tau in taus:
                sq += float(tau.double().pow(2).sum())
                self.delta[n] = tau
            self.norms.append(math.sqrt(sq))
            self.lam = 1.0
            return self.norms[-1]
        sq_tau = 0.0
        sq_s = 0.0
        for n, tau in taus:
            sq_tau += float(tau.double().pow(2).sum())
            p = self.delta[n]
            if self.is_linear(n, p):
                tau = project_out(p, tau, self.alpha)
            s = self.lam * p + tau
            sq_s += float(s.double().pow(2).sum())
            self.delta[n] = s
        self.norms.append(math.sqrt(sq_tau))
        target = sum(self.norms) / len(self.norms)
        norm_s = math.sqrt(sq_s)
        self.lam = norm_s / target if target > 0 and norm_s > 0 else 1.0
        for n in self.delta:
            self.delta[n] = self.delta[n] / self.lam
        return math.sqrt(sum(float(d.double().pow(2).sum()) for d in self.delta.values()))


class OPCM(OPCMSteps):
    """Orthogonal projection continual merging over a stream of state dicts.

    >>> merger = OPCM(base_sd, alpha=0.5)
    >>> for sd in stream_of_experts:
    ...     merger.add(sd)
    >>> merged = merger.merged()
    """

    def __init__(self, base: Mapping[str, torch.Tensor], *, alpha: float = 0.5,
                 exclude: str = DEFAULT_EXCLUDE,
                 is_linear: Callable[[str, torch.Tensor], bool] | None = None,
                 device: str | torch.device = "cpu"):
        super().__init__(alpha=alpha, exclude=exclude, is_linear=is_linear, device=device)
        self.base = dict(base)
        self.names = [n for n, t in self.base.items() if t.is_floating_point()]

    def _tau(self, expert: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        if name not in expert:
            raise PlanError(f"opcm: model {self.count + 1} has no tensor '{name}'")
        b = self.base[name]
        e = expert[name]
        if tuple(e.shape) != tuple(b.shape):
            raise PlanError(f"opcm: model {self.count + 1}, tensor '{name}': shape "
                            f"{tuple(e.shape)} differs from the base's {tuple(b.shape)}")
        return task_vector(b, e, self.device)

    def add(self, expert: Mapping[str, torch.Tensor]) -> float:
        """Merge one more model in; returns the norm of the merged task vector afterwards.

        ``expert`` may be a lazy mapping: each tensor is read when it is merged. A model that
        lacks a tensor is refused before anything changes.
        """
        missing = [n for n in self.names if n not in expert]
        if missing:
            raise PlanError(f"opcm: model {self.count + 1} has no tensor '{missing[0]}'")
        return self.add_task_vectors((n, self._tau(expert, n)) for n in self.names)

    def merged(self) -> dict[str, torch.Tensor]:
        """θ_0 + the merged task vector, in the base's dtypes (integer tensors: the base)."""
        if not self.norms:
            raise MethodError("opcm: no model has been added yet")
        out = {}
        for n, b in self.base.items():
            if n in self.delta:
                out[n] = (b.to(self.device, torch.float32) + self.delta[n]).to(b.device, b.dtype)
            else:
                out[n] = b.clone()
        return out


def opcm_merge(base: Mapping[str, torch.Tensor], experts: Iterable[Mapping[str, torch.Tensor]],
               **options) -> dict[str, torch.Tensor]:
    """Merge a sequence of state dicts with OPCM, holding one expert at a time.

    ``experts`` may be a generator that loads each model lazily. Options as :class:`OPCM`.
    """
    merger = OPCM(base, **options)
    for sd in experts:
        merger.add(sd)
    return merger.merged()
