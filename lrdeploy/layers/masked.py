"""Masked layers: a weight with a boolean mask, computing with ``weight * mask`` (Sparse-IFT, 2:4 pruning).

``MaskedLinear`` / ``MaskedConv2d`` subclass ``nn.Linear`` / ``nn.Conv2d``, so everything that reads
``.weight`` keeps working; the mask is a buffer, so it travels in the bundle's weights file, and the manifest
records each layer's density and pattern ("unstructured" or "N:M"). Training keeps masked-out weights at zero
(the method multiplies weights, gradients and optimiser state by the mask), and the forward multiplies anyway,
so a mask is exact even if something wrote into a masked position.

``fold()`` returns the plain layer with the mask multiplied in — the exact inference form; an N:M pattern is
kept in the values (zeros), which is what TensorRT's sparse tactics look for.

The dense gradient of the *effective* weight (what RigL grows by, including masked-out positions) is captured
on demand: set ``capture_dense_grad = True`` and the next backward stores it in ``dense_grad``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.layers.structure import LayerKind, register_kind


class MaskedMixin:
    """Mask bookkeeping shared by the masked layer types."""

    weight: nn.Parameter
    mask: torch.Tensor
    pattern: str
    capture_dense_grad: bool
    dense_grad: torch.Tensor | None

    def _init_mask(self, mask: torch.Tensor | None, pattern: str) -> None:
        if mask is None:
            mask = torch.ones_like(self.weight, dtype=torch.bool)
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight {tuple(self.weight.shape)}")
        mask = mask.to(device=self.weight.device, dtype=torch.bool).clone()
        self.register_buffer("mask", mask)  # type: ignore[attr-defined]
        self.pattern = pattern
        self.capture_dense_grad = False
        self.dense_grad = None

    @property
    def density(self) -> float:
        return float(self.mask.float().mean())

    def effective_weight(self) -> torch.Tensor:
        w = self.weight * self.mask
        if self.capture_dense_grad and w.requires_grad:
            w.register_hook(self._store_dense_grad)
        return w

    def _store_dense_grad(self, grad: torch.Tensor) -> None:
        self.dense_grad = grad.detach().clone()

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the masked-out weights in place (after an optimiser step or a mask change)."""
        self.weight.mul_(self.mask)

    def set_mask(self, mask: torch.Tensor, pattern: str | None = None) -> None:
        with torch.no_grad():
            self.mask.copy_(mask.to(self.mask.device, torch.bool))
        if pattern is not None:
            self.pattern = pattern


class MaskedLinear(MaskedMixin, nn.Linear):
    kind = "masked_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: Any = None, mask: torch.Tensor | None = None, pattern: str = "unstructured") -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_mask(mask, pattern)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None,
                   pattern: str = "unstructured") -> MaskedLinear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype,
                    mask=mask, pattern=pattern)
        with torch.no_grad():
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.apply_mask_()
        return layer.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def fold(self, mode: str = "factored") -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None, self.weight.device,
                        self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight * self.mask)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.train(self.training)


class MaskedConv2d(MaskedMixin, nn.Conv2d):
    kind = "masked_conv2d"

    def __init__(self, *args: Any, mask: torch.Tensor | None = None, pattern: str = "unstructured",
                 **kwargs: Any) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_mask(mask, pattern)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None,
                   pattern: str = "unstructured") -> MaskedConv2d:
        w = conv.weight
        layer = cls(**conv_args(conv), device=w.device, dtype=w.dtype, mask=mask, pattern=pattern)
        with torch.no_grad():
            layer.weight.copy_(w)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.apply_mask_()
        return layer.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def fold(self, mode: str = "factored") -> nn.Conv2d:
        out = nn.Conv2d(**conv_args(self), device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight * self.mask)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.train(self.training)


def conv_args(conv: nn.Conv2d) -> dict[str, Any]:
    """Everything that defines a conv's shape and geometry, as constructor keyword arguments."""
    return {
        "in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": conv.kernel_size,
        "stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups,
        "bias": conv.bias is not None, "padding_mode": conv.padding_mode,
    }


def masked_layers(model: nn.Module) -> list[tuple[str, MaskedMixin]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedMixin)]


# --- manifest records ---


def _describe_linear(module: MaskedLinear) -> dict[str, Any]:
    return {"kind": module.kind, "in": module.in_features, "out": module.out_features,
            "bias": module.bias is not None, "density": round(module.density, 6), "pattern": module.pattern}


def _describe_conv(module: MaskedConv2d) -> dict[str, Any]:
    return {"kind": module.kind, "in": module.in_channels, "out": module.out_channels,
            "bias": module.bias is not None, "kernel": list(module.kernel_size),
            "stride": list(module.stride), "dilation": list(module.dilation),
            "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
            "density": round(module.density, 6), "pattern": module.pattern}


_HINT = "the manifest does not match the model; re-create the bundle"


def _build_linear(dense: nn.Module, entry: dict[str, Any], name: str) -> nn.Module:
    if not isinstance(dense, nn.Linear) or isinstance(dense, MaskedLinear):
        raise UserError(f"layer {name!r} is a {type(dense).__name__}, manifest says {entry.get('kind')}",
                        hint=_HINT)
    if (entry.get("in"), entry.get("out")) != (dense.in_features, dense.out_features):
        raise UserError(f"layer {name!r}: manifest says {entry.get('in')}→{entry.get('out')}, the model has "
                        f"{dense.in_features}→{dense.out_features}", hint=_HINT)
    return MaskedLinear.from_dense(dense, pattern=str(entry.get("pattern", "unstructured")))


def _build_conv(dense: nn.Module, entry: dict[str, Any], name: str) -> nn.Module:
    if not isinstance(dense, nn.Conv2d) or isinstance(dense, MaskedConv2d):
        raise UserError(f"layer {name!r} is a {type(dense).__name__}, manifest says {entry.get('kind')}",
                        hint=_HINT)
    recorded = {k: entry.get(k) for k in ("in", "out", "kernel", "stride", "dilation")}
    actual = {"in": dense.in_channels, "out": dense.out_channels, "kernel": list(dense.kernel_size),
              "stride": list(dense.stride), "dilation": list(dense.dilation)}
    if recorded != actual:
        raise UserError(f"layer {name!r}: manifest says {recorded}, the model has {actual}", hint=_HINT)
    return MaskedConv2d.from_dense(dense, pattern=str(entry.get("pattern", "unstructured")))


register_kind(LayerKind(MaskedLinear.kind, MaskedLinear, _describe_linear, _build_linear))
register_kind(LayerKind(MaskedConv2d.kind, MaskedConv2d, _describe_conv, _build_conv))
