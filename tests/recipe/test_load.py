"""Loading and validation: the happy paths and every error, each a one-line message."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from modelalloy.errors import MethodError, ModelAlloyError, RecipeError
from modelalloy.recipe import (
    Conditional,
    Recipe,
    RecipeWarning,
    load_recipe,
    parse_recipe,
    resolve_tensor_params,
)

MINIMAL = """
merge_method: _test_ties
base_model: ./base
models:
  - model: ./a
    parameters: {weight: 0.5, density: 0.5}
  - model: ./b
    parameters: {weight: 0.5, density: 0.5}
"""


def fails(text: str, match: str, err: type[ModelAlloyError] = RecipeError) -> str:
    """The error's one-line message; ``match`` is searched with the ``(line N)`` tags removed."""
    with pytest.raises(err) as info:
        parse_recipe(text, source="r.yaml")
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith("r.yaml: "), msg
    assert re.search(match, re.sub(r" \(line \d+\)", "", msg)), msg
    return msg


# -- happy paths ----------------------------------------------------------------------------


def test_minimal_recipe_defaults():
    r = parse_recipe(MINIMAL)
    assert isinstance(r, Recipe)
    assert r.source == "<string>" and r.base_dir == Path.cwd()
    assert r.seed == 0 and r.name is None and r.dtype is None and r.tokenizer_source is None
    assert r.parameters == {} and r.warnings == []
    assert r.models[0].parameters == {"weight": 0.5, "density": 0.5}


def test_additions_and_dtype_spellings():
    r = parse_recipe(MINIMAL + "seed: 42\nname: my-merge\ndtype: torch.bfloat16\n"
                                "out_dtype: fp16\n")
    assert (r.seed, r.name, r.dtype, r.out_dtype) == (42, "my-merge", "bfloat16", "float16")
    assert r.output_dtype == "float16"


def test_to_yaml_round_trips():
    text = """
name: demo
merge_method: _test_ties
base_model: ./base
models:
  - model: ./a
    parameters:
      weight: [{filter: mlp, value: [0, 0.5, 1]}, {value: 0.3}]
      density: 1e-1
  - model: ./b
parameters: {normalize: false, lambda: 2}
dtype: bfloat16
tokenizer_source: base
seed: 7
"""
    r = parse_recipe(text)
    assert r.models[0].parameters["density"] == 0.1  # YAML reads 1e-1 as a string
    y = r.to_yaml()
    assert "density: 0.1" in y and "weight:" in y and "[0.0, 0.5, 1.0]" in y
    again = parse_recipe(y)
    assert again.model_dump(exclude={"warnings"}) == r.model_dump(exclude={"warnings"})
    assert y.index("name") < y.index("merge_method") < y.index("models") < y.index("seed")
    assert parse_recipe(again.to_yaml()).to_yaml() == y


def test_lone_conditional_mapping_is_a_one_entry_list():
    r = parse_recipe(MINIMAL.replace("weight: 0.5, density", "weight: {filter: mlp, value: 2},"
                                                          " density"))
    assert r.models[0].parameters["weight"] == [Conditional(filter="mlp", value=2.0)]


def test_load_recipe_resolves_models_next_to_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    for m in ("base", "a", "b"):
        (folder / m).mkdir()
    (tmp_path / "elsewhere").mkdir()
    f = folder / "merge.yml"
    f.write_text(MINIMAL.replace("- model: ./b", "- model: ../elsewhere"))
    monkeypatch.chdir(tmp_path)
    r = load_recipe(f)
    assert r.source == str(f) and r.base_dir == folder.resolve()
    assert r.model_path("./a") == (folder / "a").resolve()
    assert r.model_path("../elsewhere") == (tmp_path / "elsewhere").resolve()
    r.check_paths()
    # falls back to the current directory
    (tmp_path / "only_in_cwd").mkdir()
    assert r.model_path("only_in_cwd") == (tmp_path / "only_in_cwd").resolve()
    assert r.model_path(str(folder / "a")) == (folder / "a").resolve()


