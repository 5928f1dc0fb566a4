"""Distillation merging end to end: teachers and student from a recipe, data, training, output.

The recipe names the teachers (``models``) and, through ``base_model`` and ``merge_method``,
where the student starts: ``student="base"`` (the base), ``"merge"`` (the recipe's merge of
the teachers that share the base's tensors — a warm start; teachers of other architectures
are only distilled) or a model folder. The output is an HF folder (safetensors, config,
tokenizer of the student) plus ``distill.json`` (settings, KL before and after, steps, wall
time), written atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelalloy.distill.data import pseudo_labelled, read_examples, suite_prompts
from modelalloy.distill.errors import DistillError
from modelalloy.distill.models import load_model, load_weights
from modelalloy.distill.targets import Teacher, build_targets
from modelalloy.distill.train import DistillConfig, mean_kl, train_student


def warm_start(recipe: Any, base: Path, teachers: Mapping[str, Path],
               log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """The recipe's merge of the teachers that have exactly the base's tensors."""
    from modelalloy.api import merge_state_dicts
    from modelalloy.io.checkpoint import read_state_dict
    from modelalloy.twin.shared import recipe_params

    base_sd = read_state_dict(base)
    same = []
    for name, path in teachers.items():
        sd = read_state_dict(path)
        if set(sd) == set(base_sd) and all(sd[k].shape == base_sd[k].shape for k in sd):
            same.append(sd)
        else:
            log(f"distill: teacher '{name}' is not of the base's architecture: distilled only, "
                "not merged into the warm start")
    if not same:
        raise DistillError("distill: no teacher shares the base's architecture; use "
                           "student='base' or a model folder", options=("student",))
    return merge_state_dicts(recipe.merge_method, base_sd, same, seed=recipe.seed,
                             **recipe_params(recipe))


def run_distill(recipe_path: Path, data: str, out: Path, *, student: str = "merge",
                cfg: DistillConfig | None = None, fusion: str = "min_ce",
                per_task: int = 64, checkpoint_dir: Path | None = None, resume: bool = False,
                force: bool = False, extra_teachers: Mapping[str, Path] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Distil the recipe's teachers into one student written to ``out`` (see module doc)."""

    log = log or (lambda _m: None)
    cfg = cfg or DistillConfig()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(recipe_path, data, out, student, cfg, fusion, per_task, checkpoint_dir,
                    resume, force, extra_teachers, log)
    finally:
        torch.set_num_threads(threads)


def _run(recipe_path: Path, data: str, out: Path, student: str, cfg: DistillConfig,
         fusion: str, per_task: int, checkpoint_dir: Path | None, resume: bool, force: bool,
         extra_teachers: Mapping[str, Path] | None, log: Callable[[str], None]
         ) -> dict[str, Any]:
    from modelalloy.io.writer import AtomicOutputDir
    from modelalloy.recipe.load import load_recipe

    recipe = load_recipe(recipe_path)
    paths = {p.name: p for p in (recipe.model_path(e.model) for e in recipe.expert_entries())}
    for name, path in (extra_teachers or {}).items():
        key, n = name, 2
        while key in paths:  # e.g. a second teacher of one task: "len@2"
            key, n = f"{name}@{n}", n + 1
        paths[key] = path
    if len(paths) < 2:
        raise DistillError(f"{recipe.source}: distillation merging needs at least two teachers")
    base = recipe.model_path(recipe.base_model) if recipe.base_model else None
    if data.startswith("suite:tiny-vision"):
        return _run_vision(recipe, paths, base, student, data, cfg, per_task, out, force, log)
    teachers = [Teacher(name, *load_model(p)) for name, p in paths.items()]
    if student == "merge" or student == "base":
        if base is None:
            raise DistillError(f"{recipe.source}: student='{student}' needs the recipe's "
                               "base_model", options=("student",))
        model, tok = load_model(base)
        if student == "merge":
            load_weights(model, warm_start(recipe, base, paths, log), "the warm start")
    else:
        model, tok = load_model(Path(student))
    start = time.perf_counter()
    if data.startswith("suite:"):
        from modelalloy.bench import load_suite

        _, name, *size = data.split(":")
        suite = load_suite(name, size[0] if size else "full", log=log)
        examples = pseudo_labelled(suite_prompts(suite, per_task), teachers,
                                   suite.info.config["n_positions"] - 16, log=log)
    else:
        examples = read_examples(data)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if cfg.styles:
        return _run_styles(model, tok, vocab, examples, teachers, cfg, out, force, start, log)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    width = None
    if cfg.feature_weight > 0:
        width = int(model.get_input_embeddings().weight.shape[1])
    targets = build_targets(examples, tok, vocab, teachers, fusion=fusion,
                            temperature=cfg.temperature, student_width=width,
                            alignment=cfg.alignment, log=log)
    label_s = time.perf_counter() - start
    log(f"distill: {len(targets)} examples, teacher targets in {label_s:.1f}s")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    kl_before = mean_kl(model, targets, cfg, pad)
    start = time.perf_counter()
    history = train_student(model, targets, cfg, pad_id=pad, checkpoint_dir=checkpoint_dir,
                            resume=resume, log=log)
    train_s = time.perf_counter() - start
    kl_after = mean_kl(model, targets, cfg, pad)
    report = {"teachers": list(paths), "student": student, "fusion": fusion,
              "config": asdict(cfg), "examples": len(targets), "kl_before": kl_before,
              "kl_after": kl_after, "label_seconds": round(label_s, 2),
              "train_seconds": round(train_s, 2), "history": history[-10:]}
    with AtomicOutputDir(out, force=force) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "distill.json").write_text(json.dumps(report, indent=1))
    log(f"distill: KL {kl_before:.4f} -> {kl_after:.4f}; wrote {out}")
    return report


