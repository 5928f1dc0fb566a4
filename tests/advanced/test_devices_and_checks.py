import pytest
import torch

from modelalloy.api import merge_state_dicts
from modelalloy.engine.sources import StateDictSource
from modelalloy.errors import MethodError, PlanError
from modelalloy.methods import get_method
from modelalloy.plan.planner import build_plan

from .helpers import make_models

METHODS = [("lines", {}), ("consensus", {}), ("tall_masks", {}), ("pcb", {}), ("tsv_m", {}),
           ("resm", {}), ("widen", {}), ("opcm", {}), ("doge", {"steps": 5}),
           ("optmerge", {"steps": 5})]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("method", "params"), METHODS)
def test_cuda_matches_cpu(method, params):
    base, experts = make_models(3, seed=11, shape=(16, 12))
    cpu = merge_state_dicts(method, base, experts, **params)
    gpu = merge_state_dicts(method, base, experts, device="cuda", **params)
    for n in base:
        torch.testing.assert_close(gpu[n].cpu(), cpu[n], rtol=1e-4, atol=1e-4, msg=n)


def test_whole_model_statistics_refuse_per_tensor_parameters():
    """The planner refuses them (from the resolved parameters, before any read)."""
    spec = get_method("pcb")
    p1 = spec.resolve(1, {"keep_ratio": 0.1}, "t")
    p2 = spec.resolve(1, {"keep_ratio": 0.5}, "t")
    base = {"a": torch.zeros(3), "b": torch.zeros(3)}
    expert = {"a": torch.ones(3), "b": torch.ones(3)}
    plan = build_plan(None, spec, StateDictSource("base", base), [StateDictSource("e", expert)],
                      None, resolve_params=lambda name, layer, count: p1 if name == "a" else p2)
    with pytest.raises(PlanError, match="tensor 'b': parameter 'keep_ratio'"):
        plan.raise_if_problems()


def test_base_is_required():
    base, experts = make_models(2)
    for method, _ in METHODS:
        with pytest.raises(MethodError, match="base"):
            merge_state_dicts(method, None, experts)


def odd_models():
    g = torch.Generator().manual_seed(0)
    base = {"logit_scale": torch.tensor(2.0), "conv.weight": torch.randn(4, 3, 2, 2, generator=g),
            "layers.0.attn.weight": torch.randn(5, 3, generator=g),
            "layers.1.attn.weight": torch.randn(5, 3, generator=g),
            "layers.0.bias": torch.randn(5, generator=g), "pos": torch.zeros(7, 3),
            "steps": torch.tensor(3), "model.embed_tokens.weight": torch.randn(9, 3, generator=g),
            "one": torch.randn(1, 1, generator=g)}
    experts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
                for k, v in base.items()} for _ in range(3)]
    experts[2]["pos"] = torch.zeros(7, 3)  # a zero task vector on one tensor
    return base, experts


ODD = METHODS + [("lines", {"merge": "ties"}), ("consensus", {"base_merge": "ties"}),
                 ("pcb", {"scope": "per_tensor"}), ("tsv_m", {"orthogonalize": "eigh"})]


@pytest.mark.parametrize(("method", "params"), ODD)
def test_scalars_convs_int_buffers_and_zero_deltas(method, params):
    base, experts = odd_models()
    out = merge_state_dicts(method, base, experts, **params)
    for k, v in out.items():
        assert v.shape == base[k].shape and v.dtype == base[k].dtype
        assert not v.is_floating_point() or torch.isfinite(v).all(), k
    assert int(out["steps"]) == 3
    same = [{k: v.clone() for k, v in base.items()} for _ in range(2)]
    if method != "tall_masks":
        out = merge_state_dicts(method, base, same, **params)
        assert all(torch.equal(out[k], base[k]) for k in base), "zero task vectors are a no-op"
