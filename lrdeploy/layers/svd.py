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


# ----------------------------------------------------------------------------------------------------
# Activation-aware SVD: minimise the error of the layer's *outputs* on real inputs, not of its weights
# ----------------------------------------------------------------------------------------------------
#
# For y = W·x with calibration inputs X (rows x), the output error of an approximation Ŵ is
# ‖(W − Ŵ)·Xᵀ‖_F² = tr((W − Ŵ)·C·(W − Ŵ)ᵀ), C = XᵀX. With any S such that S·Sᵀ = C the error is
# ‖(W − Ŵ)·S‖_F², so the best rank-r Ŵ is (W·S)_r·S⁻¹: truncate the SVD of W·S and fold S⁻¹ into the right
# factor (SVD-LLM's whitening, S = Cholesky factor of C). ASVD's cheaper heuristic scales each input column
# by mean|x_j|^α instead. Both return an :class:`SVD` with U·diag(S)·Vh = W exactly at full rank; S holds
# the singular values of W·S (for whitening: the spectrum of the outputs, so rank_for_energy keeps that share
# of Σ‖W·x‖²), and U, Vh are no longer orthonormal.

DEFAULT_DAMPING = 1e-6
"""Ridge added to C as a share of its mean diagonal: inputs that never vary (a dead ReLU channel, fewer
calibration rows than input features) make C singular, and S⁻¹ would not exist."""


def _rebalanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> SVD:
    """Move each component's scale between U and Vh so ``balanced_factors`` gives factors of equal norm.

    Folding S⁻¹ into Vh leaves its rows at the inverse scale of the inputs (e.g. ×100 for inputs ~0.01);
    factor pairs at very different scales train badly and lose precision in fp16.
    """
    norms = vh.norm(dim=1).clamp_min(torch.finfo(vh.dtype).tiny).sqrt()
    return SVD(u * norms, s, vh / norms[:, None])


def whitening_factor(gram: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Lower-triangular L with L·Lᵀ = C + δ·I (float64), δ = ``damping`` · mean diag(C).

    The ridge grows tenfold (up to 1 % of the mean diagonal) until the Cholesky factorisation succeeds; an
    all-zero C (the layer saw only zeros) gives the identity, i.e. plain SVD.
    """
    c = torch.as_tensor(gram).detach().to(torch.float64)
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"expected a square Gram matrix, got shape {tuple(c.shape)}")
    c = (c + c.T) / 2  # accumulated in float64, but symmetric only up to rounding
    scale = float(c.diagonal().mean()) if c.numel() else 0.0
    eye = torch.eye(c.shape[0], dtype=torch.float64, device=c.device)
    if not scale > 0.0 or not math.isfinite(scale):
        return eye
    ridge = damping
    while True:
        factor, info = torch.linalg.cholesky_ex(c + ridge * scale * eye)
        if int(info) == 0:
            return factor
        if ridge >= 1e-2:
            raise ValueError("the calibration Gram matrix is not positive semi-definite")
        ridge = max(ridge * 10, 1e-12)


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, damping: float = DEFAULT_DAMPING) -> SVD:
    """SVD-LLM: factors of ``weight`` whose rank-r truncation minimises ‖(W − W_r)·Xᵀ‖_F for C = ``gram``.

    ``weight`` is a Linear (out × in) or conv weight (seen as out × in·kh·kw; then C is the Gram matrix of
    the unfolded input patches). Exact optimum for C + δ·I (see :func:`whitening_factor`).
    """
    w = as_2d(weight.detach()).to(torch.float64)
    if gram.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Gram matrix {tuple(gram.shape)} does not match weight {tuple(w.shape)}")
    lower = whitening_factor(gram.to(w.device), damping)
    u, s, vh = torch.linalg.svd(w @ lower, full_matrices=False)
    folded = torch.linalg.solve_triangular(lower, vh, upper=False, left=False)  # Vh·L⁻¹
    return _rebalanced(u, s, folded)


def scaled_svd(weight: torch.Tensor, abs_mean: torch.Tensor, alpha: float = 0.5) -> SVD:
    """ASVD: factors of ``weight`` from the SVD of W·diag(mean|x_j|^α), the scale folded back into Vh.

    Input channels that carry large activations weigh more in the truncation. Channels that were always
    zero get the smallest positive scale seen (their columns still have to be represented, just cheaply).
    """
    w = as_2d(weight.detach()).to(torch.float64)
    a = torch.as_tensor(abs_mean).detach().to(device=w.device, dtype=torch.float64).flatten()
    if a.shape != (w.shape[1],):
        raise ValueError(f"{a.numel()} input scales do not match weight {tuple(w.shape)}")
    scale = a.clamp_min(0.0) ** float(alpha)
    positive = scale[scale > 0]
    if positive.numel() == 0:
        return svd_2d(weight)
    scale = scale.clamp_min(float(positive.min()))
    u, s, vh = torch.linalg.svd(w * scale, full_matrices=False)
    return _rebalanced(u, s, vh / scale)


def truncation(svd: SVD, rank: int) -> torch.Tensor:
    """The rank-``rank`` matrix U_r·diag(S_r)·Vh_r (float64, weight seen as 2D)."""
    return (svd.U[:, :rank] * svd.S[:rank]) @ svd.Vh[:rank]


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: tr(E·C·Eᵀ) / tr(W·C·Wᵀ), E = W − approx.

    Equals Σ‖(W − approx)·x‖² / Σ‖W·x‖² over the rows x that built C = Σ x·xᵀ; 0.0 when W·x is always 0.
    """
    w = as_2d(weight.detach()).to(torch.float64)
    e = w - as_2d(approx.detach()).to(device=w.device, dtype=torch.float64)
    c = gram.to(device=w.device, dtype=torch.float64)
    total = float(((w @ c) * w).sum())
    return 0.0 if total <= 0.0 else max(0.0, float(((e @ c) * e).sum())) / total
