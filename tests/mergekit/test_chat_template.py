"""``chat_template``: auto, the built-in names and literal Jinja end up in the merged model's
tokenizer and render the published formats (expected strings written from the formats)."""

from __future__ import annotations

import pytest

from modelalloy import merge
from tests.conftest import save_gpt2_family, write_recipe

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}]


def _tokenizer(folder, template):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    if template:
        tok.chat_template = template
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    base, experts = save_gpt2_family(root, n_experts=2)
    _tokenizer(base, "{{ 'BASE' }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for e in experts:
        _tokenizer(e, "{{ 'EXPERT' }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return base, experts


def _render(tmp_path, family, setting):
    from transformers import AutoTokenizer

    base, experts = family
    text = (f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n"
            + "".join(f"  - model: {e}\n" for e in experts) + f"chat_template: {setting}\n")
    merge(write_recipe(tmp_path / "r.yaml", text), tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    return tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_auto_takes_the_most_common_template(tmp_path, family):
    # two experts against one base
    assert _render(tmp_path, family, "auto") == "EXPERTBe brief.HiHelloBye"


def test_a_literal_template(tmp_path, family):
    assert _render(tmp_path, family, "'{% for m in messages %}<{{ m.role }}>{% endfor %}'") \
        == "<system><user><assistant><user>"


@pytest.mark.parametrize("name,want", [
    ("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
               "<|im_start|>assistant\n"),
    ("llama3", "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("mistral", "<s> [INST] Be brief.\n\nHi [/INST] Hello</s> [INST] Bye [/INST]"),
    ("alpaca", "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello\n\n"
               "### Instruction:\nBye\n\n### Response:\n"),
    ("exaone", "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n"
               "[|user|]Bye\n[|assistant|]"),
])
def test_built_in_formats(tmp_path, family, name, want):
    assert _render(tmp_path, family, name) == want
