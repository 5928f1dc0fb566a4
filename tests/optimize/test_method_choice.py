"""layerwise_search with a method per layer (MedSAMix's per-layer operator choice): it finds the
known per-layer methods, and its staged recipe reproduces through `merge-multi` bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("optuna")

from modelalloy.errors import OptimizeError  # noqa: E402
from modelalloy.optimize.candidate import ModelPool, merge_candidate, merge_staged  # noqa: E402
from modelalloy.optimize.space import StagedRecipe  # noqa: E402
from modelalloy.optimize.template import load_template  # noqa: E402
from modelalloy.search.driver import optimize  # noqa: E402
from tests.optimize import synthetic  # noqa: E402

OBJ = "python:tests.optimize.synthetic:per_layer_methods"
# weights fixed at 1 (the target's): the search is over the method of each layer
SEARCH = {"granularity": "layer", "methods": ["ties"], "parameters": {"weight": [1.0, 1.0]}}


def test_space_has_a_method_gene_per_cell(template):
    space, _ = load_template(template(search=SEARCH))
    assert space.methods == ["task_arithmetic", "ties"]
    assert space.dim == 4 * 2 + 4     # (2 weights + 1 method) per cell
    genome = space.x0()
    assert space.cell_methods(genome) == ["task_arithmetic"] * 4
    methods_at = [i for i, g in enumerate(space.genes) if g.param == "method"]
    for i in methods_at[::2]:         # layers.0 and layers.2 to ties
        genome[i] = 0.9
    assert space.cell_methods(genome) == ["ties", "task_arithmetic", "ties", "task_arithmetic"]
    staged = space.recipe(genome)
    assert isinstance(staged, StagedRecipe)
    assert [n for n, _ in staged.stages] == ["stage_task_arithmetic", "stage_ties"]
    # one method everywhere: a plain recipe of that method
    for i in methods_at:
        genome[i] = 0.9
    assert space.recipe(genome).merge_method == "ties"


def test_staged_candidate_is_the_hand_built_per_layer_merge(template):
    space, _ = load_template(template(search=SEARCH))
    genome = space.x0()
    methods_at = [i for i, g in enumerate(space.genes) if g.param == "method"]
    for i in methods_at[::2]:
        genome[i] = 0.9
    merged = merge_staged(space.recipe(genome), ModelPool())
    assert synthetic.per_layer_methods(merged) == pytest.approx(0.0, abs=1e-12)
    assert merged["step"].item() == 7
    # against each single method, whose recipes the engine merges on its own
    for i in methods_at:
        genome[i] = 0.1
    ta = merge_candidate(space.recipe(genome), ModelPool())
    assert synthetic.per_layer_methods(ta) < -0.1


def test_search_finds_the_per_layer_methods_and_merge_multi_reproduces(template, tmp_path,
                                                                       run_cli):
    res = optimize("layerwise_search", template(search=SEARCH), [OBJ], tmp_path / "out",
                   budget=60, seed=0, options={"rungs": 1})
    space, _ = load_template(tmp_path / "template.yaml")
    methods = space.cell_methods(res.best["candidate"])
    assert methods == [synthetic.METHOD_TARGET[c] for c in ("layers.0", "layers.1",
                                                             "layers.2", "head")]
    assert res.best["scores"]["fitness"] == pytest.approx(0.0, abs=1e-12)
    text = res.recipe_path.read_text()
    assert text.count("---") == 2 and "merge-multi" in text
    r = run_cli("merge-multi", res.recipe_path, "-I", tmp_path / "work", "--out-path",
                tmp_path / "merged")
    assert r.code == 0, r.err
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    cand = merge_staged(space.recipe(res.best["candidate"]), ModelPool())
    assert sorted(merged) == sorted(cand)
    for n in cand:
        assert merged[n].dtype == cand[n].dtype and torch.equal(merged[n], cand[n]), n
        if cand[n].is_floating_point():  # bit for bit, the sign of zeros too
            assert torch.equal(merged[n].view(torch.int32), cand[n].view(torch.int32)), n


@pytest.mark.filterwarnings("ignore:.*base_model. ignored")
def test_method_list_errors(template):
    with pytest.raises(OptimizeError, match="search.methods must be a list"):
        load_template(template(search={**SEARCH, "methods": "ties"}))
    with pytest.raises(OptimizeError, match="at least one method besides"):
        load_template(template(search={**SEARCH, "methods": ["task_arithmetic"]}))
    with pytest.raises(OptimizeError, match="'passthrough' cannot merge"):
        load_template(template(search={**SEARCH, "methods": ["passthrough"]}))


def test_resume_with_other_methods_is_refused(template, tmp_path):
    tpl = template(search=SEARCH)
    optimize("layerwise_search", tpl, [OBJ], tmp_path / "out", budget=4, seed=0,
             options={"rungs": 1})
    data = tpl.read_text().replace("- ties", "- dare_ties")
    tpl.write_text(data)
    with pytest.raises(OptimizeError, match="search"):
        optimize("layerwise_search", tpl, [OBJ], tmp_path / "out", budget=8, seed=0,
                 resume=True, options={"rungs": 1})