def test_model_path_errors(tmp_path):
    r = parse_recipe(MINIMAL, base_dir=tmp_path)
    with pytest.raises(RecipeError, match="never downloads.*local folder") as info:
        r.model_path("mistralai/Mistral-7B-v0.1")
    assert "huggingface-cli download mistralai/Mistral-7B-v0.1" in str(info.value)
    with pytest.raises(RecipeError, match="model folder './nope' not found"):
        r.model_path("./nope")
    with pytest.raises(RecipeError, match="model folder './base' not found"):
        r.check_paths()


def test_tokenizer_source_variants(tmp_path):
    (tmp_path / "base").mkdir()
    r = parse_recipe(MINIMAL + "tokenizer_source: base\n", base_dir=tmp_path)
    assert r.tokenizer_source == "base" and r.tokenizer_path() == (tmp_path / "base").resolve()
    r = parse_recipe(MINIMAL + "tokenizer_source: ./base\n", base_dir=tmp_path)
    assert r.tokenizer_source == "./base"
    r = parse_recipe(MINIMAL + "tokenizer:\n  source: base\n")
    assert r.tokenizer_source == "base"
    assert parse_recipe(MINIMAL + "tokenizer_source: union\n").tokenizer_path() is None
    # a block without `source` is a union (mergekit's default)
    assert parse_recipe(MINIMAL + "tokenizer:\n  pad_to_multiple_of: 8\n").tokenizer_source \
        == "union"
    assert parse_recipe(MINIMAL).tokenizer_path() is None


def test_chat_template_is_kept_and_checked():
    # supported since the mergekit-compatibility work (tests/mergekit/test_chat_template.py)
    r = parse_recipe(MINIMAL + "chat_template: chatml\n")
    assert not r.warnings and r.chat_template == "chatml" and "chat_template: chatml" in r.to_yaml()
    fails(MINIMAL + "chat_template: chatmlx\n", r"chat_template: must be auto, a built-in name")


def test_bare_model_strings_and_null_parameters():
    r = parse_recipe("merge_method: _test_linear\nmodels: [./a, {model: ./b, parameters: }]\n"
                     "parameters:\n")
    assert [e.model for e in r.models] == ["./a", "./b"] and r.parameters == {}


def test_mergekit_structured_model_reference():
    r = parse_recipe("merge_method: _test_linear\nmodels:\n  - model: {model: {path: ./a}}\n"
                     "  - model: ./b\n")
    assert r.models[0].model == "./a"


def test_base_model_for_a_method_without_base_is_ignored_with_a_warning():
    with pytest.warns(RecipeWarning, match=r"base_model \(line 2\): ignored"):
        r = parse_recipe("merge_method: _test_linear\nbase_model: ./c\n"
                         "models: [{model: ./a}, {model: ./b}]\n")
    assert len(r.expert_entries()) == 2 and not r.uses_base()
    # listed among the models, it is simply merged like the others (no warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = parse_recipe("merge_method: _test_linear\nbase_model: ./a\n"
                         "models: [{model: ./a}, {model: ./b}]\n")
    assert len(r.expert_entries()) == 2


def test_negative_weights_need_an_opt_in():
    # _test_ties declares no lower bound on weight, like task_arithmetic (task negation).
    # With the paper conventions a negative weight takes an opt-in; mergekit's accept it.
    text = MINIMAL.replace("weight: 0.5, density: 0.5}\n  - model: ./b",
                           "weight: -0.5, density: 0.5}\n  - model: ./b") \
        + "conventions: paper\n"
    fails(text, r"models\[0\]\.parameters\.weight: negative weight -0\.5.*"
                r"add `allow_negative_weights: true`")
    fails(MINIMAL + "conventions: paper\nparameters:\n  weight: [{filter: mlp, value: [1, -2]}]\n",
          r"parameters\.weight\[0\]\.value\[1\]: negative weight -2")
    with pytest.warns(RecipeWarning, match=r"models\[0\]\.parameters\.weight \(line 6\): "
                                           r"negative weight"):
        r = parse_recipe(text + "allow_negative_weights: true\n")
    assert resolve_tensor_params(r, "w", None, None)["weight"] == [-0.5, 0.5]
    assert "allow_negative_weights: true" in r.to_yaml()
    # A method whose schema bounds weight (ge=0, like ties) rejects it even with the opt-in.
    fails("merge_method: _test_bounded\nallow_negative_weights: true\nmodels:\n"
          "  - model: ./a\n    parameters:\n      weight: [{filter: mlp, value: [0.5, -0.1]}]\n",
          r"models\[0\]\.parameters\.weight\[0\]\.value\[1\]: parameter 'weight' = -0\.1 is "
          r"out of range; it must be >= 0", MethodError)


