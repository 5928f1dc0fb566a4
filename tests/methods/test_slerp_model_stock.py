"""SLERP and Model Stock against hand-computed angles."""

import math

import pytest
import torch

from modelalloy.errors import MethodError


def test_slerp_endpoints_are_exact(run):
    g = torch.Generator().manual_seed(0)
    v0, v1 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    assert torch.equal(run("slerp", v0, [v1], t=0.0), v0)
    assert torch.equal(run("slerp", v0, [v1], t=1.0), v1)


def test_slerp_ninety_degrees(run):
    h = math.sqrt(0.5)
    assert torch.allclose(run("slerp", [1.0, 0.0], [[0.0, 1.0]], t=0.5), torch.tensor([h, h]))
    # t = 1/3 of a right angle: (cos 30°, sin 30°)
    assert torch.allclose(run("slerp", [1.0, 0.0], [[0.0, 1.0]], t=1 / 3),
                          torch.tensor([math.sqrt(3) / 2, 0.5]), atol=1e-6)
    # unequal norms: sin((1-t)π/2)·v0 + sin(tπ/2)·v1 on the raw tensors
    assert torch.allclose(run("slerp", [2.0, 0.0], [[0.0, 3.0]], t=0.5),
                          torch.tensor([2 * h, 3 * h]))


def test_slerp_sixty_degrees(run):
    # v0 = e1, v1 = (cos 60°, sin 60°), t = 0.5 -> the unit vector at 30°
    v1 = [0.5, math.sqrt(3) / 2]
    assert torch.allclose(run("slerp", [1.0, 0.0], [v1], t=0.5),
                          torch.tensor([math.sqrt(3) / 2, 0.5]), atol=1e-6)


def test_slerp_parallel_and_antiparallel_fall_back_to_lerp(run):
    assert torch.allclose(run("slerp", [1.0, 2.0], [[2.0, 4.0]], t=0.25),
                          torch.tensor([1.25, 2.5]))
    assert torch.allclose(run("slerp", [1.0, 2.0], [[-2.0, -4.0]], t=0.5),
                          torch.tensor([-0.5, -1.0]))


def test_slerp_of_two_task_vectors_added_to_the_base(run):
    base = torch.tensor([1.0, -1.0])
    h = math.sqrt(0.5)
    out = run("slerp", base, [base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 1.0])],
              t=0.5)
    assert torch.allclose(out, base + torch.tensor([h, h]))


def test_slerp_model_counts_and_t_range(run):
    with pytest.raises(MethodError, match="'t'"):
        run("slerp", [1.0], [[2.0]], t=-0.1)
    with pytest.raises(MethodError, match="base"):
        run("slerp", None, [[1.0], [2.0]])
    with pytest.raises(MethodError, match="1 to 2"):
        run("slerp", [0.0], [[1.0], [2.0], [3.0]])


def test_model_stock_identical_deltas_give_the_fine_tune(run):
    base = torch.tensor([1.0, 2.0, 3.0])
    e = torch.tensor([1.5, 1.0, 3.25])
    assert torch.allclose(run("model_stock", base, [e, e.clone()]), e)


def test_model_stock_two_models_hand_angle(run):
    base = torch.zeros(2)
    d1, d2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    c = 1 / math.sqrt(2)  # 45°
    t = 2 * c / (1 + c)
    want = t * (d1 + d2) / 2
    assert torch.allclose(run("model_stock", base, [d1, d2]), want)
    # orthogonal deltas: cos 0 -> t 0 -> the base
    assert torch.allclose(run("model_stock", base, [d1, torch.tensor([0.0, 2.0])]), base)


def test_model_stock_three_models_and_clamp(run):
    base = torch.zeros(3)
    ds = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0]),
          torch.tensor([1.0, 0.0, 1.0])]
    c = (1 / math.sqrt(2) + 1 / math.sqrt(2) + 0.5) / 3
    t = 3 * c / (1 + 2 * c)
    assert torch.allclose(run("model_stock", base, ds), t * sum(ds) / 3)
    # opposite deltas: cos = -1 -> denominator 0 -> clamped to t = 0 (the base)
    opp = run("model_stock", base, [ds[0], -ds[0]])
    assert torch.equal(opp, base)
    # three models at cos -0.6 < -1/2: the formula gives t = 9; clamped to 0
    g = [torch.tensor([1.0, 0.0]), torch.tensor([-0.6, 0.8]), torch.tensor([-0.6, -0.8])]
    assert torch.equal(run("model_stock", torch.zeros(2), g), torch.zeros(2))


def test_model_stock_filter_wise(run):
    base = torch.zeros(2, 2)
    e1 = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    e2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # row 0: identical -> t 1 -> mean; row 1: orthogonal -> t 0 -> base
    out = run("model_stock", base, [e1, e2], filter_wise=True)
    assert torch.allclose(out, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    # per tensor: cos = 2/(√3·√3) = 2/3 -> t = 2c/(1+c) = 0.8
    out = run("model_stock", base, [e1, e2])
    assert torch.allclose(out, 0.8 * (e1 + e2) / 2)


def test_model_stock_needs_two_models(run):
    with pytest.raises(MethodError, match="at least 2"):
        run("model_stock", [0.0], [[1.0]])
