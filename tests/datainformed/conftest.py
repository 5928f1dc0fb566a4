from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def tiny_gpt2():
    """A 2-layer GPT-2 with 32-d embeddings, built locally (no download)."""
    import transformers

    def build(seed: int = 0):
        torch.manual_seed(seed)
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32,
                                      vocab_size=50, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg).eval()

    return build


@pytest.fixture
def lm_batches():
    return _lm_batches


def _lm_batches(seed: int, n_batches: int = 2, batch: int = 3, length: int = 7,
               vocab: int = 50, pad_last: int = 2) -> list[dict[str, torch.Tensor]]:
    """Random token batches; the last ``pad_last`` positions of example 0 are padding."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.long)
        if pad_last:
            mask[0, -pad_last:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out