# -- errors -----------------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_line():
    msg = fails("merge_method: _test_ties\nmodels:\n  - model: ./a\n   bad: [\n", "YAML syntax")
    assert "line 4" in msg or "line 5" in msg


def test_duplicate_yaml_key():
    fails(MINIMAL + "merge_method: _test_linear\n", r"line \d+.*'merge_method' is given twice")


def test_not_a_mapping_and_empty():
    fails("", "empty")
    fails("- a\n- b\n", "must be a YAML mapping")


def test_unknown_top_level_key_suggests_the_closest():
    fails(MINIMAL + "merge_methd: x\n", r"merge_methd: unknown key; did you mean 'merge_method'")
    fails(MINIMAL + "out_type: float16\n", "did you mean 'out_dtype'")
    fails(MINIMAL + "zzzz: 1\n", "valid keys: merge_method, base_model")


@pytest.mark.parametrize("text,match", [
    ("models: [{model: ./a}]\n", r"merge_method: missing"),
    ("merge_method: _test_linear\n", r"models: missing"),
    ("merge_method: _test_linear\nmodels: []\n", r"models: must be a non-empty list"),
    ("merge_method: _test_linear\nmodels: ./a\n", r"models: must be a non-empty list"),
    ("merge_method: [a]\nmodels: [./a]\n", r"merge_method: must be a method name"),
    ("merge_method: _test_linear\nmodels: [{path: ./a}]\n", r"models\[0\]\.path: unknown key"),
    ("merge_method: _test_linear\nmodels: [{parameters: {}}]\n", r"models\[0\]\.model: missing"),
    ("merge_method: _test_linear\nmodels: [3]\n", r"models\[0\]: must be a mapping"),
    ("merge_method: _test_linear\nmodels: [{model: 3}]\n", r"models\[0\]\.model: must be the path"),
])
def test_missing_or_malformed_fields(text, match):
    fails(text, match)


def test_unknown_method_lists_the_available_ones():
    msg = fails("merge_method: tiez\nmodels: [./a]\n", "unknown merge method 'tiez'", MethodError)
    assert "merge_method" in msg and "_test_ties" in msg


def test_unknown_parameter_lists_the_methods_parameters():
    msg = fails(MINIMAL.replace("density: 0.5}\n  - model: ./b", "densty: 0.5}\n  - model: ./b"),
                r"models\[0\]\.parameters\.densty: method '_test_ties' has no parameter",
                MethodError)
    assert "weight, density, normalize, lambda" in msg
    fails(MINIMAL + "parameters: {tt_scale: 0.5}\n",
          r"parameters\.tt_scale: method '_test_ties' has no", MethodError)
    # a parameter another method takes (slerp's t): mergekit accepts it, so a warning
    with pytest.warns(RecipeWarning, match=r"parameters\.t \(line \d+\): ignored: method "
                                           r"'_test_ties' does not use 't'"):
        parse_recipe(MINIMAL + "parameters: {t: 0.5}\n")


def test_global_parameter_set_per_model():
    # mergekit reads a global parameter from the top level only: set per model it is ignored
    with pytest.warns(RecipeWarning, match=r"models\[0\]\.parameters\.normalize \(line 6\): "
                                           r"ignored: 'normalize' is a global parameter"):
        r = parse_recipe(MINIMAL.replace("{weight: 0.5, density: 0.5}\n  - model: ./b",
                                         "{normalize: true}\n  - model: ./b"))
    assert "normalize" not in r.models[0].parameters


