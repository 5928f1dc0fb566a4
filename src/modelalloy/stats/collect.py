"""Collect statistics from calibration data through hooks on any torch module.

Three collectors, one code path for Hugging Face models and plain ``nn.Module``\\ s:

- :func:`collect_grams` — RegMean's input Gram matrices ``G = XᵀX / n`` of every linear map,
  token-weighted, attention-mask aware (forward pre-hooks, no backward pass);
- :func:`collect_activations` — AIM's per-input-channel mean ``|x|`` of every weight-bearing,
  non-embedding module (forward pre-hooks);
- :func:`collect_fisher` — the diagonal Fisher of every parameter from **per-example** gradients
  (one backward pass per example and sample; Matena & Raffel 2022).

Each returns a :class:`Statistic`: a read-only mapping from *parameter name* (the state-dict name
of the weight the statistic belongs to) to a float32 CPU tensor, which is exactly what
:func:`modelalloy.stats.save_stats` writes and what ``merge_state_dicts(..., stats=...)`` reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from modelalloy.stats.hooks import (
    FIRST,
    LAST,
    batch_size_of,
    call_model,
    linear_modules,
    logits_of,
    progress,
    select_example,
    split_batch,
    to_device,
    token_mask,
    weight_modules,
)

KINDS = ("gram", "activations", "fisher")


@dataclass
class Statistic(Mapping[str, torch.Tensor]):
    """Per-parameter statistics of one model: ``stat[param_name] -> Tensor``.

    ``input_dims`` says, for gram/activation statistics, which dimension of the weight the
    statistic's channels run along ("last" for ``nn.Linear`` and norms, "first" for the
    transposed ``Conv1D`` of GPT-2 style models). ``counts`` holds the number of tokens (gram,
    activations) or examples (fisher) behind each entry, so means can be pooled or turned back
    into sums.
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    input_dims: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def _as_predicate(include: Any) -> Callable[[str], bool] | None:
    if include is None or callable(include):
        return include
    import re

    pattern = re.compile(include)
    return lambda name: pattern.search(name) is not None


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("input", "x", "hidden_states"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


class _TokenRows:
    """Turns a hooked input (…, d) into the rows (n, d) that count, honouring the mask.

    The kept rows' flat indices are computed once per batch and input shape (setting
    :attr:`mask` resets them and starts a new batch, :attr:`batch`) and shared by every hooked
    module that sees an input of that shape. A batch without padding needs no gather at all.

    With ``token_fraction`` r < 1 (Grams only), a seeded random subset of the n kept rows is
    drawn once per batch and input shape (the same tokens for every layer of the batch): m of
    them, m = ⌊r·n⌋ or ⌈r·n⌉ with the probabilities that make E[m] = r·n, uniformly among the
    subsets of that size. Every row is then used with probability exactly r, so a sum over the
    used rows divided by r is an unbiased estimate of the sum over all n (the caller divides).
    """

    def __init__(self, mask_padding: bool, token_fraction: float = 1.0, seed: int = 0):
        if not 0.0 < token_fraction <= 1.0:
            raise ValueError("token_fraction must be in (0, 1]")
        self.mask_padding = mask_padding
        self.token_fraction = float(token_fraction)
        self.batch = 0
        self._gen = (torch.Generator(device="cpu").manual_seed(seed)
                     if self.token_fraction < 1.0 else None)
        self._mask: torch.Tensor | None = None
        self._shape: tuple[int, ...] | None = None
        self._select: dict[Any, tuple[torch.Tensor | None, int]] = {}

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        self.batch += 1
        self._select = {}
        if value is not None and (not self.mask_padding or bool(value.all())):
            value = None  # no padding in this batch: every row counts, nothing to gather
        self._mask = value
        self._shape = tuple(value.shape) if value is not None else None

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """(flat indices of the rows of ``x`` to use, or None for all; the number of rows
        they stand for: the kept rows, before any subsampling)."""
        shape = tuple(x.shape[:-1])
        if self._gen is None and shape != self._shape:
            return None, math.prod(shape)  # the fast path: unmasked, not subsampled
        key = (shape, x.device)
        sel = self._select.get(key)
        if sel is None:
            # drawn once per shape (the same tokens on every device), then moved
            idx, n = self._select.get(shape) or self._select.setdefault(shape,
                                                                         self._make(shape))
            sel = self._select[key] = (None if idx is None else idx.to(x.device), n)
        return sel

    def _make(self, shape: tuple[int, ...]) -> tuple[torch.Tensor | None, int]:
        base = None
        if shape == self._shape and len(shape) >= 1:
            # a shape equal to the mask's means a mask is set
            base = cast(torch.Tensor, self._mask).reshape(-1).nonzero().squeeze(1)
        n = math.prod(shape) if base is None else int(base.numel())
        if self._gen is None:
            return base, n
        target = self.token_fraction * n
        m = math.floor(target)
        if float(torch.rand((), generator=self._gen)) < target - m:
            m += 1
        pick = torch.randperm(n, generator=self._gen)[:m].sort().values
        idx = pick if base is None else base[pick.to(base.device)]
        return idx, n

    def kept(self, x: torch.Tensor) -> torch.Tensor | None:
        """Flat indices of the rows of ``x`` to keep, or None for all of them."""
        return self.select(x)[0]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        flat = x.reshape(-1, x.shape[-1])
        idx = self.kept(x)
        return flat if idx is None else flat.index_select(0, idx)


# Gram accumulation: column blocks of this width; only blocks on or above the diagonal are
# multiplied (G is symmetric), which saves up to half the multiply-adds for wide inputs.
GRAM_BLOCK = 128
# Rows gathered per linear map before one multiply (≤ 4 MiB of float32 per map, 64–4096 rows).
GRAM_CHUNK_ELEMENTS = 1 << 20


# On the CPU, multiply with NumPy's ``a.T @ a`` (BLAS syrk: half the work of a general product).
GRAM_SYRK = True
# Layers reading the very same input tensor share one Gram (see :class:`_SharedGrams`).
GRAM_SHARE = True


def _blas_threads() -> Any:
    """Limit NumPy's BLAS to torch's thread count while collecting (with threadpoolctl, when
    installed), so the syrk path uses the threads torch was told to use."""
    import contextlib

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=torch.get_num_threads(), user_api="blas")


