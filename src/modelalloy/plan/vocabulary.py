"""Every input model's embedding rows in the merged vocabulary (mergekit's tokenizer merge).

With a ``tokenizer_source`` / ``tokenizer:`` block, each model's vocabulary-indexed tensors
(input embeddings, ``lm_head``; one matrix for tied GPT-2) are rearranged into the output's
token order before the method merges them; every other tensor takes the normal path. A row
for a token a model lacks (or a ``force``\\ d token) is, as in mergekit:

- the ``tokenizer.tokens`` entry's source, when the recipe gives one: ``<model>`` (that
  model's row of the token), ``{kind: model_token, model, token | token_id}`` (that model's
  row of another token), ``{kind: zero}``;
- otherwise: the row of the only model that has the token; the base model's row when the
  base has it; else the mean of the rows of the models that have it; zeros when none has it.

Rows past the vocabulary (``pad_to_multiple_of``) are the mean of the model's token rows.

:class:`AlignedSource` wraps a :class:`TensorSource`: the vocabulary tensors report the output
shape and are read whole (the planner never slices them); all models' rows of one tensor are
built together once (the defaults need every model's rows) and handed out per model.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from pathlib import Path
from typing import Any, cast

import torch

from modelalloy.errors import PlanError
from modelalloy.io.vocabulary import Vocabulary, config_vocab_size, model_key
from modelalloy.plan.layers import split_layer
from modelalloy.plan.sources import TensorSource
from modelalloy.recipe.model import TokenSpec


def origin(source: TensorSource, name: str) -> Path:
    """The model folder a source reads ``name`` from (slices compose several)."""
    where = getattr(source, "origin", None)
    return Path(where(name) if where is not None else source.path)


# Name parts of position embeddings, whose rows can number as many as the vocabulary's.
POSITION_WORDS = ("position", "wpe", "pos_emb")


def vocabulary_tensors(sources: list[TensorSource]) -> list[str]:
    """Names outside every layer stack whose first dimension is, in every model, that model's
    vocabulary size (config ``vocab_size``): input embeddings, ``lm_head``."""
    held = [set(s.names()) for s in sources]
    out = []
    for name in sources[0].names():
        if split_layer(name) is not None or any(w in name for w in POSITION_WORDS):
            continue
        if all(name in h and _vocabulary_rows(s, name) for s, h in zip(sources, held, strict=True)):
            out.append(name)
    return out


def _vocabulary_rows(source: TensorSource, name: str) -> bool:
    shape = source.info(name).shape
    rows = config_vocab_size(origin(source, name))
    return bool(shape) and rows is not None and shape[0] == rows


class VocabularyAligner:
    """Builds every model's rows of a vocabulary tensor (see the module doc)."""

    def __init__(self, vocabulary: Vocabulary, sources: list[TensorSource],
                 base: TensorSource | None, tokens: dict[str, TokenSpec],
                 token_models: dict[str, str], names: list[str]) -> None:
        self.vocabulary = vocabulary
        self.sources = sources
        self.base_index = next((i for i, s in enumerate(sources) if s is base), None)
        self.tokens = tokens
        self.token_models = token_models  # recipe model string -> model key
        self.names = frozenset(names)
        self._lock = threading.Lock()
        self._ready: dict[str, list[torch.Tensor | None]] = {}

    def rows_of(self, name: str, index: int) -> torch.Tensor:
        with self._lock:
            ready = self._ready.get(name)
            if ready is None or ready[index] is None:
                ready = list(self._align(name))
            tensor = ready[index]
            ready[index] = None
            self._ready[name] = ready
            if all(t is None for t in ready):
                del self._ready[name]
        assert tensor is not None
        return tensor

    def _key(self, model: str) -> str:
        return self.token_models[model]

    def _align(self, name: str) -> list[torch.Tensor]:
        vocab = self.vocabulary
        keys = [model_key(origin(s, name)) for s in self.sources]
        raw = [s.get(name).to(torch.float32) for s in self.sources]
        maps = [torch.tensor(vocab.rows[k], dtype=torch.long) for k in keys]
        present = [m >= 0 for m in maps]
        n_tokens = len(vocab.vocab)
        rest = raw[0].shape[1:]
        # The rows that replace a model's own (or fill a missing one): token id -> row.
        defaults: dict[int, torch.Tensor] = {}
        count = torch.stack(present).sum(0)
        missing = (count < len(self.sources)).nonzero().flatten().tolist()
        ids = {token: i for token, i in vocab.vocab.items()}
        forced = {ids[t] for t, spec in self.tokens.items() if spec.force and t in ids}
        configured = {ids[t]: (t, spec) for t, spec in self.tokens.items() if t in ids}
        average = []
        id_to_token = {i: t for t, i in ids.items()}
        for token_id in sorted(set(missing) | forced):
            if token_id in configured:
                token, spec = configured[token_id]
                defaults[token_id] = self._configured(name, token, spec, token_id, keys, raw,
                                                      maps)
                continue
            have = [r for r in range(len(raw)) if present[r][token_id]]
            if len(have) == 1:
                defaults[token_id] = raw[have[0]][maps[have[0]][token_id]]
            elif not have:
                warnings.warn(f"token {id_to_token[token_id]!r} is in no model: its row in "
                              f"'{name}' is zero", UserWarning, stacklevel=2)
                defaults[token_id] = torch.zeros(rest)
            elif self.base_index is not None and present[self.base_index][token_id]:
                defaults[token_id] = raw[self.base_index][maps[self.base_index][token_id]]
            else:
                average.append(token_id)
        if average:  # summed in model order, then divided, as mergekit does
            at = torch.tensor(average)
            total = torch.zeros((len(average), *rest))
            for r in range(len(raw)):
                take = present[r][at]
                rows = raw[r][maps[r][at].clamp(min=0)]
                total = total + torch.where(take.view(-1, *[1] * len(rest)), rows, 0.0)
            total /= count[at].to(torch.float32).view(-1, *[1] * len(rest))
            for k, token_id in enumerate(average):
                defaults[token_id] = total[k]
        out = []
        default_ids = torch.tensor(sorted(defaults), dtype=torch.long)
        default_rows = torch.stack([defaults[i] for i in sorted(defaults)]) if defaults else None
        forced_mask = torch.zeros(n_tokens, dtype=torch.bool)
        if forced:
            forced_mask[torch.tensor(sorted(forced))] = True
        for r, tensor in enumerate(raw):
            if tensor.shape[1:] != rest:
                raise PlanError(f"tensor '{name}': shape {list(tensor.shape)} in "
                                f"{self.sources[r].path} does not match "
                                f"{list(raw[0].shape)}")
            new = torch.zeros((vocab.size, *rest))
            own = present[r] & ~forced_mask
            new[:n_tokens][own] = tensor[maps[r][own]]
            if default_rows is not None:
                fill = ~own[default_ids]
                new[default_ids[fill]] = default_rows[fill]
            if vocab.size > n_tokens:  # padding rows: the mean of the token rows
                new[n_tokens:] = new[:n_tokens].mean(0)
            out.append(new)
        return out

    def _configured(self, name: str, token: str, spec: TokenSpec, token_id: int,
                    keys: list[str], raw: list[torch.Tensor],
                    maps: list[torch.Tensor]) -> torch.Tensor:
        where = f"tokenizer.tokens.{token}"
        src = spec.source
        if src is None:
            raise PlanError(f"{where}: some models lack this token (or it is forced): give it "
                            "a `source` (a model, {kind: model_token, ...} or {kind: zero})")
        if src.kind == "zero":
            return torch.zeros(raw[0].shape[1:])
        assert src.model is not None
        key = self._key(src.model)
        if key not in keys:
            raise PlanError(f"{where}: source model '{src.model}' is not one of the models "
                            f"merged into '{name}'; name one of them")
        r = keys.index(key)
        if src.kind == "model":
            row = int(maps[r][token_id])
            if row < 0:
                raise PlanError(f"{where}: model '{src.model}' has no token {token!r}; use "
                                "{kind: model_token, model: ..., token: ...} to take another "
                                "token's row")
            return raw[r][row]
        token_row = src.token_id
        if token_row is None:
            own = self.vocabulary.own[key]
            if src.token not in own:
                raise PlanError(f"{where}: model '{src.model}' has no token {src.token!r}")
            token_row = own[src.token]
        if not 0 <= token_row < raw[r].shape[0]:
            raise PlanError(f"{where}: token id {token_row} is out of range for model "
                            f"'{src.model}' ({raw[r].shape[0]} rows)")
        return raw[r][token_row]


