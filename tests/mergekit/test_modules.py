"""``modules:`` (mergekit's per-module recipes for models with several layer stacks) and Llava
in transformers 5's layout: tensors written under the names transformers 5 builds in memory
(as mergekit writes them), per-module slices and parameters, the config's per-module layer
counts. Expected values are worked out here from the stored input tensors."""

from __future__ import annotations

import json

import pytest
import torch

from modelalloy import merge
from modelalloy.errors import ModelAlloyError, RecipeError
from modelalloy.recipe import parse_recipe
from tests.mergekit.helpers import save_family, weights

TEXT, VISION = "model.language_model.layers", "model.vision_tower.encoder.layers"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("llava"), "llava", n_models=2, layers=2, seed=6)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("llama"), "llama", n_models=2, layers=4)


def _stored(name: str) -> str:
    """The on-disk (transformers 4) name of an in-memory Llava tensor name."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    return name[len("model."):]


def _merge(tmp_path, text):
    tmp_path.mkdir(exist_ok=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text + "dtype: float32\n")
    merge(recipe, tmp_path / "out")
    return tmp_path / "out", weights(tmp_path / "out")


def test_llava_linear_in_transformers5_names(tmp_path, llava):
    from transformers import LlavaForConditionalGeneration

    _, a, b = llava
    out, merged = _merge(tmp_path, f"merge_method: linear\nmodels:\n  - model: {a}\n"
                                   "    parameters: {weight: 0.6}\n"
                                   f"  - model: {b}\n    parameters: {{weight: 0.4}}\n")
    wa, wb = weights(a), weights(b)
    assert "lm_head.weight" in merged and f"{TEXT}.0.mlp.up_proj.weight" in merged
    assert len(merged) == len(wa)
    for name, value in merged.items():
        want = 0.6 * wa[_stored(name)] + 0.4 * wb[_stored(name)]
        torch.testing.assert_close(value, want, rtol=0, atol=1e-6, msg=name)
    model = LlavaForConditionalGeneration.from_pretrained(out)  # loads every tensor
    torch.testing.assert_close(model.lm_head.weight.detach(), merged["lm_head.weight"])


def test_llava_modules(tmp_path, llava):
    from transformers import LlavaForConditionalGeneration

    _, a, b = llava
    out, merged = _merge(tmp_path, f"""merge_method: linear
modules:
  {TEXT}:
    slices:
      - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]
      - sources: [{{model: {a}, layer_range: [1, 2]}}, {{model: {b}, layer_range: [1, 2]}}]
    parameters: {{weight: [0.2, 1]}}
  {VISION}:
    models:
      - {{model: {a}, parameters: {{weight: 0.3}}}}
      - {{model: {b}, parameters: {{weight: 0.7}}}}
  default:
    models: [{a}, {b}]
parameters: {{weight: 0.5}}
""")
    wa, wb = weights(a), weights(b)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3
    assert config["vision_config"]["num_hidden_layers"] == 2

    def linear(name, source, ta, tb):
        s = _stored(source)
        return (ta * wa[s] + tb * wb[s]) / (ta + tb)

    # text module: gradient [0.2, 1] over each slice (t = 0, 1 over slice 0; t = 1 for the
    # one-layer slice 1), the same weight for both models: their mean
    for layer, src in ((0, 0), (1, 1), (2, 1)):
        name = f"{TEXT}.{layer}.mlp.up_proj.weight"
        want = linear(name, f"{TEXT}.{src}.mlp.up_proj.weight", 1, 1)
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6, msg=name)
    # vision module: its models' own weights
    name = f"{VISION}.1.mlp.fc1.weight"
    torch.testing.assert_close(merged[name], linear(name, name, 0.3, 0.7), rtol=0, atol=1e-6)
    # default module (outside every stack): the top-level weight
    name = "model.multi_modal_projector.linear_1.weight"
    torch.testing.assert_close(merged[name], linear(name, name, 0.5, 0.5), rtol=0, atol=1e-6)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert len(model.model.language_model.layers) == 3


def test_default_module_is_the_only_stack(tmp_path, llama):
    """``modules: {default: ...}`` on a plain model is the same as ``slices:``."""
    _, a, b = llama
    slices = (f"    - sources: [{{model: {a}, layer_range: [0, 3]}}]\n"
              f"    - sources: [{{model: {b}, layer_range: [1, 4]}}]\n")
    _, as_modules = _merge(tmp_path / "m", "merge_method: passthrough\nmodules:\n  default:\n"
                                           "    slices:\n" + slices.replace("    -", "      -"))
    _, as_slices = _merge(tmp_path / "s", "merge_method: passthrough\nslices:\n" + slices)
    assert as_modules.keys() == as_slices.keys() and len(as_modules) == 6 * 9 + 3
    for name in as_slices:
        assert torch.equal(as_modules[name], as_slices[name]), name


def test_slices_on_a_vlm_name_modules(tmp_path, llava):
    _, a, _ = llava
    with pytest.raises(ModelAlloyError, match=r"several stacks .* need mergekit's `modules:`"):
        _merge(tmp_path, f"merge_method: passthrough\nslices:\n"
                         f"  - sources: [{{model: {a}, layer_range: [0, 1]}}]\n")


def test_layerless_module_takes_no_layer_range(tmp_path, llava):
    _, a, _ = llava
    with pytest.raises(ModelAlloyError, match=r"module 'model.multi_modal_projector' has no "
                                              r"layer stack"):
        _merge(tmp_path, f"merge_method: passthrough\nmodules:\n"
                         f"  model.multi_modal_projector:\n    slices:\n"
                         f"      - sources: [{{model: {a}, layer_range: [0, 1]}}]\n")


@pytest.mark.parametrize("modules,match", [
    ("  text: {}\n", r"modules\.text.*: give either `slices` or `models`"),
    ("  text: {models: [./a], slices: []}\n", r"give either `slices` or `models`"),
    ("  text: {models: [./a], weight: 1}\n", r"modules\.text\.weight.*unknown key"),
    ("  text: [./a]\n", r"modules\.text.*must be a mapping"),
])
def test_modules_errors(modules, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe("merge_method: linear\nmodules:\n" + modules)


def test_modules_round_trip():
    text = ("merge_method: linear\nmodules:\n  text:\n    slices:\n"
            "      - sources: [{model: ./a, layer_range: [0, 2]},\n"
            "                  {model: ./b, layer_range: [0, 2]}]\n"
            "    parameters: {weight: 0.5}\n  vision:\n    models: [./a, ./b]\n")
    recipe = parse_recipe(text)
    assert [sl.module for sl in recipe.slices] == ["text", "vision"]
    again = parse_recipe(recipe.to_yaml())
    assert again.slices == recipe.slices and again.modules == recipe.modules


def test_a_model_type_without_renaming_rules_never_imports_transformers(tmp_path, llama):
    """Importing transformers' conversion rules costs about 0.9 s and 70 MB per merge: a
    model type that has none (llama) is told from the rules' source text, without importing
    them; Llava, which has some, still reads under its in-memory names (the tests above)."""
    import subprocess
    import sys

    from modelalloy.io.layout import _may_have_rules
    from tests.conftest import subprocess_env

    assert _may_have_rules("llava") and _may_have_rules("mixtral")
    assert not _may_have_rules("llama") and not _may_have_rules("") and not _may_have_rules(3)
    _, a, b = llama
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: "
                      f"{{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
                      "dtype: float32\n")
    code = ("import sys\nfrom modelalloy import merge\n"
            f"merge({str(recipe)!r}, {str(tmp_path / 'out')!r})\n"
            "print(sorted(m for m in sys.modules if m.startswith('transformers')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
