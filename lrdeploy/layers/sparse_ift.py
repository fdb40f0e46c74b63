"""Sparse-IFT's iso-FLOP blocks (methods.md §3.2), each folding exactly to a plain inference form.

A dense layer y = W·x (D_in → D_out, a conv's D_in read as k²·C_in) becomes, at sparsity s:

- **Parallel** (:class:`ParallelConv2d` / :class:`ParallelLinear`): the sum of b = round(1/(1−s)) sparse
  copies, a conv branch with its own BatchNorm. Folds into ONE layer of the original shape (each BN folded
  into its conv, kernels and biases summed): the deployed model is the dense architecture.
- **Factorized** (:class:`FactorizedConv2d` / :class:`FactorizedLinear`): V·σ(BN(U·x)) with sparse U
  (k×k, C_in → d) and sparse V (1×1, d → C_out), d = ⌈k²C_in·C_out / ((1−s)(k²C_in + C_out))⌉. The ReLU
  between them cannot be folded: it deploys as two layers (BN folded into U).
- **Doped** (:class:`DopedConv2d` / :class:`DopedLinear`): sparse W plus a DENSE low-rank V·U of rank
  d = ⌊s·k²C_in·C_out / (k²C_in + C_out)⌋ on the same input. Folds into one layer W + V·U. (The reference
  code also masks U and V at s — methods.md §3.11 #3 — so its "Doped" layers cost 1 − s² of the FLOPs; here
  they are dense, as the paper defines them.)
- **Wide** needs no block: the model is rebuilt wider and its layers masked
  (:mod:`lrdeploy.methods.sparse_ift`).

Iso-FLOP exactly, not nominally: the integer branch count / rank makes the nominal s miss the dense FLOPs by
up to 0.7 % (methods.md §3.2), so each block's mask density is solved from its own FLOPs
(:func:`parallel_density`, :func:`factorized_density`, :func:`doped_density`): sparse FLOPs = dense FLOPs up
to the rounding of one mask count.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.layers.masked import MaskedConv2d, MaskedLinear, conv_args
from lrdeploy.layers.structure import LayerKind, register_kind

# --- closed-form iso-FLOP sizes -----------------------------------------------------------------------------


def fan(layer: nn.Module) -> tuple[int, int, int]:
    """(k², C_in, C_out) of a conv, (1, D_in, D_out) of a Linear."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return kh * kw, layer.in_channels // layer.groups, layer.out_channels
    return 1, layer.in_features, layer.out_features


def parallel_branches(sparsity: float) -> int:
    return max(1, round(1.0 / (1.0 - sparsity)))


def parallel_density(sparsity: float) -> float:
    """Each of b branches keeps 1/b of its weights: b·(1/b) = the dense FLOPs."""
    return 1.0 / parallel_branches(sparsity)


def factorized_rank(k2: int, c_in: int, c_out: int, sparsity: float) -> int:
    return math.ceil(k2 * c_in * c_out / ((1.0 - sparsity) * (k2 * c_in + c_out)) - 1e-9)


def factorized_density(k2: int, c_in: int, c_out: int, rank: int) -> float:
    """Density of U and V whose FLOPs d·(k²C_in + C_out) equal the dense k²·C_in·C_out."""
    return min(1.0, k2 * c_in * c_out / (rank * (k2 * c_in + c_out)))


def doped_rank(k2: int, c_in: int, c_out: int, sparsity: float) -> int:
    return math.floor(sparsity * k2 * c_in * c_out / (k2 * c_in + c_out) + 1e-9)


def doped_density(k2: int, c_in: int, c_out: int, rank: int) -> float:
    """Density of W so that W's sparse FLOPs plus the dense V·U's d·(k²C_in + C_out) equal the dense ones."""
    return max(0.0, 1.0 - rank * (k2 * c_in + c_out) / (k2 * c_in * c_out))


