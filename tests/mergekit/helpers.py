"""Tiny Llama / Mistral / GPT-2 families for the mergekit-compatibility tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def _config(arch: str, layers: int, tie: bool):
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, vocab_size=48,
                           max_position_embeddings=32, tie_word_embeddings=tie)
    if arch == "mistral":
        from transformers import MistralConfig

        return MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=1, vocab_size=48,
                             max_position_embeddings=32, tie_word_embeddings=tie)
    if arch == "granite":  # mergekit's test sizes, smaller
        from transformers import GraniteConfig

        return GraniteConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=2, vocab_size=48,
                             max_position_embeddings=32, tie_word_embeddings=tie)
    if arch == "llava":  # a CLIP vision tower and a Llama text model (transformers 5 layout)
        from transformers import CLIPVisionConfig, LlavaConfig

        vision = CLIPVisionConfig(image_size=16, patch_size=4, num_hidden_layers=2,
                                  num_attention_heads=2, hidden_size=16, intermediate_size=24)
        text = _config("llama", layers, tie)
        return LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    from transformers import GPT2Config

    return GPT2Config(n_layer=layers, n_embd=16, n_head=2, vocab_size=48, n_positions=32,
                      bos_token_id=1, eos_token_id=2)


def save_family(root: Path, arch: str = "llama", n_models: int = 2, layers: int = 4,
                seed: int = 0, scale: float = 0.05, tie: bool = False) -> list[Path]:
    """A base (``root/base``) and ``n_models`` fine-tunes (``root/m0`` ...): the base plus
    random deltas, saved as float32 HF folders. Returns [base, m0, m1, ...]."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if arch == "llava" else AutoModelForCausalLM
    torch.manual_seed(seed)
    config = _config(arch, layers, tie)
    base = auto.from_config(config)
    folders = [root / "base"]
    base.save_pretrained(folders[0])
    for i in range(n_models):
        model = auto.from_config(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
        model.save_pretrained(root / f"m{i}")
        folders.append(root / f"m{i}")
    return folders


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# Tokens each model of a tokenizer family adds to the shared base vocabulary (special tokens
# as AddedToken(special=True); "hello" an ordinary added token). The union is the base's 32
# tokens, then <|im_start|>, <|im_end|>, <|tool|>, hello.
ADDED_TOKENS = [[], [("<|im_start|>", True), ("<|im_end|>", True)],
                [("<|im_end|>", True), ("<|tool|>", True), ("hello", False)]]
BASE_WORDS = 32


def save_tokenizer(folder: Path, added: list[tuple[str, bool]]):
    """A WordLevel tokenizer: <unk>, <s>, </s>, w3..w31, then ``added`` (text, special)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, BASE_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    for text, special in added:
        tok.add_tokens([AddedToken(text, special=special, normalized=not special)])
    tok.save_pretrained(folder)
    return tok


def save_token_family(root: Path, arch: str = "llama", layers: int = 2, seed: int = 3,
                      scale: float = 0.05) -> list[Path]:
    """A base with the 32-token vocabulary and two fine-tunes whose tokenizers add the
    tokens of :data:`ADDED_TOKENS` (their embedding rows: the base's, plus random rows for
    the new tokens, plus deltas). GPT-2 ties its embeddings. Returns [base, m0, m1]."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    folders = []
    base_state = None
    for i, added in enumerate(ADDED_TOKENS):
        folder = root / ("base" if i == 0 else f"m{i - 1}")
        tok = save_tokenizer(folder, added)
        config = _config(arch, layers, tie=False)
        config.vocab_size = len(tok)
        model = AutoModelForCausalLM.from_config(config)
        if base_state is None:
            base_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            state = model.state_dict()
            with torch.no_grad():
                for name, value in state.items():
                    old = base_state[name]
                    if value.shape == old.shape:
                        value.copy_(old)
                    else:  # vocabulary rows: the base's, then new ones
                        value[:old.shape[0]] = old
                    if value.is_floating_point():
                        value.add_(torch.randn_like(value) * scale)
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


def against_mergekit(recipe: Path, work: Path, base: Path | None = None,
                     random_masks: bool = False) -> tuple[bool, str]:
    """Merge ``recipe`` with both tools into ``work`` and compare (benchmarks/
    mergekit_recipes.py: compare); skips the test when mergekit is not installed."""
    import pytest

    from tests.conftest import load_benchmark

    bench = load_benchmark("mergekit_recipes")
    binary, how = bench.find_mergekit()
    if binary is None:
        pytest.skip(f"mergekit is not installed: {how}")
    ours, theirs = work / "ours", work / "theirs"
    assert bench.run_modelalloy(recipe, ours) == "yes"
    assert bench.run_mergekit(binary, recipe, theirs) == "yes"
    return bench.compare(ours, theirs, base, random_masks)
