"""Run a MergePlan: bounded memory, reading || computing || writing on worker threads.

Each output tensor is one task: read the aligned inputs, upcast to float32 on the device, call
the method, cast to the output dtype and write it at its precomputed place in its shard. For an
elementwise method on the CPU a large tensor goes through the same steps a slice at a time, in
small per-thread buffers that stay in cache (``PlanEntry.sliced``). Tasks
are independent and every random draw is seeded from (recipe seed, tensor name), so the output
is bit-identical whatever the thread count or the order tasks finish in. Torch releases the GIL
in reads, casts and math, so threads overlap I/O with compute; the byte budget caps what is in
flight.
"""

from __future__ import annotations

import gc
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Future,
    ThreadPoolExecutor,
    wait,
)
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from modelalloy import kernels
from modelalloy.engine.budget import ByteBudget
from modelalloy.engine.direct_reads import (
    HOLD_BYTES_MAX,
    WINDOW_BYTES,
    DirectWindows,
    direct_source,
)
from modelalloy.engine.progress import ProgressSink, merge_progress
from modelalloy.engine.sources import StateDictSource
from modelalloy.errors import NonFiniteError, PlanError
from modelalloy.io.checkpoint import DIRECT_ALIGN, aligned_buffer
from modelalloy.methods.registry import KeptBits, MergeContext, TensorGroup
from modelalloy.plan.planner import KEPT_BYTES_MAX, SLICE_ELEMENTS, MergePlan, PlanEntry
from modelalloy.plan.sources import TensorSource
from modelalloy.threads import one_intra_op_thread

StatsLoader = Callable[[str], dict[str, list[torch.Tensor | None]]]
# (slice start, element count) -> the merged slice in the output dtype, or None when an input
# slice holds a NaN/Inf (the whole-tensor path then reports or tolerates it)
SliceMerger = Callable[[int, int], "torch.Tensor | None"]
# (source index, slice start, buffer) -> the buffer, filled with that source's stored elements
SliceFetch = Callable[[int, int, torch.Tensor], torch.Tensor]
HELD_CACHE_BYTES = 256 << 20


