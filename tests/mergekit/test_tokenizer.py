"""Tokenizer merging (``tokenizer_source`` and the ``tokenizer:`` block): the merged vocabulary,
the embedding rows of tokens some models lack, tied embeddings, padding. Expected rows are
worked out here from mergekit's documented rules (the only owner's row; the base's row; the
mean of the owners' rows) and the method's formula, on the models' own tensors; with mergekit
installed, the outputs equal mergekit's, row by row per token."""

from __future__ import annotations

import json

import pytest
import torch

from modelalloy import merge
from modelalloy.errors import ModelAlloyError, RecipeError
from modelalloy.recipe import parse_recipe
from tests.conftest import load_benchmark
from tests.mergekit.helpers import BASE_WORDS, against_mergekit, save_token_family, weights

BENCH = load_benchmark("mergekit_recipes")
UNION = ["<|im_start|>", "<|im_end|>", "<|tool|>", "hello"]  # after the base's 32 tokens
AGAINST_MERGEKIT = ["tokenizer-union", "tokenizer-union-ties", "tokenizer-base",
                    "tokenizer-model", "tokenizer-tokens", "tokenizer-token-id",
                    "tokenizer-pad", "tokenizer-gpt2-union", "tokenizer-gpt2-slerp"]
EMBED, HEAD, WTE = "model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"llama": save_token_family(root / "llama", "llama"),
            "gpt2": save_token_family(root / "gpt2", "gpt2")}


@pytest.fixture(scope="module")
def token_models(family):
    """The families under the benchmark's recipe placeholders."""
    out = {}
    for prefix, arch in (("t", "llama"), ("gt", "gpt2")):
        out.update({f"{prefix}base": family[arch][0], f"{prefix}a": family[arch][1],
                    f"{prefix}b": family[arch][2]})
    return out


def _merge(tmp_path, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text + "dtype: float32\n")
    out = tmp_path / "out"
    merge(recipe, out)
    return out, weights(out)


def _vocab(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True).get_vocab()


def _rows(folder, name):
    """token -> that model's row of ``name``."""
    w = weights(folder)[name]
    return {t: w[i] for t, i in _vocab(folder).items()}


def _linear_recipe(a, b, source):
    return (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.4}}\ntokenizer_source: {source}\n")


@pytest.mark.parametrize("arch,names", [("llama", [EMBED, HEAD]), ("gpt2", [WTE])])
def test_union_rows(tmp_path, family, arch, names):
    _, a, b = family[arch]
    out, merged = _merge(tmp_path, _linear_recipe(a, b, "union"))
    vocab = _vocab(out)
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][BASE_WORDS:] == UNION
    assert json.loads((out / "config.json").read_text())["vocab_size"] == BASE_WORDS + 4
    assert HEAD not in merged if arch == "gpt2" else True  # tied: one matrix
    for name in names:
        ra, rb = _rows(a, name), _rows(b, name)
        for token, i in vocab.items():
            # a model lacking the token takes the only owner's row (<|im_start|>: a;
            # <|tool|>, hello: b); both own the rest
            xa = ra.get(token, rb.get(token))
            xb = rb.get(token, ra.get(token))
            torch.testing.assert_close(merged[name][i], 0.6 * xa + 0.4 * xb, rtol=0, atol=1e-6)


def test_base_row_and_mean_of_owners(tmp_path, family):
    """task arithmetic with a base lacking the added tokens: the base's row of a token both
    fine-tunes own is their mean, of a token one owns that one's row."""
    base, a, b = family["llama"]
    out, merged = _merge(tmp_path, f"merge_method: task_arithmetic\nbase_model: {base}\n"
                                   f"models:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
                                   f"  - model: {b}\n    parameters: {{weight: 0.3}}\n"
                                   "tokenizer_source: union\n")
    vocab = _vocab(out)
    r0, ra, rb = _rows(base, EMBED), _rows(a, EMBED), _rows(b, EMBED)
    for token, i in vocab.items():
        xa, xb = ra.get(token, rb.get(token)), rb.get(token, ra.get(token))
        x0 = r0[token] if token in r0 else (
            (ra[token] + rb[token]) / 2 if token in ra and token in rb else xa)
        want = x0 + 0.6 * (xa - x0) + 0.3 * (xb - x0)
        torch.testing.assert_close(merged[EMBED][i], want, rtol=0, atol=1e-6, msg=token)


