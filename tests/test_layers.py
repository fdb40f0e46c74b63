"""Factorised layers against the dense layer and against torch.linalg.svd computed independently here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.flops import count_flops, count_params
from lrdeploy.layers import LowRankConv2d, LowRankLinear, rank_for_energy, rank_for_ratio

F64 = torch.float64


def _ref_svd(weight: torch.Tensor):
    """Reference SVD of the weight seen as out × rest (independent of lrdeploy's code path)."""
    return torch.linalg.svd(weight.detach().reshape(weight.shape[0], -1).double(), full_matrices=False)


def _ref_truncation(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_r, W - W_r) from the reference SVD, both in the weight's own shape."""
    u, s, vh = _ref_svd(weight)
    kept = (u[:, :rank] * s[:rank]) @ vh[:rank]
    tail = (u[:, rank:] * s[rank:]) @ vh[rank:]
    return kept.reshape(weight.shape), tail.reshape(weight.shape)


# ---------------------------------------------------------------- full rank reproduces the dense layer


@pytest.mark.parametrize("bias", [True, False])
def test_linear_full_rank_is_exact_float64(bias):
    torch.manual_seed(0)
    dense = nn.Linear(12, 7, bias=bias, dtype=F64)
    low = LowRankLinear.from_dense(dense, 7)
    assert low.rank == low.full_rank == 7
    assert low.first.weight.dtype == F64
    x = torch.randn(5, 12, dtype=F64)
    torch.testing.assert_close(low(x), dense(x), rtol=0, atol=1e-12)
    assert (low.second.bias is None) == (not bias)


def test_linear_full_rank_float32_within_rounding():
    torch.manual_seed(1)
    dense = nn.Linear(64, 48)
    low = LowRankLinear.from_dense(dense, 48)
    x = torch.randn(16, 64)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "hw"),
    [
        (dict(kernel_size=3, stride=1, padding=0), (9, 9)),
        (dict(kernel_size=3, stride=2, padding=1), (9, 9)),
        (dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (11, 10)),
        (dict(kernel_size=3, padding=1, padding_mode="reflect"), (7, 7)),
    ],
)
def test_conv_full_rank_is_exact_float64(kwargs, hw):
    torch.manual_seed(2)
    dense = nn.Conv2d(4, 6, dtype=F64, **kwargs)
    full = min(6, 4 * math.prod(dense.kernel_size))
    low = LowRankConv2d.from_dense(dense, full)
    assert low.full_rank == full
    x = torch.randn(2, 4, *hw, dtype=F64)
    y = dense(x)
    torch.testing.assert_close(low(x), y, rtol=0, atol=1e-12)
    assert low.stride == dense.stride and low.padding == dense.padding and low.dilation == dense.dilation


def test_conv_full_rank_float32_within_rounding():
    torch.manual_seed(3)
    dense = nn.Conv2d(6, 16, 5, stride=2, padding=2)
    low = LowRankConv2d.from_dense(dense, 16)
    x = torch.randn(3, 6, 14, 14)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- lower rank: error is the discarded spectrum


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_linear_truncation_matches_reference_svd(rank):
    torch.manual_seed(4)
    dense = nn.Linear(10, 8, dtype=F64)
    w = dense.weight.detach()
    low = LowRankLinear.from_dense(dense, rank)
    _, s, _ = _ref_svd(w)
    kept, tail = _ref_truncation(w, rank)

    w_r = low.second.weight @ low.first.weight
    # Eckart–Young: our W_r is the reference best rank-r approximation, element by element ...
    torch.testing.assert_close(w_r.detach(), kept, rtol=0, atol=1e-12)
    # ... and its Frobenius error is exactly the discarded singular values' energy.
    err2 = torch.linalg.matrix_norm(w - w_r.detach()) ** 2
    torch.testing.assert_close(err2, (s[rank:] ** 2).sum(), rtol=1e-12, atol=1e-12)

    # Output error on the identity input is (W - W_r)ᵀ; on a random input X it is X (W - W_r)ᵀ.
    eye = torch.eye(10, dtype=F64)
    err_eye = dense(eye) - low(eye)
    torch.testing.assert_close(err_eye.detach(), tail.T, rtol=0, atol=1e-12)
    torch.testing.assert_close((err_eye**2).sum().detach(), (s[rank:] ** 2).sum(), rtol=1e-12, atol=1e-12)
    x = torch.randn(7, 10, dtype=F64)
    torch.testing.assert_close((dense(x) - low(x)).detach(), x @ tail.T, rtol=0, atol=1e-12)


