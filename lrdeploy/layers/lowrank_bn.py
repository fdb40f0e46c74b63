"""Factorised Conv2d with a BatchNorm between the factors (Pufferfish / Cuttlefish "extra BN").

The extra BN helps the factors train (it re-normalises the rank-r bottleneck), but it is a training-time
construct: in eval mode it is an affine map per bottleneck channel, so ``fold()`` multiplies it into the first
factor (a k×k conv that gains a bias) and the deployed graph is the same two convs as a plain
:class:`LowRankConv2d` — or one dense conv. Importing this module registers the manifest kind
``lowrank_conv2d_bn`` so bundles holding such layers load through :func:`lrdeploy.layers.structure.apply`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lrdeploy.layers.lowrank import LowRankConv2d, _check_mode
from lrdeploy.layers.structure import LayerKind, check_conv, conv_kwargs, register_kind


class LowRankConv2dBN(LowRankConv2d):
    """y = second(bn(first(x))): k×k conv to ``rank`` channels, BatchNorm2d(rank), 1×1 conv to the outputs.

    ``from_dense`` (inherited) sets the factors by truncated SVD and leaves the BN freshly initialised, as the
    reference does: the factorised layer is therefore *not* equal to the dense one in training mode.
    """

    kind = "lowrank_conv2d_bn"

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
        bn_eps: float = 1e-5,
        bn_momentum: float | None = 0.1,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, rank, stride=stride, padding=padding, dilation=dilation,
            bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self.bn = nn.BatchNorm2d(rank, eps=bn_eps, momentum=bn_momentum, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.bn(self.first(x)))

    def _bn_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift) of the BN in eval mode, float64: bn(z) = scale·z + shift."""
        bn = self.bn
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("the extra BN tracks no running statistics, so it has no eval-mode form to fold")
        mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        return scale, beta - mean * scale

    def _folded_first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First factor with the BN multiplied in: (weight r×in×kh×kw, bias r), float64."""
        scale, shift = self._bn_affine()
        w = self.first.weight.detach().double() * scale[:, None, None, None]
        return w, shift

    def dense_weight(self) -> torch.Tensor:
        """W = second · bn · first at the BN's eval statistics, in the dense conv's weight shape."""
        first, _ = self._folded_first()
        left = self.second.weight.detach().double().reshape(self.out_channels, self.rank)
        w = (left @ first.reshape(self.rank, -1)).reshape(self.dense_shape)
        return w.to(self.first.weight.dtype)

    def dense_bias(self) -> torch.Tensor:
        """Bias of the equivalent dense conv: second · shift (+ second's own bias); the BN always adds one."""
        _, shift = self._folded_first()
        left = self.second.weight.detach().double().reshape(self.out_channels, self.rank)
        b = left @ shift
        if self.second.bias is not None:
            b = b + self.second.bias.detach().double()
        return b.to(self.first.weight.dtype)

    def dense_param_count(self) -> int:
        kh, kw = self.kernel_size
        return self.out_channels * self.in_channels * kh * kw + self.out_channels

    def fold(self, mode: str = "factored") -> nn.Module:
        """Plain convs at the BN's eval statistics: (k×k conv with bias, 1×1 conv) or one dense conv."""
        _check_mode(mode)
        w = self.first.weight
        geometry = {
            "stride": self.stride, "padding": self.padding, "dilation": self.dilation,
            "padding_mode": self.padding_mode, "device": w.device, "dtype": w.dtype,
        }
        if mode == "factored":
            first_w, first_b = self._folded_first()
            first = nn.Conv2d(self.in_channels, self.rank, self.kernel_size, bias=True, **geometry)
            with torch.no_grad():
                first.weight.copy_(first_w)
                first.bias.copy_(first_b)
            return nn.Sequential(first, copy.deepcopy(self.second)).train(self.training)
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=True, **geometry)
        with torch.no_grad():
            out.weight.copy_(self.dense_weight())
            out.bias.copy_(self.dense_bias())
        return out.train(self.training)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, full_rank={self.full_rank}, extra_bn=True"


def _describe(module: LowRankConv2dBN) -> dict[str, Any]:
    padding = module.padding
    return {
        "kind": module.kind,
        "rank": module.rank,
        "full_rank": module.full_rank,
        "in": module.in_channels,
        "out": module.out_channels,
        "kernel": list(module.kernel_size),
        "bias": module.second.bias is not None,
        "stride": list(module.stride),
        "padding": padding if isinstance(padding, str) else list(padding),
        "dilation": list(module.dilation),
        "bn_eps": module.bn.eps,
        "bn_momentum": module.bn.momentum,
    }


def _build(dense: nn.Module, entry: dict[str, Any], name: str) -> nn.Module:
    rank = check_conv(dense, entry, name)
    return LowRankConv2dBN(
        dense.in_channels, dense.out_channels, dense.kernel_size, rank,
        bn_eps=float(entry.get("bn_eps", 1e-5)), bn_momentum=entry.get("bn_momentum", 0.1),
        **conv_kwargs(dense),
    )


register_kind(LayerKind(LowRankConv2dBN.kind, LowRankConv2dBN, _describe, _build))
