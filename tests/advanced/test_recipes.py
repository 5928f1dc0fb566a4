"""Every advanced method through the recipe runner (plan -> engine, prepare included), checked
against the in-memory runner on the same state dicts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from modelalloy import merge
from modelalloy.api import merge_state_dicts
from tests.conftest import save_gpt2_family, write_recipe

CASES = [
    ("lines", {"beta": 0.4}),
    ("lines", {"merge": "consensus_ties", "beta": 0.8}),
    ("consensus", {"k": 2, "lambda": 0.5}),
    ("consensus", {"base_merge": "ties", "k": 1}),
    ("tall_masks", {"task": 1}),
    ("tsv_m", {"lambda": 0.8}),
    ("resm", {}),
    ("pcb", {"keep_ratio": 0.2}),
    ("opcm", {"alpha": 0.5}),
    ("widen", {}),
    ("doge", {"steps": 3}),
    ("optmerge", {"steps": 3}),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return save_gpt2_family(tmp_path_factory.mktemp("family"), n_experts=3)


def load(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{i}" for i, (m, _) in
                                                            enumerate(CASES)])
def test_recipe_runner_matches_in_memory(family, tmp_path, method, params):
    base, experts = family
    text = (f"merge_method: {method}\nbase_model: {base}\n"
            f"parameters: {{{', '.join(f'{k}: {v}' for k, v in params.items())}}}\n"
            "models:\n" + "".join(f"  - model: {e}\n" for e in experts))
    out = merge(write_recipe(tmp_path / "r.yaml", text), tmp_path / "out").path
    got = load(out)
    b = load(base)
    want = merge_state_dicts(method, b, [load(e) for e in experts], **params)
    assert set(got) == set(b)
    for name in b:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
