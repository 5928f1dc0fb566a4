"""Compression bundles: one merged checkpoint plus per-task artifacts that rebuild each expert.

:class:`TallBundle` is the TALL-masks bundle (Wang, Dimitriadis et al., ICML 2024): the base
θ_0, the multi-task vector τ_MTL and one packed binary mask per task; expert t is rebuilt as
θ̂_t = θ_0 + m_t ⊙ τ_MTL. :func:`compress_to` / :func:`rebuild_to` stream through folders;
:func:`compress` and :class:`TallBundle` hold a bundle in memory. A recipe names expert t of a
bundle folder as ``BUNDLE#t``; the engine reads it through
:class:`modelalloy.engine.sources.TallExpertSource` (:func:`load_expert` in memory).
"""

from modelalloy.bundle._checkpoint import LazyState, lazy_state
from modelalloy.bundle.tall import (
    PackedMask,
    StorageReport,
    TallBundle,
    TallConfig,
    compress,
    compress_to,
    load_expert,
    rebuild_to,
)

__all__ = ["LazyState", "PackedMask", "StorageReport", "TallBundle", "TallConfig", "compress",
           "compress_to", "lazy_state", "load_expert", "rebuild_to"]
