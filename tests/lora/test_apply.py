"""LoRA adapters applied tensor by tensor while merging: against W + s·B·A worked out by hand
and against peft's own merge_and_unload."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelalloy.errors import AdapterError
from modelalloy.lora import open_model
from tests.lora.helpers import merged_with_peft, peft_adapter, tiny_llama, write_adapter

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.mlp.down_proj"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def base(tmp_path: Path) -> Path:
    tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _factors(seed: int, r: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {Q0: (torch.randn(r, 16, generator=g), torch.randn(16, r, generator=g)),
            V1: (torch.randn(r, 32, generator=g), torch.randn(16, r, generator=g))}


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("rslora", [False, True])
def test_model_plus_adapter_is_w_plus_scaled_ba(tmp_path, base, run_cli, rslora):
    factors = _factors(1)
    write_adapter(tmp_path / "ad", factors, r=2, alpha=6, use_rslora=rslora)
    recipe = _recipe(tmp_path, "merge_method: linear\nmodels:\n  - model: base+ad\n")
    result = run_cli("merge", recipe, tmp_path / "out")
    assert result.code == 0, result.err
    got, ref = _weights(tmp_path / "out"), _weights(base)
    scale = 6 / math.sqrt(2) if rslora else 6 / 2
    for module, (a, b) in factors.items():
        name = module + ".weight"
        expected = ref[name] + scale * (b @ a)
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-6)
    for name in set(ref) - {m + ".weight" for m in factors}:
        assert torch.equal(got[name], ref[name]), name


def test_structured_forms_and_task_arithmetic_of_two_adapters(tmp_path, base, run_cli):
    """`{model:, adapter:}` entries, mergekit's `{model: {path}, lora: {path}}`; task
    arithmetic of two adapted models is base + Σ w_i s_i B_i A_i (--no-as-adapter: a recipe
    of adapters alone would write the merged adapter)."""
    f1, f2 = _factors(1), _factors(2)
    write_adapter(tmp_path / "a1", f1, r=2, alpha=4)
    write_adapter(tmp_path / "a2", f2, r=2, alpha=2, alpha_pattern={"down_proj": 8})
    recipe = _recipe(tmp_path, """merge_method: task_arithmetic
base_model: base
models:
  - model: base
    adapter: a1
    parameters: {weight: 0.5}
  - model: {model: {path: base}, lora: {path: a2}}
    parameters: {weight: 0.25}
""")
    result = run_cli("merge", recipe, tmp_path / "out", "--no-as-adapter")
    assert result.code == 0, result.err
    got, ref = _weights(tmp_path / "out"), _weights(base)
    for module in f1:
        s2 = (8 if "down_proj" in module else 2) / 2
        delta = 0.5 * 2 * (f1[module][1] @ f1[module][0]) \
            + 0.25 * s2 * (f2[module][1] @ f2[module][0])
        torch.testing.assert_close(got[module + ".weight"], ref[module + ".weight"] + delta,
                                   rtol=1e-6, atol=1e-5)
    assert "base+a1" in (tmp_path / "out" / "modelalloy_recipe.yaml").read_text()


@pytest.mark.parametrize("block", [256, 3])
def test_slices_equal_whole_tensor(tmp_path, base, monkeypatch, block):
    """The engine's sliced reads (a band of rows of B·A) agree with the whole tensor, also
    when bands cut across the product's row blocks."""
    import modelalloy.io.lora.adapter as adapter_module

    monkeypatch.setattr(adapter_module, "ROW_BLOCK", block)
    write_adapter(tmp_path / "ad", _factors(3), r=2, alpha=4)
    with open_model(base, tmp_path / "ad") as ckpt:
        for name in (Q0 + ".weight", V1 + ".weight"):
            whole = ckpt.get(name).reshape(-1)
            for start, count in ((0, 7), (5, 40), (17, 33), (whole.numel() - 9, 9)):
                out = torch.empty(count, dtype=whole.dtype)
                assert torch.equal(ckpt.get_slice(name, start, out), whole[start:start + count])