@pytest.mark.parametrize("setting,match", [
    ("density: 1.5", r"parameters\.density: parameter 'density' = 1\.5 is out of range"),
    ("density: 0", r"parameters\.density.*must be > 0"),
    ("density: [1, 0.5, 1.2]", r"parameters\.density\[2\]: .*out of range"),
    ("density: [{filter: mlp, value: [0.5, 2]}]",
     r"parameters\.density\[0\]\.value\[1\]: .*out of range"),
    ("density: {filter: mlp, value: -1}", r"parameters\.density\.value: .*out of range"),
    ("density: .nan", r"parameters\.density: .*must be finite"),
    ("weight: .inf", r"parameters\.weight: .*must be finite"),
    ("density: abc", r"parameters\.density: parameter 'density' must be a number"),
    ("density: [0.5, abc]", r"parameters\.density\[1\]: .*must be a number"),
    ("density: [0.5, true]", r"parameters\.density\[1\]: .*must be a number"),
    ("normalize: 3", r"parameters\.normalize: parameter 'normalize' must be true or false"),
    ("normalize: [true, 0.5]", r"parameters\.normalize\[1\]: .*must be true or false"),
    ("lambda: -1", r"parameters\.lambda: .*must be >= 0"),
])
def test_out_of_range_and_wrong_type_values(setting, match):
    fails(MINIMAL + f"parameters:\n  {setting}\n", match, MethodError)


def test_int_and_choice_parameters():
    base = "merge_method: _test_opt\nmodels: [./a]\nparameters:\n  "
    fails(base + "k: 2.5\n", r"parameters\.k: parameter 'k' must be a whole number", MethodError)
    fails(base + "k: 0\n", r"parameters\.k: .*must be >= 1", MethodError)
    fails(base + "mode: max\n", r"parameters\.mode: .* is not one of sum, mean", MethodError)
    fails(base + "mode: [sum, max]\n", r"parameters\.mode\[1\]: .*not one of", MethodError)
    assert parse_recipe(base + "k: 2.0\n").parameters["k"] == 2


@pytest.mark.parametrize("setting,match", [
    ("density: []", r"parameters\.density: empty list"),
    ("density: [[0.5, 1]]", r"parameters\.density: a list must be either a gradient"),
    ("density: [0.5, {filter: mlp, value: 1}]", r"parameters\.density: a list must be either"),
    ("density: [{filter: mlp}]", r"parameters\.density\[0\]: conditional entry without `value`"),
    ("density: [{filtr: mlp, value: 1}]", r"density\[0\]\.filtr: unknown key.*'filter'"),
    ("density: [{filter: 3, value: 1}]", r"density\[0\]\.filter: must be a string"),
    ("density: [{value: [{value: 1}]}]", r"density\[0\]\.value: .*do not nest"),
    ("density: [{value: {value: 1}}]", r"density\[0\]\.value: .*do not nest"),
    ("density: [{value: []}]", r"density\[0\]\.value: .*do not nest"),
    ("density:", r"parameters\.density: no value given"),
])
def test_malformed_settings(setting, match):
    fails(MINIMAL + f"parameters:\n  {setting}\n", match)


def test_method_needing_a_base_without_one():
    fails(MINIMAL.replace("base_model: ./base\n", ""), r"models: method '_test_ties' needs a "
                                                        "base model", MethodError)


def test_wrong_model_count():
    fails("merge_method: _test_slerp\nbase_model: ./base\nmodels: [./base, ./a, ./b]\n",
          r"models: method '_test_slerp' takes exactly 1 models besides the base, got 2",
          MethodError)
    fails("merge_method: _test_linear\nmodels: [./a]\n", r"takes at least 2 models, got 1",
          MethodError)
    fails("merge_method: _test_ties\nbase_model: ./a\nmodels: [./a]\n", r"got 0", MethodError)
    # the count is checked before duplicates: the method's own error names the method
    fails("merge_method: _test_slerp\nbase_model: ./base\nmodels: [./a, ./a]\n",
          r"'_test_slerp' takes exactly 1 models besides the base, got 2", MethodError)


def test_duplicate_models():
    fails("merge_method: _test_linear\nmodels: [./a, ./b, a]\n",
          r"models\[2\]\.model: 'a' is already listed as models\[0\]")


