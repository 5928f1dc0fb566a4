"""The merged model's vocabulary (mergekit's ``tokenizer_source`` / ``tokenizer:`` block): which
tokenizer the output gets, and where each of its tokens sits in every input model.

- ``base``: the base model's tokenizer; ``<folder>``: that folder's tokenizer;
- ``union``: the first model's (the base's) tokenizer, then every token another model has and
  it lacks, added in model order: first the other models' ordinary tokens, then their added
  (special) tokens with the settings of the first model that adds them;
- ``tokens`` listed in the recipe's ``tokenizer.tokens`` and missing from the result are added
  as ordinary tokens.

For each input model, :attr:`Vocabulary.rows` gives, for every output token id, that model's
row (its own id for the token) or -1 when the model lacks the token. Tokens whose id is past a
model's embedding rows (tokenizers longer than ``vocab_size``) count as missing. The rows are
filled by :mod:`modelalloy.plan.vocabulary`.

Tokenizers are read and written with transformers (the ``hf`` extra), local files only, never
with remote code.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelalloy.errors import ModelAlloyError


@dataclass
class Vocabulary:
    tokenizer: Any  # the output's transformers tokenizer
    vocab: dict[str, int]  # output token -> output id
    size: int  # output embedding rows (len(vocab), padded up to pad_to_multiple_of)
    rows: dict[str, list[int]] = field(default_factory=dict)  # model key -> row per output id
    own: dict[str, dict[str, int]] = field(default_factory=dict)  # model key -> its vocab

    def tokenizer_vocab_of(self, folder: Path) -> dict[str, int] | None:
        """A model's own vocabulary (None for a folder that is not one of the models)."""
        return self.own.get(model_key(folder)) if folder is not None else None

    def is_identity(self, key: str, model_rows: int) -> bool:
        """True when the model's embedding already is the output's (same rows, same order)."""
        rows = self.rows[key]
        return model_rows == self.size == len(rows) and rows == list(range(len(rows)))


def model_key(path: Path) -> str:
    return str(Path(path).resolve())


def config_vocab_size(folder: Path) -> int | None:
    """``vocab_size`` from a model's config.json (``text_config.vocab_size`` for VLMs)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for where in (cfg, cfg.get("text_config") or {}):
        if isinstance(where.get("vocab_size"), int):
            return where["vocab_size"]
    return None


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True,
                                             trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelAlloyError(f"{folder}: cannot read its tokenizer ({first}); a merged "
                              "vocabulary needs every model's tokenizer files") from None


def _copy(tokenizer: Any) -> Any:
    """An independent copy (a tokenizer's added tokens live in shared Rust state)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, use_fast=True, local_files_only=True,
                                             trust_remote_code=False)


def _usable(tokenizer: Any, rows: int) -> list[tuple[str, int]]:
    """(token, id) of the tokens that have an embedding row, in id order."""
    return sorted(((t, i) for t, i in tokenizer.get_vocab().items() if i < rows),
                  key=lambda pair: pair[1])


def _union(models: list[tuple[Any, int]]) -> Any:
    """The first tokenizer plus the other models' tokens it lacks (see the module doc); an
    added token keeps the settings of the first model that adds it (the first's own win)."""
    first = models[0][0]
    out = _copy(first)
    known = set(first.get_vocab())
    ordinary: list[str] = []
    added: dict[str, Any] = {}
    for tokenizer, rows in models:
        special = {info.content for info in tokenizer.added_tokens_decoder.values()}
        for token, _ in _usable(tokenizer, rows):
            if token not in special and token not in known and token not in ordinary:
                ordinary.append(token)
        for index, info in sorted(tokenizer.added_tokens_decoder.items()):
            if index < rows:
                added.setdefault(info.content, info)
    for token in ordinary:
        if token not in added:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_vocabulary(models: list[Path], source: str | Path, add_tokens: list[str],
                     pad_to_multiple_of: int | None = None) -> Vocabulary:
    """The output tokenizer and every model's rows in it. ``models[0]`` is the base (or the
    first model when the merge has none); ``source`` is "union", "base" or a folder."""
    tokenizers, sizes = [], []
    for folder in models:
        tokenizer = load_tokenizer(folder)
        rows = config_vocab_size(folder) or len(tokenizer.get_vocab())
        tokenizers.append(tokenizer)
        sizes.append(rows)
    first, first_rows = tokenizers[0], sizes[0]
    past = [t for t, i in first.get_vocab().items() if i >= first_rows]
    if past and source in ("union", "base"):
        raise ModelAlloyError(
            f"{models[0]}: its tokenizer has {len(past)} token(s) past the model's "
            f"{first_rows} embedding rows (e.g. {past[0]!r}); building a vocabulary from "
            "such a tokenizer is not supported yet: give another model's folder as the "
            "tokenizer source")
    if source == "union":
        out = _union(list(zip(tokenizers, sizes, strict=True)))
    elif source == "base":
        out = _copy(first)
    else:
        out = load_tokenizer(Path(source))
    existing = set(out.get_vocab())
    for token in add_tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    vocab = out.get_vocab()
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ModelAlloyError(f"{source}: the output tokenizer's ids are not 0..{len(vocab) - 1}"
                              " without gaps; choose another tokenizer source")
    result = Vocabulary(tokenizer=out, vocab=vocab, size=size)
    for folder, tokenizer, rows in zip(models, tokenizers, sizes, strict=True):
        own = tokenizer.get_vocab()
        mapping = [-1] * len(vocab)
        for token, new_id in vocab.items():
            old = own.get(token, -1)
            mapping[new_id] = old if old < rows else -1
        result.rows[model_key(folder)] = mapping
        result.own[model_key(folder)] = own
    return result