def _triangle_blocks(d: int, block: int) -> list[tuple[int, int, int, int]]:
    if block <= 0 or d < 2 * block:
        return [(0, d, 0, d)]
    edges = list(range(0, d, block)) + [d]
    if edges[-1] - edges[-2] < block // 2 and len(edges) > 2:  # no sliver at the end
        edges.pop(-2)
    spans = list(zip(edges[:-1], edges[1:], strict=True))
    return [(a0, a1, b0, b1) for i, (a0, a1) in enumerate(spans) for b0, b1 in spans[i:]]


class _GramSum:
    """Σ xᵀx over the selected rows of every input, in ``dtype``, without per-call allocations.

    Rows are copied (gathered, when a token mask or subsampling applies) into a fixed buffer and
    multiplied once it is full: larger, fewer matrix products. G is symmetric: on the CPU the
    product is NumPy's ``a.T @ a``, which BLAS computes with syrk (one triangle); on other
    devices only the upper block triangle is multiplied (:data:`GRAM_BLOCK`) and mirrored at
    the end.
    """

    def __init__(self, d: int, dtype: torch.dtype, device: torch.device,
                 block: int | None = None, chunk_elements: int | None = None):
        block = GRAM_BLOCK if block is None else block
        chunk_elements = GRAM_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
        self.d = d
        self.dtype = dtype
        self.gram = torch.zeros(d, d, dtype=dtype, device=device)
        cap = max(64, min(4096, chunk_elements // max(d, 1)))
        self.buf = torch.empty(cap, d, dtype=dtype, device=device)
        self.filled = 0
        self.count = 0
        self.blocks = _triangle_blocks(d, block)
        # CPU float32/float64: multiply through NumPy (syrk); elsewhere torch's addmm_ on the
        # upper block triangle (mirrored in :meth:`total`).
        self._numpy = (self.gram.numpy() if self.gram.device.type == "cpu" and GRAM_SYRK
                       and dtype in (torch.float32, torch.float64) else None)
        if self._numpy is not None:
            self.blocks = [(0, d, 0, d)]

    def _multiply(self, r: torch.Tensor) -> None:
        g = self.gram
        if self._numpy is not None:
            # NumPy computes ``a.T @ a`` with BLAS syrk (one triangle, half the multiply-adds;
            # torch has no syrk) and mirrors it; the sum lands in the torch tensor's memory.
            a = r.contiguous().numpy()
            self._numpy += a.T @ a
            return
        for a0, a1, b0, b1 in self.blocks:
            g[a0:a1, b0:b1].addmm_(r[:, a0:a1].T, r[:, b0:b1])

    def flush(self) -> None:
        if self.filled:
            self._multiply(self.buf[:self.filled])
            self.filled = 0

    def add(self, x: torch.Tensor, idx: torch.Tensor | None, count: int | None = None) -> None:
        """Add the rows ``idx`` of ``x`` (all rows when None); ``count`` rows are counted
        (default: the rows used)."""
        flat = x.detach().reshape(-1, self.d)
        m = flat.shape[0] if idx is None else idx.numel()
        self.count += m if count is None else count
        cap = self.buf.shape[0]
        if idx is None and self.filled == 0 and m >= cap and flat.dtype == self.buf.dtype:
            self._multiply(flat)  # a large batch: multiply it where it is
            return
        start = 0
        while start < m:
            take = min(m - start, cap - self.filled)
            dst = self.buf[self.filled:self.filled + take]
            if idx is None:
                dst.copy_(flat[start:start + take])
            elif flat.dtype == dst.dtype:
                torch.index_select(flat, 0, idx[start:start + take], out=dst)
            else:
                dst.copy_(flat.index_select(0, idx[start:start + take]))
            self.filled += take
            start += take
            if self.filled == cap:
                self.flush()

    def subtract(self, x: torch.Tensor, idx: torch.Tensor | None, count: int) -> None:
        """Undo an :meth:`add` of the same rows (rare: a shared Gram that has to split)."""
        self.flush()
        flat = x.detach().reshape(-1, self.d)
        r = (flat if idx is None else flat.index_select(0, idx)).to(self.dtype)
        self.gram.sub_(r.T @ r)  # both triangles: the lower one is mirrored anyway
        self.count -= count

    def clone(self) -> _GramSum:
        """An independent accumulator holding the same sum so far."""
        self.flush()
        other = _GramSum.__new__(_GramSum)
        other.__dict__.update(self.__dict__)
        other.gram = self.gram.clone()
        other.buf = torch.empty_like(self.buf)
        other._numpy = other.gram.numpy() if self._numpy is not None else None
        return other

    def total(self) -> torch.Tensor:
        """Σ xᵀx (the buffer flushed, the lower triangle mirrored); call once, at the end."""
        self.flush()
        g = self.gram
        for a0, a1, b0, b1 in self.blocks:
            if (a0, a1) != (b0, b1):
                g[b0:b1, a0:a1] = g[a0:a1, b0:b1].T
        self.buf = self.buf[:0]
        return g


def _same_tensor(x: torch.Tensor, ref: Any, sig: tuple) -> bool:
    """Whether ``x`` is the tensor recorded as (weak reference, signature): the very same
    object, or a tensor over the same memory with the same layout, while the recorded one is
    still alive (so its memory cannot have been reused), and unmodified since (version)."""
    held = ref()
    if held is None:
        return False
    try:
        return (held is x or _signature(x)[:-1] == sig[:-1]) and x._version == sig[-1]
    except RuntimeError:  # inference-mode tensors have no version counter
        return False


def _signature(x: torch.Tensor) -> tuple:
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(),
            x.dtype, x.device, x._version)


class _Group:
    """Layers whose Grams are one accumulator, because every forward so far gave them the very
    same input tensor. One *round* is one input shared by all members: the first member's call
    adds it, the others' are skipped."""

    __slots__ = ("members", "acc", "frozen", "seen", "ref", "sig", "held")

    def __init__(self, member: str, acc: _GramSum):
        self.members = [member]
        self.acc = acc
        self.frozen = False  # members can still join (the group's first round, in one batch)
        self.seen: set[str] = set()
        self.ref: Any = None
        self.sig: tuple = ()
        # while a round of a frozen group of several members is incomplete: (x, idx, count)
        # of its input, to take it back out if a member turns out not to share it
        self.held: tuple | None = None


class _SharedGrams:
    """Gram accumulators of the hooked layers, one per distinct input: layers that read the
    very same input tensor in the same forward pass (q/k/v projections of one normed hidden
    state, gate/up of another, ...) share one accumulator, so that Gram is computed once.

    Detection is generic: at a layer's first call, it joins a group created in the same batch
    whose input was this very tensor (same object, or same memory and layout while that one is
    alive, and not modified since). Every later round is checked the same way; if a member ever
    reads a different input, or is called twice before its siblings, or not at all in a batch,
    the group is split — each member gets its own accumulator holding its exact sum so far —
    so the result is always exactly what per-layer accumulation would give.
    """

    def __init__(self, rows: _TokenRows, dtype: torch.dtype):
        self.rows = rows
        self.dtype = dtype
        self.group: dict[str, _Group] = {}
        self.batch = -1
        self.forming: list[_Group] = []  # groups created in this batch, still in round one
        self.shared_calls = 0  # calls served by a sibling's product (for tests and notes)

    def _new_batch(self) -> None:
        for g in {id(g): g for g in self.group.values()}.values():
            if g.frozen and g.held is not None:
                self._split(g)  # a member was not called in that batch
            g.frozen = True
            g.held = None
            g.seen = set()
        self.forming = []
        self.batch = self.rows.batch

    def add(self, name: str, x: torch.Tensor) -> None:
        if self.rows.batch != self.batch:
            self._new_batch()
        g = self.group.get(name)
        if g is None:
            self._first_call(name, x)
            return
        if g.frozen and len(g.members) == 1:
            g.acc.add(x, *self.rows.select(x))
            return
        if not g.frozen:
            # round one, in the batch that created the group: a repeated call ends it
            g.frozen = True
            g.members = [m for m in g.members if m in g.seen]
            self.forming = [f for f in self.forming if f is not g]
            self._start_round(g, name, x)
            return
        if not g.seen or len(g.seen) == len(g.members):
            self._start_round(g, name, x)
        elif name not in g.seen and _same_tensor(x, g.ref, g.sig):
            g.seen.add(name)
            self.shared_calls += 1
            if len(g.seen) == len(g.members):
                g.held = None  # every member has it: nothing left to take back
        else:
            self._split(g)
            self.add(name, x)

    def _first_call(self, name: str, x: torch.Tensor) -> None:
        for g in self.forming if GRAM_SHARE else ():
            if (name not in g.seen and g.acc.d == x.shape[-1]
                    and _same_tensor(x, g.ref, g.sig)):
                g.members.append(name)
                g.seen.add(name)
                self.group[name] = g
                self.shared_calls += 1
                return
        g = _Group(name, _GramSum(x.shape[-1], self.dtype, x.device))
        self.group[name] = g
        self.forming.append(g)
        g.seen = {name}
        self._record(g, x)
        g.acc.add(x, *self.rows.select(x))

    def _record(self, g: _Group, x: torch.Tensor) -> None:
        import weakref

        try:
            g.ref, g.sig = weakref.ref(x), _signature(x)
        except (RuntimeError, TypeError):  # no version counter: it cannot be shared
            g.ref, g.sig = (lambda: None), ()

    def _start_round(self, g: _Group, name: str, x: torch.Tensor) -> None:
        g.seen = {name}
        idx, count = self.rows.select(x)
        g.acc.add(x, idx, count)
        if len(g.members) > 1:
            self._record(g, x)
            g.held = (x, idx, count)
        else:
            g.held = None

    def _split(self, g: _Group) -> None:
        """Give every member of ``g`` its own accumulator with its exact sum so far."""
        keeper = next((m for m in g.members if m in g.seen), g.members[0])
        for m in g.members:
            if m == keeper:
                acc = g.acc
            else:
                acc = g.acc.clone()
                if g.held is not None and m not in g.seen:
                    acc.subtract(*g.held)
            solo = _Group(m, acc)
            solo.frozen = True
            self.group[m] = solo
        self.forming = [f for f in self.forming if f is not g]

    def totals(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Every layer's Σ xᵀx and row count (layers of one group: copies of one product)."""
        self._new_batch()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        done: dict[int, torch.Tensor] = {}
        for name, g in self.group.items():
            if id(g) in done:
                sums[name] = done[id(g)].clone()
            else:
                total = g.acc.total()
                if self.rows.token_fraction < 1.0:
                    total = total / self.rows.token_fraction  # unbiased: each row had chance r
                sums[name] = done[id(g)] = total
            counts[name] = g.acc.count
        return sums, counts


def _run_forward(model: nn.Module, batches: Iterable[Any], rows: _TokenRows,
                 device: torch.device | None, show: bool, desc: str,
                 max_batches: int | None) -> int:
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in progress(batches, show, desc):
                if max_batches is not None and n_batches >= max_batches:
                    break
                inputs, _ = split_batch(batch)
                if device is not None:
                    inputs = to_device(inputs, device)
                rows.mask = token_mask(inputs)
                call_model(model, inputs)
                n_batches += 1
    finally:
        rows.mask = None
        model.train(was_training)
    return n_batches



def _run_with_pre_hooks(model: nn.Module, hooks: list[tuple[Any, Callable]],
                        batches: Iterable[Any], rows: _TokenRows,
                        dev: torch.device | None, show_progress: bool, label: str,
                        max_batches: int | None) -> None:
    """Forward every batch with the given pre-hooks installed; always remove them."""
    handles = [hw.module.register_forward_pre_hook(hook, with_kwargs=True)
               for hw, hook in hooks]
    try:
        _run_forward(model, batches, rows, dev, show_progress, label, max_batches)
    finally:
        for h in handles:
            h.remove()


def _per_parameter(hooked: list[Any], sums: dict[str, torch.Tensor], counts: dict[str, int],
                   finish: Callable[[torch.Tensor, int], torch.Tensor],
                   input_dim: Callable[[Any], str]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, int]]:
    """File each module's accumulated statistic under every parameter name it covers."""
    out, dims, cnt = {}, {}, {}
    for hw in hooked:
        if hw.module_name not in sums:
            continue
        n = counts[hw.module_name]
        value = finish(sums[hw.module_name], n).to("cpu", torch.float32)
        for pname in hw.param_names:
            out[pname] = value
            dims[pname] = input_dim(hw)
            cnt[pname] = n
    return out, dims, cnt

def collect_grams(model: nn.Module, batches: Iterable[Any], *, include: Any = None,
                  mask_padding: bool = True, reduce: str = "mean",
                  dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                  max_batches: int | None = None, show_progress: bool = False,
                  token_fraction: float = 1.0, seed: int = 0) -> Statistic:
    """Input Gram matrices of every linear map of ``model`` (RegMean, Jin et al. 2023).

    For a linear map with inputs x (flattened over batch and tokens to rows), accumulates
    ``Σ xᵀx`` and the row count n, and returns ``G = Σ xᵀx / n`` (``reduce="mean"``, the
    reference's running mean, the default) or the sum (``reduce="sum"``). With ``mask_padding``
    (default) rows whose ``attention_mask`` is 0 are left out; the reference RegMean includes
    padding — pass ``mask_padding=False`` to reproduce it. ``include`` (a regex or a predicate on
    the parameter name) restricts the hooked layers. Accumulation is in ``dtype`` on the
    device of the activations; results are returned float32 on the CPU.

    Layers that read the very same input tensor in a forward pass (e.g. the q/k/v projections
    of a Llama block) share one product: it is computed once and written for each of them.

    ``token_fraction`` r < 1 (opt-in; default 1, exact) uses a seeded (``seed``) random subset
    of about r·n of the n rows of every batch (the same tokens for every layer; each row with
    probability exactly r) and divides the sum by r: an unbiased estimate of the full Gram at
    about r of the product's cost. Counts stay the full row counts; the statistic's meta
    records ``token_fraction`` and ``seed``.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError("reduce must be 'mean' or 'sum'")
    dev = torch.device(device) if device is not None else None
    rows = _TokenRows(mask_padding, token_fraction, seed)
    shared = _SharedGrams(rows, dtype)
    hooked = linear_modules(model, _as_predicate(include))

    def make_hook(key: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else _first_input(args,
                                                                                       kwargs)
            if x is not None:
                shared.add(key, x)
        return hook

    with _blas_threads():
        _run_with_pre_hooks(model, [(hw, make_hook(hw.module_name)) for hw in hooked],
                            batches, rows, dev, show_progress, "gram", max_batches)
        sums, counts = shared.totals()
    out, dims, cnt = _per_parameter(
        hooked, sums, counts,
        lambda g, n: g / max(n, 1) if reduce == "mean" else g,
        lambda hw: hw.input_dim)
    meta = {"reduce": reduce, "mask_padding": str(mask_padding).lower()}
    if rows.token_fraction < 1.0:
        meta.update({"token_fraction": repr(rows.token_fraction), "seed": str(seed)})
    return Statistic("gram", out, dims, cnt, meta)


def collect_activations(model: nn.Module, batches: Iterable[Any], *, include: Any = None,
                        mask_padding: bool = True, device: str | torch.device | None = None,
                        max_batches: int | None = None,
                        show_progress: bool = False) -> Statistic:
    """Per-input-channel mean ``|x|`` at every weight-bearing, non-embedding module (AIM).

    The reference (Nobari et al. 2025, ``get_calib_feat``) sums per-batch token means; we keep
    the token-weighted mean, which differs only by a constant when batches have equal size and
    is the same after AIM's normalisation by the maximum. Keys are the modules' weight names;
    the vector runs along the weight's input dimension (``input_dims``).
    """
    dev = torch.device(device) if device is not None else None
    rows = _TokenRows(mask_padding)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooked = weight_modules(model, _as_predicate(include))

    def d_in(hw: Any) -> int:
        w = hw.module.weight
        if w.dim() == 1:
            return w.shape[0]
        return w.shape[0] if hw.input_dim == FIRST else w.shape[-1]

    def make_hook(key: str, width: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_input(args, kwargs)
            if x is None or x.shape[-1] != width or not x.is_floating_point():
                return
            r = rows.rows(x).float().abs()
            s = r.sum(0)
            if key in sums:
                sums[key].add_(s)
            else:
                sums[key] = s
            counts[key] = counts.get(key, 0) + r.shape[0]
        return hook

    _run_with_pre_hooks(model, [(hw, make_hook(hw.module_name, d_in(hw))) for hw in hooked],
                        batches, rows, dev, show_progress, "activations", max_batches)
    out, dims, cnt = _per_parameter(
        hooked, sums, counts, lambda a, n: a / max(n, 1),
        lambda hw: LAST if hw.module.weight.dim() == 1 else hw.input_dim)
    return Statistic("activations", out, dims, cnt, {"reduce": "mean",
                                                     "mask_padding": str(mask_padding).lower()})


FISHER_MODES = ("exact", "sampled", "hard", "empirical")


def collect_fisher(model: nn.Module, batches: Iterable[Any], *, mode: str = "sampled",
                   include: Any = None, logits_fn: Callable[[Any], torch.Tensor] | None = None,
                   num_samples: int = 1, shift_labels: bool = True, seed: int = 0,
                   device: str | torch.device | None = None, max_examples: int | None = None,
                   show_progress: bool = False) -> Statistic:
    """Diagonal Fisher ``F = (1/N) Σ_n E_y[(∇θ log p(y|x_n))²]`` from per-example gradients.

    Matena & Raffel (2022), ``compute_fisher_for_model``: the square is taken per example,
    before averaging. ``mode`` picks how y is drawn:

    - ``"exact"`` — the expectation over classes, Σ_c p(c|x)·(∇ log p(c|x))², one backward pass
      per class (classification outputs ``(batch, classes)`` only; the reference's default);
    - ``"sampled"`` — ``num_samples`` draws y ~ p(y|x) (Monte-Carlo; the default here because it
      also works for language models, where it samples one token per position);
    - ``"hard"`` — y = argmax p(y|x) (the RegMean repo's "hard" variant, but per example);
    - ``"empirical"`` — y = the batch's ``labels`` (for causal LMs, with ``shift_labels``, the
      Hugging Face convention: position t predicts label t+1; -100 is ignored).

    For sequence outputs ``(batch, tokens, vocab)`` the example's log-likelihood is the sum over
    its unmasked positions. No floor or normalisation is applied here: they belong to the merge
    (``fisher`` method). Every trainable floating parameter selected by ``include`` gets an
    entry (tied parameters under all their names).
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"mode must be one of {', '.join(FISHER_MODES)}")
    predicate = _as_predicate(include)
    dev = torch.device(device) if device is not None else None
    get_logits = logits_fn or (lambda out: logits_of(out))
    names_by_param: dict[int, list[str]] = {}
    params: list[nn.Parameter] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.is_floating_point():
            continue
        if id(p) in names_by_param:
            names_by_param[id(p)].append(name)
            continue
        names_by_param[id(p)] = [name]
        params.append(p)
    if predicate is not None:
        params = [p for p in params if any(predicate(n) for n in names_by_param[id(p)])]
    if not params:
        raise ValueError("no parameter selected for the Fisher")
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    saved_flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    n_examples = 0

    def grads_of(value: torch.Tensor, retain: bool) -> list[torch.Tensor]:
        gs = torch.autograd.grad(value, params, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)]

    try:
        for p in params:
            p.requires_grad_(True)
        for batch in progress(batches, show_progress, "fisher"):
            inputs, labels = split_batch(batch)
            if dev is not None:
                inputs = to_device(inputs, dev)
                labels = to_device(labels, dev)
            n = batch_size_of(inputs)
            for i in range(n):
                if max_examples is not None and n_examples >= max_examples:
                    break
                ex = select_example(inputs, i, n)
                mask = token_mask(ex)
                logp = torch.log_softmax(get_logits(call_model(model, ex)).float(), dim=-1)
                if logp.dim() == 2:  # (1, classes)
                    logp = logp[0]
                    if mode == "exact":
                        probs = logp.detach().exp()
                        for c in range(logp.shape[0]):
                            gs = grads_of(logp[c], retain=c < logp.shape[0] - 1)
                            for a, g in zip(acc, gs, strict=True):
                                a.add_(probs[c] * g.float() ** 2)
                    else:
                        if mode == "empirical":
                            if labels is None:
                                raise ValueError("mode='empirical' needs 'labels' in the batch")
                            ys = [int(labels[i])]
                        elif mode == "hard":
                            ys = [int(logp.argmax())]
                        else:
                            ys = torch.multinomial(logp.detach().exp().cpu(), num_samples,
                                                   replacement=True, generator=gen).tolist()
                        for j, y in enumerate(ys):
                            gs = grads_of(logp[y], retain=j < len(ys) - 1)
                            for a, g in zip(acc, gs, strict=True):
                                a.add_(g.float() ** 2 / len(ys))
                elif logp.dim() == 3:  # (1, tokens, vocab)
                    logp = logp[0]
                    valid = (mask[0] if mask is not None and mask.shape[1] == logp.shape[0]
                             else torch.ones(logp.shape[0], dtype=torch.bool,
                                             device=logp.device))
                    if mode == "exact":
                        raise ValueError("mode='exact' needs classification outputs (batch, "
                                         "classes); use 'sampled' for sequence outputs")
                    if mode == "empirical":
                        if labels is None:
                            raise ValueError("mode='empirical' needs 'labels' in the batch")
                        lab = labels[i]
                        if shift_labels:
                            lp, lab, val = logp[:-1], lab[1:], valid[:-1]
                        else:
                            lp, val = logp, valid
                        keep = val & (lab != -100)
                        lab = lab.clamp_min(0)
                        picked = lp.gather(-1, lab[:, None])[:, 0]
                        draws = [(picked * keep).sum()]
                    elif mode == "hard":
                        picked = logp.gather(-1, logp.argmax(-1, keepdim=True))[:, 0]
                        draws = [(picked * valid).sum()]
                    else:
                        draws = []
                        probs = logp.detach().exp().cpu()
                        for _ in range(num_samples):
                            drawn = torch.multinomial(probs, 1, generator=gen).to(logp.device)
                            draws.append((logp.gather(-1, drawn)[:, 0] * valid).sum())
                    for j, value in enumerate(draws):
                        gs = grads_of(value, retain=j < len(draws) - 1)
                        for a, g in zip(acc, gs, strict=True):
                            a.add_(g.float() ** 2 / len(draws))
                else:
                    raise ValueError(f"logits of shape {tuple(logp.shape)}: expected "
                                     "(batch, classes) or (batch, tokens, vocab)")
                n_examples += 1
            if max_examples is not None and n_examples >= max_examples:
                break
    finally:
        for p, flag in zip(params, saved_flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    if n_examples == 0:
        raise ValueError("no calibration example was seen")
    out, cnt = {}, {}
    for p, a in zip(params, acc, strict=True):
        f = (a / n_examples).to("cpu", torch.float32)
        for name in names_by_param[id(p)]:
            out[name] = f
            cnt[name] = n_examples
    return Statistic("fisher", out, {}, cnt, {"mode": mode, "num_samples": str(num_samples)})


def collect_stats(model: nn.Module, batches: Iterable[Any], kind: str, **options: Any
                  ) -> Statistic:
    """Dispatch to the collector of ``kind`` (gram, activations or fisher)."""
    if kind == "gram":
        return collect_grams(model, batches, **options)
    if kind == "activations":
        return collect_activations(model, batches, **options)
    if kind == "fisher":
        return collect_fisher(model, batches, **options)
    raise ValueError(f"unknown statistic kind '{kind}'; one of {', '.join(KINDS)}")


def global_norm(stat: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> float:
    """‖F‖₂ over all entries of the selected tensors concatenated (Fisher normalisation)."""
    total = 0.0
    for name in (names if names is not None else stat.keys()):
        t = stat.get(name)
        if t is not None:
            total += float((t.double() ** 2).sum())
    return math.sqrt(total)
