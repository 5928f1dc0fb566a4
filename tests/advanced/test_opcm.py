import math

import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from modelalloy.api import merge_state_dicts
from modelalloy.commands import merge_stream
from modelalloy.continual import OPCM, energy_rank, linear_weight_names, opcm_merge, project_out

from .helpers import make_models


def test_opcm_of_one_model_is_that_model():
    base, experts = make_models(1)
    out = opcm_merge(base, experts)
    assert all(torch.allclose(out[n], experts[0][n], atol=1e-6) for n in base)
    out = merge_state_dicts("opcm", base, experts)
    assert all(torch.allclose(out[n], experts[0][n], atol=1e-6) for n in base)


def test_opcm_norm_is_mean_task_norm_after_each_step():
    base, experts = make_models(4, seed=2, shape=(6, 5))
    merger = OPCM(base, alpha=0.5)
    norms = []
    for e in experts:
        got = merger.add(e)
        norms.append(math.sqrt(sum(float((e[n] - base[n]).pow(2).sum()) for n in base)))
        assert abs(got - sum(norms) / len(norms)) < 1e-4


def test_opcm_two_steps_hand_worked():
    base = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    e1 = {"w": torch.diag(torch.tensor([3.0, 0.0])), "b": torch.tensor([0.0, 4.0])}
    e2 = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([3.0, 0.0])}
    # Step 2: P_w = diag(3, 0), s = [3, 0], cumsum/sum = [1, 1] > 0.5 -> r* = 0: only the
    # diagonal of Uᵀ τ V is removed: τ̃_w = [[0, 2], [3, 0]]. S_w = [[3, 2], [3, 0]], S_b = [3, 4]
    # ‖S‖ = √47; n̄ = (‖τ1‖ + ‖τ2‖)/2 = (5 + √39)/2; θ = S · n̄/√47.
    out = opcm_merge(base, [e1, e2], alpha=0.5)
    k = (5 + math.sqrt(39)) / 2 / math.sqrt(47)
    assert torch.allclose(out["w"], k * torch.tensor([[3.0, 2.0], [3.0, 0.0]]), atol=1e-6)
    assert torch.allclose(out["b"], k * torch.tensor([3.0, 4.0]), atol=1e-6)
    reg = merge_state_dicts("opcm", base, [e1, e2])
    assert all(torch.allclose(reg[n], out[n], atol=1e-6) for n in base)


def test_projection_matches_the_full_svd_form():
    g = torch.Generator().manual_seed(7)
    p = torch.randn(5, 3, generator=g, dtype=torch.float64)
    tau = torch.randn(5, 3, generator=g, dtype=torch.float64)
    alpha = 0.4
    u, s, vh = torch.linalg.svd(p, full_matrices=True)
    r = energy_rank(s, alpha)
    c = u.T @ tau @ vh.T
    for i in range(min(c.shape)):
        c[i, i] = 0
    c[:r, :r] = 0
    want = u @ c @ vh
    assert torch.allclose(project_out(p, tau, alpha), want, atol=1e-10)


def test_energy_rank():
    assert energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.5) == 1  # 0.4, 0.7 > 0.5
    assert energy_rank(torch.tensor([0.0, 0.0]), 0.5) == 0


def test_linear_weight_names():
    m = torch.nn.Sequential(torch.nn.Embedding(4, 3), torch.nn.Linear(3, 2))
    assert linear_weight_names(m) == {"1.weight"}


def test_merge_stream_cli(tmp_path):
    base, experts = make_models(3, seed=9)
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, e in enumerate(experts):
        p = tmp_path / f"m{i}.safetensors"
        save_file(e, str(p))
        paths.append(str(p))
    app = typer.Typer()

    @app.callback()
    def main() -> None:  # a group, as in the real CLI (one command alone would be flattened)
        pass

    merge_stream.register(app)
    res = CliRunner().invoke(app, ["merge-stream", str(tmp_path / "base.safetensors"), *paths,
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = opcm_merge(base, experts)
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in base)


def test_opcm_refuses_a_model_with_a_missing_tensor_without_changing_state():
    import pytest

    from modelalloy.errors import PlanError

    base, experts = make_models(2, seed=4)
    merger = OPCM(base)
    merger.add(experts[0])
    before = {n: t.clone() for n, t in merger.delta.items()}
    broken = dict(experts[1])
    broken.pop("head.weight")
    with pytest.raises(PlanError, match="head.weight"):
        merger.add(broken)
    assert merger.count == 1
    assert all(torch.equal(before[n], merger.delta[n]) for n in before)


def test_merge_stream_cli_shuffle_is_the_api_in_the_shuffled_order(tmp_path):
    import random

    base, experts = make_models(3, seed=12)
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, e in enumerate(experts):
        save_file(e, str(tmp_path / f"m{i}.safetensors"))
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        pass

    merge_stream.register(app)
    res = CliRunner().invoke(app, ["merge-stream", str(tmp_path / "base.safetensors"), *paths,
                                   "--out", str(tmp_path / "out"), "--shuffle", "--seed", "3"])
    assert res.exit_code == 0, res.output
    order = list(range(3))
    random.Random(3).shuffle(order)
    want = opcm_merge(base, [experts[i] for i in order])
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in base)
