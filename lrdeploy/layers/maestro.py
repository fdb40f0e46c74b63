"""Maestro layers (Horváth et al., ICML 2024): factorised Linear/Conv2d whose rank components are *ordered*.

W = U·Vᵀ is stored as two plain factors, ``first`` (Vᵀ: input → components, no bias) and ``second`` (U:
components → output, with the original bias), exactly like :class:`LowRankLinear` / :class:`LowRankConv2d`
(these classes subclass them, so compress, fold and structure code treat them as factorised layers).
What Maestro adds:

- ``rank`` — how many leading components survive. Ranks only fall (progressive shrinking), and the survivors
  are always a prefix: the hierarchical group lasso makes importance non-increasing in the component index,
  and :meth:`shrink` cuts at the first component below the threshold, so a prefix is enforced even if
  rounding ever disagreed. During training shrinking is mask-only: the storage (``stored`` components,
  what the optimiser holds) keeps its size; :meth:`sliced` and :meth:`fold` physically cut it.
  The count is also a buffer (``surviving``) so a plain ``state_dict`` round trip keeps it.
- a transient truncation for Ordered Dropout's sampled pass: :meth:`set_active_rank` or the
  :meth:`active_rank` context manager — set on the module, never threaded through forward signatures
  (the reference's sampler-in-every-forward design, methods.md §4.4).
- ``importance()`` and ``group_lasso()`` from tail-block norms g_i = ‖components i..r-1‖_F (§1.4–1.5).

Bundles: the manifest entry records ``rank``, ``stored`` and ``full_rank``; loading rebuilds storage at
``stored`` components so the weights load with ``strict=True``, then the ``surviving`` buffer restores the
rank. A freshly trained model stores every component (dead ones included); :func:`compact` (or
:meth:`sliced`) cuts storage to the rank first when a smaller weights file is wanted.

Departures from the reference (methods.md §1.11): a rank-0 conv outputs its bias broadcast to N×C×H×W
(bug #3); group lasso and importance cover surviving components only (dead ones can never return, so
regularising them is wasted work, and a sliced copy has the same importance as the original); the square
root in g_i has a zero subgradient at 0 instead of NaN, so a component driven exactly to zero does not
poison training.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.layers.lowrank import LowRankConv2d, LowRankLinear
from lrdeploy.layers.structure import (
    _HINT,
    LayerKind,
    _conv_geometry,
    _expect,
    conv_kwargs,
    register_kind,
    set_submodule,
)
from lrdeploy.layers.svd import SVD


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (a valid subgradient of the norm) where x == 0, instead of inf·0 = NaN."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def tail_norms(sq_norms: torch.Tensor) -> torch.Tensor:
    """g_i = sqrt(Σ_{j ≥ i} sq_norms[j]) for every i (flip → cumsum → flip), differentiable and NaN-free."""
    return _safe_sqrt(sq_norms.flip(0).cumsum(0).flip(0))


def _check_int(value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an int in [{low}, {high}], got {value!r}")
    return value


class _Maestro:
    """Behaviour shared by MaestroLinear and MaestroConv2d (mixed in before the LowRank base class)."""

    first: nn.Module
    second: nn.Module
    surviving: torch.Tensor
    _rank: int
    _active: int | None

    def _init_maestro(self, rank: int | None) -> None:
        stored = self.stored
        rank = stored if rank is None else _check_int(rank, 0, stored, "rank")
        device = self.first.weight.device
        self.register_buffer("surviving", torch.tensor(rank, dtype=torch.long, device=device))
        self._rank = rank
        self._active = None

    # --- ranks ---

    @property
    def stored(self) -> int:
        """Components held in storage (the optimiser's view); ``rank`` of them are alive."""
        return self.first.weight.shape[0]

    @property
    def rank(self) -> int:
        """Surviving components (a prefix); 0 means the layer outputs its bias only."""
        return self._rank

    @property
    def effective_rank(self) -> int:
        """Components the next forward uses: the active truncation if one is set, else ``rank``."""
        return self._rank if self._active is None else min(self._active, self._rank)

    def set_rank(self, rank: int) -> None:
        """Permanently drop every component from ``rank`` on (mask only; storage keeps its size)."""
        _check_int(rank, 0, self._rank, "rank (ranks only fall)")
        self._assign_rank(rank)

    def _assign_rank(self, rank: int) -> None:
        self._rank = rank
        self.surviving.fill_(rank)

    def set_active_rank(self, rank: int | None) -> None:
        """Truncate following forwards to the first ``rank`` components (None: use all survivors)."""
        if rank is not None:
            _check_int(rank, 0, self._rank, "active rank")
        self._active = rank

    @contextlib.contextmanager
    def active_rank(self, rank: int | None) -> Iterator[None]:
        """``with layer.active_rank(k):`` — truncated forwards inside, previous setting restored after."""
        previous = self._active
        self.set_active_rank(rank)
        try:
            yield
        finally:
            self._active = previous

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )
        if prefix + "surviving" in state_dict:
            value = int(state_dict[prefix + "surviving"])
            if 0 <= value <= self.stored:
                self._rank = value
            else:
                errors.append(f"{prefix}surviving={value} is outside [0, {self.stored}]")

    # --- group lasso, importance, shrinking ---

    def _component_sq_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared norms of the surviving components: (rows of Vᵀ, columns of U)."""
        r = self._rank
        v = self.first.weight[:r].flatten(1)  # flatten, not reshape(r, -1): a rank-0 layer has 0 elements
        u = self.second.weight[:, :r].reshape(self.second.weight.shape[0], r)
        return v.pow(2).sum(1), u.pow(2).sum(0)

    def group_lasso(self) -> torch.Tensor:
        """Hierarchical group lasso Σ_i g_i(U) + g_i(V) over surviving components (differentiable)."""
        v_sq, u_sq = self._component_sq_norms()
        return tail_norms(u_sq).sum() + tail_norms(v_sq).sum()

    @torch.no_grad()
    def importance(self) -> torch.Tensor:
        """imp_i = g_i(V)·g_i(U) for surviving components (float32+, non-increasing in i by construction)."""
        v_sq, u_sq = self._component_sq_norms()
        return tail_norms(v_sq.float()) * tail_norms(u_sq.float())

    @torch.no_grad()
    def shrink(self, threshold: float) -> int:
        """Progressive shrinking: keep components before the first with importance < ``threshold``.

        Equals count(importance ≥ threshold) because importance is non-increasing; cutting at the first
        failure enforces the prefix regardless. Never increases the rank. Returns the new rank.
        """
        self._assign_rank(self.rank_after_shrink(threshold))
        return self._rank

    @torch.no_grad()
    def rank_after_shrink(self, threshold: float) -> int:
        """The rank :meth:`shrink` would leave, without changing anything."""
        below = torch.nonzero(self.importance() < threshold)
        new = int(below[0, 0]) if below.numel() else self._rank
        return min(new, self._rank)

    # --- sizes ---

    def component_params(self) -> int:
        """Weights one component costs: a row of Vᵀ plus a column of U."""
        return self.first.weight[0].numel() + self.second.weight.shape[0]

    def param_count(self) -> int:
        """Parameters of the factor pair at the current rank (what ``fold`` keeps), not of the storage."""
        bias = self.second.bias.numel() if self.second.bias is not None else 0
        return self._rank * self.component_params() + bias

    # --- deployment ---

    def sliced(self, rank: int | None = None) -> _Maestro:
        """A copy physically cut to ``rank`` (default: current) components; storage ≥ 1 (valid tensors)."""
        rank = self._rank if rank is None else _check_int(rank, 0, self._rank, "rank")
        keep = max(rank, 1)
        out = copy.deepcopy(self)
        out._active = None
        _cut(out.first, keep, dim=0)
        _cut(out.second, keep, dim=1)
        out._assign_rank(rank)
        return out

    def to_lowrank(self) -> LowRankLinear | LowRankConv2d:
        """Plain LowRank layer at the current rank; rank 0 becomes a zero rank-1 pair (bias only, exact)."""
        raise NotImplementedError

    def _fill_lowrank(self, layer: LowRankLinear | LowRankConv2d) -> LowRankLinear | LowRankConv2d:
        r = self._rank
        with torch.no_grad():
            if r == 0:
                layer.first.weight.zero_()
                layer.second.weight.zero_()
            else:
                layer.first.weight.copy_(self.first.weight[:r])
                layer.second.weight.copy_(self.second.weight[:, :r])
            if self.second.bias is not None:
                layer.second.bias.copy_(self.second.bias)
        return layer.train(self.training)

    def dense_weight(self) -> torch.Tensor:
        return self.to_lowrank().dense_weight()

    def fold(self, mode: str = "factored") -> nn.Module:
        """Plain modules at the surviving rank: two layers ("factored") or one ("dense")."""
        return self.to_lowrank().fold(mode)

    def extra_repr(self) -> str:
        return f"rank={self._rank}, stored={self.stored}, full_rank={self.full_rank}"  # type: ignore[attr-defined]


def _cut(layer: nn.Module, keep: int, dim: int) -> None:
    """Slice a Linear/Conv2d weight to ``keep`` entries along ``dim`` in place, fixing its size attributes."""
    weight = layer.weight.detach().narrow(dim, 0, keep).clone()
    layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    if isinstance(layer, nn.Linear):
        if dim == 0:
            layer.out_features = keep
        else:
            layer.in_features = keep
    elif dim == 0:
        layer.out_channels = keep
    else:
        layer.in_channels = keep


class MaestroLinear(_Maestro, LowRankLinear):
    """Linear as ordered factors: y = U[:, :k] (Vᵀ[:k] x) + b, with k the (active) rank."""

    kind = "maestro_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        stored: int | None = None,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int | None = None,
    ) -> None:
        full = min(in_features, out_features)
        super().__init__(in_features, out_features, full if stored is None else stored, bias, device, dtype)
        self._init_maestro(rank)

    @classmethod
    def from_dense(  # type: ignore[override]
        cls, linear: nn.Linear, stored: int | None = None, *, svd: SVD | None = None
    ) -> MaestroLinear:
        """Balanced SVD split (U = P√S, Vᵀ = √S Qᵀ), by default at full rank: reproduces ``linear`` exactly
        up to float rounding, with components ordered by singular value."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        full = min(linear.in_features, linear.out_features)
        return super().from_dense(linear, full if stored is None else stored, svd=svd)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.effective_rank
        bias = self.second.bias
        if k == 0:
            shape = (*x.shape[:-1], self.out_features)
            return x.new_zeros(shape) + bias if bias is not None else x.new_zeros(shape)
        return F.linear(F.linear(x, self.first.weight[:k]), self.second.weight[:, :k], bias)

    def to_lowrank(self) -> LowRankLinear:
        w = self.first.weight
        layer = LowRankLinear(
            self.in_features, self.out_features, max(self._rank, 1), self.second.bias is not None,
            w.device, w.dtype,
        )
        return self._fill_lowrank(layer)  # type: ignore[return-value]


