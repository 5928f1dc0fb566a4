"""A TALL bundle's expert as an engine source (``bundle#task`` in a recipe): its rebuilt
weights are θ_0 + m_t ⊙ τ_MTL bit for bit, whole or a slice at any offset, and a merge of
rebuilt experts through the driver equals the merge of the same weights given as state dicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import modelalloy
from modelalloy.bundle import TallBundle, compress, compress_to, rebuild_to
from modelalloy.bundle.tall import TallConfig
from modelalloy.engine.run import run_recipe
from modelalloy.engine.sources import open_tall_expert
from modelalloy.errors import CheckpointError
from modelalloy.io.tall_bundle import CONFIG_FIELDS
from modelalloy.methods.registry import SLICE_ELEMENTS

# more than two slices and a length that is not a multiple of 8 (the masks' bytes)
BIG = (2 * SLICE_ELEMENTS + 12345) // 7 * 7
SHAPES = {"big.weight": (BIG // 7, 7), "small.weight": (33, 5), "bias": (13,)}


def _family(dtype: torch.dtype = torch.bfloat16):
    gen = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=gen).to(dtype) for k, s in SHAPES.items()}
    base["steps"] = torch.tensor([5, 6])  # an integer buffer: copied from the base
    experts = {}
    for task in ("math", "code"):
        experts[task] = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=gen)).to(dtype)
                         if v.is_floating_point() else v.clone() for k, v in base.items()}
    return base, experts


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    base, experts = _family()
    path = tmp_path_factory.mktemp("tall") / "bundle"
    compress_to(path, base, experts, mask_lambda=0.4)
    return path


def _formula(bundle_dir, task_index: int) -> dict[str, torch.Tensor]:
    """θ_0 + m_t ⊙ τ_MTL from the bundle's files read directly (numpy's unpackbits), in
    float32 and cast to θ_0's dtype: the reconstruction the bundle code made before it read
    through the engine source."""
    base = load_file(str(bundle_dir / "base" / "model.safetensors"))
    merged = load_file(str(bundle_dir / "merged" / "model.safetensors"))
    masks = load_file(str(bundle_dir / "masks" / "model.safetensors"))
    out = {}
    for name, b in base.items():
        if name not in merged:
            out[name] = b
            continue
        bits = np.unpackbits(masks[f"{task_index}/{name}"].numpy(), count=b.numel())
        m = torch.from_numpy(bits.astype(bool)).reshape(b.shape).to(torch.float32)
        out[name] = (b.to(torch.float32) + m * merged[name].to(torch.float32)).to(b.dtype)
    return out


def test_the_manifest_config_keys_are_the_bundle_config_fields():
    assert set(CONFIG_FIELDS) == set(TallConfig.__annotations__)


@pytest.mark.parametrize("task, index", [("math", 0), ("code", 1), ("1", 1)])
def test_the_source_rebuilds_each_expert_bit_for_bit(bundle_dir, task, index):
    want = _formula(bundle_dir, index)
    with open_tall_expert(bundle_dir, task) as expert:
        assert expert.names() == list(want)
        for name, tensor in want.items():
            got = expert.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
            assert expert.info(name).shape == tuple(tensor.shape)
        # slices at offsets that cut the mask's bytes, of lengths that are not multiples of 8
        flat = want["big.weight"].reshape(-1)
        for start, count in [(0, 1), (3, 13), (8, 8), (1001, 4099), (BIG - 5, 5),
                             (SLICE_ELEMENTS - 3, 11)]:
            out = torch.empty(count, dtype=torch.bfloat16)
            expert.get_slice("big.weight", start, out)
            assert torch.equal(out, flat[start:start + count]), (start, count)
        ints = torch.empty(2, dtype=torch.int64)
        assert torch.equal(expert.get_slice("steps", 0, ints), torch.tensor([5, 6]))


def test_rebuild_and_rebuild_to_read_through_the_source(bundle_dir, tmp_path):
    want = _formula(bundle_dir, 1)
    loaded = TallBundle.load(bundle_dir).rebuild("code")
    rebuild_to(bundle_dir, "code", tmp_path / "code")
    written = load_file(str(tmp_path / "code" / "model.safetensors"))
    for name, tensor in want.items():
        assert torch.equal(loaded[name], tensor) and torch.equal(written[name], tensor), name


def test_an_in_memory_rebuild_shares_no_storage_with_the_bundle():
    base, experts = _family(torch.float32)
    bundle = compress(base, experts, mask_lambda=0.4)
    rebuilt = bundle.rebuild("math")
    for name, tensor in rebuilt.items():
        assert tensor.untyped_storage().data_ptr() != \
            bundle.base[name].untyped_storage().data_ptr(), name


def test_an_unknown_task_is_one_line_naming_the_tasks(bundle_dir):
    with pytest.raises(CheckpointError, match="unknown task 'art'.*math, code"):
        open_tall_expert(bundle_dir, "art")
    with pytest.raises(CheckpointError, match="task index 2 out of range"):
        open_tall_expert(bundle_dir, 2)


RECIPE = """\
merge_method: {method}
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0{density}}}
  - model: {b}
    parameters: {{weight: 0.7{density}}}
