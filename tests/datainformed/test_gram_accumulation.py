"""The Gram accumulator (buffered rows, upper block triangle) against a plain XᵀX."""

import pytest
import torch
from torch import nn

import modelalloy.stats.collect as collect
from modelalloy.stats import collect_grams


@pytest.mark.parametrize("syrk", [True, False])
@pytest.mark.parametrize("d,block,chunk", [(300, 128, 1000), (256, 128, 1 << 20), (40, 128, 64),
                                           (130, 32, 500)])
def test_blocked_buffered_gram_equals_xtx(monkeypatch, d, block, chunk, syrk):
    monkeypatch.setattr(collect, "GRAM_SYRK", syrk)
    monkeypatch.setattr(collect, "GRAM_BLOCK", block)
    monkeypatch.setattr(collect, "GRAM_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 3))
    xs = [torch.randn(4, 7, d, generator=gen) for _ in range(3)]
    masks = [torch.rand(4, 7, generator=gen) > 0.3 for _ in range(3)]

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, inputs_embeds, attention_mask):
            return self.inner(inputs_embeds)

    batches = [{"inputs_embeds": x, "attention_mask": m.long()}
               for x, m in zip(xs, masks, strict=True)]
    got = collect_grams(Wrap(), batches, reduce="sum")
    rows = torch.cat([x[m] for x, m in zip(xs, masks, strict=True)]).double()
    expect = rows.T @ rows
    torch.testing.assert_close(got["inner.0.weight"].double(), expect, rtol=1e-5, atol=1e-4)
    assert got.counts["inner.0.weight"] == rows.shape[0]
    unmasked = collect_grams(Wrap(), batches, reduce="sum", mask_padding=False)
    allrows = torch.cat([x.reshape(-1, d) for x in xs]).double()
    torch.testing.assert_close(unmasked["inner.0.weight"].double(), allrows.T @ allrows,
                               rtol=1e-5, atol=1e-4)


def test_triangle_blocks_cover_every_entry_or_its_mirror():
    for d in (10, 255, 256, 300, 1000):
        seen = torch.zeros(d, d, dtype=torch.int32)
        for a0, a1, b0, b1 in collect._triangle_blocks(d, 128):
            seen[a0:a1, b0:b1] += 1
        assert int(seen.max()) == 1 and bool(((seen + seen.T) >= 1).all()), d
