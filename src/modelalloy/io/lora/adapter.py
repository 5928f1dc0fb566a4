"""A PEFT LoRA adapter folder, mapped onto the tensor names of the model it adapts.

A LoRA adapter stores, for each targeted module ``m`` with weight ``W`` (out × in),
``A`` (r × in) and ``B`` (out × r); the adapted weight is (Hu et al., 2021)

    W' = W + s · B·A,   s = lora_alpha / r   (rsLoRA, ``use_rslora``: s = lora_alpha / √r)
    b' = b + s · b_B    (``lora_bias``: lora_B's own bias)

with per-module ``r`` and ``lora_alpha`` from ``rank_pattern`` / ``alpha_pattern`` when given.
``fan_in_fan_out`` (GPT-2's Conv1D stores W as in × out) and embeddings
(``lora_embedding_A`` r × vocab, ``lora_embedding_B`` dim × r) take the transpose:
``W' = W + s · (B·A)ᵀ``. Adapter tensors that are not LoRA factors (``modules_to_save``,
embeddings saved with the adapter) replace the model's tensor of the same name.

Read from ``adapter_config.json`` and ``adapter_model.safetensors`` (or a pickle read with
``weights_only``); peft is not needed. Keys are peft's saved names:
``base_model.model.<module>.lora_A.weight`` and so on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelalloy.errors import AdapterError, CheckpointError
from modelalloy.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from modelalloy.io.safe_read import CONFIG_LIMIT, read_json_file

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
ROW_BLOCK = 256  # rows of W per block of B·A (see LoraTerm.delta)
# adapter_config.json settings that change the adapted weight in ways plain LoRA does not
# describe: refused rather than silently applied wrong.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) adapters",
    "layer_replication": "adapters with layer_replication",
    "target_parameters": "adapters on nn.Parameters (target_parameters)",
    "trainable_token_indices": "adapters with trainable tokens",
}


@dataclass(frozen=True)
class LoraTerm:
    """One adapted tensor: ``target`` (the model's name) gets ``scale · B·A`` (transposed when
    ``transposed``: fan_in_fan_out or an embedding)."""

    module: str
    target: str
    a_name: str
    b_name: str
    rank: int
    scale: float
    transposed: bool

    def delta(self, a: torch.Tensor, b: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """``s·B·A`` (or its transpose) in float32, optionally only rows ``rows`` of W's
        layout: a band of W costs a band of the product, not the whole matrix.

        The product is formed in blocks of ``ROW_BLOCK`` rows of W on a fixed grid from row
        0, whatever band is asked for: a matrix product's rounding depends on its shape, so
        computing exactly the same blocks makes every band agree bit for bit with the whole
        tensor (the engine reads large tensors a slice at a time)."""
        a = a.to(torch.float32)
        b = b.to(torch.float32) * self.scale
        if self.transposed:  # W = (B·A)ᵀ = Aᵀ·Bᵀ: W's rows come from Aᵀ's rows
            a, b = b.T, a.T
        total = b.shape[0]
        start, stop = (0, total) if rows is None else (rows.start, min(rows.stop, total))
        first = start - start % ROW_BLOCK
        blocks = [b[r:r + ROW_BLOCK] @ a for r in range(first, stop, ROW_BLOCK)]
        out = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        return out[start - first:stop - first]


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first key matching the module name's end
    (``re.match(r"(.*\\.)?(key)$", module)``)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter:
    """An adapter folder: its config, its weights (lazily read) and its LoRA terms."""

    def __init__(self, path: Path, config: dict[str, Any], weights: Checkpoint) -> None:
        self.path = path
        self.config = config
        self.weights = weights
        self.terms: dict[str, LoraTerm] = {}  # module -> term (targets bound by ``bind``)
        self.replacements: dict[str, str] = {}  # module tensor name -> adapter tensor name
        self.base_copies: set[str] = set()  # replacements that are the base's own layers
        self.bias_terms: dict[str, str] = {}  # module -> its lora_B.bias (``lora_bias``)
        self.biases: dict[str, tuple[str, float]] = {}  # bias tensor -> (key, scale): bound
        self._parse()

    # -- reading ---------------------------------------------------------------------------

    def _parse(self) -> None:
        factors: dict[str, dict[str, str]] = {}
        for key in self.weights.names():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            kind = None
            for suffix, what in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                                 (".lora_B.bias", "bias"),
                                 (".lora_embedding_A", "EA"), (".lora_embedding_B", "EB")):
                if name.endswith(suffix):
                    module, kind = name[: -len(suffix)], what
                    break
            if kind is None:
                if "lora_" in name:
                    raise AdapterError(f"{self.path}: tensor {key!r} is a LoRA part modelalloy "
                                       "does not know; only lora_A/lora_B (and embedding) "
                                       "factors are supported")
                # modules_to_save and saved embedding layers replace the model's tensor
                self.replacements[name.replace(".base_layer.", ".")] = key
                if ".base_layer." in name:  # the base's own layer, saved alongside
                    self.base_copies.add(name.replace(".base_layer.", "."))
                continue
            factors.setdefault(module, {})[kind] = key
        use_rslora = bool(self.config.get("use_rslora", False))
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        for module, parts in factors.items():
            if "bias" in parts:  # lora_bias: the bias gets s · lora_B.bias
                self.bias_terms[module] = parts.pop("bias")
            embedding = "EA" in parts or "EB" in parts
            a_key = parts.get("EA" if embedding else "A")
            b_key = parts.get("EB" if embedding else "B")
            if a_key is None or b_key is None:
                raise AdapterError(f"{self.path}: module {module!r} has only one of its two "
                                   "LoRA factors; the adapter file is incomplete")
            a, b = self.weights.info(a_key), self.weights.info(b_key)
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                raise AdapterError(f"{self.path}: module {module!r}: factors of shapes "
                                   f"{list(a.shape)} and {list(b.shape)} are not a rank-r pair "
                                   "(convolution LoRA is not supported)")
            rank = a.shape[0]
            alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module,
                                   self.config.get("lora_alpha", 8))
            scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
            self.terms[module] = LoraTerm(module=module, target=f"{module}.weight",
                                          a_name=a_key, b_name=b_key, rank=rank,
                                          scale=float(scale),
                                          transposed=embedding or fan_in_fan_out)

    # -- binding to a model ----------------------------------------------------------------

    def bind(self, model: str | Path, infos: dict[str, TensorInfo]) -> None:
        """Map every term and replacement to a tensor of the model and check shapes: an
        adapter made for another base fails here, on one line."""
        names = list(infos)
        bound: dict[str, LoraTerm] = {}
        for module, term in self.terms.items():
            target = _find_tensor(term.target, names, self.path, model)
            a, b = self.weights.info(term.a_name), self.weights.info(term.b_name)
            shape = (b.shape[0], a.shape[1])
            if term.transposed:
                shape = shape[::-1]
            have = tuple(infos[target].shape)
            if have != shape:
                raise AdapterError(f"{self.path}: module {module!r} adapts a {list(shape)} "
                                   f"weight but {model} has {target!r} of shape {list(have)}; "
                                   "the adapter was trained on another base model")
            bound[target] = LoraTerm(module, target, term.a_name, term.b_name, term.rank,
                                     term.scale, term.transposed)
        self.terms = bound
        biases: dict[str, tuple[str, float]] = {}  # bias tensor -> (lora_B.bias, scale)
        for term in bound.values():
            key = self.bias_terms.get(term.module)
            if key is None:
                continue
            target = term.target[: -len("weight")] + "bias"
            if target not in infos:
                raise AdapterError(f"{self.path}: module {term.module!r} has a LoRA bias but "
                                   f"{model}'s {term.target!r} has no bias to add it to")
            if tuple(infos[target].shape) != tuple(self.weights.info(key).shape):
                raise AdapterError(f"{self.path}: LoRA bias {key!r} has shape "
                                   f"{list(self.weights.info(key).shape)} but {model}'s "
                                   f"{target!r} has {list(infos[target].shape)}")
            biases[target] = (key, term.scale)
        self.biases = biases
        replaced: dict[str, str] = {}
        for name, key in self.replacements.items():
            target = _find_tensor(name, names, self.path, model)
            saved = tuple(self.weights.info(key).shape)
            if tuple(infos[target].shape) != saved:
                raise AdapterError(f"{self.path}: saved tensor {key!r} has shape {list(saved)} "
                                   f"but {model}'s {target!r} has "
                                   f"{list(infos[target].shape)}; the adapter "
                                   "was trained on another base model")
            replaced[target] = key
        self.replacements = replaced

    def close(self) -> None:
        self.weights.close()


def _find_tensor(name: str, names: Iterable[str], adapter: Path, model: str | Path) -> str:
    """The model's tensor for an adapter name: the same name, else the one name that ends
    with it (or that it ends with: a model saved with or without its ``model.`` prefix)."""
    names = list(names)
    if name in names:
        return name
    hits = [n for n in names if n.endswith("." + name) or name.endswith("." + n)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise AdapterError(f"{adapter}: targets {name!r}, which {model} does not have; the "
                           "adapter was trained on another base model (or architecture)")
    raise AdapterError(f"{adapter}: target {name!r} matches {len(hits)} tensors of {model} "
                       f"({hits[0]!r}, {hits[1]!r}, ...); cannot tell which one it adapts")


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's config: a regular JSON file of a config's size (a FIFO, a device or a
    giant file is refused unread), with finite positive ranks and finite alphas."""
    cfg = folder / CONFIG_FILE
    if not cfg.exists() and not cfg.is_symlink():
        raise AdapterError(f"{folder}: no {CONFIG_FILE}; give a PEFT LoRA adapter folder "
                           "(adapter_config.json + adapter_model.safetensors)")
    config = read_json_file(cfg, CONFIG_LIMIT, AdapterError, CONFIG_FILE)
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg}: is not a JSON object; re-save the adapter")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg}: peft_type {config.get('peft_type')!r} is not supported; "
                           "only LoRA adapters can be applied")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{cfg}: {what} are not supported; merge it into its model "
                               "with peft first and give that folder")
    _check_numbers(cfg, config)
    return config


