"""Compression bundles: one merged checkpoint plus per-task artifacts that rebuild each expert.

:class:`TallBundle` is the TALL-masks bundle (Wang, Dimitriadis et al., ICML 2024): the base
θ_0, the multi-task vector τ_MTL and one packed binary mask per task; expert t is rebuilt as
θ̂_t = θ_0 + m_t ⊙ τ_MTL.
"""

from modelalloy.bundle.tall import PackedMask, StorageReport, TallBundle, TallConfig, compress

__all__ = ["PackedMask", "StorageReport", "TallBundle", "TallConfig", "compress"]