class MaestroConv2d(_Maestro, LowRankConv2d):
    """Conv2d as ordered factors: k×k conv to the (active) rank k, then 1×1 conv with the bias; groups = 1."""

    kind = "maestro_conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stored: int | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int | None = None,
    ) -> None:
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        full = min(out_channels, in_channels * kh * kw)
        super().__init__(
            in_channels, out_channels, (kh, kw), full if stored is None else stored, stride=stride,
            padding=padding, dilation=dilation, bias=bias, padding_mode=padding_mode, device=device,
            dtype=dtype,
        )
        self._init_maestro(rank)

    @classmethod
    def from_dense(  # type: ignore[override]
        cls, conv: nn.Conv2d, stored: int | None = None, *, svd: SVD | None = None
    ) -> MaestroConv2d:
        """Balanced SVD split of the weight seen as out × (in·kh·kw), by default at full rank (exact)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        kh, kw = conv.kernel_size
        full = min(conv.out_channels, conv.in_channels * kh * kw)
        return super().from_dense(conv, full if stored is None else stored, svd=svd)  # type: ignore[return-value]

    def _output_hw(self, h: int, w: int) -> tuple[int, int]:
        """Spatial output size of the dense conv (the rank-0 path computes no convolution)."""
        if self.padding == "same":
            return h, w
        pad = (0, 0) if self.padding == "valid" else self.padding
        sizes = []
        for size, p, d, k, s in zip((h, w), pad, self.dilation, self.kernel_size, self.stride, strict=True):
            sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.effective_rank
        bias = self.second.bias
        if k == 0:  # the reference returned the bias shaped (1, 1, 1, C) here (methods.md §1.11 bug #3)
            h, w = self._output_hw(x.shape[-2], x.shape[-1])
            shape = (*x.shape[:-3], self.out_channels, h, w)
            # a fresh tensor, not bias.expand(): a view of a parameter made under no_grad still claims
            # requires_grad without a grad_fn, which breaks module trackers (FLOP counting)
            return x.new_zeros(shape) + bias[:, None, None] if bias is not None else x.new_zeros(shape)
        hidden = self.first._conv_forward(x, self.first.weight[:k], None)
        return F.conv2d(hidden, self.second.weight[:, :k], bias)

    def to_lowrank(self) -> LowRankConv2d:
        layer = LowRankConv2d(
            self.in_channels, self.out_channels, self.kernel_size, max(self._rank, 1),
            **{**conv_kwargs(self.first), "bias": self.second.bias is not None},
        )
        return self._fill_lowrank(layer)  # type: ignore[return-value]


MAESTRO_TYPES: tuple[type[nn.Module], ...] = (MaestroLinear, MaestroConv2d)


def maestro_layers(model: nn.Module) -> list[tuple[str, MaestroLinear | MaestroConv2d]]:
    """(qualified name, layer) of every Maestro layer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MAESTRO_TYPES)]


