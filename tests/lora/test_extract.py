"""extract-lora: errors against the Eckart–Young bound (an independent float64 SVD), peft
loads the adapter, ranks from --energy, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modelalloy.lora import open_model
from modelalloy.lora.extract import extract_lora
from tests.lora.helpers import tiny_llama


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Llama base and a 'fine-tune': every weight moved, norms included."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    base.save_pretrained(tmp_path / "tuned")
    return tmp_path / "tuned", tmp_path / "base"


def _deltas(tuned: Path, base: Path) -> dict[str, np.ndarray]:
    t, b = load_file(str(tuned / "model.safetensors")), load_file(str(base / "model.safetensors"))
    return {k: (t[k].double() - b[k].double()).numpy() for k in t}


def test_rank_error_is_the_tail_energy(pair, tmp_path, run_cli):
    tuned, base = pair
    result = run_cli("extract-lora", tuned, "--base", base, "--rank", "3", "--out",
                     tmp_path / "ad", "--embed-lora")
    assert result.code == 0, result.err
    deltas = _deltas(tuned, base)
    with open_model(base, tmp_path / "ad") as rebuilt:
        num = den = 0.0
        for name, delta in deltas.items():
            got = rebuilt.get(name).double().numpy() - load_file(
                str(base / "model.safetensors"))[name].double().numpy()
            if delta.ndim == 2:
                s = np.linalg.svd(delta.T if "embed" in name else delta, compute_uv=False)
                tail = np.sqrt((s[3:] ** 2).sum())
                err = np.linalg.norm(delta - got)
                assert err == pytest.approx(tail, rel=2e-3, abs=1e-6), name
                num, den = num + err ** 2, den + (s ** 2).sum()
            else:  # norms: saved whole (modules_to_save)
                np.testing.assert_allclose(got, delta, atol=1e-6)
    reported = float(result.out.split("‖Δ‖_F:")[1].split()[0])
    assert reported == pytest.approx(np.sqrt(num / den), rel=1e-3)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["r"] == 3 and "model.layers.0.input_layernorm" in config["modules_to_save"]
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in saved


def test_embeddings_saved_whole_by_default(pair, tmp_path):
    """As mergekit without --embed-lora: input embeddings and the head go to modules_to_save."""
    tuned, base = pair
    extract_lora(tuned, base, tmp_path / "ad", rank=2)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "lm_head"} <= set(config["modules_to_save"])
    assert "lm_head" not in config["target_modules"]
    want = load_file(str(tuned / "model.safetensors"))
    with open_model(base, tmp_path / "ad") as rebuilt:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(rebuilt.get(name), want[name])


def test_energy_picks_the_smallest_rank(pair, tmp_path):
    tuned, base = pair
    report = extract_lora(tuned, base, tmp_path / "ad", energy=0.5,
                          include=[r"mlp"], skip_other=True)
    deltas = _deltas(tuned, base)
    assert report.modules and all("mlp" in m.name for m in report.modules)
    for m in report.modules:
        s = np.linalg.svd(deltas[m.name + ".weight"], compute_uv=False)
        share = np.cumsum(s ** 2) / (s ** 2).sum()
        assert m.rank == int(np.argmax(share >= 0.5)) + 1, m.name
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert not any("layernorm" in k or "self_attn" in k for k in saved)


def test_full_rank_reproduces_the_model_and_peft_loads_it(pair, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    tuned, base = pair
    extract_lora(tuned, base, tmp_path / "ad", rank=16, exclude=[r"mlp\.(up|gate)"])
    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base),
                                           tmp_path / "ad").merge_and_unload()
    want = load_file(str(tuned / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    for name, value in model.state_dict().items():
        expected = b[name] if ("up_proj" in name or "gate_proj" in name) else want[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_peft_reads_ranks_per_module(pair, tmp_path):
    """--energy gives modules different ranks: peft must build each at its own rank."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    tuned, base = pair
    report = extract_lora(tuned, base, tmp_path / "ad", energy=0.6)
    assert len({m.rank for m in report.modules}) > 1
    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base),
                                           tmp_path / "ad").merge_and_unload()
    with open_model(base, tmp_path / "ad") as ours:
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, ours.get(name), rtol=1e-5, atol=1e-6, msg=name)


def test_rank_above_the_matrix_is_one_line_error(pair, tmp_path, run_cli):
    tuned, base = pair
    result = run_cli("extract-lora", tuned, "--base", base, "--rank", "17", "--out",
                     tmp_path / "ad")
    assert result.code == 1 and "above the rank" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "ad").exists()
    result = run_cli("extract-lora", tuned, "--base", base, "--out", tmp_path / "ad")
    assert result.code == 1 and "exactly one of --rank" in result.err


def test_gpt2_biases_go_to_lora_bias_and_peft_reproduces_the_model(tmp_path):
    """GPT-2: Conv1D weights (fan_in_fan_out) with biases: Δbias becomes lora_B.bias."""
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    from tests.conftest import save_gpt2_family

    base, (tuned,) = save_gpt2_family(tmp_path, n_experts=1)
    report = extract_lora(tuned, base, tmp_path / "ad", rank=32)
    assert not report.dropped
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["lora_bias"] and config["fan_in_fan_out"]
    model = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base),
                                           tmp_path / "ad").merge_and_unload()
    want = load_file(str(tuned / "model.safetensors"))
    with open_model(base, tmp_path / "ad") as ours:
        for name, value in model.state_dict().items():
            if name in want:
                torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-5, msg=name)
                torch.testing.assert_close(ours.get(name), value, rtol=1e-5, atol=1e-6,
                                           msg=name)


def test_svd_clamp_clips_the_factors_at_their_quantile(pair, tmp_path, run_cli):
    """--svd-clamp q: each module's factors are the unclamped ones clipped at ±numpy's
    q-quantile of their joint values, and the reported error is the clipped factors'."""
    tuned, base = pair
    plain = extract_lora(tuned, base, tmp_path / "plain", rank=4)
    result = run_cli("extract-lora", tuned, "--base", base, "--rank", "4", "--svd-clamp",
                     "0.8", "--out", tmp_path / "clamped")
    assert result.code == 0, result.err
    assert "LAPACK gesdd on the CPU" in result.out
    p = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    c = load_file(str(tmp_path / "clamped" / "adapter_model.safetensors"))
    deltas = _deltas(tuned, base)
    num = den = 0.0
    for key in [k for k in p if k.endswith("lora_A.weight")]:
        b_key = key.replace("lora_A", "lora_B")
        values = np.concatenate([p[b_key].double().numpy().ravel(),
                                 p[key].double().numpy().ravel()])
        h = np.quantile(values, 0.8)
        np.testing.assert_allclose(c[key].numpy(), np.clip(p[key].numpy(), -h, h), atol=1e-7)
        np.testing.assert_allclose(c[b_key].numpy(), np.clip(p[b_key].numpy(), -h, h),
                                   atol=1e-7)
        name = key.removeprefix("base_model.model.").replace(".lora_A", "")
        delta = deltas[name]
        num += np.linalg.norm(delta - c[b_key].double().numpy() @ c[key].double().numpy()) ** 2
        den += np.linalg.norm(delta) ** 2
    reported = float(result.out.split("‖Δ‖_F:")[1].split()[0])
    assert reported == pytest.approx(np.sqrt(num / den), rel=1e-3)
    assert reported > plain.relative_error  # clipping moves B·A off the truncated SVD