class TensorWriter(Protocol):
    """Where merged tensors go, whole or in parts: the sharded writer
    (``ShardedSafetensorsWriter``, which takes CPU tensors), a state dict or a live module
    (``engine/sinks.py``, which set ``wants_cpu = False`` and take them on the merge device)."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...
    def begin(self, name: str) -> None: ...
    def write_part(self, name: str, start: int, part: torch.Tensor) -> None: ...
    def end(self, name: str) -> None: ...
    def abandon(self, name: str) -> None: ...


class PlanExecutor:
    """Executes the entries of one plan with a shared budget, device and seed."""

    def __init__(self, plan: MergePlan, *, device: torch.device, seed: int, threads: int,
                 budget: ByteBudget, allow_nonfinite: bool,
                 stats_loader: StatsLoader | None = None, slicing: bool = True,
                 direct: bool = False):
        self.plan = plan
        self.device = device
        self.seed = seed
        self.threads = max(1, threads)
        self.budget = budget
        self.allow_nonfinite = allow_nonfinite
        self.stats_loader = stats_loader
        # False: every tensor whole (the reference the sliced and fused strategies are
        # tested against; same bits)
        self.slicing = slicing
        # True: sliced tensors' safetensors inputs are read with O_DIRECT (engine/direct_reads)
        self.direct = direct
        self.global_stats: Any = None
        self.warnings: list[str] = []
        self.notes: dict[str, list[str]] = {}  # MergeContext.note: message -> tensors
        self._warn_lock = threading.Lock()
        self._slice_buffers = threading.local()
        # O_DIRECT windows are read ahead here (DirectWindows): two reads per merge thread
        self._read_pool: ThreadPoolExecutor | None = None

    # -- reading -----------------------------------------------------------------------------
    def _load(self, ckpt: TensorSource, name: str) -> torch.Tensor:
        tensor = ckpt.get(name)
        if tensor.device != self.device:
            if tensor.device.type == "cpu" and self.device.type == "cuda":
                # Move in the stored dtype (fewer bytes over PCIe), then upcast on the GPU.
                tensor = tensor.pin_memory().to(self.device, non_blocking=True)
            else:
                tensor = tensor.to(self.device)
        # A contiguous float32 tensor already on the device is used as it is (methods never
        # modify their inputs): an in-memory source is not copied. A strided one (a transposed
        # view in a state dict) is made contiguous, as a tensor read from disk is.
        tensor = tensor.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        if not all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            message = (f"{ckpt.path}: tensor '{name}' has {bad} NaN/Inf value(s); fix the "
                       "model, or allow them (allow_nonfinite=True) to merge anyway")
            if not self.allow_nonfinite:
                raise NonFiniteError(message, options=("allow_nonfinite",))
            with self._warn_lock:
                self.warnings.append(message)
        return tensor

    def _context(self, entry: PlanEntry) -> MergeContext:
        return MergeContext(name=entry.name, seed=self.seed, layer_index=entry.layer_index,
                            num_layers=entry.num_layers, device=self.device,
                            global_stats=self.global_stats, notes=self.notes,
                            stats=self.stats_loader(entry.name) if self.stats_loader else {})

    def _split(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor | None,
                                                            list[torch.Tensor]]:
        if self.plan.base is not None:
            return tensors[0], tensors[1:]
        return None, tensors

    # -- the two passes --------------------------------------------------------------------
    def groups(self) -> Iterator[TensorGroup]:
        """Every merged tensor in plan order, for a method's whole-model ``prepare`` pass."""
        for entry in self.plan.entries:
            if entry.merge:
                base, experts = self._split([self._load(c, entry.name)
                                             for c in self.plan.sources])
                yield TensorGroup(name=entry.name, base=base, experts=experts,
                                  params=entry.params, ctx=self._context(entry))

    def prepare(self) -> None:
        """The method's whole-model pass, unless it has nothing to do for these parameters
        (it reads every tensor)."""
        first = next((e for e in self.plan.entries if e.merge), None)
        run = self.plan.spec.execution.prepare_for(None if first is None else first.params)
        if run is not None:
            self.global_stats = run(self.groups)

    def sliced(self, entry: PlanEntry) -> bool:
        """Whether ``entry`` is merged a slice at a time (elementwise method, CPU)."""
        return self.slicing and entry.sliced and self.device.type == "cpu"

    def working_bytes(self, entry: PlanEntry) -> int:
        return entry.working_bytes(len(self.plan.sources), sliced=self.sliced(entry),
                                   kept=self.keeps_bits(entry)) + self.direct_bytes(entry)

    def direct_window(self, entry: PlanEntry) -> int:
        """Bytes of each source's O_DIRECT window for ``entry`` (0: read through the page
        cache). A method with passes before its merge reads every slice more than once: it
        gets the whole tensor (read from the disk once) when all its inputs fit
        ``HOLD_BYTES_MAX`` over all threads and, under a memory budget, one thread's share;
        otherwise the page cache serves its passes, as without direct I/O. Under a memory
        budget, single-pass windows that do not fit one thread's share of it (with the
        tensor's working bytes) are not used either."""
        if not self.direct or not self.sliced(entry) or not entry.merge \
                or not any(direct_source(s) for s in self.plan.sources):
            return 0
        sizes = [s.info(entry.name).nbytes for s in self.plan.sources]
        limit = self.budget.limit
        working = entry.working_bytes(len(sizes), sliced=True, kept=self.keeps_bits(entry))
        if not self.plan.spec.execution.passes_for(entry.params):
            slice_bytes = entry.slice_length * max(s // max(1, entry.numel) for s in sizes)
            window = max(WINDOW_BYTES, slice_bytes)
            fits = limit is None or self.threads * (working + _windows_bytes(sizes, window)) \
                <= limit
            return window if fits else 0
        held = sum(sizes) + 2 * DIRECT_ALIGN * len(sizes)
        if held * self.threads > HOLD_BYTES_MAX or (
                limit is not None and self.threads * (working + held) > limit):
            return 0
        return max(sizes)

    def direct_bytes(self, entry: PlanEntry) -> int:
        """Memory of ``entry``'s O_DIRECT windows (0 without)."""
        window = self.direct_window(entry)
        return window and _windows_bytes([s.info(entry.name).nbytes for s in self.plan.sources],
                                         window)

    @contextmanager
    def _fetcher(self, entry: PlanEntry) -> Iterator[SliceFetch]:
        """How this thread reads ``entry``'s slices: O_DIRECT windows read ahead on the
        executor's read pool, or ``get_slice``."""
        window = self.direct_window(entry)
        if not window:
            sources, name = self.plan.sources, entry.name
            yield lambda index, start, out: sources[index].get_slice(name, start, out)
            return
        windows = DirectWindows(self.plan.sources, entry.name, window, self._aligned,
                                self._read_pool)
        try:
            yield windows.read
        finally:
            windows.close()

    def _aligned(self, key: int, nbytes: int) -> torch.Tensor:
        """This thread's reused O_DIRECT buffer ``key`` (DirectWindows: two per source), at
        least ``nbytes`` long."""
        cache: dict[Any, torch.Tensor] = self._slice_buffers.__dict__
        buf = cache.get(("direct", key))
        if buf is None or buf.numel() < nbytes:
            buf = cache[("direct", key)] = aligned_buffer(nbytes)
        return buf

    def keeps_bits(self, entry: PlanEntry) -> bool:
        """Whether ``entry``'s fused passes may keep their bits for its merge
        (``PlanEntry.kept_bytes``): at most ``KEPT_BYTES_MAX`` over all threads and, under a
        memory budget, its working bytes with them within one thread's share of the budget;
        else the kernel recomputes them (DARE redraws its masks: the same bits)."""
        kept = entry.kept_bytes
        if not kept or not self.sliced(entry) or kept * self.threads > KEPT_BYTES_MAX \
                or not self._fused(entry):
            return False
        limit = self.budget.limit
        return limit is None or self.threads * entry.working_bytes(
            len(self.plan.sources), sliced=True, kept=True) <= limit

    def _buffers(self, key: object, dtype: torch.dtype, size: int) -> torch.Tensor:
        """This thread's reused slice buffer ``key`` of ``dtype``, at least ``size`` long."""
        cache: dict[Any, torch.Tensor] = self._slice_buffers.__dict__
        buf = cache.get((key, dtype))
        if buf is None or buf.numel() < size:
            buf = cache[(key, dtype)] = torch.empty(max(size, SLICE_ELEMENTS), dtype=dtype)
        return buf

    def _merge_sliced(self, entry: PlanEntry, writer: TensorWriter) -> bool:
        """Merge and write ``entry`` slice by slice, bit-identical to the whole tensor (the
        same float32 operations on the same elements); no full-size buffer is made. False
        when an input slice holds a NaN/Inf: the whole-tensor path then reports or tolerates
        it with its full count."""
        with one_intra_op_thread(), self._fetcher(entry) as fetch:
            return self._merge_slices(entry, writer, fetch)

    def _merge_slices(self, entry: PlanEntry, writer: TensorWriter, fetch: SliceFetch) -> bool:
        execution, ctx = self.plan.spec.execution, self._context(entry)
        ctx.streams = {}  # random draws continue from slice to slice
        kernel = self._kernel(entry)
        if kernel is not None and self.keeps_bits(entry):
            ctx.streams[KeptBits] = KeptBits(entry.numel)
        # a kernel takes the counting passes too when it has them all (its state is the
        # method's own, so either way gives the same bits); otherwise the torch path does all
        passes = getattr(kernel, "passes", ())
        if kernel is not None and len(passes) == len(execution.passes_for(entry.params)):
            if not self._fused_reduce(entry, ctx, kernel, fetch):
                return False
            merge_slice = self._fused_slice(entry, ctx, kernel, fetch)
        else:
            if not self._reduce_slices(entry, ctx, fetch):
                return False
            merge_slice = self._torch_slice(entry, ctx, fetch)
        # A method that settles some elements after the last slice (its Finish) keeps the
        # merged tensor in memory until then (its output bytes, which working_bytes counts):
        # patching scattered elements of a written file costs far more (a page fault or a
        # write call per element). Up to HELD_CACHE_BYTES the buffer is kept for the thread's
        # next tensor (fresh pages cost a fault each); a larger one goes when the tensor does,
        # so memory outside the budget's count stays bounded.
        held, finish = None, execution.finish_for(entry.params)
        if finish is not None:
            nbytes = entry.numel * entry.out_dtype.itemsize
            held = (self._buffers("held", entry.out_dtype, entry.numel)[:entry.numel]
                    if nbytes <= HELD_CACHE_BYTES
                    else torch.empty(entry.numel, dtype=entry.out_dtype))
        writer.begin(entry.name)
        for start, count in _slices(entry, ctx):
            merged = merge_slice(start, count)
            if merged is None:
                writer.abandon(entry.name)
                return False
            if held is None:
                writer.write_part(entry.name, start, merged)
            else:
                held[start:start + count] = merged
        if held is not None and finish is not None:
            for index, values in finish(ctx):
                held[index] = values.to(entry.out_dtype)
            writer.write_part(entry.name, 0, held)
        writer.end(entry.name)
        return True

    def _read_slice(self, entry: PlanEntry, start: int, count: int, fetch: SliceFetch
                    ) -> tuple[torch.Tensor | None, list[torch.Tensor]] | None:
        """(base, experts) of one slice in float32, in this thread's reused buffers; None
        when an input slice holds a NaN/Inf."""
        step, unit = entry.slice_length, entry.slice_unit
        inputs = []
        for index, ckpt in enumerate(self.plan.sources):
            raw = self._buffers(index, ckpt.info(entry.name).dtype, step)[:count]
            wide = self._buffers(("float32", index), torch.float32, step)[:count]
            wide.copy_(fetch(index, start, raw))
            if not all_finite(wide):
                return None
            inputs.append(wide if unit == 1 else wide.view(-1, unit))
        return self._split(inputs)

    def _reduce_slices(self, entry: PlanEntry, ctx: MergeContext, fetch: SliceFetch) -> bool:
        """The method's reduction passes (``Execution.passes``), each over every slice in
        order; False on a NaN/Inf input."""
        for reduce in self.plan.spec.execution.passes_for(entry.params):
            for start, count in _slices(entry, ctx):
                split = self._read_slice(entry, start, count, fetch)
                if split is None:
                    return False
                reduce(*split, entry.params, ctx)
        return True

    def _torch_slice(self, entry: PlanEntry, ctx: MergeContext, fetch: SliceFetch
                     ) -> SliceMerger:
        """Slices through the method's torch code: read, upcast, merge, cast down."""
        spec = self.plan.spec
        out = self._buffers("out", entry.out_dtype, entry.slice_length)

        def merge_slice(start: int, count: int) -> torch.Tensor | None:
            split = self._read_slice(entry, start, count, fetch)
            if split is None:
                return None
            return out[:count].copy_(spec(*split, entry.params, ctx).reshape(-1))
        return merge_slice

    def _kernel(self, entry: PlanEntry) -> Any:
        """The method's fused kernel (``modelalloy.kernels``) for this tensor, if it has one for
        these parameters and dtypes and numba is installed; else None (the torch path)."""
        if not self._fused(entry):
            return None
        from modelalloy.kernels import slices

        return getattr(slices, str(self.plan.spec.execution.kernel_for(entry.params)))(
            entry.params)

    def _fused(self, entry: PlanEntry) -> bool:
        """Whether a fused kernel serves this tensor's parameters and dtypes (numba
        installed, kernels on)."""
        return (self.plan.spec.execution.kernel_for(entry.params) is not None
                and kernels.available() and kernels.supports(
                    [ckpt.info(entry.name).dtype for ckpt in self.plan.sources],
                    entry.out_dtype))

    def _raw_reader(self, entry: PlanEntry, fetch: SliceFetch
                    ) -> tuple[Callable[[int, int], None], Any]:
        """(read(start, count) of every source's stored bits into one (sources × slice)
        buffer of this thread, that buffer's NumPy view)."""
        sources, step = self.plan.sources, entry.slice_length
        raw = self._buffers(("sources", len(sources)), sources[0].info(entry.name).dtype,
                            len(sources) * step)[:len(sources) * step].view(len(sources), step)

        def read(start: int, count: int) -> None:
            for index in range(len(sources)):
                fetch(index, start, raw[index, :count])
        return read, kernels.bits(raw)

    def _fused_reduce(self, entry: PlanEntry, ctx: MergeContext, kernel: Any,
                      fetch: SliceFetch) -> bool:
        """The kernel's counting passes (its ``passes``, as the method's own, then any it
        asks for after them: ``slices.reduce_passes``)."""
        from modelalloy.kernels.slices import reduce_passes

        read, raw_bits = self._raw_reader(entry, fetch)
        for reduce in reduce_passes(kernel, ctx):
            for start, count in _slices(entry, ctx):
                read(start, count)
                if not reduce(raw_bits, count, ctx, entry.slice_unit):
                    return False
        return True

    def _fused_slice(self, entry: PlanEntry, ctx: MergeContext, kernel: Any,
                     fetch: SliceFetch) -> SliceMerger:
        """Slices through the fused kernel: one pass from the stored bits to the output's,
        the same bits as :meth:`_torch_slice`."""
        read, raw_bits = self._raw_reader(entry, fetch)
        out = self._buffers("out", entry.out_dtype, entry.slice_length)
        out_bits = kernels.bits(out)

        def merge_slice(start: int, count: int) -> torch.Tensor | None:
            read(start, count)
            if not kernel(raw_bits, count, out_bits, ctx, entry.slice_unit):
                return None
            return out[:count]
        return merge_slice

    def merge_entry(self, entry: PlanEntry) -> torch.Tensor:
        """The output tensor of one entry, in its output dtype, on the merge device (a copied
        one: as the reference holds it)."""
        if not entry.merge:
            return self.plan.reference.get(entry.name)
        base, experts = self._split([self._load(c, entry.name) for c in self.plan.sources])
        merged = self.plan.spec(base, experts, entry.params, self._context(entry))
        if tuple(merged.shape) != entry.shape:
            raise PlanError(f"tensor '{entry.name}': method '{self.plan.spec.name}' returned "
                            f"shape {list(merged.shape)}, expected {list(entry.shape)}")
        return merged.to(entry.out_dtype)

    def merge_and_write(self, entry: PlanEntry, writer: TensorWriter) -> None:
        if entry.merge and self.sliced(entry) and self._merge_sliced(entry, writer):
            return
        if self.device.type == "cpu" and entry.numel < 2 * SLICE_ELEMENTS:
            # too small to slice, too small to split across cores: torch's intra-op team only
            # spins (a 100M TIES merge's 16 k/v projections of 196K elements: 0.03 CPU-s on
            # one intra-op thread, 0.5-1.9 CPU-s on two of a loaded 2-core machine)
            with one_intra_op_thread():
                merged = self.merge_entry(entry)
        else:
            merged = self.merge_entry(entry)
        if getattr(writer, "wants_cpu", True):
            merged = merged.cpu().contiguous()
        writer.write(entry.name, merged)

    def run(self, writer: TensorWriter, sink: ProgressSink) -> None:
        """Merge every entry and hand each result to ``writer``; the first error stops all."""
        failed = threading.Event()
        # Merging makes many short-lived tensors and no reference cycles: the cyclic garbage
        # collector's passes cost about 3% of a 1B-parameter linear merge (perf) for nothing.
        collecting = gc.isenabled()
        gc.disable()
        if self.direct:
            # 16 readers at 4 threads: this disk streams O_DIRECT reads at 4.7 GB/s with 16
            # requests in flight, 2.9 GB/s with 4 (direct_reads.PIECE_BYTES)
            self._read_pool = ThreadPoolExecutor(max_workers=4 * self.threads,
                                                 thread_name_prefix="modelalloy-read")
        try:
            if self.threads == 1 and all(isinstance(s, StateDictSource)
                                         for s in self.plan.sources):
                self._run_here(writer, sink)
            else:
                self._run(writer, sink, failed)
        finally:
            if self._read_pool is not None:
                self._read_pool.shutdown(wait=True, cancel_futures=True)
                self._read_pool = None
            if collecting:
                gc.enable()
        for message, names in self.notes.items():
            self.warnings.append(f"{message} ({len(names)} tensor(s), e.g. '{names[0]}')")

    def _run_here(self, writer: TensorWriter, sink: ProgressSink) -> None:
        """One thread and nothing to read ahead (every source in memory): merge in this
        thread, in plan order. Handing tasks to a pool cost more than merging a small model
        (7.7 ms against 1.5 ms for 60 tensors of 4K elements, measured), and an optimiser
        merges thousands of candidates."""
        for entry in self.plan.entries:
            self.merge_and_write(entry, writer)
            sink.advance(entry.bytes_in)

    def _run(self, writer: TensorWriter, sink: ProgressSink, failed: threading.Event) -> None:
        def task(entry: PlanEntry, cost: int) -> None:
            try:
                if failed.is_set():
                    return
                self.merge_and_write(entry, writer)
                sink.advance(entry.bytes_in)
            except BaseException:
                failed.set()
                raise
            finally:
                self.budget.release(cost)

        pending: set[Future] = set()
        # One thread hints the disk about the queued tensors' bytes (posix_fadvise), so on a
        # cold page cache the next inputs are read while the current ones merge.
        with ThreadPoolExecutor(max_workers=self.threads,
                                thread_name_prefix="modelalloy-merge") as pool, \
                ThreadPoolExecutor(max_workers=1,
                                   thread_name_prefix="modelalloy-prefetch") as prefetcher:
            try:
                # Largest first (stable: file order among equals): the last tensors to finish
                # are then small ones, not a 3B model's lm_head merged on one core at the end
                for entry in sorted(self.plan.entries, key=lambda e: -e.bytes_in):
                    if failed.is_set():
                        break
                    # Keep at most two tasks per thread queued: read-ahead without hoarding.
                    while len(pending) >= 2 * self.threads:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        _reraise(done)
                    cost = self.working_bytes(entry)
                    self.budget.acquire(cost)
                    prefetcher.submit(self._prefetch, entry)
                    pending.add(pool.submit(task, entry, cost))
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                _reraise(done)
                done, _ = wait(pending)
                _reraise(done)
            except BaseException:
                failed.set()
                for fut in pending:
                    fut.cancel()
                prefetcher.shutdown(wait=False, cancel_futures=True)
                raise

    def _prefetch(self, entry: PlanEntry) -> None:
        """Hint the page cache about the inputs ``entry`` will read (not those read with
        O_DIRECT: the cache would only hold pages nobody reads)."""
        if self.direct_window(entry):
            return
        for ckpt in self.plan.sources if entry.merge else (self.plan.reference,):
            ckpt.prefetch(entry.name)


def run_plan(plan: MergePlan, sink: TensorWriter, *, device: torch.device, seed: int,
             threads: int, allow_nonfinite: bool = False, stats_loader: StatsLoader | None = None,
             budget: ByteBudget | None = None, progress: bool = False,
             slicing: bool = True, prepared: Callable[[Any], None] | None = None,
             direct: bool = False) -> list[str]:
    """The one driver: check the plan, run the method's whole-model pass when it has one
    (its ``Prepare``), then merge every tensor into ``sink`` (a writer on disk, a state dict, a
    live module) on ``threads`` threads, each tensor whole, sliced or through a fused kernel
    as the plan and the device allow (``slicing=False``: every tensor whole). ``prepared``
    is given what the whole-model pass found (None without one), before the tensors are
    merged. ``direct``: read sliced tensors' safetensors inputs with O_DIRECT
    (engine/direct_reads.py; the same bits). Returns the warnings (tolerated NaN/Inf
    inputs)."""
    plan.raise_if_problems()
    executor = PlanExecutor(plan, device=device, seed=seed, threads=threads,
                            budget=budget if budget is not None else ByteBudget(None),
                            allow_nonfinite=allow_nonfinite,
                            stats_loader=stats_loader, slicing=slicing, direct=direct)
    executor.prepare()
    if prepared is not None:
        prepared(executor.global_stats)
    with merge_progress("merge", len(plan.entries), plan.bytes_read, progress) as bar:
        executor.run(sink, bar)
    return executor.warnings


def _windows_bytes(sizes: list[int], window: int) -> int:
    """Buffers of O_DIRECT windows of ``window`` bytes onto inputs of ``sizes`` bytes: two per
    source (the one merged, the one read ahead) unless one holds its whole tensor."""
    return sum((min(size, window) + 2 * DIRECT_ALIGN) * (2 if size > window else 1)
               for size in sizes)


def _slices(entry: PlanEntry, ctx: MergeContext) -> Iterator[tuple[int, int]]:
    """(start, count) of each slice of ``entry`` in order, with ``ctx.slice_start`` set."""
    for start in range(0, entry.numel, entry.slice_length):
        ctx.slice_start = start
        yield start, min(entry.slice_length, entry.numel - start)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf.

    min and max propagate NaN and expose ±Inf, and one ``aminmax`` pass costs about 1/60 of
    ``isfinite(t).all()`` on the CPU (5 ms against 300 ms for 24.6M elements). The two
    scalars are tested in Python: two more torch calls cost more than the pass itself on a
    small tensor (an in-memory merge of a small model checks thousands).
    """
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _reraise(done: set[Future]) -> None:
    for fut in done:
        if not fut.cancelled() and fut.exception() is not None:
            raise fut.exception()  # type: ignore[misc]
