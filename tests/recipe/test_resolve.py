"""Per-tensor parameter values against hand-worked numbers from mergekit's rule.

mergekit (mergekit/config.py ``evaluate_setting``; mergekit/plan.py ``plan_slice``):
    t = idx / (num_layers - 1)          (t = 1 when the stack has one layer)
    scaled = t * (len(g) - 1); i0 = int(scaled); i1 = min(len(g) - 1, i0 + 1)
    value = (1 - frac) * g[i0] + frac * g[i1],  frac = scaled - i0
    conditional list: the first entry whose filter is absent, "*" or a substring of the name.
"""

from __future__ import annotations

import pytest

from modelalloy.errors import MethodError, RecipeError
from modelalloy.recipe import (
    Conditional,
    evaluate_setting,
    layer_position,
    resolve_tensor_params,
)

# The mergekit README's TIES example, with the method renamed to the test stand-in.
TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: _test_ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

# The mergekit README's SLERP example, written with `models` instead of `slices`.
SLERP = """
models:
  - model: ./psmathur-orca
  - model: ./platypus
merge_method: _test_slerp
base_model: ./psmathur-orca
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""


def name(i: int | None, part: str) -> str:
    return f"model.layers.{i}.{part}.weight" if i is not None else part


@pytest.fixture
def ties(parse):
    with pytest.warns(UserWarning, match="int8_mask"):
        return parse(TIES)


@pytest.fixture
def slerp(parse):
    return parse(SLERP)


# Hand-worked: 5 layers -> t = 0, .25, .5, .75, 1.
# density [1, .7, .1]: scaled = 2t = 0, .5, 1, 1.5, 2 -> 1, .85, .7, .4, .1
# weight [0, .3, .7, 1]: scaled = 3t = 0, .75, 1.5, 2.25, 3
#   -> 0, .75*.3 = .225, .5*.3+.5*.7 = .5, .75*.7+.25*1 = .775, 1
TIES_5 = {
    0: ([1.0, 0.0], [1.0, 0.5]),
    1: ([1.0, 0.225], [0.85, 0.5]),
    2: ([1.0, 0.5], [0.7, 0.5]),
    3: ([1.0, 0.775], [0.4, 0.5]),
    4: ([1.0, 1.0], [0.1, 0.5]),
}


@pytest.mark.parametrize("layer", range(5))
@pytest.mark.parametrize("part,third_weight", [("mlp.down_proj", 0.5),
                                               ("self_attn.q_proj", 0.0),
                                               ("input_layernorm", 0.0)])
def test_ties_recipe_per_layer(ties, layer, part, third_weight):
    got = resolve_tensor_params(ties, name(layer, part), layer, 5)
    weights, densities = TIES_5[layer]
    assert got["weight"] == pytest.approx(weights + [third_weight], abs=1e-12)
    assert got["density"] == pytest.approx(densities + [0.33], abs=1e-12)
    assert got["normalize"] is True
    assert got["lambda"] == 1.0  # method default
    assert set(got) == {"weight", "density", "normalize", "lambda"}


def test_ties_recipe_shape(ties):
    assert [e.model for e in ties.expert_entries()] == [
        "psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B", "WizardLM/WizardMath-13B-V1.0"]
    assert ties.dtype == "float16" and ties.output_dtype == "float16"
    assert "int8_mask" not in ties.parameters  # mergekit-only knob, ignored with a warning
    assert any("int8_mask" in w for w in ties.warnings)


def test_ties_outside_the_stack_is_t0(ties):
    # Embeddings / lm_head / final norm: t = 0 (current mergekit evaluates its pre- and
    # post-weights with ConfigReader(t=0)): density gradient -> 1, weight gradient -> 0.
    for tensor in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        got = resolve_tensor_params(ties, tensor, None, 5)
        assert got["weight"] == [1.0, 0.0, 0.0]
        assert got["density"] == [1.0, 0.5, 0.33]
    # A tensor outside the stack whose name matches a filter still uses its entry.
    assert resolve_tensor_params(ties, "vision.mlp.fc.weight", None, None)["weight"][2] == 0.5


# Hand-worked: 9 layers -> t = i/8; gradients of 5 -> scaled = 4t = i/2.
# self_attn [0, .5, .3, .7, 1]: i=1: .5*0+.5*.5 = .25; i=3: .5*.5+.5*.3 = .4;
#   i=5: .5*.3+.5*.7 = .5; i=7: .5*.7+.5*1 = .85; even i: the knots.
SLERP_9_ATTN = [0.0, 0.25, 0.5, 0.4, 0.3, 0.5, 0.7, 0.85, 1.0]
# mlp [1, .5, .7, .3, 0]: i=1: .75; i=3: .6; i=5: .5; i=7: .15.
SLERP_9_MLP = [1.0, 0.75, 0.5, 0.6, 0.7, 0.5, 0.3, 0.15, 0.0]


@pytest.mark.parametrize("layer", range(9))
def test_slerp_filtered_gradients_9_layers(slerp, layer):
    t_attn = resolve_tensor_params(slerp, name(layer, "self_attn.o_proj"), layer, 9)["t"]
    t_mlp = resolve_tensor_params(slerp, name(layer, "mlp.gate_proj"), layer, 9)["t"]
    t_norm = resolve_tensor_params(slerp, name(layer, "post_attention_layernorm"), layer, 9)["t"]
    assert t_attn == pytest.approx(SLERP_9_ATTN[layer], abs=1e-12)
    assert t_mlp == pytest.approx(SLERP_9_MLP[layer], abs=1e-12)
    assert t_norm == 0.5


@pytest.mark.parametrize("layer,attn,mlp", [(0, 0.0, 1.0), (1, 0.5, 0.5), (2, 0.3, 0.7),
                                            (3, 0.7, 0.3), (4, 1.0, 0.0)])
def test_slerp_5_layers_hits_the_knots(slerp, layer, attn, mlp):
    assert resolve_tensor_params(slerp, name(layer, "self_attn.k_proj"), layer, 5)["t"] == attn
    assert resolve_tensor_params(slerp, name(layer, "mlp.up_proj"), layer, 5)["t"] == mlp


def test_slerp_outside_stack_and_experts(slerp):
    assert resolve_tensor_params(slerp, "model.embed_tokens.weight", None, 9) == {"t": 0.5}
    assert resolve_tensor_params(slerp, "lm_head.weight", None, 9) == {"t": 0.5}
    assert [e.model for e in slerp.expert_entries()] == ["./platypus"]  # base removed


def test_bit_identical_to_mergekit_arithmetic():
    # 4-layer model, gradient of 3: t = 1/3 -> scaled 2/3; t = 2/3 -> scaled 4/3.
    g = [0.0, 1.0, 0.5]
    for idx, want in [(0, 0.0), (1, 2 / 3), (2, (1 - 1 / 3) * 1.0 + (1 / 3) * 0.5), (3, 0.5)]:
        t = idx / 3
        scaled = t * 2
        i0 = int(scaled)
        frac = scaled - i0
        exact = (1 - frac) * g[i0] + frac * g[min(2, i0 + 1)]
        got = evaluate_setting("x", g, layer_position(idx, 4))
        assert got == exact  # same float operations, same bits
        assert got == pytest.approx(want, abs=1e-12)


def test_layer_position():
    assert layer_position(None, 9) == 0.0
    assert layer_position(None, None) == 0.0
    assert layer_position(0, 1) == 1.0  # mergekit: one-layer slice -> t = 1
    assert layer_position(3, 4) == 1.0
    assert layer_position(2, 5) == 0.5
    with pytest.raises(RecipeError, match="outside a stack"):
        layer_position(5, 5)
    with pytest.raises(RecipeError, match="num_layers"):
        layer_position(2, None)


def test_first_matching_entry_wins_even_the_default():
    # mergekit walks the list in order: a filterless entry first shadows every later one.
    setting = [Conditional(value=0.1), Conditional(filter="mlp", value=0.9)]
    assert evaluate_setting("model.layers.0.mlp.up_proj.weight", setting) == 0.1
    setting = [Conditional(filter="mlp", value=0.9), Conditional(filter="mlp.up", value=0.2)]
    assert evaluate_setting("model.layers.0.mlp.up_proj.weight", setting) == 0.9
    # "*" matches everything; a filter is a plain substring test (no glob, no regex).
    assert evaluate_setting("a.b", [Conditional(filter="*", value=3)]) == 3
    assert evaluate_setting("a.b", [Conditional(filter="a.*", value=3)]) is None
    assert evaluate_setting("x.q_proj.w", [Conditional(filter="q_proj", value=3)]) == 3
    # No match -> None (the lookup falls through to the next level).
    assert evaluate_setting("lm_head.weight", [Conditional(filter="mlp", value=1)]) is None


def test_stepped_gradient_for_non_numbers():
    # mergekit: a list that is not all numbers is indexed with int(t * (n - 1)), no blend.
    g = ["sum", "mean", "sum"]
    assert [evaluate_setting("x", g, t) for t in (0, 0.49, 0.5, 0.99, 1)] == [
        "sum", "sum", "mean", "mean", "sum"]


def test_model_level_falls_through_to_top_level(parse):
    r = parse("""
