"""The SVD shared by ``extract-lora`` and the svd adapter combinations: torch's driver choice
and peft's ``svd_clamp``.

``svd_driver``: torch picks the LAPACK/cuSOLVER routine itself unless told. On CUDA it may be
told ``gesvd`` (QR iterations: slow, most accurate), ``gesvdj`` (Jacobi: fast on small and
medium matrices) or ``gesvda`` (approximate, for tall thin matrices; least accurate). On the
CPU torch always runs LAPACK's ``gesdd`` (divide and conquer) and has no choice, so a driver
given for a CPU run is refused with a line that says so.

``svd_clamp`` q (peft's ``add_weighted_adapter(svd_clamp=q)``, after kohya's
``svd_merge_lora``): with the factors B (out × k) and A (k × in) as written,

    h = quantile_q(vec(B) ⧺ vec(A)),   B ← clip(B, −h, h),   A ← clip(A, −h, h)

(the q-quantile of the signed values, linear interpolation as ``torch.quantile``). It trims
outlying factor entries, which keeps an fp16 adapter in range, at the cost of moving B·A away
from the truncated SVD (the error reported after extraction is the clamped factors').
"""

from __future__ import annotations

import torch

from modelalloy.errors import AdapterError

DRIVERS = ("gesvd", "gesvdj", "gesvda")
CPU_DRIVER = "gesdd"  # what torch.linalg.svd runs on the CPU (LAPACK), whatever is asked


def check_svd_options(driver: str | None, clamp: float | None, device: str) -> None:
    """One-line errors for a driver torch cannot use here and a clamp outside (0, 1]."""
    if driver is not None:
        if driver not in DRIVERS:
            raise AdapterError(f"svd_driver={driver}: use one of {', '.join(DRIVERS)} "
                               "(cuSOLVER's; leave it out for torch's default)",
                               options=("svd_driver",))
        if not str(device).startswith("cuda"):
            raise AdapterError(f"svd_driver={driver}: torch takes a driver only on CUDA; on "
                               f"the CPU it always runs LAPACK's {CPU_DRIVER} (leave it out, "
                               "or give device=cuda)", options=("svd_driver", "device"))
        if not torch.cuda.is_available():
            raise AdapterError(f"svd_driver={driver}: no CUDA device is available here",
                               options=("svd_driver",))
    if clamp is not None and not 0 < clamp <= 1:
        raise AdapterError(f"svd_clamp={clamp}: must be a quantile in (0, 1], e.g. 0.99",
                           options=("svd_clamp",))


def svd(matrix: torch.Tensor, *, driver: str | None = None, device: str = "cpu"
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ, Vᵀ) of ``matrix`` (reduced), computed on ``device``, returned on the CPU."""
    on = matrix.to(device)
    u, s, vh = torch.linalg.svd(on, full_matrices=False,
                                driver=driver if on.is_cuda else None)
    return u.cpu(), s.cpu(), vh.cpu()


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) without its 2²⁴-element limit."""
    flat = values.reshape(-1)
    position = q * (flat.numel() - 1)
    below = int(position)
    lo = flat.kthvalue(below + 1).values
    hi = flat.kthvalue(min(below + 2, flat.numel())).values
    return torch.lerp(lo, hi, torch.tensor(position - below, dtype=flat.dtype))


def clamp_factors(b: torch.Tensor, a: torch.Tensor, q: float | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """B and A clipped to ±quantile_q of their joint values (peft's svd_clamp); q None: as is."""
    if q is None or b.numel() + a.numel() == 0:
        return b, a
    h = quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), q)
    return b.clamp(-h, h), a.clamp(-h, h)
