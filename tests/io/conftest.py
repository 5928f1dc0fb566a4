"""Tiny checkpoints built inside the tests (no downloads)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def gpt2_dirs(tmp_path_factory):
    """(unsharded, sharded) save_pretrained folders of the same tiny GPT-2, and the model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    root = tmp_path_factory.mktemp("gpt2")
    single, sharded = root / "single", root / "sharded"
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="20KB")
    return single, sharded, model
