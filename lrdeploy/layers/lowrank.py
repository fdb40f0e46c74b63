"""Factorised Linear and Conv2d: W ≈ second · first, each factor a plain torch layer.

The factors are ordinary nn.Linear / nn.Conv2d children so that training code, optimisers, state dicts and
exporters see nothing exotic. ``fold()`` returns plain torch modules for deployment: either the two factors
("factored", fewer FLOPs when the rank is low) or their product as one dense layer ("dense", one kernel
launch, faster when the rank is close to full — see docs/baseline on break-even ranks).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.layers.svd import SVD, balanced_factors, svd_2d

FOLD_MODES = ("factored", "dense")


def _check_mode(mode: str) -> None:
    if mode not in FOLD_MODES:
        raise UserError(f"unknown fold mode {mode!r}", hint=f"use one of {', '.join(FOLD_MODES)}")


def _check_rank(rank: int, full_rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank:
        raise ValueError(f"rank must be an int in [1, {full_rank}], got {rank!r}")
    return rank


class LowRankLayer(nn.Module):
    """Shared behaviour of factorised layers: ``first`` maps input → rank, ``second`` maps rank → output."""

    kind: str = ""
    first: nn.Module
    second: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def full_rank(self) -> int:
        raise NotImplementedError

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """Weight shape of the equivalent dense layer."""
        raise NotImplementedError

    def param_count(self) -> int:
        """Parameters actually stored (both factors and the bias)."""
        return sum(p.numel() for p in self.parameters())

    def dense_param_count(self) -> int:
        """Parameters of the equivalent dense layer (weight + bias)."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """W = second · first in the dense layer's own weight shape (product taken in float64)."""
        raise NotImplementedError

    def fold(self, mode: str = "factored") -> nn.Module:
        """A plain torch module computing the same function; parameters are copies, not shared."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"rank={self.rank}, full_rank={self.full_rank}"


class LowRankLinear(LowRankLayer):
    """Linear stored as two factors: y = second(first(x)); first: in→rank (no bias), second: rank→out."""

    kind = "lowrank_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_rank(rank, min(in_features, out_features))
        self.in_features = in_features
        self.out_features = out_features
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.first.out_features

    @property
    def full_rank(self) -> int:
        return min(self.in_features, self.out_features)

    @property
    def dense_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int, *, svd: SVD | None = None) -> LowRankLinear:
        """Best rank-``rank`` approximation of ``linear`` (Eckart–Young) by truncated SVD.

        ``svd`` may be passed when the caller already computed ``svd_2d(linear.weight)`` (e.g. to choose the
        rank by energy) so it is not computed twice. Dtype, device and train/eval mode are preserved.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, w.device, w.dtype)
        left, right = balanced_factors(svd if svd is not None else svd_2d(w), rank)
        with torch.no_grad():
            layer.first.weight.copy_(right)
            layer.second.weight.copy_(left)
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias)
        layer.train(linear.training)
        return layer

    def dense_param_count(self) -> int:
        bias = self.out_features if self.second.bias is not None else 0
        return self.in_features * self.out_features + bias

    def flops_per_position(self) -> int:
        """FLOPs (2·MAC) per input vector: 2·r·(in + out)."""
        return 2 * self.rank * (self.in_features + self.out_features)

    def dense_flops_per_position(self) -> int:
        """FLOPs (2·MAC) per input vector of the dense equivalent: 2·in·out."""
        return 2 * self.in_features * self.out_features

    def dense_weight(self) -> torch.Tensor:
        w = self.second.weight.detach().double() @ self.first.weight.detach().double()
        return w.to(self.first.weight.dtype)

    def fold(self, mode: str = "factored") -> nn.Module:
        _check_mode(mode)
        if mode == "factored":
            return nn.Sequential(copy.deepcopy(self.first), copy.deepcopy(self.second)).train(self.training)
        w = self.first.weight
        has_bias = self.second.bias is not None
        out = nn.Linear(self.in_features, self.out_features, bias=has_bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(self.dense_weight())
            if has_bias:
                out.bias.copy_(self.second.bias)
        return out.train(self.training)


class LowRankConv2d(LowRankLayer):
    """Conv2d stored as a k×k conv to ``rank`` channels followed by a 1×1 conv to the output channels.

    The first conv carries the original stride, padding, dilation and padding mode, so output sizes match
    the dense layer exactly; groups must be 1 (a grouped conv's weight is not one matrix).
    """

    kind = "lowrank_conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        _check_rank(rank, min(out_channels, in_channels * kh * kw))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kh, kw)
        self.first = nn.Conv2d(
            in_channels,
            rank,
            (kh, kw),
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.first.out_channels

    @property
    def full_rank(self) -> int:
        kh, kw = self.kernel_size
        return min(self.out_channels, self.in_channels * kh * kw)

    @property
    def stride(self) -> tuple[int, ...]:
        return self.first.stride

    @property
    def padding(self) -> tuple[int, ...] | str:
        return self.first.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.first.dilation

    @property
    def padding_mode(self) -> str:
        return self.first.padding_mode

    @property
    def dense_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int, *, svd: SVD | None = None) -> LowRankConv2d:
        """Best rank-``rank`` approximation of ``conv``'s weight seen as out × (in·kh·kw) (truncated SVD)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"grouped convolutions (groups={conv.groups}) cannot be factorised")
        w = conv.weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            rank,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        left, right = balanced_factors(svd if svd is not None else svd_2d(w), rank)
        with torch.no_grad():
            layer.first.weight.copy_(right.reshape(layer.first.weight.shape))
            layer.second.weight.copy_(left.reshape(layer.second.weight.shape))
            if conv.bias is not None:
                layer.second.bias.copy_(conv.bias)
        layer.train(conv.training)
        return layer

    def dense_param_count(self) -> int:
        kh, kw = self.kernel_size
        bias = self.out_channels if self.second.bias is not None else 0
        return self.out_channels * self.in_channels * kh * kw + bias

    def flops_per_position(self) -> int:
        """FLOPs (2·MAC) per output pixel: 2·r·(in·kh·kw + out)."""
        kh, kw = self.kernel_size
        return 2 * self.rank * (self.in_channels * kh * kw + self.out_channels)

    def dense_flops_per_position(self) -> int:
        """FLOPs (2·MAC) per output pixel of the dense equivalent: 2·out·in·kh·kw."""
        kh, kw = self.kernel_size
        return 2 * self.out_channels * self.in_channels * kh * kw

    def dense_weight(self) -> torch.Tensor:
        left = self.second.weight.detach().double().reshape(self.out_channels, self.rank)
        right = self.first.weight.detach().double().reshape(self.rank, -1)
        w = (left @ right).reshape(self.dense_shape)
        return w.to(self.first.weight.dtype)

    def fold(self, mode: str = "factored") -> nn.Module:
        _check_mode(mode)
        if mode == "factored":
            return nn.Sequential(copy.deepcopy(self.first), copy.deepcopy(self.second)).train(self.training)
        w = self.first.weight
        has_bias = self.second.bias is not None
        out = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=has_bias,
            padding_mode=self.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(self.dense_weight())
            if has_bias:
                out.bias.copy_(self.second.bias)
        return out.train(self.training)


LOWRANK_TYPES: tuple[type[LowRankLayer], ...] = (LowRankLinear, LowRankConv2d)
