"""The Twin-Merging model at inference: the shared model, a router, and low-rank side branches.

For an input x the router gives gates w(x) (softmax over the K experts) and the model computes
f_θ(x) with θ = θ* + Σ_k w_k δ̂_k (Lu et al. 2024, Eq. 5). The merged weights are never built:
each module whose parameters carry exclusive knowledge gets a forward hook that adds the
routed deltas' contribution to the shared module's output, per sample b:

    Linear        y_b += Σ_k w_bk (x_b V_k)(U_k Σ_k)ᵀ + Σ_k w_bk δbias_k      (δ̂ = up·down)
    HF Conv1D     y_b += Σ_k w_bk (x_b up_k) down_k + Σ_k w_bk δbias_k         (weight is in×out)
    Embedding     y_b += Σ_k w_bk up_k[ids_b] down_k
    LayerNorm     y_b += x̂_b ⊙ Σ_k w_bk δγ_k + Σ_k w_bk δβ_k                  (x̂: normalised x)

Every K experts' ranks are concatenated (R = Σ r_k), so a branch is two thin matrix products
whatever K. A module of any other type (a custom block that uses its weight in its own way) is
recomputed with :func:`torch.func.functional_call` and its own parameters θ* + Σ_k w_k δ̂_k,
once per distinct gate vector in the batch (per sample with soft gates, per routed task with
``routing="top1"``): exact, slower, and only for those modules.

Routing: ``"sample"`` (the paper: soft gates per input), ``"top1"`` (each input to its
argmax expert, inputs grouped by expert) or ``"batch"`` (one gate vector, the batch mean).
In cached decoding (``past_key_values`` given and not empty) the gates of the prompt are kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from modelalloy.errors import MethodError
from modelalloy.twin.lowrank import LowRank
from modelalloy.twin.router import TwinRouter

ROUTINGS = ("sample", "top1", "batch")
Factor = LowRank | torch.Tensor


class _Delta:
    """One parameter's exclusive knowledge for all K tasks, ready for batched gates."""

    def __init__(self, per_task: Sequence[Factor | None], shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.low_rank = any(isinstance(f, LowRank) for f in per_task)
        if self.low_rank:
            ups, downs, seg = [], [], []
            for k, f in enumerate(per_task):
                if f is None:
                    continue
                if not isinstance(f, LowRank):
                    raise MethodError("twin: a tensor mixes low-rank and dense factors")
                ups.append(f.up.float())
                downs.append(f.down.float())
                seg += [k] * f.rank
            self.up = torch.cat(ups, 1)  # (m, R)
            self.down = torch.cat(downs, 0)  # (R, n)
            self.seg = torch.tensor(seg, dtype=torch.long)
        else:
            self.stack = torch.stack([torch.zeros(shape) if f is None else f.float()
                                      for f in per_task])  # (K, *shape)

    def coeff(self, gates: torch.Tensor) -> torch.Tensor:
        """(B, R): each rank column's task gate."""
        return gates[:, self.seg]

    def dense_batch(self, gates: torch.Tensor) -> torch.Tensor:
        """(B, *shape): Σ_k w_bk δ_k for a dense delta."""
        return torch.tensordot(gates, self.stack.to(gates.dtype), dims=1)

    def full(self, g: torch.Tensor) -> torch.Tensor:
        """Σ_k g_k δ̂_k as one tensor (the fallback path)."""
        if self.low_rank:
            return self.up @ (g[self.seg, None] * self.down)
        return torch.tensordot(g, self.stack, dims=1)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, 1, ..., 1, C) to broadcast over ``like``'s middle dimensions."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 2)), v.shape[-1])


