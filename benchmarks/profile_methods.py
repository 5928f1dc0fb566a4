"""Per-tensor math cost of a merge method over every tensor of a checkpoint set.

Usage (from a directory holding ``base/``, ``e0/``, ``e1/``, ``e2/`` safetensors checkpoints)::

    PYTHONPATH=src python benchmarks/profile_methods.py ties density=0.2
    PYTHONPATH=src python benchmarks/profile_methods.py dare_ties density=0.2 --repeat 3
    PYTHONPATH=src python benchmarks/profile_methods.py breadcrumbs density=0.2 --profile

``key=value`` pairs are the method's parameters (values parsed as YAML scalars; without any,
the sparsifying methods get density=0.2). Timing is single-threaded CPU time
(``time.process_time``) of the method calls only — reading and converting the tensors is not
counted — best of ``--repeat`` runs over all tensors, so it is robust to a loaded machine.
``--profile`` also writes a cProfile dump (CPU-time timer) (``--profile-out``, default ``profile_<method>.out``
in the current directory) and prints the top entries. Nothing else is written.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as modelalloy does, before torch loads

import torch  # noqa: E402
import yaml  # noqa: E402

from modelalloy.io.checkpoint import open_checkpoint  # noqa: E402
from modelalloy.methods import MergeContext, get_method  # noqa: E402

SPARSIFYING = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
               "della_linear"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method")
    ap.add_argument("params", nargs="*", help="key=value method parameters")
    ap.add_argument("--models", default="base,e0,e1,e2",
                    help="comma-separated checkpoint dirs; the first is the base")
    ap.add_argument("--repeat", type=int, default=1, help="best of N timed runs")
    ap.add_argument("--profile", action="store_true", help="also run under cProfile")
    ap.add_argument("--profile-out", default=None)
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    params: dict = {}
    for kv in args.params:
        k, _, v = kv.partition("=")
        params[k] = yaml.safe_load(v)
    if not params and args.method in SPARSIFYING:
        params = {"density": 0.2}
    if args.method == "della" and "epsilon" not in params:
        params.setdefault("epsilon", 0.1)

    spec = get_method(args.method)
    paths = args.models.split(",")
    cks = [open_checkpoint(p) for p in paths]
    has_base = spec.base != "none"
    n_experts = len(cks) - 1 if has_base else len(cks)
    if spec.name == "slerp":
        n_experts = 1
        cks = cks[:2]
    resolved = spec.resolve(n_experts, params, f"method '{spec.name}'")
    names = list(cks[0].names())

    def load(name):
        ts = [c.get(name).to(torch.float32) for c in cks]
        return (ts[0], ts[1:]) if has_base else (None, ts)

    def run_all() -> float:
        cpu = 0.0
        for name in names:
            base, experts = load(name)
            ctx = MergeContext(name=name, seed=0)
            t0 = time.process_time()
            out = spec(base, experts, resolved, ctx)
            cpu += time.process_time() - t0
            del out
        return cpu

    times = [run_all() for _ in range(max(1, args.repeat))]
    n_params = sum(cks[0].get(n).numel() for n in names)
    print(f"{spec.name} {params} threads={args.threads}: {len(names)} tensors, "
          f"{n_params / 1e6:.1f}M params, method CPU s best {min(times):.2f} "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)})")

    if args.profile:
        out_path = args.profile_out or f"profile_{spec.name}.out"
        prof = cProfile.Profile(time.process_time)  # CPU time, as the timing above
        prof.enable()
        run_all()
        prof.disable()
        prof.dump_stats(out_path)
        pstats.Stats(out_path).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
