"""Twin-Merging (Lu et al., NeurIPS 2024): a shared merge, compressed exclusive knowledge per
expert, and a router that mixes them per input.

``build_bundle(base, experts, module, router_data)`` makes a :class:`TwinBundle`;
``bundle.save(dir)`` writes it atomically; ``modelalloy.twin.load(dir)`` returns the routed
torch module (:class:`TwinModel`). See docs/methods/twin_merging.md.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from modelalloy.twin.build import build_bundle, exclusive_factors
from modelalloy.twin.bundle import TwinBundle, TwinBundleError, is_twin_bundle
from modelalloy.twin.lowrank import LowRank, rank_for, tail_energy, truncate
from modelalloy.twin.router import TwinRouter, train_router
from modelalloy.twin.runtime import ROUTINGS, TwinModel


def load(bundle: str | Path, module: nn.Module | None = None, *, routing: str = "sample",
         verify: bool = True) -> TwinModel:
    """The routed model of a bundle folder; ``module`` defaults to the shared model's
    architecture read from its config.json."""
    from modelalloy.twin.folders import module_for_folder

    b = TwinBundle.load(bundle, verify=verify)
    return b.model(module if module is not None else module_for_folder(Path(bundle) / "shared"),
                   routing=routing)


__all__ = ["ROUTINGS", "LowRank", "TwinBundle", "TwinBundleError", "TwinModel", "TwinRouter",
           "build_bundle", "exclusive_factors", "is_twin_bundle", "load", "rank_for",
           "tail_energy", "train_router", "truncate"]
