"""``slices:``: frankenmerges, self-stacking and per-slice gradients, checked tensor by tensor
against the source layers they name."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modelalloy import merge
from modelalloy.errors import ModelAlloyError
from tests.conftest import write_recipe
from tests.mergekit.helpers import save_family, weights

LAYER = "model.layers.{}.{}"
PARTS = ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("llama"), "llama", n_models=2, layers=4)


def _merge(tmp_path, text):
    out = tmp_path / "out"
    merge(write_recipe(tmp_path / "r.yaml", text), out)
    return out, weights(out), json.loads((out / "config.json").read_text())


def test_frankenmerge_takes_each_layer_from_its_slice(tmp_path, family):
    base, a, b = family
    out, got, cfg = _merge(tmp_path, f"""merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {b}, layer_range: [1, 4]}}]
dtype: float32
""")
    wa, wb = weights(a), weights(b)
    assert cfg["num_hidden_layers"] == 5
    want = [(wa, 0), (wa, 1), (wb, 1), (wb, 2), (wb, 3)]
    for j, (src, i) in enumerate(want):
        for part in PARTS:
            assert torch.equal(got[LAYER.format(j, part)], src[LAYER.format(i, part)])
    assert not any(k.startswith("model.layers.5.") for k in got)
    # embeddings from the first slice, final norm and lm_head from the last (as mergekit)
    assert torch.equal(got["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], wb["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], wb["lm_head.weight"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # loads with no missing tensor
    assert len(model.model.layers) == 5


def test_self_stacking_repeats_layers_as_separate_tensors(tmp_path, family):
    _, a, _ = family
    _, got, cfg = _merge(tmp_path, f"""merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {a}, layer_range: [1, 4]}}]
""")
    wa = weights(a)
    assert cfg["num_hidden_layers"] == 6
    for j, i in enumerate([0, 1, 2, 1, 2, 3]):
        assert torch.equal(got[LAYER.format(j, PARTS[0])], wa[LAYER.format(i, PARTS[0])])


def test_passthrough_scale_by_filter_in_a_slice(tmp_path, family):
    _, a, _ = family
    _, got, _ = _merge(tmp_path, f"""merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources:
      - model: {a}
        layer_range: [0, 2]
        parameters:
          scale: [{{filter: down_proj, value: 0.0}}, {{value: 1.0}}]
""")
    wa = weights(a)
    assert torch.equal(got[LAYER.format(2, "mlp.down_proj.weight")],
                       torch.zeros_like(wa[LAYER.format(0, "mlp.down_proj.weight")]))
    assert torch.equal(got[LAYER.format(3, PARTS[0])], wa[LAYER.format(1, PARTS[0])])
    assert torch.equal(got[LAYER.format(0, "mlp.down_proj.weight")],
                       wa[LAYER.format(0, "mlp.down_proj.weight")])


def _slerp(t, v0, v1):
    """SLERP written out from its formula (float64), for the gradient test."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    dot = float(a @ b / (a.norm() * b.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    om = math.acos(dot)
    return ((math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)).reshape(v0.shape)


def test_gradient_runs_over_each_slice(tmp_path, family):
    base, a, _ = family
    # one slice of layers 1..3 of both: t = 0, 0.5, 1 over the slice's own three layers
    _, got, cfg = _merge(tmp_path, f"""merge_method: slerp
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [1, 4]}}
      - {{model: {a}, layer_range: [1, 4]}}
parameters:
  t: [0, 1]
""")
    w0, w1 = weights(base), weights(a)
    assert cfg["num_hidden_layers"] == 3
    name = PARTS[0]
    assert torch.equal(got[LAYER.format(0, name)], w0[LAYER.format(1, name)])
    assert torch.equal(got[LAYER.format(2, name)], w1[LAYER.format(3, name)])
    want = _slerp(0.5, w0[LAYER.format(2, name)], w1[LAYER.format(2, name)])
    assert torch.allclose(got[LAYER.format(1, name)].double(), want, atol=1e-6)
    # outside the stack: t = 0 -> the base
    assert torch.equal(got["model.norm.weight"], w0["model.norm.weight"])


def test_source_then_slice_then_top_level_parameters(tmp_path, family):
    base, a, b = family
    _, got, _ = _merge(tmp_path, f"""merge_method: linear
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 1], parameters: {{weight: 3.0}}}}
      - {{model: {b}, layer_range: [0, 1]}}
    parameters: {{weight: 1.0}}
  - sources:
      - {{model: {a}, layer_range: [1, 2]}}
      - {{model: {b}, layer_range: [1, 2]}}
parameters: {{weight: 2.0, normalize: false}}
""")
    wa, wb = weights(a), weights(b)
    name = PARTS[0]
    # slice 0: a's own 3, b from the slice's 1
    assert torch.allclose(got[LAYER.format(0, name)],
                          3 * wa[LAYER.format(0, name)] + wb[LAYER.format(0, name)])
    # slice 1: both from the top level's 2
    assert torch.allclose(got[LAYER.format(1, name)],
                          2 * wa[LAYER.format(1, name)] + 2 * wb[LAYER.format(1, name)])


@pytest.mark.parametrize("body,match", [
    ("  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
     "      - {{model: {b}, layer_range: [0, 3]}}\n", "same number of layers"),
    ("  - sources: [{{model: {a}, layer_range: [2, 9]}}]\n", "goes past its 4 layers"),
    ("  - sources: [{{model: {a}, layer_range: [2, 1]}}]\n", "0 <= start < end"),
])
def test_bad_slices_are_one_line_errors(tmp_path, family, body, match):
    _, a, b = family
    text = "merge_method: passthrough\nslices:\n" + body.format(a=a, b=b)
    with pytest.raises(ModelAlloyError, match=match):
        merge(write_recipe(tmp_path / "r.yaml", text), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_base_must_be_in_every_slice(tmp_path, family):
    base, a, b = family
    text = (f"merge_method: ties\nbase_model: {base}\nslices:\n"
            f"  - sources: [{{model: {a}, layer_range: [0, 2]}}, "
            f"{{model: {b}, layer_range: [0, 2]}}]\n")
    with pytest.raises(ModelAlloyError, match="must be one of this slice's sources"):
        merge(write_recipe(tmp_path / "r.yaml", text), tmp_path / "out")
