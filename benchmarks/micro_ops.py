#!/usr/bin/env python
"""Per-operation costs behind a merge, on one embedding-sized tensor (32000 x 768 by default).

Prints best-of-N milliseconds for the operations the engine does on every input tensor
(cast, non-finite check) and for TIES selection, with the cheaper alternative next to each.
Used for the "where the time goes" notes in docs/performance.md::

    python benchmarks/micro_ops.py [--rows 32000 --cols 768] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch


def best_ms(f, n: int = 5) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32000)
    ap.add_argument("--cols", type=int, default=768)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--density", type=float, default=0.2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x16 = (torch.randn(args.rows, args.cols, generator=g) * 0.02).to(torch.bfloat16)
    x32 = x16.float()
    buf = torch.empty_like(x32)
    d = (torch.randn(args.rows, args.cols, generator=g) * 1e-3).abs().view(-1)
    k = int(args.density * d.numel())
    rows = [
        ("cast bf16->fp32: x.to(float32) (fresh tensor)", lambda: x16.to(torch.float32), 5),
        ("cast bf16->fp32: buf.copy_(x) (reused buffer)", lambda: buf.copy_(x16), 5),
        ("non-finite check: isfinite(x32).all()", lambda: bool(torch.isfinite(x32).all()), 5),
        ("non-finite check: isfinite(x16).all() before the cast",
         lambda: bool(torch.isfinite(x16).all()), 5),
        ("non-finite check: isfinite(x32.sum()) (exact check only if it fails)",
         lambda: bool(torch.isfinite(x32.sum())), 5),
        ("|delta|: d.abs() (fresh tensor)", lambda: d.abs(), 5),
        ("|delta|: torch.abs(d, out=buf) (reused buffer)",
         lambda: torch.abs(d, out=buf.view(-1)), 5),
        (f"TIES trim, density {args.density}: argsort (mergekit)",
         lambda: torch.argsort(d, descending=True), 1),
        (f"TIES trim, density {args.density}: kthvalue",
         lambda: torch.kthvalue(d, d.numel() - k + 1), 2),
        (f"TIES trim, density {args.density}: topk(sorted=False)",
         lambda: torch.topk(d, k, sorted=False), 2),
        ("one streaming pass for comparison: d.sum()", lambda: d.sum(), 5),
    ]
    print(f"tensor {args.rows} x {args.cols} ({x16.numel() / 1e6:.1f}M elements), "
          f"{args.threads} thread(s)")
    for label, f, n in rows:
        print(f"{best_ms(f, n):10.1f} ms  {label}")


if __name__ == "__main__":
    main()
