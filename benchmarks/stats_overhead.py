"""Cost of collecting statistics against a plain forward pass over the same data.

    python benchmarks/stats_overhead.py [--suite synthetic|tiny-vision|tiny-lm] [--size full]
                                        [--repeats 7] [--threads 1]
                                        [--gram-token-fraction R [R ...]]
                                        [--layers 4] [--dim 256] [--batches 16] [--tokens 128]

Prints a Markdown table: **CPU seconds** (``time.process_time``: user + system time of this
process, so other jobs on a shared machine do not inflate it) for a plain ``no_grad`` forward
pass over the batches and for each collector over the same batches, each the median of
``--repeats`` interleaved rounds, and the ratio of the medians (plus the median of the per-round
ratios). ``--threads`` (default 1) fixes torch's intra-op threads, so CPU time is not spent
spinning in idle worker threads.

``--gram-token-fraction`` adds a row per rate R < 1: Grams from a seeded random R of the
token rows, rescaled (``collect_grams(..., token_fraction=R)``; the exact row stays).

``--suite synthetic`` (default) is a random GPT-2 config (``--layers``, ``--dim``, ...);
``tiny-vision`` / ``tiny-lm`` take the first merged task's expert of the built suite and the
unlabeled test inputs of every merged task (``--limit`` examples per task, ``--batch-size`` per
batch), through the
same model wrapper the benchmark uses (:func:`modelalloy.eval.suite_stats.suite_module`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from modelalloy.stats.collect import collect_activations, collect_fisher, collect_grams
from modelalloy.stats.hooks import call_model


def cpu_seconds(fn: Callable[[], Any], device: str = "cpu") -> float:
    """CPU time (user + system, this process) spent in ``fn()``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.process_time() - start


def compare(passes: dict[str, Callable[[], Any]], repeats: int, device: str = "cpu"
            ) -> list[tuple[str, float, float, float]]:
    """Run the passes in interleaved rounds (after one warm-up round); per pass: (label,
    median CPU s, median / median of the first pass, median of the per-round ratios)."""
    labels = list(passes)
    for fn in passes.values():
        fn()  # warm-up: allocator, lazy imports, hook registration paths
    times: dict[str, list[float]] = {k: [] for k in labels}
    for _ in range(repeats):
        for label in labels:
            times[label].append(cpu_seconds(passes[label], device))
    ref = times[labels[0]]
    base = statistics.median(ref)
    return [(label, statistics.median(t), statistics.median(t) / base,
             statistics.median(a / b for a, b in zip(t, ref, strict=True)))
            for label, t in times.items()]


def _synthetic(args: argparse.Namespace) -> tuple[torch.nn.Module, list[Any], str]:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=args.layers, n_embd=args.dim,
                                  n_head=max(1, args.dim // 64), n_positions=args.tokens,
                                  vocab_size=1000)
    model = transformers.GPT2LMHeadModel(cfg).to(args.device).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (args.batch_size, args.tokens),
                                           generator=gen).to(args.device),
                "attention_mask": torch.ones(args.batch_size, args.tokens, dtype=torch.long,
                                             device=args.device)}
               for _ in range(args.batches)]
    desc = (f"synthetic GPT-2: {args.layers} layers, d={args.dim}, vocab 1000, {args.batches} "
            f"batches × {args.batch_size} × {args.tokens} tokens")
    return model, batches, desc


def _suite(args: argparse.Namespace) -> tuple[torch.nn.Module, list[Any], str]:
    from modelalloy.bench import load_suite
    from modelalloy.eval.suite_stats import suite_module, task_batches

    suite = load_suite(args.suite, args.size)
    tasks = suite.info.merged_tasks
    model = suite_module(suite, suite.expert_state_dict(tasks[0]), tasks)
    # every merged task's test inputs (a classifier batch carries its task's head index)
    batches = [b for bs in task_batches(suite, tasks, "test", args.batch_size, limit=args.limit)
               for b in bs]
    n = sum(int(b["images"].shape[0]) if "images" in b else int(b["input_ids"].shape[0])
            for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches if "attention_mask" in b)
    params = sum(p.numel() for p in model.parameters())
    desc = (f"{args.suite} ({args.size}) expert '{tasks[0]}', {params:,} parameters, {n} test "
            f"inputs of the {len(tasks)} merged tasks in batches of {args.batch_size}"
            + (f" ({tokens} real tokens)" if tokens else ""))
    return model, batches, desc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="synthetic", choices=["synthetic", "tiny-vision",
                                                             "tiny-lm"])
    ap.add_argument("--size", default="full", choices=["full", "smoke"])
    ap.add_argument("--limit", type=int, default=None, help="suite inputs used (default all)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default 1 (synthetic) or 32 (suites)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fisher-examples", type=int, default=4)
    ap.add_argument("--gram-token-fraction", type=float, nargs="+", default=[],
                    metavar="R", help="also time Grams on a fraction R of the token rows")
    args = ap.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 1 if args.suite == "synthetic" else 32
    torch.set_num_threads(args.threads)
    model, batches, desc = _synthetic(args) if args.suite == "synthetic" else _suite(args)

    def plain() -> None:
        with torch.no_grad():
            for b in batches:
                call_model(model, b)

    passes = {"plain forward": plain,
              "gram": lambda: collect_grams(model, batches),
              "activations": lambda: collect_activations(model, batches)}
    for r in args.gram_token_fraction:
        passes[f"gram, token fraction {r:g}"] = (
            lambda r=r: collect_grams(model, batches, token_fraction=r))
    rows = compare(passes, args.repeats, args.device)
    fisher_rows: list[tuple[str, float, float, float]] = []
    if args.suite == "synthetic" and args.fisher_examples > 0:
        fb = batches[: max(1, args.fisher_examples // args.batch_size)]

        def plain_fb() -> None:
            for b in fb:
                model.zero_grad(set_to_none=True)
                call_model(model, b).logits.float().log_softmax(-1).mean().backward()

        fisher_rows = compare({f"plain forward+backward ({len(fb)} batches)": plain_fb,
                               f"fisher, sampled ({len(fb)} batches)":
                               lambda: collect_fisher(model, fb, mode="sampled")},
                              args.repeats, args.device)
    print(f"{desc}; {args.device}, {torch.get_num_threads()} thread(s); CPU time "
          f"(time.process_time), median of {args.repeats} interleaved rounds after a warm-up\n")
    print("| pass | CPU seconds | ratio of medians | median per-round ratio |\n|---|---|---|---|")
    for label, t, r, rr in rows + fisher_rows:
        print(f"| {label} | {t:.3f} | {r:.2f}× | {rr:.2f}× |")
    print("\n(ratios: against the plain forward pass"
          + ("; the Fisher row against forward+backward over the same batches)"
             if fisher_rows else ")"))


if __name__ == "__main__":
    main()
