"""Turning a running sum S (r x r) into the memory matrix M that the adapted layers use.

All functions take a batch (..., r, r), work in fp32 and map a zero sum to a zero matrix, so an
empty memory leaves the base model exactly as it is.
"""

from __future__ import annotations

import torch

# Singular values below this fraction of the largest are treated as zero: their singular vectors
# are arbitrary (numerical noise), so they must not be promoted to 1.
_RELATIVE_CUTOFF = 1e-4
_TINY = 1e-30


def polar_svd(s: torch.Tensor) -> torch.Tensor:
    """Exact orthogonal polar factor U V^T, restricted to the numerically non-zero singular values."""
    u, sigma, vh = torch.linalg.svd(s.float())  # (..., r, r), (..., r), (..., r, r)
    keep = sigma > _RELATIVE_CUTOFF * sigma[..., :1].clamp_min(_TINY)  # (..., r)
    keep &= sigma[..., :1] > _TINY  # an all-zero S keeps nothing
    return (u * keep.unsqueeze(-2).float()) @ vh


def polar_newton_schulz(s: torch.Tensor, steps: int) -> torch.Tensor:
    """U V^T by the cubic Newton-Schulz iteration X <- 1.5 X - 0.5 X X^T X.

    Starting from S / ||S||_F puts every singular value in (0, 1], where the iteration drives it
    towards 1 (quadratically once near it) and keeps exact zeros at zero. Only matrix products, so it
    runs fast on GPUs and is differentiable without the instability of SVD gradients.
    """
    x = frobenius(s)
    for _ in range(steps):
        x = 1.5 * x - 0.5 * x @ x.transpose(-1, -2) @ x
    return x


def frobenius(s: torch.Tensor) -> torch.Tensor:
    """S / ||S||_F (a zero S stays zero)."""
    s = s.float()
    norm = torch.linalg.matrix_norm(s, ord="fro", keepdim=True)  # (..., 1, 1)
    return s / norm.clamp_min(_TINY)


def normalize(s: torch.Tensor, method: str, polar_steps: int = 12) -> torch.Tensor:
    if method == "svd":
        return polar_svd(s)
    if method == "polar":
        return polar_newton_schulz(s, polar_steps)
    if method == "frobenius":
        return frobenius(s)
    raise ValueError(f"unknown normalization {method!r}")
