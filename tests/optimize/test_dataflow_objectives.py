"""Data-flow candidates (a layer path: another depth than the sources) scored by the suite and
lm-eval objectives: the evaluators build a model of the candidate's own depth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

pytest.importorskip("cma")

from modelalloy.errors import ModelAlloyError, OptimizeError  # noqa: E402
from modelalloy.optimize.candidate import ModelPool, merge_candidate  # noqa: E402
from modelalloy.optimize.template import load_template  # noqa: E402
from modelalloy.search.driver import optimize  # noqa: E402
from modelalloy.search.objectives import parse_objective, stack_depth  # noqa: E402


def flow_template(root: Path, suite, tasks: list[str]) -> Path:
    data = {"merge_method": "passthrough",
            "models": [{"model": str(suite.info.expert_dir(t))} for t in tasks],
            "dtype": "float32", "search": {"space": "dataflow", "scale": False}}
    path = root / "flow.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def candidate(template: Path, on: list[int]):
    space, _ = load_template(template)
    genome = [0.9 if t in on else 0.1 for t in range(space.dim)]
    return space, merge_candidate(space.recipe(genome), ModelPool())


def test_tiny_lm_scores_a_deeper_path_as_the_hand_built_gpt2(lm_smoke, tmp_path):
    from transformers import GPT2LMHeadModel

    from modelalloy.bench.lm import final_answer, gpt2_config, greedy

    tpl = flow_template(tmp_path, lm_smoke, ["len", "max"])
    space, cand = candidate(tpl, [0, 1])          # len:0 then max:0: two layers of one each
    assert space.cells == ["len:0", "max:0"] and stack_depth(cand) == 2
    ln, mx = (lm_smoke.expert_state_dict(t) for t in ("len", "max"))
    hand = {n: t for n, t in ln.items() if not n.startswith(("transformer.h.", "transformer.ln_f"))}
    hand.update({n: t for n, t in ln.items() if n.startswith("transformer.h.0.")})
    hand.update({n.replace("transformer.h.0.", "transformer.h.1."): t for n, t in mx.items()
                 if n.startswith("transformer.h.0.")})
    hand.update({n: t for n, t in mx.items() if n.startswith("transformer.ln_f")})
    model = GPT2LMHeadModel(gpt2_config({**lm_smoke.info.config, "n_layer": 2})).eval()
    model.load_state_dict(hand, strict=False)
    model.tie_weights()
    ids = torch.arange(1, 11)[None]
    with torch.no_grad():
        assert torch.equal(lm_smoke._model(dict(cand))(input_ids=ids).logits,
                           model(input_ids=ids).logits)
    expected = {}
    for task in lm_smoke.info.merged_tasks:
        prompts, answers = lm_smoke.labeled(task, "val")
        gens = greedy(model, prompts[:8], lm_smoke.info.config["n_positions"] - 16)
        expected[task] = sum(final_answer(g) == final_answer(a)
                             for g, a in zip(gens, answers[:8], strict=True)) / 8
    scores = parse_objective("suite:tiny-lm?size=smoke&limit=8").score(cand)
    assert {t: scores[t] for t in expected} == expected
    # the one-layer suite model would not even load a two-layer state dict
    assert scores["score"] == pytest.approx(sum(expected.values()) / len(expected))


def test_evolve_dataflow_on_tiny_lm_writes_a_recipe_merge_reproduces(lm_smoke, tmp_path,
                                                                     run_cli):
    tpl = flow_template(tmp_path, lm_smoke, ["len", "max"])
    res = optimize("evolve", tpl, ["suite:tiny-lm?size=smoke&limit=4"], tmp_path / "out",
                   budget=6, seed=0, options={"popsize": 3})
    assert len(res.trials) == 6
    r = run_cli("merge", res.recipe_path, tmp_path / "merged")
    assert r.code == 0, r.err
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    again = lm_smoke.evaluate(merged, lm_smoke.info.merged_tasks, split="val", limit=4)
    assert {t: v["accuracy"] for t, v in again.items()} == {
        t: res.best["scores"][t] for t in again}


def _forward_by_hand(sd: dict[str, torch.Tensor], x: torch.Tensor, blocks: int) -> torch.Tensor:
    """The tiny-vision body written out: 3x3 convs (+ReLU; 2x2 max-pool after the second),
    then the linear projection (linear features)."""
    h = x.unsqueeze(1)
    for i in range(blocks - 1):
        w, b = sd[f"blocks.{i}.weight"], sd[f"blocks.{i}.bias"]
        h = F.relu(F.conv2d(h, w.view(w.shape[0], -1, 3, 3), b, padding=1))
        if i == 1:
            h = F.max_pool2d(h, 2)
    last = blocks - 1
    return h.flatten(1) @ sd[f"blocks.{last}.weight"].T + sd[f"blocks.{last}.bias"]


def test_tiny_vision_scores_a_deeper_path_and_refuses_blocks_that_do_not_chain(vision_smoke,
                                                                               tmp_path):
    tasks = vision_smoke.info.merged_tasks[:2]
    tpl = flow_template(tmp_path, vision_smoke, tasks)
    # slots: a:0 a:1 a:2 a:3 b:0 b:1 b:2 b:3 -> a:0 a:1 a:2 b:2 b:3 (block 2 twice)
    space, cand = candidate(tpl, [0, 1, 2, 6, 7])
    assert stack_depth(cand) == 5
    obj = parse_objective("suite:tiny-vision?size=smoke")
    scores = obj.score(cand)
    with torch.no_grad():
        for task in vision_smoke.info.merged_tasks:
            x, y = vision_smoke.labeled(task, "val")
            hit = vision_smoke.head(task)(_forward_by_hand(cand, x, 5)).argmax(1) == y
            assert scores[task] == float(hit.float().mean()), task
    _, bad = candidate(tpl, [0, 3, 5])            # a:0, a:3 (the projection), b:1
    with pytest.raises(ModelAlloyError, match="does not fit a body of depth 2: .*size mismatch"):
        obj.score(bad)


def test_a_path_that_does_not_chain_stops_the_search_in_one_line(vision_smoke, tmp_path):
    tasks = vision_smoke.info.merged_tasks[:2]
    tpl = flow_template(tmp_path, vision_smoke, tasks)
    with pytest.raises(OptimizeError, match=r"failed on trial \d+: SuiteError: tiny-vision: "
                                            "the state dict does not fit"):
        optimize("evolve", tpl, ["suite:tiny-vision?size=smoke&limit=4"], tmp_path / "out",
                 budget=40, seed=0, options={"sigma0": 0.5})
    assert (tmp_path / "out" / "trials.jsonl").is_file()


@pytest.mark.slow
def test_lm_eval_scores_a_deeper_path_as_lm_eval_on_the_merged_folder(lm_smoke, tmp_path,
                                                                      run_cli):
    from modelalloy.eval.lm_eval_adapter import export_suite_task, run_lm_eval

    include = export_suite_task(lm_smoke, "len", tmp_path / "tasks", limit=6)
    tpl = flow_template(tmp_path, lm_smoke, ["len", "max"])
    space, cand = candidate(tpl, [0, 1])
    obj = parse_objective(f"lm-eval:ma_len?include={include}")
    obj.bind(lm_smoke.info.expert_dir("len"))
    obj.prepare()
    score = obj.score(cand)["ma_len"]
    path = tmp_path / "path.yaml"
    path.write_text(space.recipe([0.9, 0.9]).to_yaml())
    r = run_cli("merge", path, tmp_path / "merged")
    assert r.code == 0, r.err
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "merged" / f).write_bytes((lm_smoke.info.base_dir / f).read_bytes())
    disk = run_lm_eval(tmp_path / "merged", ["ma_len"], include_path=include)
    assert disk["ma_len"]["exact_match"] == pytest.approx(score)
    assert 2 in obj._lms  # the two-layer model, built from the reference's config
