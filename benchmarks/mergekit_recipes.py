"""mergekit recipes, unchanged, through `modelalloy merge` and `mergekit-yaml`: do both merge,
and does modelalloy give mergekit's result?

    PYTHONPATH=src python benchmarks/mergekit_recipes.py [--write-docs] [--only NAME,...]

Builds tiny Llama, Mistral and GPT-2 (tied embeddings) families with transformers (a base and
three fine-tunes: base + random deltas, float32), then runs every recipe in :data:`RECIPES`
(mergekit's `examples/` and the configurations of its tests/test_basic_merges.py, on these
models) with both tools and compares the outputs tensor by tensor: names, shapes, dtypes, and
values within float32 rounding (|Δ| ≤ 2^-20 · max|mergekit's tensor|). DARE and DELLA draw
random masks with different generators, so for them only the share of entries that differ
from the base over the whole model is compared (within 0.02). mergekit is found by
benchmarks/mergekit_bin.py (``MERGEKIT_YAML``, PATH, the documented ../venv-mergekit), which
says which one it used; without it only modelalloy runs and the table says so.
``--write-docs`` puts the table into docs/recipes.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from mergekit_bin import find_mergekit  # noqa: E402

DOCS = REPO / "docs" / "recipes.md"
SECTION = "## Against mergekit"
TOLERANCE = 2.0 ** -20  # relative to the tensor's largest |value|
RANDOM = ("dare_", "della")  # methods whose masks are random draws
DROPS = "mergekit writes only"  # the why-not of outputs that lack some of our tensors



def _two(a: str, b: str) -> str:
    """The ``models:`` entries of mergekit's two_model_config: weights 0.6 and 0.4."""
    return (f"  - model: {{{a}}}\n    parameters: {{{{weight: 0.6}}}}\n"
            f"  - model: {{{b}}}\n    parameters: {{{{weight: 0.4}}}}\n")


LLAMA_MODELS, TOKEN_MODELS = _two("a", "b"), _two("ta", "tb")
GRANITE_MODELS, VLM_MODELS = _two("gra", "grb"), _two("va", "vb")

