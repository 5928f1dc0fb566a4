"""The whole path: recipe -> plan -> engine -> HF folder, checked against hand computation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelalloy import merge
from tests.conftest import save_gpt2_family, write_recipe


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder, read with the safetensors library (not our reader)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.glob("*.safetensors"))}


def test_linear_merge_is_the_average_and_loads_in_transformers(gpt2_family, tmp_path):
    from transformers import GPT2LMHeadModel

    base, experts = gpt2_family
    recipe = write_recipe(tmp_path / "r.yaml",
                          "merge_method: linear\nmodels:\n"
                          f"  - model: {experts[0]}\n    parameters: {{weight: 3}}\n"
                          f"  - model: {experts[1]}\n    parameters: {{weight: 1}}\n")
    result = merge(recipe, tmp_path / "out")
    a, b, m = load_folder(experts[0]), load_folder(experts[1]), load_folder(result.path)
    assert set(m) == set(a)
    for name in a:
        torch.testing.assert_close(m[name], (3 * a[name] + b[name]) / 4, rtol=0, atol=1e-6)
    model = GPT2LMHeadModel.from_pretrained(result.path)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
    card = (result.path / "README.md").read_text()
    assert "modelalloy" in card and "merge" in card
    assert (result.path / "config.json").exists()


def test_task_arithmetic_matches_hand_computation(gpt2_family, tmp_path):
    base, experts = gpt2_family
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: task_arithmetic\nbase_model: {base}\n"
                          "parameters: {lambda: 0.5}\nmodels:\n"
                          + "".join(f"  - model: {e}\n" for e in experts))
    out = merge(recipe, tmp_path / "out").path
    b, m = load_folder(base), load_folder(out)
    ex = [load_folder(e) for e in experts]
    for name, t0 in b.items():
        want = t0 + 0.5 * sum(e[name] - t0 for e in ex)
        torch.testing.assert_close(m[name], want, rtol=0, atol=1e-6)


def test_sharded_and_unsharded_inputs_give_identical_output(tmp_path):
    one = save_gpt2_family(tmp_path / "one")
    many = save_gpt2_family(tmp_path / "many", max_shard_size="40KB")
    assert len(list(many[0].glob("*.safetensors"))) > 1
    outs = []
    for (base, experts), tag in ((one, "one"), (many, "many")):
        recipe = write_recipe(tmp_path / f"{tag}.yaml",
                              f"merge_method: ties\nbase_model: {base}\n"
                              "parameters: {density: 0.3}\nmodels:\n"
                              + "".join(f"  - model: {e}\n" for e in experts))
        outs.append(merge(recipe, tmp_path / f"out-{tag}").path)
    a, b = load_folder(outs[0]), load_folder(outs[1])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_output_is_bit_identical_across_thread_counts(gpt2_family, tmp_path):
    base, experts = gpt2_family
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: dare_ties\nbase_model: {base}\nseed: 11\n"
                          "parameters: {density: 0.5}\nmodels:\n"
                          + "".join(f"  - model: {e}\n" for e in experts))
    d1 = digest(merge(recipe, tmp_path / "t1", threads=1, shard_size="30KB").path)
    d4 = digest(merge(recipe, tmp_path / "t4", threads=4, shard_size="30KB").path)
    assert len(d1) > 1 and d1 == d4
    d_other_seed = digest(merge(recipe, tmp_path / "s", threads=2, seed=12,
                                shard_size="30KB").path)
    assert d_other_seed != d1


def test_sharded_output_has_an_index_and_loads(gpt2_family, tmp_path):
    from transformers import GPT2LMHeadModel

    base, experts = gpt2_family
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: slerp\nbase_model: {base}\n"
                          f"parameters: {{t: 0.3}}\nmodels:\n  - model: {experts[0]}\n")
    out = merge(recipe, tmp_path / "out", shard_size="50KB").path
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_folder(base))
    GPT2LMHeadModel.from_pretrained(out)


def test_out_dtype_is_applied(gpt2_family, tmp_path):
    base, experts = gpt2_family
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: task_arithmetic\nbase_model: {base}\n"
                          "out_dtype: bfloat16\nmodels:\n"
                          + "".join(f"  - model: {e}\n" for e in experts))
    out = merge(recipe, tmp_path / "out").path
    tensors = load_folder(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
    config = json.loads((out / "config.json").read_text())
    assert "bfloat16" in (config.get("torch_dtype"), config.get("dtype"))


@pytest.mark.parametrize("cli_threads", ["1", "3"])
def test_cli_merge_and_plan(gpt2_family, tmp_path, run_cli, cli_threads):
    base, experts = gpt2_family
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: ties\nbase_model: {base}\n"
                          "parameters: {density: 0.5}\nmodels:\n"
                          + "".join(f"  - model: {e}\n" for e in experts))
    planned = run_cli("plan", recipe)
    assert planned.code == 0, planned.err
    assert "no problems" in planned.out and "estimated peak memory" in planned.out
    merged = run_cli("merge", recipe, tmp_path / "out", "--threads", cli_threads)
    assert merged.code == 0, merged.err
    assert "merged" in merged.out and (tmp_path / "out" / "model.safetensors").exists()


def test_methods_command_lists_parameters(run_cli):
    listed = run_cli("methods")
    assert listed.code == 0
    for name in ("linear", "task_arithmetic", "ties", "dare_ties", "slerp", "breadcrumbs",
                 "model_stock", "della"):
        assert name in listed.out
    assert "density" in listed.out


def test_plan_reports_every_problem_and_fails(gpt2_family, tmp_path, run_cli):
    from safetensors.torch import save_file

    base, experts = gpt2_family
    f = experts[1] / "model.safetensors"
    tensors = load_file(f)
    names = sorted(n for n, t in tensors.items() if t.ndim == 2)
    tensors[names[0]] = tensors[names[0]][:-1].clone()
    del tensors[names[1]]
    save_file(tensors, f, metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                          + "".join(f"  - model: {e}\n" for e in experts))
    planned = run_cli("plan", recipe)
    assert planned.code == 1
    assert names[0] in planned.err and names[1] in planned.err


def _slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation written out from the formula (mergekit's DOT_THRESHOLD 0.9995)."""
    a, b = v0.double(), v1.double()
    dot = float((a / a.norm() * (b / b.norm())).sum())
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * b).float()
    omega = torch.arccos(torch.tensor(dot, dtype=torch.float64))
    s0 = torch.sin((1 - t) * omega) / torch.sin(omega)
    s1 = torch.sin(t * omega) / torch.sin(omega)
    return (s0 * a + s1 * b).float()