def test_linear_truncation_error_is_not_zero_below_full_rank():
    """Guard against a test that passes because nothing was truncated."""
    torch.manual_seed(5)
    dense = nn.Linear(10, 8, dtype=F64)
    low = LowRankLinear.from_dense(dense, 2)
    x = torch.randn(4, 10, dtype=F64)
    assert (dense(x) - low(x)).abs().max() > 1e-3


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_conv_truncation_matches_reference_svd(rank):
    torch.manual_seed(6)
    dense = nn.Conv2d(3, 10, 3, stride=2, padding=1, dtype=F64)
    w = dense.weight.detach()
    low = LowRankConv2d.from_dense(dense, rank)
    _, s, _ = _ref_svd(w)
    kept, tail = _ref_truncation(w, rank)
    torch.testing.assert_close(low.dense_weight(), kept, rtol=0, atol=1e-12)
    err2 = ((w - low.dense_weight()) ** 2).sum()
    torch.testing.assert_close(err2, (s[rank:] ** 2).sum(), rtol=1e-12, atol=1e-12)
    # The output error is the convolution with the discarded part of the weight (no bias: it is kept).
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    expected = F.conv2d(x, tail, stride=2, padding=1)
    torch.testing.assert_close((dense(x) - low(x)).detach(), expected, rtol=0, atol=1e-12)


def test_factors_are_balanced():
    """first = √S·Vᵀ and second = U·√S: both factors carry the same singular values."""
    torch.manual_seed(7)
    dense = nn.Linear(9, 6, dtype=F64)
    low = LowRankLinear.from_dense(dense, 4)
    _, s, _ = _ref_svd(dense.weight)
    root = s[:4].sqrt()
    torch.testing.assert_close(torch.linalg.svdvals(low.first.weight.detach()), root, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.linalg.svdvals(low.second.weight.detach()), root, rtol=1e-10, atol=1e-12)


def test_from_dense_keeps_mode_and_rejects_bad_input():
    dense = nn.Linear(6, 4).eval()
    assert not LowRankLinear.from_dense(dense, 2).training
    with pytest.raises(ValueError):
        LowRankLinear.from_dense(dense, 5)
    with pytest.raises(ValueError):
        LowRankLinear.from_dense(dense, 0)
    with pytest.raises(ValueError, match="grouped"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(TypeError):
        LowRankLinear.from_dense(nn.Conv2d(4, 4, 3), 2)


# ---------------------------------------------------------------- counts


def test_param_and_flop_counts():
    lin = LowRankLinear(400, 120, 30)
    assert lin.param_count() == 30 * 400 + 120 * 30 + 120 == count_params(lin)
    assert lin.dense_param_count() == 400 * 120 + 120
    assert lin.flops_per_position() == 2 * 30 * (400 + 120)
    assert count_flops(lin, (400,)) == lin.flops_per_position()
    assert count_flops(nn.Linear(400, 120), (400,)) == lin.dense_flops_per_position() == 2 * 400 * 120

    conv = LowRankConv2d(6, 16, 5, 4, bias=False)
    assert conv.param_count() == 4 * 6 * 25 + 16 * 4
    assert conv.dense_param_count() == 16 * 6 * 25
    # 14×14 input, kernel 5, no padding → 10×10 output positions.
    assert count_flops(conv, (6, 14, 14)) == 100 * conv.flops_per_position()
    assert count_flops(nn.Conv2d(6, 16, 5, bias=False), (6, 14, 14)) == 100 * conv.dense_flops_per_position()


def test_count_flops_restores_training_mode():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    count_flops(model, (4,))
    assert model.training


# ---------------------------------------------------------------- rank selection


def test_rank_for_ratio():
    w = torch.zeros(10, 6)  # full rank 6
    assert rank_for_ratio(w, 0.5) == 3
    assert rank_for_ratio(w, 0.3) == 2  # ceil(1.8)
    assert rank_for_ratio(w, 1.0) == 6
    assert rank_for_ratio(w, 0.01) == 1  # never 0
    # 0.28 * 25 and 0.07 * 100 are 7.000000000000001 in floating point: a naive ceil gives 8.
    assert rank_for_ratio(torch.zeros(25, 30), 0.28) == 7
    assert rank_for_ratio(torch.zeros(100, 100), 0.07) == 7
    assert rank_for_ratio(torch.zeros(16, 6, 5, 5), 0.5) == 8  # conv weight seen as 16 × 150
    for bad in (0, 1.5, -0.2, float("nan")):
        with pytest.raises(UserError):
            rank_for_ratio(w, bad)


def test_rank_for_energy_known_spectrum():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # s² = 16, 9, 4, 1; total 30; cumulative 16, 25, 29, 30
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 16 / 30) == 1  # boundary: ≥ counts
    assert rank_for_energy(s, 0.54) == 2
    assert rank_for_energy(s, 25 / 30) == 2
    assert rank_for_energy(s, 0.9) == 3
    assert rank_for_energy(s, 0.97) == 4
    assert rank_for_energy(s, 1.0) == 4
    assert rank_for_energy(torch.tensor([1.0, 2.0, 4.0, 3.0]), 0.9) == 3  # order does not matter
    assert rank_for_energy(torch.tensor([3.0, 0.0, 0.0]), 1.0) == 1  # zeros add no energy
    assert rank_for_energy(torch.zeros(5), 0.9) == 1
    for bad in (0, 1.5):
        with pytest.raises(UserError):
            rank_for_energy(s, bad)
