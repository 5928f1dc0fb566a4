"""Tensor names in the layout transformers 5 builds in memory, for checkpoints saved in an
older one (Llava: ``language_model.model.layers.0...`` on disk is
``model.language_model.layers.0...`` in memory; ``language_model.lm_head`` is ``lm_head``).

transformers 5 loads such checkpoints through renaming rules it keeps per model type; mergekit
merges and writes in the in-memory layout. modelalloy does the same, so an output's tensor
names (and the module names of a ``modules:`` recipe) are mergekit's. The names come from
transformers itself: the model is built on the meta device from its config (no weights, never
remote code) and each stored name goes through transformers' own renaming. Only pure renames
are followed: a model type whose loading also converts tensors (fused experts) keeps its
stored names, as does any checkpoint whose renamed names transformers would not load.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from modelalloy.io.checkpoint import TensorInfo

_CACHE: dict[tuple[str, tuple[str, ...]], dict[str, str] | None] = {}


def in_memory_names(folder: Path, names: list[str]) -> dict[str, str] | None:
    """Stored name -> transformers 5's in-memory name, when some differ; None otherwise (no
    config, no renaming rules, rules that do more than rename, or transformers missing)."""
    try:
        config_text = (Path(folder) / "config.json").read_text()
        config = json.loads(config_text)
    except (OSError, ValueError):
        return None
    key = (config_text, tuple(names))
    if key not in _CACHE:
        _CACHE[key] = _renames(folder, config, names)
    return _CACHE[key]


def _may_have_rules(model_type: object) -> bool:
    """Whether transformers may keep renaming rules for ``model_type``, from the text of its
    ``conversion_mapping`` module: every model type it has rules for is a quoted literal there.
    Importing the module costs about 0.9 s and 70 MB (it pulls in torch.distributed.tensor):
    a third of a 1B linear merge, for the common model types that have no rules."""
    if not isinstance(model_type, str) or not model_type:
        return False
    spec = importlib.util.find_spec("transformers")  # finds the package, imports nothing
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        try:
            text = (Path(folder) / "conversion_mapping.py").read_text(encoding="utf-8")
        except OSError:
            continue
        return f'"{model_type}"' in text or f"'{model_type}'" in text
    return False


def _renames(folder: Path, config: dict, names: list[str]) -> dict[str, str] | None:
    if not isinstance(config, dict) or not _may_have_rules(config.get("model_type")):
        return None  # the common case: nothing to rename, and transformers is not imported
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return None
    if not isinstance(config, dict) or not get_checkpoint_conversion_mapping(
            config.get("model_type")):
        return None  # the common case: nothing to rename, and no model is built
    try:
        import transformers
        from transformers import AutoConfig
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                         trust_remote_code=False)
        cls = getattr(transformers, (cfg.architectures or [""])[0], None)
        if cls is None:
            return None
        with torch.device("meta"):
            model = cls._from_config(cfg)
        meta = model.state_dict()
        rules = get_model_conversion_mapping(model)
        renamings = [r for r in rules if isinstance(r, WeightRenaming)]
        if len(renamings) != len(rules):
            return None
        renamed = {n: rename_source_key(n, renamings, [], model.base_model_prefix, meta)[0]
                   for n in names}
    except Exception:  # noqa: BLE001 - any failure: keep the stored names
        return None
    if renamed == {n: n for n in names} or len(set(renamed.values())) != len(names) \
            or not all(v in meta for v in renamed.values()):
        return None
    return renamed


class RenamedCheckpoint:
    """A checkpoint read under other tensor names (the engine's read API)."""

    def __init__(self, inner: Any, renames: dict[str, str]) -> None:
        self._inner = inner
        self._stored = {new: old for old, new in renames.items()}
        self._order = [renames.get(n, n) for n in inner.names()]

    def __getattr__(self, attr: str) -> Any:  # path, config, files, total_nbytes, close, ...
        return getattr(self._inner, attr)

    def names(self) -> list[str]:
        return list(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._stored

    def __len__(self) -> int:
        return len(self._order)

    def info(self, name: str) -> TensorInfo:
        info = self._inner.info(self._stored.get(name, name))
        return TensorInfo(name=name, shape=info.shape, dtype=info.dtype, nbytes=info.nbytes,
                          file=info.file)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        stored = self._stored.get(name, name)
        return self._inner.get(stored) if out is None else self._inner.get(stored, out)

    def get_slice(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        return self._inner.get_slice(self._stored.get(name, name), start, out)

    def prefetch(self, name: str) -> bool:
        return self._inner.prefetch(self._stored.get(name, name))


def in_transformers_layout(ckpt: Any) -> Any:
    """``ckpt`` read under transformers 5's in-memory names when they differ (see the module
    doc), else ``ckpt`` itself."""
    path = Path(ckpt.path)
    renames = in_memory_names(path if path.is_dir() else path.parent, ckpt.names())
    return ckpt if renames is None else RenamedCheckpoint(ckpt, renames)