parameters: {{lambda: 0.9}}
dtype: bfloat16
"""


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_recipe_merges_bundle_experts_as_the_same_weights_given_as_state_dicts(
        bundle_dir, tmp_path, method):
    bundle = TallBundle.load(bundle_dir)
    experts = {task: bundle.rebuild(task) for task in bundle.tasks}
    density = ", density: 0.5" if method == "ties" else ""
    by_reference = RECIPE.format(method=method, base=f"{bundle_dir}/base", a=f"{bundle_dir}#math",
                                 b=f"{bundle_dir}#code", density=density)
    plain = RECIPE.format(method=method, base="base", a="math", b="code", density=density)
    want = modelalloy.merge(plain, sources={"base": bundle.base, **experts})

    # from the bundle folder: written to disk, and merged in memory
    run_recipe(by_reference, tmp_path / "out", threads=2)
    on_disk = load_file(str(tmp_path / "out" / "model.safetensors"))
    in_memory = modelalloy.merge(by_reference)
    assert list(in_memory) == list(want)
    for name, tensor in want.items():
        assert torch.equal(on_disk[name], tensor), name
        assert torch.equal(in_memory[name], tensor), name
    assert (tmp_path / "out" / "modelalloy_recipe.yaml").exists()
    # the merge is not the base: the rebuilt experts took part
    assert not torch.equal(want["big.weight"], bundle.base["big.weight"])


def test_a_recipe_naming_a_task_the_bundle_lacks_is_refused(bundle_dir, tmp_path):
    recipe = RECIPE.format(method="task_arithmetic", base=f"{bundle_dir}/base",
                           a=f"{bundle_dir}#math", b=f"{bundle_dir}#art", density="")
    with pytest.raises(CheckpointError, match="unknown task 'art'"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_eval_reads_a_bundle_expert_through_the_source(bundle_dir):
    from modelalloy.eval.harness import EvalError, load_model_folder

    want = _formula(bundle_dir, 0)
    got = load_model_folder(f"{bundle_dir}#math")
    assert list(got) == list(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    with pytest.raises(EvalError, match="TALL-masks bundle; name one of its experts"):
        load_model_folder(bundle_dir)


def test_a_data_informed_merge_of_bundle_experts_says_to_rebuild_them(bundle_dir, tmp_path):
    recipe = (f"merge_method: regmean\n"
              f"models:\n  - model: {bundle_dir}#math\n  - model: {bundle_dir}#code\n")
    with pytest.raises(CheckpointError, match="expert of a TALL bundle; rebuild it"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_slices_of_bundle_experts_are_slices_of_their_weights(tmp_path):
    gen = torch.Generator().manual_seed(5)
    base = {f"layers.{i}.w": torch.randn(6, 4, generator=gen) for i in range(3)}
    experts = {t: {k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
               for t in ("a", "b")}
    compress_to(tmp_path / "bun", base, experts, mask_lambda=0.4)
    recipe = """\
merge_method: linear
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}
      - {{model: {b}, layer_range: [1, 3], parameters: {{weight: 0.7}}}}
"""
    bundle = TallBundle.load(tmp_path / "bun")
    want = modelalloy.merge(recipe.format(a="a", b="b"),
                            sources={t: bundle.rebuild(t) for t in ("a", "b")})
    run_recipe(recipe.format(a=f"{tmp_path}/bun#a", b=f"{tmp_path}/bun#b"), tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(want) == {"layers.0.w", "layers.1.w"}
    assert all(torch.equal(got[n], want[n]) for n in want)
    # each expert its own source (they share the bundle's folder): layer 0 is 0.3·a0 + 0.7·b1
    a, b = bundle.rebuild("a"), bundle.rebuild("b")
    assert torch.allclose(got["layers.0.w"], 0.3 * a["layers.0.w"] + 0.7 * b["layers.1.w"])
