"""The method contract and registry.

A merge method is a pure function of the aligned float32 tensors for one parameter name::

    fn(base: Tensor | None, experts: list[Tensor], params: dict, ctx: MergeContext) -> Tensor

- ``experts`` are the models being merged (for methods that use a base, the base is *not* among
  them); every tensor is float32 on ``ctx.device`` and must not be modified in place.
- ``params`` holds the parameter values resolved for this tensor: a per-model parameter is a
  list with one value per expert (same order as ``experts``), a global one is a scalar.
- The return value is the merged float32 tensor, same shape as the inputs.

Methods register with :func:`register_method`; the declared :class:`Param` list is the schema
that recipes are validated against. How the engine may run the method is one declared
:class:`Execution` beside its math: its shape (whole, elementwise, rowwise), the reduction
passes and finish step of a sliced merge, its fused kernel and when it applies, and a
whole-model :class:`Prepare` pass (a global top-k threshold, a global norm), whose result the
method reads as ``ctx.global_stats``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from modelalloy.errors import MethodError, did_you_mean

# The unit of the sliced execution shape: the planner cuts large tensors into slices of about
# this many elements, and methods that reduce over slices (the Gram chunks of SLERP and Model
# Stock) follow it. 256K elements of every input in float32 (1 MB each) stay in cache between
# the cast, the method and the cast down, and the buffers are reused, so no full-size float32
# copy is ever made (2.8x less CPU for a 3-model linear merge than whole-tensor float32
# copies, measured in benchmarks/micro_ops.py).
SLICE_ELEMENTS = 1 << 18

BaseUse = Literal["required", "optional", "none"]

# Recipe-wide ``conventions``: "mergekit" (default) reproduces mergekit's result for a mergekit
# recipe (its defaults and variants); "paper" switches every method to its paper's defaults.
CONVENTIONS = ("mergekit", "paper")
_SAME = object()  # Param.paper_default when both conventions share the default


@dataclass(frozen=True)
class Param:
    """One parameter of a method, as a recipe may set it.

    ``per_model`` parameters are set under ``models[].parameters`` (mergekit style) or
    globally as a default for every model; the method receives a list, one per expert.
    """

    name: str
    type: type  # float, int, bool or str
    default: Any
    help: str
    per_model: bool = False
    ge: float | None = None  # inclusive lower bound
    le: float | None = None  # inclusive upper bound
    gt: float | None = None  # exclusive lower bound
    lt: float | None = None  # exclusive upper bound
    choices: tuple[Any, ...] | None = None
    # The default under ``conventions: paper`` when it differs from mergekit's (``default``).
    paper_default: Any = _SAME
    # No default: a recipe must set it (mergekit's slerp ``t``).
    required: bool = False

    def default_for(self, conventions: str = "mergekit") -> Any:
        """The default under the recipe's conventions (see :data:`CONVENTIONS`)."""
        if conventions == "paper" and self.paper_default is not _SAME:
            return self.paper_default
        return self.default

    def check(self, value: Any, where: str) -> Any:
        """Validate and coerce one resolved value; raise MethodError naming ``where``."""
        if self.type is bool:
            if not isinstance(value, bool):
                raise MethodError(f"{where}: parameter '{self.name}' must be true or false, "
                                  f"got {value!r}")
            return value
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MethodError(f"{where}: parameter '{self.name}' must be a number, "
                                  f"got {value!r}")
            value = self.type(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise MethodError(f"{where}: parameter '{self.name}' must be finite, got {value}")
            bounds = [(self.ge, lambda v, b: v >= b, ">="), (self.le, lambda v, b: v <= b, "<="),
                      (self.gt, lambda v, b: v > b, ">"), (self.lt, lambda v, b: v < b, "<")]
            for bound, ok, sym in bounds:
                if bound is not None and not ok(value, bound):
                    raise MethodError(f"{where}: parameter '{self.name}' = {value} is out of "
                                      f"range; it must be {sym} {bound}")
        elif self.type is str and not isinstance(value, str):
            raise MethodError(f"{where}: parameter '{self.name}' must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise MethodError(f"{where}: parameter '{self.name}' = {value!r} is not one of "
                              f"{', '.join(map(str, self.choices))}")
        return value


_State = TypeVar("_State")


@dataclass
class RandomStreams:
    """A sliced tensor's random streams per model index, continued from slice to slice:
    :meth:`MergeContext.generator`'s torch generators and :meth:`MergeContext.keep_mask`'s
    SFC64 generators."""

    torch: dict[int, torch.Generator] = field(default_factory=dict)
    sfc64: dict[int, np.random.Generator] = field(default_factory=dict)


@dataclass
class MergeContext:
    """What a method may know about the tensor being merged, besides the tensors."""

    name: str
    seed: int = 0
    layer_index: int | None = None  # 0-based block index; None outside the block stack
    num_layers: int | None = None  # number of blocks in the model, when known
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    global_stats: Any = None  # what the method's Prepare pass returned
    # Per-expert statistics for this tensor, by kind ("gram", "fisher", ...): one entry per
    # expert (None where that expert has none). Filled by the engine for methods that declare
    # ``stats``; see modelalloy.stats for the file format.
    stats: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)

    # Set by the engine when it merges a tensor slice by slice: the tensor's state between
    # slices, one typed object per class, keyed by that class (:meth:`state`): the random
    # streams (:class:`RandomStreams`), which then continue from one call to the next instead
    # of restarting, so the slices draw what the whole tensor would; what a method's passes
    # gather for its merge (``orderstats.SlicedTopK``, ``dare.L1Sums``, ...).
    streams: dict[type, Any] | None = None
    # The element offset of the current slice in the flattened tensor (None: whole tensor).
    slice_start: int | None = None
    # Where :meth:`note` collects remarks for the merge summary (message -> tensor names);
    # None: remarks are dropped (the in-memory API).
    notes: dict[str, list[str]] | None = None

    def note(self, message: str) -> None:
        """Tell the merge summary something about this tensor's result (e.g. that it differs
        from mergekit's); the engine prints each message once with its tensor count."""
        if self.notes is not None and self.slice_start in (None, 0):
            self.notes.setdefault(message, []).append(self.name)

    def _seed(self, model_index: int) -> int:
        digest = hashlib.sha256(f"{self.seed}\x00{self.name}\x00{model_index}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def state(self, kind: type[_State], make: Callable[[], _State] | None = None) -> _State:
        """This sliced tensor's state of class ``kind``: what a pass over the slices leaves
        for the next pass, the merge and the finish step. ``make()`` makes it on first use;
        without ``make`` an earlier pass must have."""
        found = self.state_if_any(kind)
        if found is None:
            if self.streams is None or make is None:
                raise RuntimeError(f"tensor '{self.name}': no {kind.__name__} (the state of a "
                                   "sliced merge's passes)")
            found = self.streams[kind] = make()
        return found

    def state_if_any(self, kind: type[_State]) -> _State | None:
        """This tensor's state of class ``kind`` when a sliced merge made it, else None."""
        return None if self.streams is None else self.streams.get(kind)

    def _stream(self, table: Callable[[RandomStreams], dict[int, Any]], model_index: int,
                make: Callable[[int], Any]) -> Any:
        if self.streams is None:
            return make(self._seed(model_index))
        streams = table(self.state(RandomStreams, RandomStreams))
        if model_index not in streams:
            streams[model_index] = make(self._seed(model_index))
        return streams[model_index]

    def generator(self, model_index: int = 0) -> torch.Generator:
        """A generator seeded from (recipe seed, tensor name, model index).

        The seed does not depend on scheduling, thread count or device, so a recipe gives the
        same masks however it runs. Random draws are made on the CPU generator and moved.
        """
        return self._stream(lambda s: s.torch, model_index,
                            lambda seed: torch.Generator(device="cpu").manual_seed(seed))

    def rand_like(self, t: torch.Tensor, model_index: int = 0) -> torch.Tensor:
        """Uniform [0, 1) noise shaped like ``t``, on ``t``'s device, from :meth:`generator`."""
        gen = self.generator(model_index)
        return torch.rand(t.shape, generator=gen, dtype=torch.float32).to(t.device)

    def sfc64_state(self, model_index: int = 0) -> np.ndarray:
        """The start state (uint64[4]: a, b, c, counter) of :meth:`keep_mask`'s SFC64 stream,
        for the fused kernels, which advance it themselves."""
        state = np.random.SFC64(self._seed(model_index)).state["state"]["state"]
        return np.array(state, dtype=np.uint64)

    def keep_mask(self, t: torch.Tensor, density: float, model_index: int = 0) -> torch.Tensor:
        """Bernoulli(density) keep mask shaped like ``t`` (bool, on ``t``'s device).

        Element i is kept when the i-th 32-bit word of an SFC64 stream seeded from (recipe
        seed, tensor name, model index) is below round(density · 2^32): the keep probability
        is density to within 2^-32 (torch.rand's float32 draws resolve 2^-24), and a decision
        costs about 1 ns against 3.4 ns for ``torch.rand(...) < density`` (measured on the
        benchmark machine). Two decisions come from each 64-bit draw.
        """
        bits = self._stream(lambda s: s.sfc64, model_index,
                            lambda seed: np.random.Generator(np.random.SFC64(seed)))
        n = t.numel()
        draws = bits.integers(0, 2**64 - 1, size=(n + 1) // 2, dtype=np.uint64, endpoint=True)
        words = draws.view("<u4")[:n]
        threshold = np.uint32(min(round(density * 2**32), 2**32 - 1))
        return torch.from_numpy(words < threshold).view(t.shape).to(t.device)


@dataclass
class TensorGroup:
    """The aligned tensors of one parameter name, as given to a :class:`Prepare` pass."""

    name: str
    base: torch.Tensor | None
    experts: list[torch.Tensor]
    params: dict[str, Any]
    ctx: MergeContext


MergeFn = Callable[[torch.Tensor | None, list[torch.Tensor], dict[str, Any], MergeContext],
                   torch.Tensor]
PrepareFn = Callable[[Callable[[], Iterator[TensorGroup]]], Any]
# One pass of a sliced merge over a slice: (base, experts, params, ctx), state in ctx.streams.
ReduceFn = Callable[[torch.Tensor | None, list[torch.Tensor], dict[str, Any], MergeContext], None]


@dataclass(frozen=True)
class MethodFacts:
    """What the benchmark and the docs know of a method beside its math and its execution
    (``modelalloy bench``, eval/harness.py, eval/informed.py, eval/report.py read it here
    rather than from tables of method names)."""

    # The paper's experimental settings where the registry's defaults (mergekit's, so that a
    # mergekit recipe merges the same) differ: what the bench's "default" rows run. TIES keeps
    # the top 20% (Yadav et al. 2023), DARE drops 90% (Yu et al. 2024), Breadcrumbs keeps 90%
    # below the top 1% (Davari & Belilovsky 2023), task arithmetic uses λ 0.3 for eight tasks
    # (Ilharco et al. 2023; FusionBench's default). Not recipe defaults: ``conventions: paper``
    # is Param.paper_default.
    paper_settings: Mapping[str, Any] = field(default_factory=dict)
    # The parameter that scales the merged task vector, which the bench tunes on validation
    # (when the method has it).
    scale: str = "lambda"
    # The output is one expert rebuilt from a compression bundle (TALL masks), not a merge: the
    # bench scores and reports it apart.
    bundle: bool = False


ParamsTest = Callable[[dict[str, Any]], bool]  # a decision from a tensor's resolved parameters
# The engine's ways to run a tensor: whole; in slices of any elements (the output at each
# element depends only on the inputs at that element); in bands of whole rows (each output row,
# along the last dimension, depends only on the same rows of the inputs).
Shape = Literal["whole", "elementwise", "rowwise"]
FinishFn = Callable[[MergeContext], list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class Prepare:
    """A whole-model pass before the merge: ``run(groups)`` gets a factory of
    :class:`TensorGroup` iterators (it may iterate several times) and returns what
    ``ctx.global_stats`` holds in the main pass. ``when``: whether the pass has work for the
    first merged tensor's parameters (None: always); TIES needs it only with scope: global."""

    run: PrepareFn
    when: ParamsTest | None = None


@dataclass(frozen=True)
class Finish:
    """For a sliced method that needs one whole-tensor value at a few elements (the paper
    vote's majority sign at zero sums): after the last slice, ``run(ctx)`` gives (flat
    indices, float32 values) that overwrite what the slices wrote, from the state the slices
    left in ``ctx.streams``. ``when``: the parameters it has work for (None: always); only
    then does the engine hold the tensor's merged output until the end, otherwise it writes
    each slice at once."""

    run: FinishFn
    when: ParamsTest | None = None


@dataclass(frozen=True)
class KeptBits:
    """The engine's grant, in a sliced tensor's ``ctx.streams``: the fused passes may keep
    ``Execution.kept_bits`` bits for each of the tensor's ``numel`` elements for its merge
    (counted in the tensor's working bytes). Without it they keep nothing."""

    numel: int


@dataclass(frozen=True)
class FusedKernel:
    """A fused kernel for the sliced path, used when numba is installed: ``factory`` names a
    function of ``modelalloy.kernels.slices`` that maps the tensor's resolved parameters to a
    kernel giving the torch path's bits. ``when``: the sliced parameters it serves, when not
    all of them (None: whenever the tensor is sliced) — the one place that rule is written."""

    factory: str
    when: ParamsTest | None = None


@dataclass(frozen=True)
class Execution:
    """How the engine may run a method, declared next to its math: the method's one
    statement of its execution shape. The engine reads nothing else about it.

    - ``shape``: "whole", "elementwise" or "rowwise" (see :data:`Shape`), or a function of the
      tensor's resolved parameters giving one (DARE is elementwise unless a negative weight
      makes it whole). A sliced shape must give the whole tensor's bits, and a non-finite
      input a non-finite output there.
    - ``passes``: for a method that is elementwise once a few whole-tensor values are known
      (SLERP's norms and dot, TIES' magnitude threshold): passes over a sliced tensor before
      the merge; each is called on every slice in order, ``(base, experts, params, ctx)``,
      and keeps what it gathers in ``ctx.streams`` (typed state keyed by its class), where the
      later passes and the method (in the final pass) read it. A function of the parameters
      may give them (DARE's L1 rescale needs one, its density rescale none).
    - ``finish``: the :class:`Finish` step after the last slice.
    - ``kernel``: the :class:`FusedKernel` of the sliced path.
    - ``prepare``: the :class:`Prepare` pass over the whole model.
    - ``kept_bits``: bits per element the fused kernel's passes may keep for its merge
      instead of recomputing them there (DARE's keep masks: one bit per model that drops at
      random), or a function of the parameters giving them. The planner counts them in the
      tensor's working bytes; the engine grants them (:class:`KeptBits` in ``ctx.streams``)
      only when they fit, and the kernel recomputes otherwise.
    """

    shape: Shape | Callable[[dict[str, Any]], Shape] = "whole"
    passes: tuple[ReduceFn, ...] | Callable[[dict[str, Any]], tuple[ReduceFn, ...]] = ()
    finish: Finish | None = None
    kernel: FusedKernel | None = None
    prepare: Prepare | None = None
    kept_bits: int | Callable[[dict[str, Any]], int] = 0

    def shape_for(self, params: dict[str, Any]) -> Shape:
        """The shape of a tensor with these resolved parameters (none given: whole, unless
        the shape is fixed)."""
        if callable(self.shape):
            return self.shape(params) if params else "whole"
        return self.shape

    def passes_for(self, params: dict[str, Any]) -> tuple[ReduceFn, ...]:
        """The reduction passes of a sliced merge with these parameters."""
        return self.passes(params) if callable(self.passes) else self.passes

    def finish_for(self, params: dict[str, Any]) -> FinishFn | None:
        """The finish step of a sliced merge with these parameters, if it has work."""
        if self.finish is None or not _applies(self.finish.when, params):
            return None
        return self.finish.run

    def kernel_for(self, params: dict[str, Any]) -> str | None:
        """The fused kernel factory's name for a sliced tensor with these parameters."""
        if self.kernel is None or not _applies(self.kernel.when, params):
            return None
        return self.kernel.factory

    def kept_bits_for(self, params: dict[str, Any]) -> int:
        """Bits per element the fused passes of a sliced tensor with these parameters may
        keep for the merge."""
        return self.kept_bits(params) if callable(self.kept_bits) else self.kept_bits

    def prepare_for(self, params: dict[str, Any] | None) -> PrepareFn | None:
        """The whole-model pass, if it has work for these (the first merged tensor's)
        parameters; None: no tensor is merged."""
        if self.prepare is None or (self.prepare.when is not None
                                    and (params is None or not self.prepare.when(params))):
            return None
        return self.prepare.run


def _applies(when: ParamsTest | None, params: dict[str, Any]) -> bool:
    return when is None or when(params)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MergeFn
    params: tuple[Param, ...]
    paper: str
    summary: str
    base: BaseUse
    min_models: int = 1  # experts, not counting the base
    max_models: int | None = None
    aliases: tuple[str, ...] = ()
    stats: tuple[str, ...] = ()  # statistic kinds the method reads from ctx.stats
    # Whose statistics: one per expert (default), or the base model's alone (AIM), which
    # then arrives as a one-element list in ctx.stats[kind].
    stats_from: Literal["experts", "base"] = "experts"

    # How the engine may run it (whole, sliced, fused; its passes and finish step).
    execution: Execution = field(default_factory=Execution)

    # Checks on the resolved parameters that depend on the recipe's conventions:
    # ``validate(params, conventions, where)`` raises a MethodError (linear: a normalized
    # average with a negative weight is refused with ``conventions: paper``).
    validate: Callable[[dict[str, Any], str, str], None] | None = None

    # Parameters that must have one value for every tensor (they feed a whole-model statistic
    # computed in ``prepare``): the planner checks them from the resolved parameters, before
    # any tensor is read.
    uniform: tuple[str, ...] = ()

    # Facts for the benchmark and the docs (paper settings, scale parameter, bundle).
    facts: MethodFacts = field(default_factory=MethodFacts)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise MethodError(f"method '{self.name}' has no parameter '{name}'; it takes: "
                          f"{', '.join(p.name for p in self.params) or 'none'}")

    def check_model_count(self, n_experts: int, has_base: bool) -> None:
        if self.base == "required" and not has_base:
            raise MethodError(f"method '{self.name}' needs a base model: set base_model in the "
                              "recipe")
        if n_experts < self.min_models or (self.max_models is not None
                                           and n_experts > self.max_models):
            want = (f"exactly {self.min_models}" if self.max_models == self.min_models
                    else f"at least {self.min_models}" if self.max_models is None
                    else f"{self.min_models} to {self.max_models}")
            what = "models besides the base" if self.base == "required" else "models"
            raise MethodError(f"method '{self.name}' takes {want} {what}, got {n_experts}")

    def defaults(self, n_experts: int, conventions: str = "mergekit") -> dict[str, Any]:
        return {p.name: ([p.default_for(conventions)] * n_experts if p.per_model
                         else p.default_for(conventions))
                for p in self.params}

    def resolve(self, n_experts: int, given: dict[str, Any], where: str,
                conventions: str = "mergekit") -> dict[str, Any]:
        """Fill defaults, broadcast per-model scalars to lists, and validate every value.

        ``given`` maps a parameter name to a scalar, or for a per-model parameter to a scalar or
        a list with one value per expert. Unknown names raise a MethodError; a ``required``
        parameter missing from ``given`` too. Defaults follow ``conventions``.
        """
        if conventions not in CONVENTIONS:
            raise MethodError(f"{where}: conventions must be one of {', '.join(CONVENTIONS)}, "
                              f"got {conventions!r}")
        for p in self.params:
            if p.required and p.name not in given:
                raise MethodError(f"{where}: method '{self.name}' needs parameter '{p.name}' "
                                  f"({p.help}); set it under `parameters`")
        out = self.defaults(n_experts, conventions)
        for key, value in given.items():
            param = self.param(key)
            if param.per_model:
                values = list(value) if isinstance(value, (list, tuple)) else [value] * n_experts
                if len(values) != n_experts:
                    raise MethodError(f"{where}: parameter '{key}' has {len(values)} values but "
                                      f"there are {n_experts} models")
                out[key] = [param.check(v, where) for v in values]
            else:
                out[key] = param.check(value, where)
        if self.validate is not None:
            self.validate(out, conventions, where)
        return out

    def __call__(self, base: torch.Tensor | None, experts: list[torch.Tensor],
                 params: dict[str, Any], ctx: MergeContext) -> torch.Tensor:
        return self.fn(base, experts, params, ctx)


_REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def register_method(*, name: str, params: list[Param] | tuple[Param, ...], paper: str,
                    summary: str, base: BaseUse, min_models: int = 1,
                    max_models: int | None = None, aliases: tuple[str, ...] = (),
                    stats: tuple[str, ...] = (),
                    stats_from: Literal["experts", "base"] = "experts",
                    execution: Execution | None = None,
                    validate: Callable[[dict[str, Any], str, str], None] | None = None,
                    uniform: tuple[str, ...] | bool = (),
                    paper_settings: Mapping[str, Any] | None = None,
                    scale: str = "lambda", bundle: bool = False,
                    ) -> Callable[[MergeFn], MergeFn]:
    """Decorator: register ``fn`` as the merge method ``name`` with its parameter schema and
    its :class:`Execution` (None: whole tensors, no whole-model pass).

    ``uniform=True`` stands for every parameter of the schema. ``paper_settings``, ``scale``
    and ``bundle`` are the method's :class:`MethodFacts`."""
    if isinstance(uniform, bool):
        uniform = tuple(p.name for p in params) if uniform else ()

    def wrap(fn: MergeFn) -> MergeFn:
        if name in _REGISTRY or name in _ALIASES:
            raise RuntimeError(f"method '{name}' registered twice")
        _REGISTRY[name] = MethodSpec(name=name, fn=fn, params=tuple(params), paper=paper,
                                     summary=summary, base=base, min_models=min_models,
                                     max_models=max_models, aliases=aliases,
                                     stats=stats, stats_from=stats_from,
                                     execution=execution or Execution(),
                                     validate=validate, uniform=uniform,
                                     facts=MethodFacts(dict(paper_settings or {}), scale,
                                                       bundle))
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    """Look a method up by name or alias; a clear error lists what exists. Every built-in
    method is registered by then: importing this module imports its package first, whose
    ``__init__`` imports every method family."""
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        hint = did_you_mean(name, [*_REGISTRY, *_ALIASES])
        raise MethodError(f"unknown merge method '{name}'; {hint + ' ' if hint else ''}"
                          f"available: {', '.join(sorted(_REGISTRY))} (see `modelalloy methods`)")
    return _REGISTRY[key]


def list_methods() -> list[MethodSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
