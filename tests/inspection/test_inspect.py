"""modelalloy inspect: its numbers against ones worked out here with numpy, per tensor and
per layer; the report folder; errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.conftest import save_gpt2_family

DENS = [0.3, 0.5, 0.4]


@pytest.fixture
def family(tmp_path: Path) -> Path:
    save_gpt2_family(tmp_path, n_experts=3)
    (tmp_path / "ties.yaml").write_text(
        "merge_method: ties\nbase_model: base\nmodels:\n"
        + "".join(f"  - model: expert{i}\n    parameters: {{density: {d}, weight: 1.0}}\n"
                  for i, d in enumerate(DENS)))
    return tmp_path


def _taus(root: Path, names: list[str]) -> list[np.ndarray]:
    base = load_file(str(root / "base" / "model.safetensors"))
    out = []
    for i in range(3):
        e = load_file(str(root / f"expert{i}" / "model.safetensors"))
        out.append(np.concatenate([(e[n].double() - base[n].double()).numpy().ravel()
                                   for n in names]))
    return out


def _expected(root: Path, names: list[str]) -> dict:
    """The measures from their definitions, tensor by tensor where masks are per tensor."""
    per = [_taus(root, [n]) for n in names]
    taus = _taus(root, names)
    cos = [taus[i] @ taus[j] / np.linalg.norm(taus[i]) / np.linalg.norm(taus[j])
           for i, j in ((0, 1), (0, 2), (1, 2))]
    t = np.stack(taus)
    conflict = ((t > 0).any(0) & (t < 0).any(0)).mean()
    ties_and = np.zeros((3, 3))
    ties_or = np.zeros((3, 3))
    tall_and = np.zeros((3, 3))
    tall_or = np.zeros((3, 3))
    kept = np.zeros(3)
    for tv in per:
        masks = []
        for i in range(3):
            k = int(DENS[i] * tv[i].size)
            m = np.zeros(tv[i].size, bool)
            m[np.argsort(-np.abs(tv[i]))[:k]] = True
            masks.append(m)
        trimmed = [np.where(m, x, 0.0) for m, x in zip(masks, tv, strict=True)]
        gamma = np.where(np.sum(trimmed, axis=0) >= 0, 1.0, -1.0)
        mtl = np.sum(tv, axis=0)
        tall = [np.abs(tv[i]) > 0.6 * np.abs(mtl - tv[i]) for i in range(3)]
        for i in range(3):
            agree = masks[i] & (np.sign(tv[i]) == gamma)
            kept[i] += (tv[i][agree] ** 2).sum()
            for j in range(3):
                ties_and[i, j] += (masks[i] & masks[j]).sum()
                ties_or[i, j] += (masks[i] | masks[j]).sum()
                tall_and[i, j] += (tall[i] & tall[j]).sum()
                tall_or[i, j] += (tall[i] | tall[j]).sum()
    pairs = ((0, 1), (0, 2), (1, 2))
    return {
        "norms": [np.linalg.norm(x) for x in taus], "mean_cosine": np.mean(cos),
        "sign_conflict_rate": conflict,
        "ties_overlap": np.mean([ties_and[i, j] / ties_or[i, j] for i, j in pairs]),
        "tall_overlap": np.mean([tall_and[i, j] / tall_or[i, j] for i, j in pairs]),
        "surviving": [kept[i] / (taus[i] ** 2).sum() for i in range(3)],
    }


def _check(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert np.allclose(got[key], value, rtol=1e-5, atol=1e-7), (key, got[key], value)


def test_numbers_match_independent_ones(family, run_cli):
    result = run_cli("inspect", family / "ties.yaml", "--out", family / "report")
    assert result.code == 0, result.err
    assert "sign conflict" in result.out and "per layer" in result.out
    report = json.loads((family / "report" / "report.json").read_text())
    name = "transformer.h.1.mlp.c_fc.weight"
    _check(report["tensors"][name], _expected(family, [name]))
    layer1 = [n for n in load_file(str(family / "base" / "model.safetensors"))
              if n.startswith("transformer.h.1.")]
    _check(report["tables"]["layer"]["1"], _expected(family, layer1))
    assert report["tables"]["family"]["mlp.c_fc.weight"]["elements"] == 3 * 32 * 128
    for png in ("cosine", "sign_conflicts", "ties_overlap", "tall_overlap", "surviving"):
        assert (family / "report" / f"{png}.png").stat().st_size > 1000
    page = (family / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5 and "per family" in page


def test_without_base_is_one_line_error(family, run_cli):
    (family / "lin.yaml").write_text("merge_method: linear\nmodels: [expert0, expert1]\n")
    result = run_cli("inspect", family / "lin.yaml")
    assert result.code == 1 and "base_model" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_streamed_trim_masks_are_the_merges_own(monkeypatch):
    """Chunk by chunk, with many ties at the threshold (bf16 values), the TIES masks are
    exactly those of the whole-tensor trim the merge uses (k kept, ties in index order)."""
    import torch

    import modelalloy.inspection.metrics as metrics
    from modelalloy.methods._sparsify import magnitude_trim_

    monkeypatch.setattr(metrics, "CHUNK", 1000)
    g = torch.Generator().manual_seed(0)
    taus = [(torch.randn(50, 101, generator=g) * 4).round() / 4 for _ in range(3)]  # ties
    dens = [0.3, 0.5, 0.1]
    sums = metrics.tensor_sums(taus, weights=[1.0] * 3, densities=dens, mask_lambda=0.6,
                               method="ties")
    masks = [magnitude_trim_(t.reshape(-1).clone(), d) != 0 for t, d in zip(taus, dens,
                                                                             strict=True)]
    for i in range(3):
        assert sums.ties_and[i][i] == int(masks[i].sum())
        for j in range(3):
            assert sums.ties_and[i][j] == int((masks[i] & masks[j]).sum())
            assert sums.ties_or[i][j] == int((masks[i] | masks[j]).sum())
