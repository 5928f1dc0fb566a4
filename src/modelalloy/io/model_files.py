"""The non-weight files of an HF output folder: config, tokenizer, model card.

Only data files are copied, never ``*.py``: a merged model never carries remote code.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import yaml

from modelalloy.errors import CheckpointError, OutputError
from modelalloy.io.dtypes import dtype_name

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "tokenizer.model",
    "tokenizer.model.v*",
    "spiece.model",
    "sentencepiece*.model",
    "tekken.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _is_tokenizer_file(name: str) -> bool:
    return not name.endswith(".py") and any(
        fnmatch.fnmatchcase(name, p) for p in TOKENIZER_PATTERNS
    )


def _copy(src: Path, dst_dir: Path) -> None:
    try:
        shutil.copyfile(src, dst_dir / src.name)  # follows symlinks (HF cache snapshots)
    except OSError as e:
        raise OutputError(
            f"{dst_dir / src.name}: cannot copy from {src} ({e.strerror or e})"
        ) from None


def copy_model_files(src: Path, dst: Path, tokenizer_source: Path | None = None,
                     copy_tokenizer: bool = True) -> list[str]:
    """Copy config.json and generation_config.json from ``src``, tokenizer files from
    ``tokenizer_source`` (or ``src``; none when ``copy_tokenizer`` is false: the caller writes
    a merged tokenizer) into ``dst``; return the names copied.

    ``src`` may be a weight file, in which case there is nothing to copy from it. Python
    files are never copied. A ``tokenizer_source`` without tokenizer files is an error.
    """
    src, dst = Path(src), Path(dst)
    copied: list[str] = []
    if src.is_dir():
        for name in CONFIG_FILES:
            f = src / name
            if f.is_file():
                _copy(f, dst)
                copied.append(name)
    tok_dir = Path(tokenizer_source) if tokenizer_source is not None else src
    if not copy_tokenizer:
        return copied
    if tok_dir.is_dir():
        found = sorted(f for f in tok_dir.iterdir() if f.is_file() and _is_tokenizer_file(f.name))
        for f in found:
            _copy(f, dst)
            copied.append(f.name)
        if tokenizer_source is not None and not found:
            raise CheckpointError(
                f"{tok_dir}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.*, ...); "
                "choose a folder that has a tokenizer"
            )
    elif tokenizer_source is not None:
        raise CheckpointError(
            f"{tok_dir}: tokenizer source is not a folder; point to a model or tokenizer folder"
        )
    return copied


def _write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _read_config_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: invalid config.json ({e}); fix the source config") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config.json is not a JSON object; fix the source config")
    return config


def update_config(dst: Path, values: dict) -> None:
    """Set top-level keys of ``dst/config.json`` (no-op without a config): e.g. the layer
    count of a ``slices:`` merge."""
    path = Path(dst) / "config.json"
    if path.is_file():
        _write_json_atomic(path, {**_read_config_json(path), **values})


def set_vocab_size(dst: Path, size: int) -> None:
    """Set the vocabulary size in ``dst/config.json`` (``text_config.vocab_size`` when the
    vocabulary lives there, as in VLMs): the rows of a merged tokenizer's embeddings."""
    path = Path(dst) / "config.json"
    if not path.is_file():
        return
    config = _read_config_json(path)
    text = config.get("text_config")
    if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
        config["text_config"] = {**text, "vocab_size": size}
    else:
        config["vocab_size"] = size
    _write_json_atomic(path, config)


def set_config_dtype(dst: Path, dtype: torch.dtype) -> None:
    """Record the output dtype in ``dst/config.json`` (no-op without a config).

    Sets ``torch_dtype`` and/or ``dtype`` (transformers >= 4.56 writes ``dtype``), whichever
    the config already has, ``torch_dtype`` if neither, and the same keys in nested
    sub-configs (``text_config`` ...) that carry one.
    """
    path = Path(dst) / "config.json"
    if not path.is_file():
        return
    config = _read_config_json(path)
    name = dtype_name(dtype)

    def update(cfg: dict, top: bool) -> None:
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg]
        if not keys and top:
            keys = ["torch_dtype"]
        for k in keys:
            cfg[k] = name
        for v in cfg.values():
            if isinstance(v, dict):
                update(v, False)

    update(config, True)
    _write_json_atomic(path, config)


def write_model_card(
    dst: Path,
    *,
    recipe_yaml: str,
    method: str,
    base_model: str | None,
    models: list[str],
    extra_tags: Iterable[str] = (),
) -> None:
    """Write ``dst/README.md``: YAML front matter, what was merged and how, and the recipe."""
    parents = list(dict.fromkeys(([base_model] if base_model else []) + list(models)))
    tags = list(dict.fromkeys(["merge", "modelalloy", *extra_tags]))
    # The Hub only accepts model ids in base_model; local paths are listed in the text only.
    hub_ids = [p for p in parents if _HUB_ID.fullmatch(p) and not Path(p).exists()]
    front: dict[str, object] = {}
    if hub_ids:
        front["base_model"] = hub_ids
    if len(hub_ids) > 1:
        front["base_model_relation"] = "merge"
    front["tags"] = tags
    front["library_name"] = "transformers"
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip()

    lines = [
        "---",
        header,
        "---",
        "",
        "# Merged model",
        "",
        f"This model is a merge of {len(parents)} model{'s' if len(parents) != 1 else ''} "
        f"made with modelalloy using the "
        f"`{method}` method.",
        "",
    ]
    if base_model:
        lines += [f"Base model: `{base_model}`.", ""]
    lines += ["## Merged models", ""]
    lines += [f"- `{m}`" for m in models] or ["- (none)"]
    fence = "```"
    while fence in recipe_yaml:
        fence += "`"
    lines += [
        "",
        "## Recipe",
        "",
        "This recipe reproduces the merge:",
        "",
        f"{fence}yaml",
        recipe_yaml.rstrip("\n"),
        fence,
        "",
    ]
    path = Path(dst) / "README.md"
    try:
        path.write_text("\n".join(lines), encoding="utf-8")
    except OSError as e:
        raise OutputError(f"{path}: cannot write the model card ({e.strerror or e})") from None
