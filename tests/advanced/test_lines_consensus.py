import pytest
import torch

from modelalloy.api import merge_state_dicts
from modelalloy.errors import MethodError
from modelalloy.methods import MergeContext, get_method
from modelalloy.methods.lines import layer_scale

from .helpers import make_models, tv


def close(a, b, tol=1e-6):
    return torch.allclose(a, b, atol=tol, rtol=0)


# ---------------------------------------------------------------- LiNeS

def test_lines_ta_auto_alpha_is_one_over_t_and_depth_scaling():
    base, experts = make_models(2)
    beta = 0.6
    out = merge_state_dicts("lines", base, experts, beta=beta)
    # L = 3 blocks: block ℓ gets 1/2 + β·ℓ/2; tensors outside the blocks get α = 1/2.
    expected_scale = {"model.embed.weight": 0.5, "model.layers.0.w.weight": 0.5,
                      "model.layers.1.w.weight": 0.5 + beta / 2,
                      "model.layers.2.w.weight": 0.5 + beta,
                      "model.layers.2.norm.weight": 0.5 + beta, "head.weight": 0.5}
    t1, t2 = tv(base, experts[0]), tv(base, experts[1])
    for name, s in expected_scale.items():
        assert close(out[name], base[name] + s * (t1[name] + t2[name])), name


def test_lines_first_and_last_block_single_task_editing():
    base, experts = make_models(1)
    out = merge_state_dicts("lines", base, experts, auto_alpha=False, alpha=0.2, beta=0.8)
    t = tv(base, experts[0])
    assert close(out["model.layers.0.w.weight"], base["model.layers.0.w.weight"]
                 + 0.2 * t["model.layers.0.w.weight"])
    # last block gets α + β = 1: the fine-tuned weights
    assert close(out["model.layers.2.w.weight"], experts[0]["model.layers.2.w.weight"])
    assert close(out["head.weight"], base["head.weight"] + 0.2 * t["head.weight"])


def test_layer_scale_edges():
    assert layer_scale(0.3, 0.5, None, 12) == 0.3
    assert layer_scale(0.3, 0.5, 0, 1) == pytest.approx(0.8)
    assert layer_scale(0.3, 0.5, 11, 12) == pytest.approx(0.8)
    assert layer_scale(0.3, 0.5, 0, 12) == pytest.approx(0.3)


def test_lines_ties_auto_alpha_hand_worked():
    # One tensor outside any block. τ1 = [3, -1], τ2 = [-1, -1], no trim (density 1).
    # TIES dis-sum: signs [+, -]; merged = [3, -2]; ‖Σ τ‖₁ = |2| + |-2| = 4; ‖merged‖₁ = 5.
    # α = (4/5)/2 = 0.4, so θ = θ_0 + 0.4·[3, -2].
    base = {"w": torch.zeros(2)}
    experts = [{"w": torch.tensor([3.0, -1.0])}, {"w": torch.tensor([-1.0, -1.0])}]
    out = merge_state_dicts("lines", base, experts, merge="ties", density=1.0, ties_agg="sum")
    assert close(out["w"], torch.tensor([1.2, -0.8]))
    # dis-mean (default): merged = [3, -1]; ‖merged‖₁ = 4; α = (4/4)/2 = 0.5 -> [1.5, -0.5].
    out = merge_state_dicts("lines", base, experts, merge="ties", density=1.0)
    assert close(out["w"], torch.tensor([1.5, -0.5]))


def test_lines_auto_alpha_without_prepare_is_an_error():
    spec = get_method("lines")
    params = spec.resolve(1, {}, "test")
    with pytest.raises(MethodError):
        spec(torch.zeros(2), [torch.ones(2)], params, MergeContext(name="w"))


# ---------------------------------------------------------------- Consensus / TALL

def test_consensus_hand_worked():
    base = {"w": torch.zeros(4)}
    experts = [{"w": torch.tensor([1.0, 0.0, 2.0, -1.0])},
               {"w": torch.tensor([1.0, 3.0, -0.1, 1.0])}]
    # τ_MTL = [2, 3, 1.9, 0]; λ = 0.5
    # m1 = |τ1| > .5|τ_MTL-τ1| = [1>.5, 0>1.5, 2>.05, 1>.5] = [1, 0, 1, 1]
    # m2 = |τ2| > .5|τ_MTL-τ2| = [1>.5, 3>0, .1>1, 1>.5]   = [1, 1, 0, 1]
    # counts [2, 1, 1, 2]
    out2 = merge_state_dicts("consensus", base, experts, k=2, mask_lambda=0.5)
    assert close(out2["w"], torch.tensor([2.0, 0.0, 0.0, 0.0]))
    out1 = merge_state_dicts("consensus", base, experts, k=1, mask_lambda=0.5, **{"lambda": 0.5})
    assert close(out1["w"], 0.5 * torch.tensor([2.0, 3.0, 1.9, 0.0]))


def test_consensus_k0_is_task_arithmetic_and_k_above_t_is_base():
    base, experts = make_models(3)
    out0 = merge_state_dicts("consensus", base, experts, k=0, **{"lambda": 0.3})
    out4 = merge_state_dicts("consensus", base, experts, k=4)
    for n in base:
        ta = base[n] + 0.3 * sum(e[n] - base[n] for e in experts)
        assert close(out0[n], ta)
        assert torch.equal(out4[n], base[n])


def test_consensus_ties_global_threshold_spans_tensors():
    # One expert, two tensors: |τ| over the model = {1, 2, 3, 4}; density 0.5 keeps >= 2
    # (k = 4 - int(4·0.5) = 2nd smallest = 2). Per tensor (d = 2) the official rule keeps
    # |x| >= (2 - int(2·0.5))-th smallest = the smallest, i.e. everything.
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    experts = [{"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([3.0, 4.0])}]
    out = merge_state_dicts("consensus", base, experts, base_merge="ties", k=0, density=0.5)
    assert close(out["a"], torch.tensor([0.0, -2.0]))
    assert close(out["b"], torch.tensor([3.0, 4.0]))
    per = merge_state_dicts("consensus", base, experts, base_merge="ties", k=0, density=0.5,
                            scope="per_tensor")
    assert close(per["a"], torch.tensor([1.0, -2.0]))
    assert close(per["b"], torch.tensor([3.0, 4.0]))


def test_tall_mask_rebuilds_expert_exactly_when_mask_keeps_everything():
    base, experts = make_models(1)
    out = merge_state_dicts("tall_masks", base, experts, task=0)
    for n in base:
        assert close(out[n], experts[0][n])


def test_tall_mask_zero_task_vector_gives_empty_mask():
    base = {"w": torch.zeros(3)}
    experts = [{"w": torch.zeros(3)}, {"w": torch.tensor([1.0, 2.0, 3.0])}]
    out = merge_state_dicts("tall_masks", base, experts, task=0)
    assert torch.equal(out["w"], torch.zeros(3))