def _run_styles(model: nn.Module, tok: Any, vocab: int, examples: list[Any],
                teachers: list[Teacher], cfg: DistillConfig, out: Path, force: bool,
                start: float, log: Callable[[str], None]) -> dict[str, Any]:
    """DMM's style-promptable student (modelalloy.distill.style): each teacher's own targets,
    one style vector per teacher, and the KL of every teacher to every style."""
    from modelalloy.distill.style import StyleStudent, save_styles, style_kl, train_style_student
    from modelalloy.io.writer import AtomicOutputDir

    per_teacher = [build_targets(examples, tok, vocab, [t], temperature=cfg.temperature,
                                 alignment=cfg.alignment) for t in teachers]
    label_s = time.perf_counter() - start
    log(f"distill: {len(examples)} examples x {len(teachers)} teachers, targets in "
        f"{label_s:.1f}s")
    student = StyleStudent(model, [t.name for t in teachers])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    kl_before = style_kl(student, per_teacher, cfg, pad)
    start = time.perf_counter()
    history = train_style_student(student, per_teacher, cfg, pad_id=pad, log=log)
    train_s = time.perf_counter() - start
    kl_after = style_kl(student, per_teacher, cfg, pad)
    report = {"teachers": [t.name for t in teachers], "styles": student.names,
              "config": asdict(cfg), "examples": len(examples),
              "style_kl_before": kl_before, "style_kl_after": kl_after,
              "kl_before": sum(r[k] for k, r in enumerate(kl_before)) / len(kl_before),
              "kl_after": sum(r[k] for k, r in enumerate(kl_after)) / len(kl_after),
              "label_seconds": round(label_s, 2), "train_seconds": round(train_s, 2),
              "history": history[-10:]}
    with AtomicOutputDir(out, force=force) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        save_styles(tmp, student)
        (tmp / "distill.json").write_text(json.dumps(report, indent=1))
    log(f"distill: KL to the own teacher {report['kl_before']:.4f} -> "
        f"{report['kl_after']:.4f}; wrote {out}")
    return report


def _run_vision(recipe: Any, paths: Mapping[str, Path], base: Path | None, student: str,
                data: str, cfg: DistillConfig, per_task: int, out: Path, force: bool,
                log: Callable[[str], None]) -> dict[str, Any]:
    """tiny-vision (modelalloy.distill.vision): teachers are suite experts (each names its task
    in config.json), the student a body; the output a folder of the suite's model format."""
    from modelalloy.bench import load_suite
    from modelalloy.bench.common import save_model_folder
    from modelalloy.distill.vision import distill_vision, suite_images
    from modelalloy.io.checkpoint import read_state_dict
    from modelalloy.io.writer import AtomicOutputDir

    if cfg.styles:
        raise DistillError("distill: a style-promptable student (styles=True) is for "
                           "language models (tiny-vision students are bodies under fixed task "
                           "heads)", options=("styles",))
    _, _name, *size = data.split(":")
    suite = load_suite("tiny-vision", size[0] if size else "full", log=log)
    teachers: dict[str, dict[str, torch.Tensor]] = {}
    for name, path in paths.items():
        cfg_path = Path(path) / "config.json"
        task = json.loads(cfg_path.read_text()).get("task") if cfg_path.is_file() else None
        if task is None:
            raise DistillError(f"{path}: a tiny-vision teacher names its task in config.json")
        if task in teachers:
            raise DistillError(f"distill: two teachers of task '{task}' ({name})")
        teachers[task] = read_state_dict(path)
    if student in ("merge", "base"):
        if base is None:
            raise DistillError(f"{recipe.source}: student='{student}' needs the recipe's "
                               "base_model", options=("student",))
        start_sd = (warm_start(recipe, base, paths, log) if student == "merge"
                    else read_state_dict(base))
        config_from = base
    else:
        start_sd, config_from = read_state_dict(Path(student)), Path(student)
    images = suite_images(suite, list(teachers), per_task)
    sd, report = distill_vision(suite, start_sd, teachers, images, cfg, log=log)
    report.update({"student": student, "config": asdict(cfg), "suite": data})
    config = json.loads((Path(config_from) / "config.json").read_text())
    config.pop("task", None)
    with AtomicOutputDir(out, force=force) as tmp:
        save_model_folder(tmp, sd, {**config, "distilled_from": list(teachers)})
        (tmp / "distill.json").write_text(json.dumps(report, indent=1))
    log(f"distill: KL {report['kl_before']:.4f} -> {report['kl_after']:.4f}; wrote {out}")
    return report