class AlignedSource:
    """A source whose vocabulary tensors come out in the merged vocabulary's order."""

    def __init__(self, inner: TensorSource, aligner: VocabularyAligner, index: int) -> None:
        self._inner = inner
        self._aligner = aligner
        self._index = index
        self.whole_tensors = aligner.names

    def __getattr__(self, attr: str) -> Any:  # path, config, config_updates, origin, ...
        return getattr(self._inner, attr)

    def names(self) -> list[str]:
        return self._inner.names()

    def info(self, name: str) -> Any:
        info = self._inner.info(name)
        if name not in self._aligner.names:
            return info
        shape = (self._aligner.vocabulary.size, *tuple(info.shape)[1:])
        numel = 1
        for d in shape:
            numel *= d
        # every source's TensorMeta is a dataclass (io.TensorInfo)
        return dataclasses.replace(cast(Any, info), shape=shape,
                                   nbytes=numel * info.dtype.itemsize)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._aligner.names:
            return self._inner.get(name)
        return self._aligner.rows_of(name, self._index)

    def get_slice(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        if name not in self._aligner.names:
            return self._inner.get_slice(name, start, out)
        flat = self.get(name).flatten()
        return out.copy_(flat[start:start + out.numel()])

    def prefetch(self, name: str) -> bool:
        return self._inner.prefetch(name)


def align_vocabulary(vocabulary: Vocabulary, base: TensorSource | None,
                     experts: list[TensorSource], tokens: dict[str, TokenSpec],
                     token_models: dict[str, str]
                     ) -> tuple[TensorSource | None, list[TensorSource]]:
    """``base`` and ``experts`` with their vocabulary tensors in the output's token order
    (unchanged when every model's rows already are)."""
    sources = ([base] if base is not None else []) + list(experts)
    names = vocabulary_tensors(sources)
    if not names:
        raise PlanError(f"{sources[0].path}: no tensor whose rows are the vocabulary "
                        "(embed_tokens, lm_head, wte) was found, so the tokenizer cannot be "
                        "merged; remove tokenizer_source / tokenizer")
    unchanged = not tokens and all(
        vocabulary.is_identity(model_key(origin(s, n)), s.info(n).shape[0])
        for s in sources for n in names)
    if unchanged:
        return base, list(experts)
    aligner = VocabularyAligner(vocabulary, sources, base, tokens, token_models, names)
    wrapped: list[TensorSource] = [AlignedSource(s, aligner, i)
                                   for i, s in enumerate(sources)]
    if base is not None:
        return wrapped[0], wrapped[1:]
    return None, wrapped
