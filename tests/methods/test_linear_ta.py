"""Averaging and task arithmetic, checked against hand-computed numbers."""

import pytest
import torch

from modelalloy.errors import MethodError


def test_uniform_average(run):
    out = run("linear", None, [[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])
    assert torch.allclose(out, torch.tensor([3.0, 3.0]))


def test_weighted_average_normalized(run):
    # (1*1 + 3*3) / 4 = 2.5 ; (1*2 + 3*6) / 4 = 5
    out = run("linear", None, [[1.0, 2.0], [3.0, 6.0]], weight=[1.0, 3.0])
    assert torch.allclose(out, torch.tensor([2.5, 5.0]))


def test_weighted_sum_without_normalize(run):
    out = run("linear", None, [[1.0, 2.0], [3.0, 6.0]], weight=[0.5, -1.0], normalize=False)
    assert torch.allclose(out, torch.tensor([0.5 - 3.0, 1.0 - 6.0]))


def test_linear_zero_weight_sum_is_an_error(run):
    with pytest.raises(MethodError, match="weight"):
        run("linear", None, [[1.0], [2.0]], weight=[0.0, 0.0])


def test_linear_negative_weight_needs_normalize_off(run):
    with pytest.raises(MethodError, match="weight"):
        run("linear", None, [[1.0], [2.0]], weight=[1.0, -0.5])


def test_task_arithmetic_hand_computed(run):
    # τ1 = [1, 0], τ2 = [0, 2]; θ = [1, 2] + 0.5 * (2*τ1 + 1*τ2) = [2, 3]
    out = run("task_arithmetic", [1.0, 2.0], [[2.0, 2.0], [1.0, 4.0]], weight=[2.0, 1.0],
              **{"lambda": 0.5})
    assert torch.allclose(out, torch.tensor([2.0, 3.0]))


def test_task_arithmetic_lambda_one_over_t_is_the_average(run):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    experts = [base + 0.1 * torch.randn(4, 5, generator=g) for _ in range(3)]
    ta = run("task_arithmetic", base, experts, **{"lambda": 1 / 3})
    avg = (experts[0] + experts[1] + experts[2]) / 3
    assert torch.allclose(ta, avg, atol=1e-6)
    assert torch.allclose(run("linear", None, experts), avg, atol=1e-6)


def test_chat_vector_recipe(run):
    # θ = θ_CPT + (θ_inst − θ_base) is task arithmetic with weights [1, 1]
    base = torch.tensor([1.0, -1.0, 0.5])
    cpt = torch.tensor([1.25, -1.0, 0.0])
    inst = torch.tensor([0.75, -0.5, 0.5])
    out = run("task_arithmetic", base, [cpt, inst], weight=[1.0, 1.0])
    assert torch.allclose(out, torch.tensor([1.0, -0.5, 0.0]))


def test_task_negation(run):
    out = run("task_arithmetic", [0.0, 1.0], [[1.0, 3.0]], **{"lambda": -1.0})
    assert torch.allclose(out, torch.tensor([-1.0, -1.0]))


def test_task_arithmetic_normalize(run):
    # normalize divides by Σw = 4: [0,0] + (1*[4,0] + 3*[0,4]) / 4 = [1, 3]
    out = run("task_arithmetic", [0.0, 0.0], [[4.0, 0.0], [0.0, 4.0]], weight=[1.0, 3.0],
              normalize=True)
    assert torch.allclose(out, torch.tensor([1.0, 3.0]))
