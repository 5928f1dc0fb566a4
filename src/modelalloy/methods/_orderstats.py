"""Exact order statistics of values spread over a whole model, in bounded memory.

``order_stats(passes, n_rows, ranks)`` returns, for each row r (one per task), the values at the
0-based ranks ``ranks(r, n_r)`` (n_r = the row's number of values, known after pass 1) of the
ascending order of all that row's values, where ``passes()`` yields the
values chunk by chunk (one chunk per tensor: a list with one flat float32 tensor per row). It
never concatenates the model:

1. pass 1 counts every value per bin of a monotone 16-bit key of its float32 bit pattern
   (``torch.bincount``, 2**16 bins per row) and tracks each row's maximum;
2. the bin holding each requested rank follows from the cumulative counts;
3. pass 2 keeps only the values that fall in those bins and selects the exact value with
   ``kthvalue``.

Memory: one 2**16 histogram per row plus the values of the selected bins. Unlike the
non-negative-only TIES histogram (``_sparsify.global_thresholds``), the key orders signed floats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

_NBINS = 1 << 16
Chunks = Callable[[], Iterator[list[torch.Tensor]]]


def monotone_keys(x: torch.Tensor) -> torch.Tensor:
    """A key in [0, 2**16) that is non-decreasing in the float32 value (−0.0 sorts below +0.0)."""
    i = x.contiguous().view(torch.int32)
    k = i ^ ((i >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    return (k >> 16) + (_NBINS // 2)


def order_stats(passes: Chunks, n_rows: int, ranks: Callable[[int, int], list[int]],
                ) -> tuple[list[list[float]], list[float]]:
    """(values at ``ranks(r, n_r)`` for every row r, the maximum of every row).

    Ranks are clamped to [0, n_r − 1]; a row with no values gives 0.0 everywhere.
    """
    hist: torch.Tensor | None = None
    maxima = [float("-inf")] * n_rows
    for chunk in passes():
        for r, v in enumerate(chunk):
            if v.numel() == 0:
                continue
            if hist is None:
                hist = torch.zeros(n_rows, _NBINS, dtype=torch.int64, device=v.device)
            hist[r] += torch.bincount(monotone_keys(v.flatten()), minlength=_NBINS)
            maxima[r] = max(maxima[r], float(v.max()))
    if hist is None:
        return [[0.0] * len(ranks(r, 0)) for r in range(n_rows)], [0.0] * n_rows
    targets: list[list[tuple[int, int]]] = []  # per row: (bin, 1-based rank inside the bin)
    for r in range(n_rows):
        cum = torch.cumsum(hist[r], 0)
        total = int(cum[-1])
        row = []
        for rank in ranks(r, total):
            rank = min(max(rank, 0), max(total - 1, 0))
            b = int(torch.searchsorted(cum, torch.tensor(rank + 1, device=cum.device)))
            below = int(cum[b - 1]) if b > 0 else 0
            row.append((b, rank + 1 - below))
        targets.append(row)
    del hist
    wanted = [sorted({b for b, _ in row}) for row in targets]
    found: list[dict[int, list[torch.Tensor]]] = [{b: [] for b in w} for w in wanted]
    for chunk in passes():
        for r, v in enumerate(chunk):
            if v.numel() == 0 or not wanted[r]:
                continue
            flat = v.flatten()
            keys = monotone_keys(flat)
            for b in wanted[r]:
                sel = flat[keys == b]
                if sel.numel():
                    found[r][b].append(sel.cpu())
    out = []
    for r in range(n_rows):
        row = []
        for b, k in targets[r]:
            vals = torch.cat(found[r][b]) if found[r][b] else torch.zeros(1)
            row.append(float(vals.kthvalue(min(k, vals.numel())).values))
        out.append(row)
    return out, [m if m != float("-inf") else 0.0 for m in maxima]
