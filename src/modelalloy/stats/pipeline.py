"""Model folder + calibration file -> statistics file (what `modelalloy stats` and the engine's
"collect what is missing" step call)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from modelalloy.errors import CheckpointError
from modelalloy.io.checkpoint import open_checkpoint
from modelalloy.stats.collect import KINDS, collect_stats
from modelalloy.stats.data import TENSOR_SUFFIXES, load_calibration, read_records
from modelalloy.stats.io import save_stats, stats_path


def load_hf_model(model_dir: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """A Hugging Face model (causal-LM head when there is one) and its tokenizer, if any.

    Local files only, no remote code. Plain torch modules are not rebuilt from a folder: use
    the Python API (:func:`modelalloy.stats.collect_stats`) with the module itself.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json — `modelalloy stats` loads Hugging "
                              "Face model folders; for other modules use "
                              "modelalloy.stats.collect_stats in Python")
    # the weights pass the validated reader first (headers, sizes, regular files): a bad shard
    # is named in one line, not lost in transformers' fallbacks below
    with open_checkpoint(model_dir):
        pass
    try:
        import transformers
    except ImportError as err:  # pragma: no cover
        raise CheckpointError("transformers is needed to load a Hugging Face model folder "
                              "(pip install modelalloy[hf])") from err
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    model: torch.nn.Module | None = None
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # stderr is for our one-line messages
    try:
        for cls in (transformers.AutoModelForCausalLM,
                    transformers.AutoModelForSequenceClassification, transformers.AutoModel):
            try:
                model = cls.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs)
                break
            except (ValueError, KeyError, OSError):
                continue
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if model is None:
        raise CheckpointError(f"{model_dir}: transformers cannot load this model folder")
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    return model.to(device).eval(), tokenizer


def _check_token_ids(batches: list[Any], model: torch.nn.Module, data: str | Path) -> None:
    """Token ids the embedding has no row for would fail deep inside the forward pass (or
    read out of bounds on some devices): refuse them with the file's name."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if not isinstance(vocab, int):
        return
    for batch in batches:
        if isinstance(batch, dict) and batch["input_ids"].numel():
            top = int(batch["input_ids"].max())
            if top >= vocab:
                raise CheckpointError(f"{data}: token id {top} is beyond the model's vocabulary "
                                      f"({vocab} tokens); tokenize the data with this model's "
                                      "tokenizer")


def collect_for_model_dir(model_dir: str | Path, data: str | Path, kind: str, *,
                          out: str | Path | None = None, batch_size: int = 8,
                          max_length: int = 512, limit: int | None = None,
                          device: str = "cpu", field: str | None = None,
                          show_progress: bool = True, **options: Any) -> tuple[Path, float]:
    """Collect ``kind`` statistics for the HF model in ``model_dir`` on ``data`` and save them
    (default ``<model_dir>/stats/<kind>.safetensors``). Returns (path, seconds spent)."""
    if kind not in KINDS:
        raise CheckpointError(f"unknown statistic kind '{kind}'; one of {', '.join(KINDS)}")
    if Path(data).suffix not in TENSOR_SUFFIXES:
        read_records(data, field=field, limit=limit)  # a bad file fails before the model loads
    model, tokenizer = load_hf_model(model_dir, device)
    batches = load_calibration(data, tokenizer, batch_size=batch_size, max_length=max_length,
                               limit=limit, field=field)
    _check_token_ids(batches, model, data)
    start = time.perf_counter()
    stat = collect_stats(model, batches, kind, device=device, show_progress=show_progress,
                         **options)
    seconds = time.perf_counter() - start
    stat.meta["data"] = Path(data).name
    stat.meta["examples"] = str(sum(int(b.shape[0]) if isinstance(b, torch.Tensor)
                                    else int(b["input_ids"].shape[0]) for b in batches))
    target = Path(out) if out is not None else stats_path(model_dir, kind)
    return save_stats(stat, target, kind), seconds