# name -> recipe text ({base}, {a}, {b}, {c}: the Llama family; {mbase}, {ma}, {mb}: Mistral;
# {gbase}, {ga}, {gb}: GPT-2 with tied embeddings). Every recipe is float32 so mergekit
# computes in float32 too.
RECIPES: dict[str, str] = {
    "linear": "merge_method: linear\nmodels:\n" + LLAMA_MODELS,
    "linear-negative": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: "
                       "{{weight: 1.5}}\n  - model: {b}\n    parameters: {{weight: -0.5}}\n",
    "linear-gpt2-tied": "merge_method: linear\nmodels:\n  - model: {ga}\n    parameters: "
                        "{{weight: 0.6}}\n  - model: {gb}\n    parameters: {{weight: 0.4}}\n",
    "passthrough": "merge_method: passthrough\nmodels:\n  - model: {a}\n",
    "passthrough-scale": "merge_method: passthrough\nmodels:\n  - model: {a}\n    parameters:\n"
                         "      scale: [{{filter: o_proj, value: 0}}, {{value: 1}}]\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                       + LLAMA_MODELS,
    "task-negation": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                     "  - model: {a}\n    parameters: {{weight: -1.0}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n" + LLAMA_MODELS
            + "parameters: {{density: 0.3}}\n",
    "ties-example": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                    "    parameters: {{density: [1, 0.7, 0.1], weight: 1.0}}\n  - model: {b}\n"
                    "    parameters: {{density: 0.5, weight: [0, 0.3, 0.7, 1]}}\n"
                    "  - model: {c}\n    parameters: {{density: 0.33, weight:\n"
                    "      [{{filter: mlp, value: 0.5}}, {{value: 0}}]}}\n"
                    "parameters: {{normalize: true, int8_mask: true}}\n",
    "ties-negative": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                     "    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {b}\n"
                     "    parameters: {{weight: -0.5, density: 0.5}}\n",
    "ties-mistral": "merge_method: ties\nbase_model: {mbase}\nmodels:\n  - model: {ma}\n"
                    "    parameters: {{weight: 0.6, density: 0.4}}\n  - model: {mb}\n"
                    "    parameters: {{weight: 0.4, density: 0.4}}\n",
    "bio-merge": "merge_method: ties\nbase_model: {mbase}\nmodels:\n  - model: {ma}\n"
                 "    parameters: {{density: 0.5, weight: 0.5}}\n  - model: {mb}\n"
                 "    parameters: {{density: 0.5, weight: 0.5}}\n"
                 "parameters: {{normalize: false, int8_mask: true}}\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n" + LLAMA_MODELS,
    "breadcrumbs-density": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n"
                           + LLAMA_MODELS + "parameters: {{density: 0.5, gamma: 0.05}}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n"
                        + LLAMA_MODELS + "parameters: {{density: 0.5, gamma: 0.05}}\n",
    "dare_linear": "merge_method: dare_linear\nbase_model: {base}\nmodels:\n" + LLAMA_MODELS
                   + "parameters: {{density: 0.66}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n" + LLAMA_MODELS
                 + "parameters: {{density: 0.66}}\n",
    "della": "merge_method: della\nbase_model: {base}\nmodels:\n" + LLAMA_MODELS
             + "parameters: {{density: 0.66, epsilon: 0.05, lambda: 0.5}}\n",
    "della_linear": "merge_method: della_linear\nbase_model: {base}\nmodels:\n" + LLAMA_MODELS
                    + "parameters: {{density: 0.66, epsilon: 0.05}}\n",
    "slerp": "merge_method: slerp\nbase_model: {a}\nmodels:\n" + LLAMA_MODELS
             + "parameters: {{t: 0.35}}\n",
    "slerp-gradient": "merge_method: slerp\nbase_model: {a}\nslices:\n  - sources:\n"
                      "      - {{model: {a}, layer_range: [0, 4]}}\n"
                      "      - {{model: {b}, layer_range: [0, 4]}}\nparameters:\n  t:\n"
                      "    - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}\n"
                      "    - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}\n    - {{value: 0.5}}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n" + LLAMA_MODELS,
    "model_stock-filter_wise": "merge_method: model_stock\nbase_model: {base}\nmodels:\n"
                               + LLAMA_MODELS + "parameters: {{filter_wise: true}}\n",
    "nuslerp": "merge_method: nuslerp\nmodels:\n" + LLAMA_MODELS,
    "nuslerp-rows": "merge_method: nuslerp\nmodels:\n" + LLAMA_MODELS
                    + "parameters: {{nuslerp_flatten: false}}\n",
    "nuslerp-columns-base": "merge_method: nuslerp\nbase_model: {base}\nmodels:\n"
                            + LLAMA_MODELS + "parameters: {{nuslerp_row_wise: true, "
                            "nuslerp_flatten: false}}\n",
    "nuslerp-cancelling": "merge_method: nuslerp\nmodels:\n  - model: {a}\n    parameters: "
                          "{{weight: -0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
                          "parameters: {{nuslerp_flatten: false}}\n",
    "multislerp": "merge_method: multislerp\nmodels:\n" + LLAMA_MODELS,
    "multislerp-base": "merge_method: multislerp\nbase_model: {base}\nmodels:\n" + LLAMA_MODELS,
    "karcher": "merge_method: karcher\nmodels:\n" + LLAMA_MODELS
               + "parameters: {{max_iter: 5, tol: 1.0e-5}}\n",
    "sce": "merge_method: sce\nbase_model: {base}\nmodels:\n" + LLAMA_MODELS
           + "parameters: {{select_topk: 0.5}}\n",
    "ram": "merge_method: ram\nbase_model: {base}\nmodels:\n" + LLAMA_MODELS,
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: {base}\nmodels:\n" + LLAMA_MODELS
                  + "parameters: {{r: 0.05, alpha: 1.0}}\n",
    "nearswap": "merge_method: nearswap\nbase_model: {a}\nmodels:\n" + LLAMA_MODELS
                + "parameters: {{t: 0.0001}}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {a}\nmodels:\n" + LLAMA_MODELS,
    "frankenmerge": "merge_method: passthrough\nslices:\n"
                    "  - sources: [{{model: {a}, layer_range: [0, 3]}}]\n"
                    "  - sources: [{{model: {b}, layer_range: [1, 4]}}]\n",
    "self-stack-gpt2": "merge_method: passthrough\nslices:\n"
                       "  - sources: [{{model: {ga}, layer_range: [0, 3]}}]\n"
                       "  - sources: [{{model: {ga}, layer_range: [1, 4]}}]\n",
    # tokenizers: {tbase}, {ta}, {tb} (Llama) and {gtbase}, {gta}, {gtb} (GPT-2, tied) whose
    # fine-tunes add different tokens (tests/mergekit/helpers.py: ADDED_TOKENS)
    "tokenizer-union": "merge_method: linear\nmodels:\n  - model: {ta}\n    parameters: "
                       "{{weight: 0.6}}\n  - model: {tb}\n    parameters: {{weight: 0.4}}\n"
                       "tokenizer_source: union\n",
    "tokenizer-union-ties": "merge_method: ties\nbase_model: {tbase}\nmodels:\n"
                            "  - model: {ta}\n    parameters: {{weight: 0.6}}\n"
                            "  - model: {tb}\n    parameters: {{weight: 0.4}}\n"
                            "parameters: {{density: 0.5}}\ntokenizer_source: union\n",
    "tokenizer-base": "merge_method: task_arithmetic\nbase_model: {tbase}\nmodels:\n"
                      "  - model: {ta}\n    parameters: {{weight: 0.6}}\n"
                      "  - model: {tb}\n    parameters: {{weight: 0.4}}\n"
                      "tokenizer_source: base\n",
    "tokenizer-model": "merge_method: linear\nmodels:\n" + TOKEN_MODELS
                       + "tokenizer_source: {tb}\n",
    "tokenizer-tokens": "merge_method: linear\nmodels:\n" + TOKEN_MODELS
                        + "tokenizer:\n  source: union\n  tokens:\n"
                        "    <|im_start|>:\n      source: {{kind: model_token, model: {tb}, "
                        "token: w5}}\n      force: true\n"
                        "    <|im_end|>: {{source: {tb}, force: true}}\n"
                        "    <|new|>: {{source: {{kind: zero}}}}\n",
    "tokenizer-token-id": "merge_method: task_arithmetic\nbase_model: {tbase}\nmodels:\n"
                          + TOKEN_MODELS + "tokenizer:\n  source: union\n"
                          "  tokens:\n    <|tool|>:\n      source: {{kind: model_token, "
                          "model: {ta}, token_id: 3}}\n      force: true\n",
    # mergekit adds the token to the base model's own tokenizer object, then finds the base's
    # new id past its embedding rows (KeyError)
    "tokenizer-base-new-token": "merge_method: task_arithmetic\nbase_model: {tbase}\n"
                                "models:\n" + TOKEN_MODELS + "tokenizer:\n  source: base\n"
                                "  tokens:\n    <|tool|>:\n      source: {{kind: "
                                "model_token, model: {ta}, token_id: 3}}\n",
    "tokenizer-pad": "merge_method: task_arithmetic\nbase_model: {tbase}\nmodels:\n"
                     + TOKEN_MODELS + "tokenizer:\n  source: union\n"
                     "  pad_to_multiple_of: 8\n",
    "tokenizer-gpt2-union": "merge_method: linear\nmodels:\n  - model: {gta}\n"
                            "    parameters: {{weight: 0.6}}\n  - model: {gtb}\n"
                            "    parameters: {{weight: 0.4}}\ntokenizer_source: union\n",
    "tokenizer-gpt2-slerp": "merge_method: slerp\nbase_model: {gtbase}\nmodels:\n"
                            "  - model: {gtbase}\n  - model: {gtb}\nparameters: {{t: 0.3}}\n"
                            "tokenizer_source: {gtb}\n",
    # mergekit's tests/test_basic_merges.py on Granite ({gra}, {grb}) and on Llava ({va}, {vb};
    # {vc} the shared base), the VLM in transformers 5's layout: every recipe unchanged
    "granite-copy": "merge_method: passthrough\nmodels:\n  - model: {gra}\n",
    "granite-linear": "merge_method: linear\nmodels:\n" + GRANITE_MODELS,
    "granite-slerp": "merge_method: slerp\nbase_model: {gra}\nmodels:\n  - model: {gra}\n"
                     "  - model: {grb}\nparameters: {{t: 0.5}}\n",
    "modules-llama": "merge_method: passthrough\nmodules:\n  default:\n    slices:\n"
                     "      - sources: [{{model: {a}, layer_range: [0, 3]}}]\n"
                     "      - sources: [{{model: {b}, layer_range: [1, 4]}}]\n",
    "vlm-linear": "merge_method: linear\nmodels:\n" + VLM_MODELS,
    "vlm-modules": "merge_method: linear\nmodules:\n  model.language_model.layers:\n"
                   "    slices:\n      - sources: [{{model: {va}, layer_range: [0, 2]}}, "
                   "{{model: {vb}, layer_range: [0, 2]}}]\n"
                   "      - sources: [{{model: {va}, layer_range: [1, 2]}}, "
                   "{{model: {vb}, layer_range: [1, 2]}}]\n"
                   "  model.vision_tower.encoder.layers:\n    models:\n" + VLM_MODELS.replace(
                       "  - ", "      - ").replace("    parameters", "        parameters")
                   + "  default:\n    models: [{{model: {va}}}, {{model: {vb}}}]\n"
                   "parameters: {{weight: 0.5}}\n",
    "vlm-slerp": "merge_method: slerp\nbase_model: {va}\nmodels:\n" + VLM_MODELS
                 + "parameters: {{t: 0.35}}\n",
    **{f"vlm-nuslerp{'-base' if base else ''}{'-rows' if rows else ''}"
       f"{'-flat' if flat else ''}":
       "merge_method: nuslerp\n" + ("base_model: {vc}\n" if base else "") + "models:\n"
       + VLM_MODELS + f"parameters: {{{{nuslerp_row_wise: {str(rows).lower()}, "
       f"nuslerp_flatten: {str(flat).lower()}}}}}\n"
       for base in (False, True) for rows in (False, True) for flat in (False, True)},
    "vlm-nuslerp-cancelling": "merge_method: nuslerp\nbase_model: {vc}\nmodels:\n"
                              "  - model: {va}\n    parameters: {{weight: -0.5}}\n"
                              "  - model: {vb}\n    parameters: {{weight: 0.5}}\n"
                              "parameters: {{nuslerp_row_wise: false, nuslerp_flatten: false}}\n",
    "vlm-task_arithmetic": "merge_method: task_arithmetic\nbase_model: {vc}\nmodels:\n"
                           + VLM_MODELS,
    "vlm-breadcrumbs": "merge_method: breadcrumbs\nbase_model: {vc}\nmodels:\n" + VLM_MODELS,
    "vlm-ties": "merge_method: ties\nbase_model: {vc}\nmodels:\n" + VLM_MODELS
                + "parameters: {{density: 0.3}}\n",
    "vlm-dare_ties": "merge_method: dare_ties\nbase_model: {vc}\nmodels:\n" + VLM_MODELS
                     + "parameters: {{density: 0.66}}\n",
    "vlm-model_stock": "merge_method: model_stock\nbase_model: {va}\nmodels:\n"
                       + VLM_MODELS.replace("{va}", "{vc}"),
    "vlm-model_stock-filter_wise": "merge_method: model_stock\nbase_model: {va}\nmodels:\n"
                                   + VLM_MODELS.replace("{va}", "{vc}")
                                   + "parameters: {{filter_wise: true}}\n",
}