def test_base_source_drops_added_rows(tmp_path, family):
    base, a, b = family["llama"]
    out, merged = _merge(tmp_path, f"merge_method: task_arithmetic\nbase_model: {base}\n"
                                   f"models: [{a}, {b}]\ntokenizer_source: base\n")
    assert merged[EMBED].shape == (BASE_WORDS, 16) == merged[HEAD].shape
    assert json.loads((out / "config.json").read_text())["vocab_size"] == BASE_WORDS
    w0, wa, wb = (weights(f)[HEAD][:BASE_WORDS] for f in (base, a, b))
    torch.testing.assert_close(merged[HEAD], wa + wb - w0, rtol=0, atol=1e-6)
    # the base's tokenizer, copied as it is
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_tokens_block_force_zero_and_padding(tmp_path, family):
    _, a, b = family["llama"]
    out, merged = _merge(tmp_path, _linear_recipe(a, b, "union").replace(
        "tokenizer_source: union\n",
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n"
        f"    <|im_end|>:\n      source: {{kind: model_token, model: {b}, token: w5}}\n"
        "      force: true\n    <|new|>: {source: {kind: zero}}\n"))
    vocab = _vocab(out)
    assert vocab["<|new|>"] == BASE_WORDS + 4 and len(vocab) == 37
    assert merged[EMBED].shape == (40, 16)  # padded to a multiple of 8
    rb = _rows(b, EMBED)
    torch.testing.assert_close(merged[EMBED][vocab["<|im_end|>"]], rb["w5"], rtol=0, atol=1e-6)
    assert not merged[EMBED][vocab["<|new|>"]].any()
    # padding rows: each model's mean token row, merged (linear: the mean of the merged rows)
    torch.testing.assert_close(merged[EMBED][37:], merged[EMBED][:37].mean(0).expand(3, 16),
                               rtol=0, atol=1e-6)


def test_identical_tokenizers_take_the_normal_path(tmp_path, family):
    """``tokenizer_source: <model>`` on a model that has it: the sources are not wrapped."""
    from contextlib import ExitStack

    from modelalloy.engine.run import as_recipe, make_plan

    _, a, _ = family["llama"]
    recipe = as_recipe(f"merge_method: passthrough\nmodels: [{a}]\ntokenizer_source: {a}\n")
    with ExitStack() as stack:
        plan = make_plan(recipe, stack)
        assert plan.vocabulary is not None and not hasattr(plan.reference, "whole_tensors")
    out, merged = _merge(tmp_path, f"merge_method: passthrough\nmodels: [{a}]\n"
                                   f"tokenizer_source: {a}\n")
    torch.testing.assert_close(merged[EMBED], weights(a)[EMBED], rtol=0, atol=0)


def test_token_source_lacking_the_token_is_one_line(tmp_path, family):
    _, a, b = family["llama"]
    with pytest.raises(ModelAlloyError, match=r"tokenizer\.tokens\.<\|tool\|>: model .* has no "
                                              r"token '<\|tool\|>'"):
        _merge(tmp_path, _linear_recipe(a, b, "union").replace(
            "tokenizer_source: union\n",
            f"tokenizer:\n  source: union\n  tokens:\n    <|tool|>: {{source: {a}, "
            "force: true}\n"))