merge_method: _test_ties
base_model: ./base
models:
  - model: ./a
    parameters:
      weight: [{filter: mlp, value: 2.0}]   # no default entry
  - model: ./b
parameters:
  weight: [{filter: self_attn, value: 0.25}, {value: 0.75}]
  density: 0.5
""")
    mlp = resolve_tensor_params(r, "model.layers.0.mlp.w.weight", 0, 2)
    attn = resolve_tensor_params(r, "model.layers.0.self_attn.w.weight", 0, 2)
    other = resolve_tensor_params(r, "model.norm.weight", None, 2)
    assert mlp["weight"] == [2.0, 0.75]
    assert attn["weight"] == [0.25, 0.25]
    assert other["weight"] == [0.75, 0.75]
    assert mlp["density"] == [0.5, 0.5]


def test_no_match_anywhere_gives_the_method_default(parse):
    r = parse("""
merge_method: _test_ties
base_model: ./base
models:
  - model: ./a
    parameters: {density: [{filter: mlp, value: 0.3}]}
  - model: ./b
parameters:
  lambda: [{filter: mlp, value: 0.5}]
""")
    got = resolve_tensor_params(r, "model.layers.0.self_attn.q.weight", 0, 3)
    assert got["density"] == [1.0, 1.0] and got["lambda"] == 1.0
    got = resolve_tensor_params(r, "model.layers.0.mlp.q.weight", 0, 3)
    assert got["density"] == [0.3, 1.0] and got["lambda"] == 0.5


def test_base_listed_in_models_is_not_an_expert(parse):
    r = parse("""
