"""Which modules the collectors hook, and how a batch is fed to any torch module.

Nothing here knows an architecture by name. A collector hooks modules by *kind*:

- a **linear map** is an ``nn.Linear`` (weight ``(d_out, d_in)``, input on the weight's last
  dimension) or a module whose class is named ``Conv1D`` (the transposed linear of GPT-2 style
  models in transformers: weight ``(d_in, d_out)``, input on the weight's first dimension);
- a **weight-bearing module** (AIM) is any module with its own ``weight`` parameter that is not an
  ``nn.Embedding``, whose input's last dimension matches one dimension of that weight.

A batch is whatever the model takes: a dict is passed as keyword arguments, a tuple/list as
positional arguments, a tensor as the only argument. The key ``labels`` is removed from dict
batches before the call (collectors that need labels read them themselves).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LAST = "last"
FIRST = "first"


@dataclass(frozen=True)
class HookedWeight:
    """A module whose weight a statistic belongs to."""

    module_name: str
    module: nn.Module
    param_names: tuple[str, ...]  # every state-dict name of the weight (tied names included)
    input_dim: str  # "last" (nn.Linear) or "first" (transformers Conv1D)


def _is_conv1d_transposed(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor)
            and weight.dim() == 2)


def _weight_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> all its names in the state dict (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def linear_modules(model: nn.Module, include: Any = None) -> list[HookedWeight]:
    """Every linear map of ``model`` (see module docstring), optionally filtered.

    ``include`` is a predicate on the weight's parameter name (``lambda name: ...``) or None.
    """
    names = _weight_names(model)
    out = []
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear):
            layout = LAST
        elif _is_conv1d_transposed(module):
            layout = FIRST
        else:
            continue
        pnames = tuple(names.get(id(module.weight), [f"{mname}.weight" if mname else "weight"]))
        if include is not None and not any(include(n) for n in pnames):
            continue
        out.append(HookedWeight(mname, module, pnames, layout))
    return out


def weight_modules(model: nn.Module, include: Any = None) -> list[HookedWeight]:
    """Every weight-bearing, non-embedding module (the modules AIM relaxes)."""
    names = _weight_names(model)
    out = []
    for mname, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is None or isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            continue
        if weight.dim() > 2:  # convolutions: channels are not the input's last dimension
            continue
        layout = FIRST if _is_conv1d_transposed(module) else LAST
        pnames = tuple(names.get(id(weight), [f"{mname}.weight" if mname else "weight"]))
        if include is not None and not any(include(n) for n in pnames):
            continue
        out.append(HookedWeight(mname, module, pnames, layout))
    return out


def split_batch(batch: Any) -> tuple[Any, Any]:
    """(model input, labels or None): ``labels`` is taken out of dict batches."""
    if isinstance(batch, Mapping):
        batch = dict(batch)
        labels = batch.pop("labels", None)
        return batch, labels
    return batch, None


def call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, ``.logits``, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; "
                    "pass logits_fn=")


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def token_mask(inputs: Any) -> torch.Tensor | None:
    """The attention mask of a dict batch, as bool (batch, tokens), or None."""
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.bool()
    return None


def batch_size_of(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        for v in inputs.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
    if isinstance(inputs, (tuple, list)):
        for v in inputs:
            if isinstance(v, torch.Tensor):
                return v.shape[0]
    raise TypeError("cannot find the batch size of a batch with no tensor")


def select_example(obj: Any, i: int, n: int) -> Any:
    """Example ``i`` of a batch of ``n``, keeping the batch dimension (size 1)."""
    if isinstance(obj, torch.Tensor):
        return obj[i:i + 1] if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, Mapping):
        return {k: select_example(v, i, n) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(select_example(v, i, n) for v in obj)
    return obj


def progress(items: Iterable[Any], enabled: bool, desc: str,
             total: int | None = None) -> Iterator[Any]:
    """A progress bar on stderr when ``enabled`` and tqdm is importable; else the items."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm comes with transformers
            pass
        else:
            yield from tqdm(items, desc=desc, total=total, leave=False)
            return
    yield from items