@pytest.mark.parametrize("block,match", [
    ("  tokens: [a]\n", r"tokenizer\.tokens: must be a mapping"),
    ("  tokens:\n    x: {sorce: ./a}\n", r"tokenizer\.tokens\.x\.sorce: unknown key; did you"),
    ("  tokens:\n    x: {source: {kind: one}}\n", r"tokens\.x\.source\.kind: must be 'zero'"),
    ("  tokens:\n    x: {source: {kind: model_token, model: ./a}}\n", r"exactly one of"),
    ("  tokens:\n    x: {source: {kind: model_token, model: ./a, token_id: -1}}\n",
     r"token_id: must be a token id"),
    ("  pad_to_multiple_of: 0\n", r"pad_to_multiple_of: must be a positive integer"),
    ("  tokens:\n    x: {force: yes please}\n", r"tokens\.x\.force: must be true or false"),
    ("  padding: 8\n", r"tokenizer\.padding: unknown key"),
])
def test_tokenizer_block_errors(block, match):
    with pytest.raises(RecipeError, match=match.replace(": ", r" \(line \d+\): ", 1)):
        parse_recipe("merge_method: linear\nmodels: [./a, ./b]\ntokenizer:\n  source: union\n"
                     + block)


def test_tokenizer_block_round_trips():
    text = ("merge_method: linear\nmodels: [./a, ./b]\ntokenizer:\n  source: union\n"
            "  pad_to_multiple_of: 8\n  tokens:\n    x: {source: ./a, force: true}\n"
            "    y: {source: {kind: model_token, model: ./b, token_id: 3}}\n"
            "    z: {source: {kind: zero}}\n")
    recipe = parse_recipe(text)
    assert recipe.tokenizer_source == "union" and recipe.tokenizer.pad_to_multiple_of == 8
    again = parse_recipe(recipe.to_yaml())
    assert again.tokenizer == recipe.tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("name", AGAINST_MERGEKIT)
def test_equals_mergekit(tmp_path, token_models, name):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(BENCH.RECIPES[name].format(**token_models) + "dtype: float32\n")
    ok, why = against_mergekit(recipe, tmp_path)
    assert ok, why


def test_mergekit_fails_adding_a_token_to_the_base_tokenizer(tmp_path_factory, token_models):
    """mergekit 0.1.5 adds `tokens` to the base model's own tokenizer object (source: base)
    and then finds the base's new id past its rows (KeyError); modelalloy merges it, the new
    token's row taken from the recipe's source."""
    models = token_models
    tmp = tmp_path_factory.mktemp("base-new-token")
    recipe = tmp / "r.yaml"
    recipe.write_text(BENCH.RECIPES["tokenizer-base-new-token"].format(**models)
                      + "dtype: float32\n")
    merge(recipe, tmp / "out")
    merged, vocab = weights(tmp / "out"), _vocab(tmp / "out")
    assert len(vocab) == BASE_WORDS + 1 and merged[EMBED].shape[0] == BASE_WORDS + 1
    # the base's and ta's rows of <|tool|> are ta's row 3 (the recipe's source: they lack
    # the token); tb keeps its own, weighted 0.4
    row = weights(models["ta"])[EMBED][3]
    own = _rows(models["tb"], EMBED)["<|tool|>"]
    torch.testing.assert_close(merged[EMBED][vocab["<|tool|>"]], row + 0.4 * (own - row),
                               rtol=0, atol=1e-6)
    binary, _ = BENCH.find_mergekit()
    if binary is not None:
        assert "KeyError" in BENCH.run_mergekit(binary, recipe, tmp / "theirs")


def test_union_tokenizer_carries_the_chat_template(tmp_path, family):
    from transformers import AutoTokenizer

    _, a, b = family["llama"]
    out, _ = _merge(tmp_path, _linear_recipe(a, b, "union") + "chat_template: chatml\n")
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(tok) == BASE_WORDS + 4
    text = tok.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False)
    assert text.startswith("<|im_start|>user\nw5<|im_end|>")
    assert json.loads((out / "config.json").read_text()).get("dtype", "float32") == "float32"