merge_method: _test_ties
base_model: ./base
models:
  - model: ./base
    parameters: {weight: 0.1}
  - model: ./a
    parameters: {weight: 0.6}
  - model: ./b
    parameters: {weight: 0.4}
""")
    assert [e.model for e in r.expert_entries()] == ["./a", "./b"]
    assert resolve_tensor_params(r, "w", None, None)["weight"] == [0.6, 0.4]
    # the same folder written differently is still the base
    r2 = parse(r.to_yaml().replace("- model: ./base", "- model: base"))
    assert [e.model for e in r2.expert_entries()] == ["./a", "./b"]


def test_base_none_method_merges_every_listed_model(parse):
    r = parse("""
merge_method: _test_lin
models:
  - model: ./a
    parameters: {weight: 1}
  - model: ./b
    parameters: {weight: 3}
""")
    assert resolve_tensor_params(r, "w", None, None) == {"weight": [1.0, 3.0], "normalize": True}


def test_base_optional_method(parse):
    with_base = parse("""
merge_method: _test_opt
base_model: ./base
models: [{model: ./base}, {model: ./a}, {model: ./b, parameters: {rescale: true}}]
parameters: {k: [1, 3], mode: [sum, mean]}
""")
    assert [e.model for e in with_base.expert_entries()] == ["./a", "./b"]
    assert with_base.uses_base()
    got = resolve_tensor_params(with_base, "layers.1.w", 1, 2)
    assert got == {"k": 3, "mode": "mean", "rescale": [False, True]}
    # int gradient interpolates as mergekit does; the int schema then truncates (2.0 -> 2).
    assert resolve_tensor_params(with_base, "layers.0.w", 0, 3)["k"] == 1
    assert resolve_tensor_params(with_base, "layers.1.w", 1, 3)["k"] == 2
    without = parse("""
merge_method: _test_opt
models: [{model: ./a}, {model: ./b}]
""")
    assert not without.uses_base() and len(without.expert_entries()) == 2


def test_resolved_values_are_checked_again(parse):
    r = parse(SLERP)
    r.parameters["t"] = 1.5  # bypassing the loader: resolve still validates via the schema
    with pytest.raises(MethodError, match="out of range"):
        resolve_tensor_params(r, "w", None, None)


def test_single_layer_stack_uses_t1(slerp):
    # mergekit: a one-layer slice has t = 1 -> the last value of every gradient.
    assert resolve_tensor_params(slerp, name(0, "self_attn.q_proj"), 0, 1)["t"] == 1.0
    assert resolve_tensor_params(slerp, name(0, "mlp.up_proj"), 0, 1)["t"] == 0.0


def test_lone_conditional_and_empty_filter():
    assert evaluate_setting("a.mlp.b", Conditional(filter="mlp", value=[0, 1]), 1.0) == 1
    assert evaluate_setting("a.b", Conditional(filter="mlp", value=1)) is None
    # mergekit tests `filter in tensor_name`: the empty string matches any non-empty name.
    assert evaluate_setting("a.b", [Conditional(filter="", value=4)]) == 4
    assert evaluate_setting("", [Conditional(filter="", value=4)]) is None
