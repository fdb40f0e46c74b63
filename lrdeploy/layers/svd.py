"""Truncated-SVD helpers: pick a rank and split a weight into two balanced factors.

Everything is computed in float64 and cast back by the caller, so a full-rank factorisation of a float32
layer reproduces it to float32 rounding rather than to the (worse) rounding of a float32 SVD.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lrdeploy.errors import UserError

# Slack for comparisons of ratios computed in floating point: 0.7 * 10 is 7.000000000000001, and a
# cumulative energy meant to be exactly 1.0 can land at 0.9999999999999998.
_EPS = 1e-9


class SVD(NamedTuple):
    """Thin SVD of a 2D weight, W = U · diag(S) · Vh, singular values in descending order (float64)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def as_2d(weight: torch.Tensor) -> torch.Tensor:
    """View a Linear (out × in) or Conv2d (out × in × kh × kw) weight as out × (in·kh·kw)."""
    if weight.dim() < 2:
        raise ValueError(f"expected a weight with at least 2 dims, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def full_rank_of(weight: torch.Tensor) -> int:
    """The largest useful rank: min of the 2D weight's dims."""
    w = as_2d(weight)
    return min(w.shape)


def svd_2d(weight: torch.Tensor) -> SVD:
    """Thin SVD in float64 of the weight seen as 2D (on the weight's own device)."""
    w = as_2d(weight.detach()).to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return SVD(u, s, vh)


def balanced_factors(svd: SVD, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the rank-``rank`` truncation into (left, right) with W_r = left @ right.

    left = U_r·√S_r (out × r), right = √S_r·Vh_r (r × in). The square-root split keeps both factors at the
    same scale, which is what training (and fp16 export) of the factors wants.
    """
    full = svd.S.shape[0]
    if not 1 <= rank <= full:
        raise ValueError(f"rank must be in [1, {full}], got {rank}")
    root = svd.S[:rank].sqrt()
    left = svd.U[:, :rank] * root
    right = root[:, None] * svd.Vh[:rank]
    return left, right


def check_fraction(value: float, what: str, flag: str) -> float:
    """Validate a user-given fraction in (0, 1] (rank ratio, energy); UserError names the flag to fix."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(
            f"{what} must be a number in (0, 1], got {value!r}", hint=f"pass e.g. {flag} 0.5"
        ) from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise UserError(f"{what} must be in (0, 1], got {value}", hint=f"pass e.g. {flag} 0.5")
    return value


def rank_for_ratio(weight2d: torch.Tensor, ratio: float) -> int:
    """ceil(ratio · full_rank), at least 1 — the rank that keeps ``ratio`` of the layer's rank.

    Accepts a 2D weight or a conv weight (seen as 2D). Ratio outside (0, 1] raises UserError.
    """
    ratio = check_fraction(ratio, "rank ratio", "--rank-ratio")
    full = full_rank_of(weight2d)
    return max(1, min(full, math.ceil(ratio * full - _EPS)))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with Σ_{i<r} s_i² / Σ s_i² ≥ energy (singular values in any order; sorted here).

    Components whose energy is below float64 resolution (~1e-9 of the total) count as zero, so
    ``energy=1.0`` gives the numerical rank. An all-zero spectrum gives 1.
    """
    energy = check_fraction(energy, "energy", "--energy")
    s = torch.as_tensor(singular_values).detach().to(torch.float64).flatten()
    if s.numel() == 0:
        raise ValueError("no singular values")
    sq = torch.sort(s.abs(), descending=True).values ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    reached = torch.nonzero(kept >= energy - _EPS)
    rank = int(reached[0]) + 1 if reached.numel() else s.numel()
    return max(1, min(rank, s.numel()))


def energy_kept(singular_values: torch.Tensor, rank: int) -> float:
    """Fraction of Σ s² kept by the first ``rank`` singular values (1.0 for an all-zero spectrum)."""
    sq = torch.sort(singular_values.detach().to(torch.float64).abs(), descending=True).values ** 2
    total = float(sq.sum())
    return 1.0 if total == 0.0 else float(sq[:rank].sum()) / total
