"""Cost of collecting statistics against a plain forward pass over the same data.

    python -m modelalloy.stats.overhead [--layers 4] [--dim 256] [--batches 16] [--tokens 128]
                                        [--device cpu] [--repeats 3]

Prints a Markdown table: seconds for a plain ``no_grad`` forward pass over the batches, for
each collector, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from modelalloy.stats.collect import collect_activations, collect_fisher, collect_grams
from modelalloy.stats.hooks import call_model


def _time(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fisher-examples", type=int, default=4)
    args = ap.parse_args(argv)
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=args.layers, n_embd=args.dim, n_head=max(1, args.dim
                                                                                    // 64),
                                  n_positions=args.tokens, vocab_size=1000)
    model = transformers.GPT2LMHeadModel(cfg).to(args.device).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (args.batch_size, args.tokens),
                                           generator=gen).to(args.device),
                "attention_mask": torch.ones(args.batch_size, args.tokens, dtype=torch.long,
                                             device=args.device)}
               for _ in range(args.batches)]

    def plain() -> None:
        with torch.no_grad():
            for b in batches:
                call_model(model, b)

    plain()  # warm-up
    # Interleaved rounds, so that load from other processes hits every pass alike.
    passes = {"plain forward": plain,
              "gram": lambda: collect_grams(model, batches),
              "activations": lambda: collect_activations(model, batches)}
    times: dict[str, list[float]] = {k: [] for k in passes}
    for _ in range(args.repeats):
        for label, fn in passes.items():
            times[label].append(_time(fn, 1, args.device))
    base = statistics.median(times["plain forward"])
    rows = [(label, statistics.median(t), statistics.median(t) / base)
            for label, t in times.items()]
    fb = batches[: max(1, args.fisher_examples // args.batch_size)]

    def plain_fb() -> None:
        for b in fb:
            model.zero_grad(set_to_none=True)
            call_model(model, b).logits.float().log_softmax(-1).mean().backward()

    tfb = _time(plain_fb, args.repeats, args.device)
    tf = _time(lambda: collect_fisher(model, fb, mode="sampled"), args.repeats, args.device)
    rows.append((f"plain forward+backward ({len(fb)} batches)", tfb, tfb / base * len(batches)
                 / len(fb)))
    rows.append((f"fisher, sampled ({len(fb)} batches)", tf, tf / tfb))
    print(f"GPT-2 config: {args.layers} layers, d={args.dim}, {args.batches} batches × "
          f"{args.batch_size} × {args.tokens} tokens, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| pass | seconds | ratio |\n|---|---|---|")
    for label, t, r in rows:
        print(f"| {label} | {t:.3f} | {r:.2f}× |")
    print("\n(ratios: against the plain forward pass; the Fisher row against forward+backward "
          "over the same batches)")


if __name__ == "__main__":
    main()