def _gates_for(gates: torch.Tensor, batch: int) -> torch.Tensor:
    if gates.shape[0] == batch:
        return gates
    if batch % gates.shape[0] == 0:  # beams / several sequences per prompt
        return gates.repeat_interleave(batch // gates.shape[0], dim=0)
    raise MethodError(f"twin: {gates.shape[0]} routed inputs but a batch of {batch} reached a "
                      "module; route the batch first")


class _Branch:
    """The hook of one module: its parameters' deltas and how they act on its output."""

    def __init__(self, owner: TwinModel, module: nn.Module, deltas: dict[str, _Delta]) -> None:
        self.owner, self.module, self.deltas = owner, module, deltas
        self.kind = self._kind(module, deltas)
        self.busy = False

    @staticmethod
    def _kind(module: nn.Module, deltas: dict[str, _Delta]) -> str:
        attrs = set(deltas)
        if isinstance(module, nn.Linear) and attrs <= {"weight", "bias"}:
            return "linear"
        if (type(module).__name__ == "Conv1D" and attrs <= {"weight", "bias"}
                and module.weight.dim() == 2):
            return "conv1d"
        if (isinstance(module, nn.Embedding) and attrs == {"weight"}
                and module.max_norm is None and deltas["weight"].low_rank):
            return "embedding"
        if (isinstance(module, nn.LayerNorm) and attrs <= {"weight", "bias"}
                and len(module.normalized_shape) == 1):
            return "layernorm"
        return "fallback"

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> Any:
        gates = self.owner.active_gates
        if gates is None or self.busy:
            return None
        if self.kind == "fallback":
            return self._recompute(args, kwargs, output)
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(output, torch.Tensor):
            raise MethodError(f"twin: module {type(module).__name__} returned a "
                              f"{type(output).__name__}, not a tensor")
        if output.shape[0] == 1 and gates.shape[0] > 1:
            # an input shared by the batch (e.g. position ids (1, T)): the output grows to the
            # routed batch, each row with its own deltas
            x = x.expand(gates.shape[0], *x.shape[1:])
            output = output.expand(gates.shape[0], *output.shape[1:])
        g = _gates_for(gates, output.shape[0]).to(output.dtype)
        return output + self._side(x, g, output).to(output.dtype)

    def _side(self, x: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        extra = torch.zeros((), dtype=out.dtype)
        w, b = self.deltas.get("weight"), self.deltas.get("bias")
        if self.kind == "embedding":
            assert w is not None
            h = w.up.to(out.dtype)[x] * _expand(w.coeff(g), out)
            return h @ w.down.to(out.dtype)
        if self.kind == "layernorm":
            xhat = F.layer_norm(x, self.module.normalized_shape, eps=self.module.eps)
            if w is not None:
                extra = extra + xhat * _expand(w.dense_batch(g), out)
            if b is not None:
                extra = extra + _expand(b.dense_batch(g), out)
            return extra
        xf = x.to(out.dtype)
        if w is not None:
            transposed = self.kind == "conv1d"  # HF Conv1D: y = x W, W is (in, out)
            if w.low_rank:
                first, second = (w.up, w.down) if transposed else (w.down.T, w.up.T)
                h = (xf @ first.to(out.dtype)) * _expand(w.coeff(g), out)
                extra = extra + h @ second.to(out.dtype)
            else:
                dw = w.dense_batch(g)  # (B, a, b)
                eq = "b...i,bio->b...o" if transposed else "b...i,boi->b...o"
                extra = extra + torch.einsum(eq, xf, dw)
        if b is not None:
            extra = extra + _expand(b.dense_batch(g), out)
        return extra

    def _recompute(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise MethodError(f"twin: cannot route module {type(self.module).__name__}: its "
                              f"output is a {type(output).__name__}, not a tensor")
        batch = output.shape[0]
        gates = _gates_for(self.owner.active_gates, batch)
        rows, inverse = torch.unique(gates, dim=0, return_inverse=True)
        result = torch.empty_like(output)
        self.busy = True
        try:
            for i, g in enumerate(rows):
                idx = (inverse == i).nonzero().flatten()
                params = {a: getattr(self.module, a) + d.full(g.float()).to(output.dtype)
                          for a, d in self.deltas.items()}
                sub_args = tuple(_select(a, idx, batch) for a in args)
                sub_kwargs = {k: _select(v, idx, batch) for k, v in kwargs.items()}
                result[idx] = functional_call(self.module, params, sub_args, sub_kwargs)
        finally:
            self.busy = False
        return result


def _select(value: Any, idx: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[idx]
    return value


def _has_past(past: Any) -> bool:
    if past is None:
        return False
    length = getattr(past, "get_seq_length", None)
    if callable(length):
        return int(length()) > 0
    return bool(len(past)) if isinstance(past, (tuple, list)) else True


def embed(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """e(x): the mean over tokens of ``model``'s last hidden state, one row per input.

    Hugging Face models: ``hidden_states[-1]`` averaged over the attention mask. Plain modules:
    their output, averaged over every dimension between the batch and the last.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        kw = {k: v for k, v in kwargs.items()
              if k not in ("past_key_values", "use_cache", "labels", "cache_position")}
        res = model(*args, **kw, output_hidden_states=True, use_cache=False)
        h = res.hidden_states[-1].float()
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == h.shape[:2]:
            m = mask.to(h.dtype)[..., None]
            return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return h.mean(1)
    out = model(*args, **kwargs)
    if not isinstance(out, torch.Tensor):
        out = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    out = out.float()
    return out if out.dim() == 2 else out.reshape(out.shape[0], -1, out.shape[-1]).mean(1)


class TwinModel(nn.Module):
    """The shared model with routed low-rank exclusive knowledge (see the module docstring).

    Call it as the shared model (same arguments, same outputs). ``gates=`` (a (B, K) tensor)
    skips the router, e.g. to apply one expert: ``model(x, gates=one_hot)``.
    """

    def __init__(self, shared: nn.Module, router: TwinRouter, tasks: Sequence[str],
                 factors: Mapping[str, Mapping[str, Factor]], routing: str = "sample") -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise MethodError(f"twin: routing must be one of {', '.join(ROUTINGS)}, "
                              f"got '{routing}'")
        if router.num_tasks != len(tasks):
            raise MethodError(f"twin: the router predicts {router.num_tasks} tasks but there "
                              f"are {len(tasks)} experts ({', '.join(tasks)})")
        self.shared, self.router, self.tasks, self.routing = shared.eval(), router.eval(), \
            list(tasks), routing
        self.active_gates: torch.Tensor | None = None
        self._pinned: torch.Tensor | None = None
        self._branches: list[_Branch] = []
        self._handles = []
        self._attach(factors)

    def _attach(self, factors: Mapping[str, Mapping[str, Factor]]) -> None:
        params = dict(self.shared.named_parameters(remove_duplicate=False))
        names = sorted({n for per in factors.values() for n in per})
        by_param: dict[int, _Delta] = {}
        for name in names:
            if name not in params:
                raise MethodError(f"twin: tensor '{name}' of the bundle is not a parameter of "
                                  "the shared model; the bundle does not match this model")
            p = params[name]
            per_task = [factors[t].get(name) for t in self.tasks]
            for f in per_task:
                shape = tuple((f.up.shape[0], f.down.shape[1]) if isinstance(f, LowRank)
                              else f.shape) if f is not None else tuple(p.shape)
                if shape != tuple(p.shape):
                    raise MethodError(f"twin: the factors of '{name}' make a {shape} tensor, "
                                      f"the shared model's is {tuple(p.shape)}")
            by_param[id(p)] = _Delta(per_task, tuple(p.shape))
        for module in self.shared.modules():
            deltas = {a: by_param[id(p)] for a, p in module._parameters.items()
                      if p is not None and id(p) in by_param}
            if deltas:
                branch = _Branch(self, module, deltas)
                self._branches.append(branch)
                self._handles.append(module.register_forward_hook(branch, with_kwargs=True))

    @property
    def branch_kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self._branches:
            out[b.kind] = out.get(b.kind, 0) + 1
        return out

    @torch.no_grad()
    def route(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Gates (B, K) for a batch: the router on the shared model's embedding."""
        saved, self.active_gates = self.active_gates, None
        try:
            e = embed(self.shared, args, kwargs)
        finally:
            self.active_gates = saved
        gates = self.router.gates(e)
        if self.routing == "top1":
            gates = F.one_hot(gates.argmax(-1), len(self.tasks)).to(gates.dtype)
        elif self.routing == "batch":
            gates = gates.mean(0, keepdim=True).expand_as(gates).contiguous()
        return gates

    def forward(self, *args: Any, gates: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if gates is None:
            if self._pinned is not None:
                gates = self._pinned
            elif _has_past(kwargs.get("past_key_values")) and self.active_gates is not None:
                gates = self.active_gates  # cached decoding: keep the prompt's routing
            else:
                gates = self.route(*args, **kwargs)
        if gates.dim() != 2 or gates.shape[1] != len(self.tasks):
            raise MethodError(f"twin: gates must be (batch, {len(self.tasks)}), got "
                              f"{tuple(gates.shape)}")
        self.active_gates = gates
        return self.shared(*args, **kwargs)

    @contextmanager
    def pinned(self, gates: torch.Tensor):
        """Every call inside uses these gates (e.g. through the shared model's ``generate``)."""
        self._pinned = self.active_gates = gates
        try:
            yield self
        finally:
            self._pinned = None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:
        """transformers' ``generate`` of the shared model, routed once on the prompt."""
        kw = {"attention_mask": attention_mask} if attention_mask is not None else {}
        gates = self.route(input_ids=input_ids, **kw)
        with self.pinned(gates):
            return self.shared.generate(input_ids=input_ids, **kw, **kwargs)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