def _check_numbers(cfg: Path, config: dict[str, Any]) -> None:
    """r and rank_pattern: integers ≥ 1; lora_alpha and alpha_pattern: finite numbers."""
    def number(key: str, value: Any, rank: bool) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value)
        if rank:
            ok = ok and float(value).is_integer() and value >= 1
        if not ok:
            want = "an integer ≥ 1" if rank else "a finite number"
            raise AdapterError(f"{cfg}: {key} is {value!r}, not {want}; re-save the adapter")

    for key, rank in (("r", True), ("lora_alpha", False)):
        if key in config:
            number(key, config[key], rank)
    for key, rank in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"{cfg}: {key} is not a mapping of module to value; re-save "
                               "the adapter")
        for module, value in pattern.items():
            number(f"{key}[{module!r}]", value, rank)


def open_adapter(folder: str | Path) -> LoraAdapter:
    """Open and validate an adapter folder (reads headers, not weights)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder not found; give a PEFT LoRA adapter "
                           "folder (adapter_config.json + adapter_model.safetensors)")
    config = read_adapter_config(folder)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise AdapterError(f"{folder}: no adapter_model.safetensors; the adapter folder is "
                           "incomplete")
    try:
        ckpt = open_checkpoint(weights)
    except AdapterError:
        raise
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    return LoraAdapter(folder, config, ckpt)