def test_adapter_for_another_base_is_one_line_error(tmp_path, base, run_cli):
    g = torch.Generator().manual_seed(0)
    wrong_shape = {Q0: (torch.randn(2, 24, generator=g), torch.randn(24, 2, generator=g))}
    write_adapter(tmp_path / "wide", wrong_shape, r=2, alpha=4)
    write_adapter(tmp_path / "other", {"transformer.h.0.attn.c_attn": _factors(0)[Q0]},
                  r=2, alpha=4)
    for adapter, words in (("wide", "another base"), ("other", "does not have")):
        recipe = _recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: base+{adapter}\n")
        result = run_cli("merge", recipe, tmp_path / "out")
        assert result.code == 1
        assert words in result.err and len(result.err.strip().splitlines()) == 1, result.err
        assert not (tmp_path / "out").exists()
    with pytest.raises(AdapterError, match="use_dora"):
        write_adapter(tmp_path / "dora", _factors(0), r=2, alpha=4, use_dora=True)
        open_model(base, tmp_path / "dora")


def test_missing_adapter_folder_is_recipe_error(tmp_path, base, run_cli):
    recipe = _recipe(tmp_path, "merge_method: linear\nmodels:\n  - model: base+nowhere\n")
    result = run_cli("merge", recipe, tmp_path / "out")
    assert result.code == 1 and "LoRA adapter folder 'nowhere'" in result.err


# -- against peft ---------------------------------------------------------------------------


def test_equals_peft_merge_and_unload_llama(tmp_path, run_cli):
    pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    peft_adapter(tiny_llama(), tmp_path / "ad", seed=5, r=4, lora_alpha=8, use_rslora=True,
                 target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
                 modules_to_save=["lm_head"])
    recipe = _recipe(tmp_path, "merge_method: linear\nmodels:\n  - model: base+ad\n")
    assert run_cli("merge", recipe, tmp_path / "out").code == 0
    expected = merged_with_peft(tmp_path / "base", tmp_path / "ad", LlamaForCausalLM)
    got = _weights(tmp_path / "out")
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(got["lm_head.weight"], _weights(tmp_path / "base")["lm_head.weight"])


def test_equals_peft_merge_and_unload_gpt2_fan_in_fan_out(tmp_path, run_cli):
    pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    from tests.conftest import tiny_gpt2_config

    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(tmp_path / "base")
    peft_adapter(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "ad", seed=7,
                 r=3, lora_alpha=5, fan_in_fan_out=True,
                 target_modules=["c_attn", "c_proj", "c_fc"])
    recipe = _recipe(tmp_path, "merge_method: linear\nmodels:\n  - model: base+ad\n")
    assert run_cli("merge", recipe, tmp_path / "out").code == 0
    expected = merged_with_peft(tmp_path / "base", tmp_path / "ad", GPT2LMHeadModel)
    got = _weights(tmp_path / "out")
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6, msg=name)


def test_recipe_forms_parse_to_model_plus_adapter(tmp_path):
    from modelalloy.recipe import parse_recipe

    text = """merge_method: linear
models:
  - model: m+a
  - model: {model: {path: m}, lora: {path: b}}
  - {model: m, adapter: c}
  - model: {model: m, adapter: d}
"""
    recipe = parse_recipe(text, base_dir=tmp_path)
    assert [e.model for e in recipe.models] == ["m+a", "m+b", "m+c", "m+d"]
    (tmp_path / "m").mkdir()
    (tmp_path / "a").mkdir()
    assert recipe.model_path("m+a") == (tmp_path / "m").resolve()
    assert recipe.adapter_path("m+a") == (tmp_path / "a").resolve()
    assert recipe.adapter_path("m") is None
    assert parse_recipe(recipe.to_yaml(), base_dir=tmp_path).models == recipe.models


def test_data_informed_method_on_adapted_model_is_one_line_error(tmp_path, base, run_cli):
    """Statistics belong to a model folder: an adapted model has none of its own."""
    write_adapter(tmp_path / "ad", _factors(1), r=2, alpha=4)
    recipe = _recipe(tmp_path, "merge_method: regmean\nmodels:\n  - model: base+ad\n"
                               "  - model: base\n")
    result = run_cli("merge", recipe, tmp_path / "out")
    assert result.code == 1 and "merge the adapter into its model first" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_bf16_model_rounds_once(tmp_path):
    """A bf16 model: W' = bf16(W + s·B·A), the sum formed in float32."""
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base16")
    factors = _factors(4)
    write_adapter(tmp_path / "ad", factors, r=2, alpha=6)
    stored = _weights(tmp_path / "base16")
    with open_model(tmp_path / "base16", tmp_path / "ad") as ckpt:
        for module, (a, b) in factors.items():
            name = module + ".weight"
            got = ckpt.get(name)
            assert got.dtype == torch.bfloat16
            want = (stored[name].float() + (b * 3.0) @ a).to(torch.bfloat16)
            assert torch.equal(got, want), name