@pytest.mark.parametrize("extra,match", [
    ("dtype: float8\n", r"dtype: unknown dtype 'float8'; use one of float32"),
    ("out_dtype: 16\n", r"out_dtype: unknown dtype 16"),
    ("seed: -1\n", r"seed: must be an integer"),
    ("seed: 1.5\n", r"seed: must be an integer"),
    ("seed: true\n", r"seed: must be an integer"),
    ("name: [a]\n", r"name: must be a string"),
    ("allow_negative_weights: 1\n", r"allow_negative_weights: must be true or false"),
])
def test_bad_scalars(extra, match):
    fails(MINIMAL + extra, match)


@pytest.mark.parametrize("extra,match", [
    ("tokenizer:\n  source: base\n  pad_to_multiple_of: 6.5\n",
     r"tokenizer\.pad_to_multiple_of: must be a positive integer"),
    ("tokenizer: base\n", r"tokenizer: must be a mapping"),
    ("tokenizer_source: base\ntokenizer: {source: base}\n", r"tokenizer: give either"),
    ("tokenizer_source: [a]\n", r"tokenizer_source: must be the path"),
])
def test_tokenizer_errors(extra, match):
    fails(MINIMAL + extra, match)


def test_tokenizer_base_needs_base_model():
    fails("merge_method: _test_linear\nmodels: [./a, ./b]\ntokenizer_source: base\n",
          r"tokenizer_source: 'base' needs `base_model`")


@pytest.mark.parametrize("text,match", [
    ("merge_method: _test_linear\nslices:\n  - sources: []\n",
     r"slices\[0\]\.sources: must be a non-empty list"),  # slices are supported (test_slices)
    ("merge_method: _test_linear\nmodules: {}\n", r"modules: must be a mapping of module"),
    ("merge_method: _test_linear\nmodels:\n  - model: ./a\n    layer_range: [0, 4]\n"
     "  - model: ./b\n",
     r"models\[0\]\.layer_range: layer ranges are not supported yet"),
    ("merge_method: _test_linear\nmodels: [org/m@main, ./b]\n",
     r"models\[0\]\.model: 'org/m@main': '@revision' is not supported"),
])
def test_not_supported_yet(text, match):
    fails(text, match)


def test_plus_in_an_existing_folder_name_is_fine(tmp_path):
    (tmp_path / "a+b").mkdir()
    r = parse_recipe("merge_method: _test_linear\nmodels: [a+b, ./c]\n", base_dir=tmp_path)
    assert r.model_path("a+b") == (tmp_path / "a+b").resolve()


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yml")
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: _test_linear\nmodels: [./a, ./b]\nbogus: 1\n")
    with pytest.raises(RecipeError, match=rf"^{bad}: bogus \(line 3\): unknown key"):
        load_recipe(bad)


def test_yaml_anchors_and_merge_keys():
    r = parse_recipe("""
merge_method: _test_ties
base_model: ./base
models:
  - model: ./a
    parameters: &p {weight: 0.5, density: 0.7}
  - model: ./b
    parameters:
      <<: *p
      weight: 0.25
""")
    assert r.models[1].parameters == {"density": 0.7, "weight": 0.25}


def test_recipe_from_dict_validates_like_yaml():
    from modelalloy.recipe import recipe_from_dict

    data = {"merge_method": "_test_linear", "models": ["./a", {"model": "./b"}],
            "parameters": {"weight": [0, 1]}}
    r = recipe_from_dict(data)
    assert r.source == "<dict>" and data["models"][0] == "./a"  # input left untouched
    assert resolve_tensor_params(r, "layers.1.w", 1, 2)["weight"] == [1.0, 1.0]
    with pytest.raises(MethodError, match=r"^<dict>: parameters\.weight\[1\]: .*finite"):
        recipe_from_dict({**data, "parameters": {"weight": [0, float("inf")]}})


def test_pydantic_errors_become_one_liners():
    from pydantic import ValidationError

    from modelalloy.recipe.load import pydantic_error

    with pytest.raises(ValidationError) as info:
        Recipe.model_validate({"merge_method": "x", "models": [{"model": "a"},
                                                               {"model": "b",
                                                                "parameters": {"w": None}}]})
    err = pydantic_error(info.value, "r.yaml")
    assert str(err).startswith("r.yaml: models[1].parameters.w") and "\n" not in str(err)


