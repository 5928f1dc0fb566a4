"""Adapters merged as adapters: equal to peft's add_weighted_adapter on the same adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelalloy.lora.combine import _generator, merge_adapters
from tests.lora.helpers import peft_adapter, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


@pytest.fixture
def adapters(tmp_path: Path):
    peft = pytest.importorskip("peft")
    tiny_llama().save_pretrained(tmp_path / "base")
    peft_adapter(tiny_llama(), tmp_path / "a1", seed=1, r=4, lora_alpha=8,
                 target_modules=TARGETS)
    peft_adapter(tiny_llama(), tmp_path / "a2", seed=2, r=4, lora_alpha=4, use_rslora=True,
                 target_modules=TARGETS[:3])
    peft_adapter(tiny_llama(), tmp_path / "a3", seed=3, r=2, lora_alpha=2,
                 target_modules=TARGETS)
    return peft, tmp_path


def _peft_merge(peft, root: Path, names: list[str], weights, kind: str, **kw):
    from transformers import LlamaForCausalLM

    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"),
                                           root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    model.add_weighted_adapter(names, weights, "merged", combination_type=kind, **kw)
    out = {}
    for key, value in model.state_dict().items():
        if ".merged" in key and "lora_" in key:
            out[key.replace(".merged", "").replace("base_model.model.", "", 1)] = value
    return out


def _ours(root: Path, names: list[str], weights, kind: str, **kw) -> dict[str, torch.Tensor]:
    out = root / f"ours-{kind}"
    merge_adapters([root / n for n in names], weights, out, kind, **kw)
    return {k.replace("base_model.model.", "", 1): v
            for k, v in load_file(str(out / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("kind,kw", [
    ("linear", {}), ("cat", {}), ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}),
])
def test_factor_rules_equal_peft(adapters, kind, kw):
    peft, root = adapters
    names, weights = ["a1", "a2"], [0.7, -0.4]
    expected = _peft_merge(peft, root, names, weights, kind, **kw)
    ours = _ours(root, names, weights, kind, density=kw.get("density", 1.0),
                 sign_method=kw.get("majority_sign_method", "total"))
    assert set(ours) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("kind", ["svd", "ties_svd", "magnitude_prune_svd"])
def test_svd_rules_equal_peft(adapters, kind):
    """Singular vectors are unique up to sign: compare the products B·A."""
    peft, root = adapters
    names, weights = ["a1", "a3"], [0.5, 1.5]
    expected = _peft_merge(peft, root, names, weights, kind, density=0.5, svd_rank=3)
    ours = _ours(root, names, weights, kind, density=0.5, svd_rank=3)
    for key in [k for k in expected if "_A" in k]:
        b_key = key.replace("_A", "_B")
        torch.testing.assert_close(ours[b_key] @ ours[key], expected[b_key] @ expected[key],
                                   rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_given_the_same_masks(adapters, kind, monkeypatch):
    """peft draws DARE masks from torch's global generator: hand it ours (found by the factor
    it prunes) and let it do the rest of the merge."""
    peft, root = adapters
    names, weights = ["a1", "a2"], [1.0, 0.5]
    ours = _ours(root, names, weights, kind, density=0.6, seed=11)
    owner = {}
    for i, name in enumerate(names):
        for key, t in load_file(str(root / name / "adapter_model.safetensors")).items():
            if ".lora_" in key:
                module, factor = key.removeprefix("base_model.model.").split(".lora_")
                factor = factor.removeprefix("embedding_")[0]
                owner[t.numpy().tobytes()] = (module, factor, i)
    used = []

    def random_pruning(tensor, density, rescale):
        module, factor, i = owner[tensor.detach().numpy().tobytes()]
        used.append(module)
        mask = torch.bernoulli(torch.full_like(tensor, density),
                               generator=_generator(11, module, factor, i))
        return tensor * mask / density if rescale else tensor * mask

    monkeypatch.setattr(peft.utils.merge_utils, "random_pruning", random_pruning)
    expected = _peft_merge(peft, root, names, weights, kind, density=0.6)
    assert used
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_mixed_ranks_refused_for_factor_rules(adapters):
    from modelalloy.errors import AdapterError

    _, root = adapters
    with pytest.raises(AdapterError, match="one rank"):
        merge_adapters([root / "a1", root / "a3"], [1, 1], root / "x", "ties")
    assert not (root / "x").exists()


def test_cli_merge_adapters_cat_is_the_exact_sum(adapters, run_cli):
    """cat keeps Σ w_i s_i B_i A_i exactly: applying it equals applying both adapters."""
    from modelalloy.lora import open_model

    _, root = adapters
    result = run_cli("merge-adapters", f"{root / 'a1'}:0.5", f"{root / 'a3'}:2",
                     "--combination", "cat", "--out", root / "cat")
    assert result.code == 0, result.err
    base = load_file(str(root / "base" / "model.safetensors"))
    with open_model(root / "base", root / "cat") as merged, \
            open_model(root / "base", root / "a1") as one, \
            open_model(root / "base", root / "a3") as three:
        for name in merged.adapter.terms:
            want = base[name] + 0.5 * (one.get(name) - base[name]) \
                + 2 * (three.get(name) - base[name])
            torch.testing.assert_close(merged.get(name), want, rtol=1e-5, atol=1e-5)
    bad = run_cli("merge-adapters", root / "a1", root / "a3", "--combination", "ties",
                  "--out", root / "t")
    assert bad.code == 1 and "one rank" in bad.err


def test_merge_as_adapter_from_a_recipe(adapters, run_cli):
    """`merge --as-adapter`: task_arithmetic of base+adapter models is peft's linear with
    weights λ·w_i (on the factors: cross terms B_i·A_j included, as in peft)."""
    _, root = adapters
    (root / "ta.yaml").write_text(
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
        "  - model: base+a1\n    parameters: {weight: 0.5}\n"
        "  - model: base+a2\n    parameters: {weight: 0.25}\nparameters: {lambda: 2.0}\n")
    result = run_cli("merge", root / "ta.yaml", root / "ta-lora", "--as-adapter")
    assert result.code == 0, result.err
    expected = _peft_merge(adapters[0], root, ["a1", "a2"], [1.0, 0.5], "linear")
    ours = {k.replace("base_model.model.", "", 1): v for k, v in
            load_file(str(root / "ta-lora" / "adapter_model.safetensors")).items()}
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
    (root / "mixed.yaml").write_text(
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: base+a1\n"
        "  - model: expert\nparameters: {density: 0.5}\n")
    (root / "expert").mkdir()
    bad = run_cli("merge", root / "mixed.yaml", root / "x", "--as-adapter")
    assert bad.code == 1 and "not an adapter" in bad.err


@pytest.mark.parametrize("kind,clamp", [("svd", 0.9), ("ties_svd", 0.75)])
def test_svd_clamp_equals_peft(adapters, kind, clamp):
    """peft's svd_clamp clips B = U_kΣ_k and A = V_kᵀ at ±(the clamp-quantile of their values).
    The quantile is not sign-invariant, so the factors themselves are compared (both run the
    same CPU SVD on the same Δ), with the clipping checked to have bitten."""
    peft, root = adapters
    names, weights = ["a1", "a3"], [0.5, 1.5]
    expected = _peft_merge(peft, root, names, weights, kind, density=0.5, svd_rank=3,
                           svd_clamp=clamp)
    plain = _peft_merge(peft, root, names, weights, kind, density=0.5, svd_rank=3)
    ours = _ours(root, names, weights, kind, density=0.5, svd_rank=3, svd_clamp=clamp)
    assert set(ours) == set(expected)
    bitten = 0
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=key)
        bitten += int(not torch.equal(value, plain[key]))
    assert bitten


def test_svd_options_are_refused_where_they_do_not_apply(adapters, run_cli):
    _, root = adapters
    bad = run_cli("merge-adapters", root / "a1", root / "a2", "--combination", "linear",
                  "--svd-clamp", "0.9", "--out", root / "x")
    assert bad.code == 1 and "svd combinations" in bad.err and len(bad.err.splitlines()) == 1
    bad = run_cli("merge-adapters", root / "a1", root / "a2", "--combination", "svd",
                  "--svd-clamp", "1.5", "--out", root / "x")
    assert bad.code == 1 and "(0, 1]" in bad.err
    bad = run_cli("merge-adapters", root / "a1", root / "a2", "--combination", "svd",
                  "--svd-driver", "gesvdj", "--out", root / "x")
    assert bad.code == 1 and "gesdd" in bad.err and "CUDA" in bad.err
    assert not (root / "x").exists()
    good = run_cli("merge-adapters", root / "a1", root / "a2", "--combination", "svd",
                   "--out", root / "x")
    assert good.code == 0 and "LAPACK gesdd on the CPU" in good.out


def test_merge_detects_a_recipe_of_adapters(adapters, run_cli):
    """No flag: a recipe of base+adapter models of one base writes the adapter (peft's result)
    and says so in one line; --no-as-adapter, a mixed recipe and a method without an adapter
    form merge full models (one base+adapter alone is baked: tests/lora/test_apply.py)."""
    peft, root = adapters
    (root / "lin.yaml").write_text(
        "merge_method: linear\nmodels:\n"
        "  - model: base+a1\n    parameters: {weight: 3.0}\n"
        "  - model: base+a2\n    parameters: {weight: 1.0}\n")
    result = run_cli("merge", root / "lin.yaml", root / "auto")
    assert result.code == 0, result.err
    assert "every model is a LoRA adapter of one base" in result.err
    assert len(result.err.strip().splitlines()) == 1
    expected = _peft_merge(peft, root, ["a1", "a2"], [0.75, 0.25], "linear")
    ours = {k.replace("base_model.model.", "", 1): v for k, v in
            load_file(str(root / "auto" / "adapter_model.safetensors")).items()}
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert not (root / "auto" / "config.json").exists()

    full = run_cli("merge", root / "lin.yaml", root / "full", "--no-as-adapter")
    assert full.code == 0, full.err
    assert (root / "full" / "config.json").exists()
    assert not (root / "full" / "adapter_config.json").exists()

    (root / "mixed.yaml").write_text(
        "merge_method: linear\nmodels:\n  - model: base+a1\n  - model: base\n")
    mixed = run_cli("merge", root / "mixed.yaml", root / "mixed")
    assert mixed.code == 0, mixed.err
    assert "LoRA adapter" not in mixed.err  # nothing changes, nothing said
    assert (root / "mixed" / "config.json").exists()

    (root / "karcher.yaml").write_text(
        "merge_method: karcher\nmodels:\n  - model: base+a1\n  - model: base+a2\n")
    karcher = run_cli("merge", root / "karcher.yaml", root / "karcher")
    assert karcher.code == 0, karcher.err
    assert "but merge_method 'karcher' has no adapter form" in karcher.err
    assert (root / "karcher" / "config.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="svd drivers are CUDA's")
@pytest.mark.parametrize("driver", ["gesvd", "gesvdj", "gesvda"])
def test_svd_drivers_on_cuda_give_the_cpu_product(adapters, driver):
    _, root = adapters
    names, weights = ["a1", "a3"], [0.5, 1.5]
    cpu = _ours(root, names, weights, "svd", svd_rank=3)
    gpu = _ours(root, names, weights, "svd", svd_rank=3, svd_driver=driver, device="cuda")
    for key in [k for k in cpu if "_A" in k]:
        b_key = key.replace("_A", "_B")
        torch.testing.assert_close(gpu[b_key] @ gpu[key], cpu[b_key] @ cpu[key],
                                   rtol=1e-3, atol=1e-4, msg=key)