def compact(model: nn.Module) -> nn.Module:
    """Cut every Maestro layer's storage to its surviving rank IN PLACE (e.g. before saving a bundle, so the
    weights file and its parameter count hold no dead components); the layers stay trainable."""
    for name, layer in maestro_layers(model):
        if name == "":
            raise ValueError("compact() needs a model containing Maestro layers, not a Maestro layer itself")
        if layer.stored != max(layer.rank, 1):
            set_submodule(model, name, layer.sliced())
    return model


# --- manifest records: current rank, storage size and full rank; storage is rebuilt at its recorded size ---


def _describe(module: MaestroLinear | MaestroConv2d) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": module.kind, "rank": module.rank, "stored": module.stored,
                             "full_rank": module.full_rank, "bias": module.second.bias is not None}
    if isinstance(module, MaestroConv2d):
        entry.update({"in": module.in_channels, "out": module.out_channels,
                      "kernel": list(module.kernel_size), **_conv_geometry(module)})
    else:
        entry.update({"in": module.in_features, "out": module.out_features})
    return entry


def _ranks(entry: dict[str, Any], full: int, name: str) -> tuple[int, int]:
    stored, rank = entry.get("stored"), entry.get("rank")
    try:
        _check_int(stored, 1, full, "stored")
        _check_int(rank, 0, stored, "rank")  # type: ignore[arg-type]
    except ValueError as exc:
        raise UserError(f"layer {name!r}: {exc}", hint=_HINT) from None
    return stored, rank  # type: ignore[return-value]