@dataclass
class Row:
    recipe: str
    modelalloy: str  # "yes" or the one-line error
    mergekit: str  # "yes", the error, or "not run"
    equal: str  # "yes", "no", "-"
    why: str = ""


def build_models(root: Path) -> dict[str, str]:
    sys.path.insert(0, str(REPO))
    from tests.mergekit.helpers import save_family, save_token_family

    llama = save_family(root / "llama", "llama", n_models=3, layers=4)
    mistral = save_family(root / "mistral", "mistral", n_models=2, layers=4, seed=1)
    gpt2 = save_family(root / "gpt2", "gpt2", n_models=2, layers=4, seed=2)
    names = {"base": llama[0], "a": llama[1], "b": llama[2], "c": llama[3],
             "mbase": mistral[0], "ma": mistral[1], "mb": mistral[2],
             "gbase": gpt2[0], "ga": gpt2[1], "gb": gpt2[2]}
    granite = save_family(root / "granite", "granite", n_models=2, layers=2, seed=5)
    llava = save_family(root / "llava", "llava", n_models=2, layers=2, seed=6)
    names.update({"gra": granite[1], "grb": granite[2],
                  "va": llava[1], "vb": llava[2], "vc": llava[0]})
    for prefix, arch in (("t", "llama"), ("gt", "gpt2")):
        family = save_token_family(root / f"tok-{arch}", arch)
        names.update({f"{prefix}base": family[0], f"{prefix}a": family[1],
                      f"{prefix}b": family[2]})
    return {k: str(v) for k, v in names.items()}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else "failed"


