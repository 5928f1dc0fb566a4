"""Make a module for a model folder from its config.json alone (no remote code, no pickle).

The suites' own models are built from their configs; any other folder is a transformers model
whose ``architectures[0]`` names a class of the installed transformers (never code shipped with
the folder).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from modelalloy.errors import CheckpointError


def module_for_folder(folder: str | Path) -> nn.Module:
    """An instance of the folder's architecture (weights not loaded)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json; pass module= with the architecture")
    config = json.loads(config_path.read_text())
    from modelalloy.bench import vision

    if config.get("model_type") == vision.MODEL_TYPE:
        return vision.TinyConvNet(config["width"], config["feat_dim"], config["image_size"],
                                  config["linear_features"], config["depth"]).eval()
    arch = (config.get("architectures") or [None])[0]
    try:
        import transformers
    except ImportError:  # pragma: no cover - the [hf] extra
        raise CheckpointError(f"{folder}: loading a transformers model needs the [hf] "
                              "extra") from None
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None or not issubclass(cls, transformers.PreTrainedModel):
        raise CheckpointError(f"{folder}: config.json architectures {arch!r} is not a "
                              "transformers model class; pass module= with the architecture")
    return cls(transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)).eval()
