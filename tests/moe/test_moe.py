"""modelalloy moe: a Mixtral built from tiny Llama experts loads in transformers, generates,
holds each expert's MLP, and routes a prompt from expert k's domain to expert k."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from modelalloy.bench.lm import VOCAB, save_tokenizer

# expert k's prompts: strings over a small character set of its own, ending in each of them
SETS = {0: "1234", 1: "abcd", 2: "ABCD"}
DOMAINS = {k: [chars[i:] + chars[:i] + chars[i] for i in range(len(chars))]
           for k, chars in SETS.items()}
HELD_OUT = {0: "4321 2143", 1: "dcba cadb", 2: "DCBA BDAC"}


def _llama(hidden: int = 64, intermediate: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=1,
        pad_token_id=0))


@pytest.fixture
def family(tmp_path: Path) -> Path:
    base = _llama()
    base.save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base")
    for k in DOMAINS:
        torch.manual_seed(100 + k)
        with torch.no_grad():
            expert = _llama()
            for name, p in expert.named_parameters():
                if ".mlp." in name:
                    p.add_(torch.randn_like(p) * 0.05)
        expert.save_pretrained(tmp_path / f"e{k}")
    return tmp_path


def _recipe(root: Path, mode: str, **extra) -> Path:
    data = {"base_model": "base", "gate_mode": mode, "experts_per_token": 1, "dtype": "float32",
            "experts": [{"source_model": f"e{k}", "positive_prompts": prompts}
                        for k, prompts in DOMAINS.items()], **extra}
    path = root / f"moe-{mode}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "cheap_embed"])
def test_prompt_routes_to_its_expert(family, run_cli, mode):
    from transformers import AutoTokenizer, MixtralForCausalLM

    result = run_cli("moe", _recipe(family, mode), "--out", family / "moe")
    assert result.code == 0, result.err
    model = MixtralForCausalLM.from_pretrained(family / "moe").eval()
    tok = AutoTokenizer.from_pretrained(family / "moe")
    for k, prompt in HELD_OUT.items():
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            # `hidden` gates come from prompts' last tokens: route the last token
            scores = logits[-1] if mode == "hidden" else logits.float().mean(0)
            assert int(scores.argmax()) == k, (mode, k, layer)
    gen = model.generate(tok("12", return_tensors="pt")["input_ids"], max_new_tokens=4,
                         do_sample=False)
    assert 3 < gen.shape[1] <= 3 + 4  # <eos>12 and up to 4 new tokens


def test_weights_come_from_their_models(family, run_cli):
    assert run_cli("moe", _recipe(family, "cheap_embed"), "--out", family / "moe").code == 0
    out = load_file(str(family / "moe" / "model.safetensors"))
    base = load_file(str(family / "base" / "model.safetensors"))
    for k in DOMAINS:
        expert = load_file(str(family / f"e{k}" / "model.safetensors"))
        for dense, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            assert torch.equal(out[f"model.layers.1.block_sparse_moe.experts.{k}.{w}.weight"],
                               expert[f"model.layers.1.mlp.{dense}.weight"])
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"],
                       base["model.layers.0.self_attn.q_proj.weight"])
    # cheap_embed, worked out here: the normalised sum of the prompt tokens' embeddings
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family / "base")
    embed = base["model.embed_tokens.weight"]
    for k, prompts in DOMAINS.items():
        ids = [i for p in prompts for i in tok(tok.bos_token + p, add_special_tokens=False)
               ["input_ids"]]
        v = embed[ids].sum(0)
        torch.testing.assert_close(out["model.layers.0.block_sparse_moe.gate.weight"][k],
                                   v / v.norm())


def test_random_gates_and_one_line_errors(family, run_cli):
    assert run_cli("moe", _recipe(family, "random"), "--out", family / "r").code == 0
    _llama(hidden=64, intermediate=48).save_pretrained(family / "wide")
    recipe = _recipe(family, "random")
    data = yaml.safe_load(recipe.read_text())
    data["experts"][1]["source_model"] = "wide"
    recipe.write_text(yaml.safe_dump(data))
    result = run_cli("moe", recipe, "--out", family / "bad")
    assert result.code == 1 and "experts differ in shape" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not (family / "bad").exists()
    data["experts"][1]["source_model"] = "e1"
    data["gate_mode"] = "hidden"
    data["experts"] = [{**e, "positive_prompts": ["same"]} for e in data["experts"]]
    recipe.write_text(yaml.safe_dump(data))
    result = run_cli("moe", recipe, "--out", family / "bad")
    assert result.code == 1 and "same prompts" in result.err
    data["experts"] = [{**e, "positive_prompts": [str(i)]} for i, e in enumerate(data["experts"])]
    data["base_model"] = "e1"  # saved without a tokenizer
    recipe.write_text(yaml.safe_dump(data))
    result = run_cli("moe", recipe, "--out", family / "bad")
    assert result.code == 1 and "no usable tokenizer" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_qwen2_moe_with_a_shared_expert(family, run_cli):
    from transformers import AutoTokenizer, Qwen2MoeForCausalLM

    data = {"base_model": "base", "gate_mode": "hidden_avg", "experts_per_token": 1,
            "experts": [{"source_model": f"e{k}", "positive_prompts": DOMAINS[k]}
                        for k in (1, 2)],
            "shared_experts": [{"source_model": "e0", "positive_prompts": DOMAINS[0]}]}
    (family / "qwen.yaml").write_text(yaml.safe_dump(data))
    result = run_cli("moe", family / "qwen.yaml", "--out", family / "qmoe")
    assert result.code == 0 and "qwen2_moe" in result.out, result.err
    out = load_file(str(family / "qmoe" / "model.safetensors"))
    shared = load_file(str(family / "e0" / "model.safetensors"))
    assert torch.equal(out["model.layers.0.mlp.shared_expert.up_proj.weight"],
                       shared["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.1.self_attn.k_proj.bias"], torch.zeros(64))
    assert out["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
    model = Qwen2MoeForCausalLM.from_pretrained(family / "qmoe").eval()
    tok = AutoTokenizer.from_pretrained(family / "qmoe")
    for index, k in enumerate((1, 2)):
        ids = tok(HELD_OUT[k], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits
        assert all(int(layer.float().mean(0).argmax()) == index for layer in logits)
    model.generate(tok("ab", return_tensors="pt")["input_ids"], max_new_tokens=3)
    data["shared_experts"].append(data["shared_experts"][0])
    (family / "qwen.yaml").write_text(yaml.safe_dump(data))
    bad = run_cli("moe", family / "qwen.yaml", "--out", family / "q2")
    assert bad.code == 1 and "exactly one shared expert" in bad.err


def test_expert_with_a_lora_adapter(family, run_cli):
    """`source_model: e1+adapter` (mergekit's syntax): expert 1 is e1 with the adapter applied."""
    from tests.lora.helpers import write_adapter

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    write_adapter(family / "ad", {"model.layers.0.mlp.up_proj": (a, b)}, r=2, alpha=2)
    data = {"base_model": "base", "gate_mode": "random", "experts_per_token": 1,
            "experts": [{"source_model": "e0"}, {"source_model": "e1+ad"}]}
    (family / "lora.yaml").write_text(yaml.safe_dump(data))
    assert run_cli("moe", family / "lora.yaml", "--out", family / "m").code == 0
    out = load_file(str(family / "m" / "model.safetensors"))
    e1 = load_file(str(family / "e1" / "model.safetensors"))
    torch.testing.assert_close(out["model.layers.0.block_sparse_moe.experts.1.w3.weight"],
                               e1["model.layers.0.mlp.up_proj.weight"] + b @ a,
                               rtol=1e-6, atol=1e-6)
    data["base_model"] = "base+ad"
    (family / "lora.yaml").write_text(yaml.safe_dump(data))
    bad = run_cli("moe", family / "lora.yaml", "--out", family / "m2")
    assert bad.code == 1 and "merge the adapter into it first" in bad.err