def run_modelalloy(recipe: Path, out: Path, notes: list[str] | None = None) -> str:
    """"yes" or the error's last line; the merge's printed notes go to ``notes``."""
    r = subprocess.run([sys.executable, "-m", "modelalloy", "merge", str(recipe), str(out),
                        "--force"], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    if notes is not None:
        notes += [line for line in (r.stdout + r.stderr).splitlines() if "model_stock: t" in line]
    return "yes" if r.returncode == 0 else _last_line(r.stderr or r.stdout)


def run_mergekit(binary: str, recipe: Path, out: Path) -> str:
    r = subprocess.run([binary, str(recipe), str(out), "--no-copy-tokenizer", "--quiet"],
                       capture_output=True, text=True)
    return "yes" if r.returncode == 0 else _last_line(r.stderr or r.stdout)


def _vocab(folder: Path) -> dict[str, int] | None:
    if not (folder / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True).get_vocab()


def by_token(ours: Path, theirs: Path, a: dict, b: dict) -> tuple[dict, str]:
    """mergekit's vocabulary tensors with their rows in our tokenizer's order (mergekit orders
    a union's new tokens by a set's iteration order, which changes between runs), or why the
    two vocabularies differ."""
    va, vb = _vocab(ours), _vocab(theirs)
    if va is None or vb is None:
        return b, ""
    if set(va) != set(vb):
        only = sorted(set(va) ^ set(vb))
        return b, f"vocabularies differ ({len(only)} tokens, e.g. {only[0]!r})"
    order = torch.tensor([vb[t] for t, _ in sorted(va.items(), key=lambda kv: kv[1])])
    out = dict(b)
    for name, x in b.items():
        if name in a and x.ndim and x.shape[0] >= len(vb) and not any(
                part.isdigit() for part in name.split(".")):
            out[name] = torch.cat([x[order], x[len(vb):]])
    return out, ""


def compare(ours: Path, theirs: Path, base: Path | None, random_masks: bool) -> tuple[bool, str]:
    """(equal, why not) for two output folders; vocabulary rows are matched by token."""
    a, b = _weights(ours), _weights(theirs)
    b, why = by_token(ours, theirs, a, b)
    if why:
        return False, why
    dropped = sorted(set(a) - set(b))
    if set(b) < set(a):  # mergekit left tensors out: compare the ones it wrote
        ok, why = compare_tensors({n: a[n] for n in b}, b, base, random_masks)
        return False, (f"{DROPS} {len(b)} of {len(a)} tensors (not e.g. {dropped[0]}); "
                       + ("those equal ours" if ok else why))
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        return False, f"tensor names differ ({len(only)}, e.g. {only[0]})"
    return compare_tensors(a, b, base, random_masks)


def compare_tensors(a: dict, b: dict, base: Path | None, random_masks: bool
                    ) -> tuple[bool, str]:
    """(equal, why not) for two state dicts with the same names."""
    reference = _weights(base) if base is not None else {}
    if base is not None:  # under the output's names (Llava: transformers 5's)
        from modelalloy.io.layout import in_memory_names

        renames = in_memory_names(base, list(reference)) or {}
        reference = {renames.get(k, k): v for k, v in reference.items()}
    worst, where = 0.0, ""
    changed, total = [0, 0], 0
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, f"{name}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
        if random_masks:
            if name in reference:
                for i, t in enumerate((x, y)):
                    changed[i] += int((t != reference[name]).sum())
                total += x.numel()
            continue
        err = (x.double() - y.double()).abs().max().item() / max(y.abs().max().item(), 1e-30)
        if err > worst:
            worst, where = err, name
    if random_masks and not total:
        return False, "random masks: no base model to count changed entries against"
    if random_masks:
        shares = [c / total for c in changed]
        if abs(shares[0] - shares[1]) > 0.02:
            return False, f"{shares[0]:.3f} vs {shares[1]:.3f} of entries changed"
        return True, ""
    if worst > TOLERANCE:
        return False, f"{where}: relative difference {worst:.1e}"
    return True, ""


def run_all(names: list[str], work: Path, mergekit: str | None,
            done: dict[str, Row] | None = None, save: Path | None = None) -> list[Row]:
    """Run ``names`` (skipping those in ``done``); every row is saved to ``save`` as it comes."""
    done = dict(done or {})
    todo = [n for n in names if n not in done]
    models = build_models(work / "models") if todo else {}
    rows = [done[n] for n in names if n in done]
    for name in todo:
        text = RECIPES[name].format(**models) + "dtype: float32\n"
        recipe = work / f"{name}.yaml"
        recipe.write_text(text)
        ours, theirs = work / f"{name}-modelalloy", work / f"{name}-mergekit"
        notes: list[str] = []
        row = Row(name, run_modelalloy(recipe, ours, notes), "not run", "-")
        if mergekit is not None:
            row.mergekit = run_mergekit(mergekit, recipe, theirs)
        if row.modelalloy == "yes" and row.mergekit == "yes":
            base = next((line.split(": ", 1)[1] for line in text.splitlines()
                         if line.startswith("base_model: ")), None)
            random_masks = any(text.startswith(f"merge_method: {m}") for m in RANDOM)
            ok, why = compare(ours, theirs, Path(base) if base else None, random_masks)
            row.equal, row.why = ("yes" if ok else "no"), why
            if not ok and notes and not why.startswith(DROPS):  # Model Stock's t
                row.why = ("by design: mergekit's Model Stock t leaves [0, 1] in some tensors, "
                           "modelalloy clamps it (" + why + ")")
            if ok and random_masks:
                row.why = "random masks: share of changed entries compared"
        rows.append(row)
        if save is not None:
            done[name] = row
            save.write_text(json.dumps([asdict(r) for r in done.values()], indent=1) + "\n")
        print(f"{name}: modelalloy {row.modelalloy}; mergekit {row.mergekit}; "
              f"equal {row.equal} {row.why}", flush=True)
    return rows


def table(rows: list[Row], mergekit: str | None) -> str:
    lines = [SECTION, "",
             "`benchmarks/mergekit_recipes.py` (`MERGEKIT_YAML=/path/to/mergekit-yaml PYTHONPATH="
             "src python benchmarks/mergekit_recipes.py --write-docs`): each recipe unchanged "
             "through both tools on tiny float32 families (Llama, Mistral, GPT-2 with tied "
             "embeddings, Granite, Llava in transformers 5's layout, and Llama/GPT-2 whose "
             "fine-tunes add different tokens); equal = same names, shapes, dtypes and values "
             "within float32 rounding (2^-20 of the tensor's largest value), vocabulary rows "
             "matched by token; DARE/DELLA: the share of changed entries."
             + ("" if mergekit else " mergekit was not installed for this run."),
             "", "| recipe | modelalloy merges | mergekit merges | equal | why not |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.recipe} | {r.modelalloy} | {r.mergekit} | {r.equal} | "
                     f"{r.why.replace('|', '/')} |")
    merged = sum(r.modelalloy == "yes" for r in rows)
    theirs = sum(r.mergekit == "yes" for r in rows)
    equal = sum(r.equal == "yes" for r in rows)
    partly = sum(r.why.startswith(DROPS) and r.why.endswith("those equal ours") for r in rows)
    lines += ["", f"{merged} of {len(rows)} recipes merge with modelalloy ({theirs} with "
              f"mergekit); {equal} give mergekit's result; {partly} more equal it on every "
              "tensor mergekit writes (mergekit 0.1.5 leaves Llava's language model out).", ""]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Recipes\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    DOCS.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated recipe names")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--json", type=Path, help="rows saved here as they come; recipes already "
                                              "in it are not run again (--only reruns them)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(RECIPES)
    done = {}
    if args.json and args.json.exists():
        done = {r["recipe"]: Row(**r) for r in json.loads(args.json.read_text())}
        done = {k: v for k, v in done.items() if k not in names or not args.only}
    mergekit, how = find_mergekit()
    print(f"[mergekit] {mergekit} ({how})" if mergekit else f"[mergekit] not run: {how}")
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mk-recipes-"))
    try:
        rows = run_all(names, work, mergekit, done, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:  # the table covers every recipe run so far, in RECIPES order
        saved = {r["recipe"]: Row(**r) for r in json.loads(args.json.read_text())}
        rows = [saved[n] for n in RECIPES if n in saved]
    section = table(rows, mergekit)
    print(section)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.write_docs:
        write_docs(section)


if __name__ == "__main__":
    main()
