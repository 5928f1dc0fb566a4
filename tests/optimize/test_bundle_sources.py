"""A TALL bundle's experts (``BUNDLE#TASK``) as the models of an optimize template: the search
space reads the reference through the engine's sources, and each candidate merges the rebuilt
experts — the same bits as the candidate merged from the experts rebuilt into folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from modelalloy.bundle import compress_to, rebuild_to
from modelalloy.optimize.candidate import ModelPool, merge_candidate
from modelalloy.optimize.template import load_template
from modelalloy.recipe.load import load_recipe
from tests.optimize.synthetic import family, save_family


def _template(root: Path, models: list[str], base: Path) -> Path:
    data = {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": m} for m in models],
            "parameters": {"lambda": 1.0, "normalize": False},
            "search": {"granularity": "layer", "parameters": {"weight": [0.0, 1.0]}}}
    path = root / f"template-{len(list(root.glob('template-*')))}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _bundle(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    base_dir, _ = save_family(tmp_path / "models")
    base, experts = family()
    bundle = tmp_path / "bundle"
    compress_to(bundle, base, {"a": experts[0], "b": experts[1]}, mask_lambda=0.4)
    return base_dir, bundle, base


def test_bundle_experts_in_a_template_merge_as_their_rebuilt_folders(tmp_path: Path) -> None:
    base_dir, bundle, base = _bundle(tmp_path)
    rebuilt = [rebuild_to(bundle, t, tmp_path / f"rebuilt-{t}") for t in ("a", "b")]

    space_b, _ = load_template(_template(tmp_path, [f"{bundle}#a", f"{bundle}#b"], base_dir))
    space_f, _ = load_template(_template(tmp_path, [str(p) for p in rebuilt], base_dir))
    assert space_b.dim == space_f.dim == 8  # 4 cells (3 layers + the head) × 2 experts

    genome = torch.rand(space_b.dim, generator=torch.Generator().manual_seed(5)).tolist()
    got = merge_candidate(space_b.recipe(genome), ModelPool())
    want = merge_candidate(space_f.recipe(genome), ModelPool())
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # the two tasks of one bundle are two experts, not one folder read twice
    weights = [0.0] * space_b.dim
    weights[0] = 1.0
    lone = merge_candidate(space_b.recipe(weights), ModelPool())
    assert not torch.equal(lone["layers.0.weight"], base["layers.0.weight"])


def test_a_search_over_bundle_experts_writes_a_recipe_merge_reproduces(tmp_path: Path,
                                                                       run_cli) -> None:
    pytest.importorskip("cma")
    from modelalloy.search.driver import optimize

    base_dir, bundle, _ = _bundle(tmp_path)
    tpl = _template(tmp_path, [f"{bundle}#a", f"{bundle}#b"], base_dir)
    res = optimize("evolve", tpl, ["python:tests.optimize.synthetic:quadratic_layers"],
                   tmp_path / "out", budget=4, seed=1)
    rec = load_recipe(res.recipe_path)
    assert [e.model for e in rec.expert_entries()] == [f"{bundle.resolve()}#a",
                                                       f"{bundle.resolve()}#b"]
    r = run_cli("merge", res.recipe_path, tmp_path / "merged")
    assert r.code == 0, r.err
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    cand = merge_candidate(rec, ModelPool())
    assert sorted(merged) == sorted(cand)
    for n in cand:
        assert torch.equal(merged[n], cand[n]), n


def test_a_model_with_a_lora_adapter_in_a_template_is_the_adapted_model(tmp_path: Path
                                                                        ) -> None:
    from safetensors.torch import save_file

    from tests.lora.helpers import write_adapter

    base_dir, expert_dirs = save_family(tmp_path / "models")
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randn(2, 4, generator=gen), torch.randn(6, 2, generator=gen)
    adapter = write_adapter(tmp_path / "adapter", {"layers.0": (a, b)}, r=2, alpha=4)
    # the adapted expert by LoRA's formula, W + (alpha / r)·B·A, saved as a plain folder
    adapted = load_file(str(expert_dirs[0] / "model.safetensors"))
    adapted["layers.0.weight"] = adapted["layers.0.weight"] + 2.0 * (b @ a)
    plain = tmp_path / "adapted"
    plain.mkdir()
    save_file(adapted, str(plain / "model.safetensors"))
    (plain / "config.json").write_text((expert_dirs[0] / "config.json").read_text())

    space_l, _ = load_template(_template(tmp_path, [f"{expert_dirs[0]}+{adapter}",
                                                    str(expert_dirs[1])], base_dir))
    space_p, _ = load_template(_template(tmp_path, [str(plain), str(expert_dirs[1])],
                                         base_dir))
    genome = torch.rand(space_l.dim, generator=gen).tolist()
    rec = space_l.recipe(genome)
    assert rec.expert_entries()[0].model == f"{expert_dirs[0]}+{adapter}"
    got = merge_candidate(rec, ModelPool())
    want = merge_candidate(space_p.recipe(genome), ModelPool())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)
    assert not torch.equal(got["layers.0.weight"],
                           merge_candidate(load_template(_template(
                               tmp_path, [str(e) for e in expert_dirs], base_dir))[0]
                               .recipe(genome), ModelPool())["layers.0.weight"])