def test_llama_slerp_with_filtered_gradients(tmp_path):
    """A mergekit-style SLERP recipe on a tiny Llama: t varies per layer and per module."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "a")
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "b")
    recipe = write_recipe(tmp_path / "r.yaml", f"""
merge_method: slerp
base_model: {tmp_path / 'a'}
models:
  - model: {tmp_path / 'a'}
  - model: {tmp_path / 'b'}
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - filter: mlp
      value: [1, 0]
    - value: 0.5
dtype: float32
""")
    out = merge(recipe, tmp_path / "out").path
    a, b, m = load_folder(tmp_path / "a"), load_folder(tmp_path / "b"), load_folder(out)
    # Layer positions 0, 0.5, 1 over 3 layers: attention t = 0, 0.5, 1; MLP the reverse.
    for layer, pos in enumerate((0.0, 0.5, 1.0)):
        q = f"model.layers.{layer}.self_attn.q_proj.weight"
        up = f"model.layers.{layer}.mlp.up_proj.weight"
        torch.testing.assert_close(m[q], _slerp(a[q], b[q], pos), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m[up], _slerp(a[up], b[up], 1 - pos), rtol=1e-5, atol=1e-6)
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(m[emb], _slerp(a[emb], b[emb], 0.5), rtol=1e-5, atol=1e-6)
    assert torch.equal(m["model.layers.0.self_attn.q_proj.weight"],
                       a["model.layers.0.self_attn.q_proj.weight"])
    tf.LlamaForCausalLM.from_pretrained(out)(torch.tensor([[1, 2, 3]]))