def test_expert_cache_follows_edits():
    r = parse_recipe(MINIMAL)
    assert [e.model for e in r.expert_entries()] == ["./a", "./b"]
    r.base_model = "./a"
    assert [e.model for e in r.expert_entries()] == ["./b"]


@pytest.mark.parametrize("text,match", [
    ("merge_method: _test_linear\nmodels: [{model: ./a, parameters: [1]}, ./b]\n",
     r"models\[0\]\.parameters: must be a mapping of parameter names"),
    ("merge_method: _test_linear\nmodels: [./a, ./b]\nparameters: 0.5\n",
     r"parameters: must be a mapping of parameter names"),
    ("merge_method: _test_linear\nmodels: [./a, ./b]\nparameters: {1: 0.5}\n",
     r"parameters\.1: parameter names must be strings"),
    ("merge_method: _test_linear\nmodels: [./a, ./b]\n1: x\n", r"1: unknown key"),
    ("merge_method: _test_linear\n\tmodels: [./a]\n", r"YAML syntax error at line 2"),
    ("merge_method: _test_ties\nbase_model: 3\nmodels: [./a]\n", r"base_model: must be the path"),
])
def test_more_malformed(text, match):
    fails(text, match)


def test_hub_id_tokenizer_source_is_caught_by_check_paths(tmp_path):
    for m in ("base", "a", "b"):
        (tmp_path / m).mkdir()
    r = parse_recipe(MINIMAL + "tokenizer_source: org/tok\n", base_dir=tmp_path)
    with pytest.raises(RecipeError, match="'org/tok' is not a local folder.*never downloads"):
        r.check_paths()


def test_errors_name_the_line():
    text = """merge_method: _test_ties
base_model: ./base
models:
  - model: ./a
    parameters:
      weight: 0.5
      density:
        - filter: mlp
          value: [0.5, 1.5]
  - model: ./b
"""
    msg = fails(text, r"models\[0\]\.parameters\.density\[0\]\.value\[1\]", MethodError)
    assert "density[0].value[1] (line 9):" in msg  # the closest field with a line: `value:`
    msg = fails(text.replace("weight: 0.5", "wieght: 0.5"), "has no parameter", MethodError)
    assert "models[0].parameters.wieght (line 6):" in msg
    ok = text.replace("1.5", "1.0")
    msg = fails(ok.replace("  - model: ./b\n", "  - model: ./b\n    layer_range: [0, 2]\n"),
                "not supported yet")
    assert "models[1].layer_range (line 11):" in msg


def test_calibration_block(tmp_path):
    from modelalloy.errors import RecipeError
    from modelalloy.recipe import parse_recipe

    (tmp_path / "calib.txt").write_text("hello\nworld\n")
    head = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n"
    recipe = parse_recipe(head + "calibration: {data: calib.txt, limit: 64}\n",
                          base_dir=tmp_path)
    assert recipe.calibration.limit == 64 and recipe.calibration.batch_size == 8
    assert recipe.calibration_path() == tmp_path / "calib.txt"
    assert "calibration" in recipe.to_yaml() and "limit: 64" in recipe.to_yaml()
    with pytest.raises(RecipeError, match=r"calibration\.data.*not found"):
        parse_recipe(head + "calibration: {data: nope.txt}\n", base_dir=tmp_path)
    sampled = parse_recipe(head + "calibration: {data: calib.txt, gram_token_fraction: 0.3}\n",
                           base_dir=tmp_path)
    assert sampled.calibration.gram_token_fraction == 0.3
    with pytest.raises(RecipeError, match=r"calibration\.gram_token_fraction"):
        parse_recipe(head + "calibration: {data: calib.txt, gram_token_fraction: 0}\n",
                     base_dir=tmp_path)
    with pytest.raises(RecipeError, match=r"calibration\.batch_sise"):
        parse_recipe(head + "calibration: {data: calib.txt, batch_sise: 4}\n",
                     base_dir=tmp_path)