def _build_linear(dense: nn.Module, entry: dict[str, Any], name: str) -> nn.Module:
    if not isinstance(dense, nn.Linear):
        raise UserError(f"layer {name!r} is a {type(dense).__name__}, manifest says {entry.get('kind')}",
                        hint=_HINT)
    checks = {"in": dense.in_features, "out": dense.out_features, "bias": dense.bias is not None}
    for key, value in checks.items():
        _expect(entry, key, value, name)
    stored, rank = _ranks(entry, min(dense.in_features, dense.out_features), name)
    w = dense.weight
    return MaestroLinear(dense.in_features, dense.out_features, stored, dense.bias is not None, w.device,
                         w.dtype, rank=rank)


def _build_conv(dense: nn.Module, entry: dict[str, Any], name: str) -> nn.Module:
    if not isinstance(dense, nn.Conv2d) or dense.groups != 1:
        raise UserError(f"layer {name!r} is a {type(dense).__name__}, manifest says {entry.get('kind')}",
                        hint=_HINT)
    checks = {"in": dense.in_channels, "out": dense.out_channels, "kernel": list(dense.kernel_size),
              "bias": dense.bias is not None, **_conv_geometry(dense)}
    for key, value in checks.items():
        _expect(entry, key, value, name)
    kh, kw = dense.kernel_size
    stored, rank = _ranks(entry, min(dense.out_channels, dense.in_channels * kh * kw), name)
    return MaestroConv2d(dense.in_channels, dense.out_channels, dense.kernel_size, stored,
                         **conv_kwargs(dense), rank=rank)


register_kind(LayerKind(MaestroLinear.kind, MaestroLinear, _describe, _build_linear))
register_kind(LayerKind(MaestroConv2d.kind, MaestroConv2d, _describe, _build_conv))
