#!/usr/bin/env python
"""CPU cost of merging one large tensor whole against slice by slice, per method.

Runs each method on one MLP-sized tensor (5632 x 2048 by default: a 1B Llama's MLP weight)
of a base and three bf16 experts, the way the engine does it: whole (float32 copies of every
input, the method on the whole tensor, one cast down) and sliced (256K-element slices cast
into reused buffers, the method per slice, each slice cast down into the output). Prints the
best-of-N CPU seconds (``time.process_time``) and checks that both give the same bits::

    PYTHONPATH=src python benchmarks/sliced_vs_whole.py [--rows 5632 --cols 2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from modelalloy import kernels
from modelalloy.methods.registry import MergeContext, get_method
from modelalloy.plan.planner import SLICE_ELEMENTS

CASES = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.5},
    "dare_ties": {"density": 0.2, "weight": 0.5},
    "breadcrumbs": {"density": 0.2, "gamma": 0.01, "weight": 0.5},
    "breadcrumbs_ties": {"density": 0.2, "gamma": 0.01, "weight": 0.5},
    "ties": {"density": 0.2},
}


def best_cpu(f: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.process_time()
        f()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5632)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(args.rows, args.cols, generator=g) * 0.02).bfloat16()
    experts = [(base.float() + 1e-3 * torch.randn(base.shape, generator=g)).bfloat16()
               for _ in range(3)]
    print(f"one {args.rows} x {args.cols} tensor, base + 3 bf16 experts, {args.threads} "
          f"thread(s); best of {args.repeats} CPU seconds\n")
    print("| method | whole s | sliced s | whole ÷ sliced | fused s | whole ÷ fused | same bits |"
          "\n|---|---:|---:|---:|---:|---:|---|")
    for name, given in CASES.items():
        spec = get_method(name)
        uses_base = spec.base != "none"
        params = spec.resolve(3, given, name)
        unit = 1 if spec.execution.shape_for(params) == "elementwise" else args.cols
        step = max(1, SLICE_ELEMENTS // unit) * unit
        inputs = ([base] if uses_base else []) + experts

        def whole(spec=spec, params=params, inputs=inputs, uses_base=uses_base) -> torch.Tensor:
            wide = [t.float() for t in inputs]
            b, e = (wide[0], wide[1:]) if uses_base else (None, wide)
            return spec(b, e, params, MergeContext(name="w", seed=1)).bfloat16()

        def sliced(spec=spec, params=params, inputs=inputs, uses_base=uses_base,
                   unit=unit, step=step) -> torch.Tensor:
            ctx = MergeContext(name="w", seed=1, streams={})
            out = torch.empty(base.numel(), dtype=torch.bfloat16)
            bufs = [torch.empty(step) for _ in inputs]
            flat = [t.view(-1) for t in inputs]

            def slices():  # (start, base, experts) in float32, as the engine reads them
                for start in range(0, base.numel(), step):
                    k = min(step, base.numel() - start)
                    wide = [b[:k].copy_(t[start:start + k])
                            for b, t in zip(bufs, flat, strict=True)]
                    wide = [w if unit == 1 else w.view(-1, unit) for w in wide]
                    ctx.slice_start = start
                    yield start, k, (wide[0], wide[1:]) if uses_base else (None, wide)

            for reduce in spec.execution.passes_for(params):  # counting passes (SLERP, TIES)
                for _, _, (b, e) in slices():
                    reduce(b, e, params, ctx)
            for start, k, (b, e) in slices():
                out[start:start + k].copy_(spec(b, e, params, ctx).reshape(-1))
            if spec.execution.finish is not None:
                for index, values in spec.execution.finish.run(ctx):
                    out[index] = values.bfloat16()
            return out.view(base.shape)

        fused = _fused(spec, params, inputs, step, unit) if kernels.available() else None
        reference = whole()
        same = torch.equal(reference, sliced()) and (fused is None
                                                     or torch.equal(reference, fused()))
        t_whole, t_sliced = best_cpu(whole, args.repeats), best_cpu(sliced, args.repeats)
        t_fused = best_cpu(fused, args.repeats) if fused is not None else None
        fused_cells = (f"{t_fused:.3f} | {t_whole / t_fused:.1f}×" if t_fused is not None
                       else "— | —")
        print(f"| {name} | {t_whole:.3f} | {t_sliced:.3f} | {t_whole / t_sliced:.1f}× | "
              f"{fused_cells} | {'yes' if same else 'NO'} |")


def _fused(spec, params, inputs: list[torch.Tensor], step: int,
           unit: int) -> Callable[[], torch.Tensor] | None:
    """The engine's fused path (``modelalloy.kernels``): stored bits in, stored bits out."""
    from modelalloy.kernels import slices

    name = spec.execution.kernel_for(params)
    if name is None:
        return None
    kernel = getattr(slices, name)(params)
    if kernel is None or len(getattr(kernel, "passes", ())) != len(
            spec.execution.passes_for(params)):
        return None
    shape, numel = inputs[0].shape, inputs[0].numel()
    flat = [kernels.bits(t.reshape(-1)) for t in inputs]

    def run() -> torch.Tensor:
        ctx = MergeContext(name="w", seed=1, streams={})
        raw = np.empty((len(flat), step), dtype=flat[0].dtype)
        out = torch.empty(numel, dtype=torch.bfloat16)
        out_bits = kernels.bits(out)
        def over_slices(step_fn) -> None:
            for start in range(0, numel, step):
                k = min(step, numel - start)
                for i, f in enumerate(flat):
                    raw[i, :k] = f[start:start + k]
                ctx.slice_start = start
                ok = (kernel(raw, k, out_bits[start:start + k], ctx, unit) if step_fn is None
                      else step_fn(raw, k, ctx, unit))
                if not ok:
                    raise ValueError("non-finite input")

        # the kernel's passes as the engine runs them: each over every slice before the next
        # is asked for (slices.reduce_passes), then its merge
        for step_fn in slices.reduce_passes(kernel, ctx):
            over_slices(step_fn)
        over_slices(None)
        if spec.execution.finish is not None:
            for index, values in spec.execution.finish.run(ctx):
                out[index] = values.bfloat16()
        return out.view(shape)
    return run


if __name__ == "__main__":
    main()