# --- BN folding helper --------------------------------------------------------------------------------------


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d | nn.BatchNorm1d
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(layer(x))`` as one layer (eval-mode BN statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(
        bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * scale.reshape(shape), b * scale + shift


def _masked(layer: nn.Module) -> MaskedConv2d | MaskedLinear:
    return MaskedConv2d.from_dense(layer) if isinstance(layer, nn.Conv2d) else MaskedLinear.from_dense(layer)


def _fresh(layer: nn.Module, **changes: Any) -> nn.Module:
    """A newly initialised dense layer like ``layer`` (same geometry, device, dtype), with ``changes``."""
    w = layer.weight
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(**{**conv_args(layer), **changes}, device=w.device, dtype=w.dtype)
    args = {"in_features": layer.in_features, "out_features": layer.out_features,
            "bias": layer.bias is not None}
    return nn.Linear(**{**args, **changes}, device=w.device, dtype=w.dtype)


def _bn(layer: nn.Module, channels: int) -> nn.Module:
    w = layer.weight
    cls = nn.BatchNorm2d if isinstance(layer, nn.Conv2d) else nn.BatchNorm1d
    return cls(channels, device=w.device, dtype=w.dtype)


def _plain(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    out = _fresh(layer, bias=bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


# --- Parallel -----------------------------------------------------------------------------------------------


class _Parallel(nn.Module):
    """Sum of ``branches`` masked copies of a layer, each followed by its own BatchNorm."""

    kind = ""

    def __init__(self, dense: nn.Module, branches: int) -> None:
        super().__init__()
        if branches < 1:
            raise UserError(f"a Sparse Parallel layer needs at least one branch, got {branches}")
        first = _masked(dense)  # branch 0 starts from the dense layer's values, the others fresh
        self.layers = nn.ModuleList([first, *(_masked(_fresh(dense)) for _ in range(branches - 1))])
        self.norms = nn.ModuleList([_bn(dense, fan(dense)[2]) for _ in range(branches)])

    @property
    def density(self) -> float:
        return sum(m.density for m in self.layers) / len(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for layer, norm in zip(self.layers, self.norms, strict=True):
            y = norm(layer(x))
            out = y if out is None else out + y
        return out

    @torch.no_grad()
    def fold(self, mode: str = "factored") -> nn.Module:
        weight, bias = None, None
        for layer, norm in zip(self.layers, self.norms, strict=True):
            w, b = fold_bn(layer.weight * layer.mask, layer.bias, norm)
            weight = w if weight is None else weight + w
            bias = b if bias is None else bias + b
        return _plain(self.layers[0], weight, bias).train(self.training)


class ParallelConv2d(_Parallel):
    kind = "sparse_parallel_conv2d"


class ParallelLinear(_Parallel):
    kind = "sparse_parallel_linear"


# --- Factorized ---------------------------------------------------------------------------------------------


class _Factorized(nn.Module):
    """V · ReLU(BN(U · x)) with U and V masked."""

    kind = ""

    def __init__(self, dense: nn.Module, rank: int) -> None:
        super().__init__()
        if isinstance(dense, nn.Conv2d):
            first = _fresh(dense, out_channels=rank, bias=False)
            second = nn.Conv2d(rank, dense.out_channels, 1, bias=dense.bias is not None,
                               device=dense.weight.device, dtype=dense.weight.dtype)
        else:
            first = _fresh(dense, out_features=rank, bias=False)
            second = _fresh(dense, in_features=rank)
        self.first, self.second = _masked(first), _masked(second)
        self.norm = _bn(dense, rank)
        self.act = nn.ReLU()
        self.rank = rank

    @property
    def density(self) -> float:
        n1, n2 = self.first.mask.numel(), self.second.mask.numel()
        return (self.first.density * n1 + self.second.density * n2) / (n1 + n2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.act(self.norm(self.first(x))))

    @torch.no_grad()
    def fold(self, mode: str = "factored") -> nn.Module:
        w, b = fold_bn(self.first.weight * self.first.mask, self.first.bias, self.norm)
        return nn.Sequential(_plain(self.first, w, b), nn.ReLU(), self.second.fold()).train(self.training)


class FactorizedConv2d(_Factorized):
    kind = "sparse_factorized_conv2d"


class FactorizedLinear(_Factorized):
    kind = "sparse_factorized_linear"


# --- Doped --------------------------------------------------------------------------------------------------


class _Doped(nn.Module):
    """Masked W plus a dense low-rank V·U on the same input (U: k×k conv / Linear, V: 1×1 conv / Linear)."""

    kind = ""

    def __init__(self, dense: nn.Module, rank: int) -> None:
        super().__init__()
        self.sparse = _masked(dense)
        if isinstance(dense, nn.Conv2d):
            self.u = _fresh(dense, out_channels=rank, bias=False)
            self.v = nn.Conv2d(rank, dense.out_channels, 1, bias=False, device=dense.weight.device,
                               dtype=dense.weight.dtype)
        else:
            self.u = _fresh(dense, out_features=rank, bias=False)
            self.v = _fresh(dense, in_features=rank, bias=False)
        with torch.no_grad():  # start as the dense layer: the low-rank part learns from zero
            self.v.weight.zero_()
        self.rank = rank

    @property
    def density(self) -> float:
        return self.sparse.density

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparse(x) + self.v(self.u(x))

    @torch.no_grad()
    def fold(self, mode: str = "factored") -> nn.Module:
        v = self.v.weight.reshape(self.v.weight.shape[0], self.rank)
        u = self.u.weight.reshape(self.rank, -1)
        merged = (v @ u).reshape(self.sparse.weight.shape)
        return _plain(self.sparse, self.sparse.weight * self.sparse.mask + merged,
                      self.sparse.bias).train(self.training)


class DopedConv2d(_Doped):
    kind = "sparse_doped_conv2d"


class DopedLinear(_Doped):
    kind = "sparse_doped_linear"


# --- manifest records ---------------------------------------------------------------------------------------


def _describe(module: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": module.kind, "density": round(module.density, 6),
                             "pattern": "unstructured"}
    if isinstance(module, _Parallel):
        entry["branches"] = len(module.layers)
    else:
        entry["rank"] = module.rank
    return entry


def _builder(cls: type[nn.Module], conv: bool) -> Any:
    def build(dense: nn.Module, entry: dict[str, Any], name: str) -> nn.Module:
        want = nn.Conv2d if conv else nn.Linear
        if type(dense) is not want:
            raise UserError(f"layer {name!r} is a {type(dense).__name__}, manifest says {entry.get('kind')}",
                            hint="the manifest does not match the model; re-create the bundle")
        size = entry.get("branches") if issubclass(cls, _Parallel) else entry.get("rank")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise UserError(f"layer {name!r}: {entry.get('kind')} needs a positive branch count or rank",
                            hint="the manifest does not match the model; re-create the bundle")
        return cls(dense, size)

    return build


for _cls, _conv in ((ParallelConv2d, True), (ParallelLinear, False), (FactorizedConv2d, True),
                    (FactorizedLinear, False), (DopedConv2d, True), (DopedLinear, False)):
    register_kind(LayerKind(_cls.kind, _cls, _describe, _builder(_cls, _conv)))
