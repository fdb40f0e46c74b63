"""Record which layers of a model are factorised, and rebuild that shape on a fresh dense model.

A bundle stores the dense architecture by name (model registry) plus this per-layer description; loading
builds the dense model, ``apply``-s the description, then loads weights with ``strict=True``. Layers are
addressed by fully-qualified module name, never by position in a state dict, so a mismatch is reported
instead of silently loading weights into the wrong layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.layers.lowrank import LowRankConv2d, LowRankLinear

_HINT = "the manifest does not match the model: re-export the bundle with this lrdeploy version"


def _conv_geometry(conv: nn.Conv2d | LowRankConv2d) -> dict[str, Any]:
    padding = conv.padding
    return {
        "stride": list(conv.stride),
        "padding": padding if isinstance(padding, str) else list(padding),
        "dilation": list(conv.dilation),
    }


@dataclass(frozen=True)
class LayerKind:
    """How one factorised layer type is recorded in a manifest and rebuilt from it.

    ``describe(module) -> entry`` (JSON-friendly; must contain "kind" and "rank") and
    ``build(dense, entry, name) -> module`` (an uninitialised module of the recorded shape, replacing the
    fresh dense layer ``dense``; raise UserError when they disagree). Methods register their own layer
    types with :func:`register_kind`, so bundles of any method load through the same code.
    """

    kind: str
    cls: type[nn.Module]
    describe: Callable[[Any], dict[str, Any]]
    build: Callable[[nn.Module, dict[str, Any], str], nn.Module]


_KINDS: dict[str, LayerKind] = {}


def register_kind(kind: LayerKind) -> None:
    _KINDS[kind.kind] = kind


def known_kinds() -> list[str]:
    return list(_KINDS)


def _kind_of(module: nn.Module) -> LayerKind | None:
    for kind in _KINDS.values():
        if type(module) is kind.cls:
            return kind
    return None


def describe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per factorised layer (by qualified name): kind, rank, full rank, in/out sizes, bias (+ geometry).

    JSON-serialisable; this is what the bundle manifest stores under "structure".
    """
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in out):
            continue  # inside a recorded layer (a Sparse Parallel's branches): the outer one rebuilds it
        kind = _kind_of(module)
        if kind is not None:
            out[name] = kind.describe(module)
    return out


def _describe_linear(module: LowRankLinear) -> dict[str, Any]:
    return {
        "kind": module.kind,
        "rank": module.rank,
        "full_rank": module.full_rank,
        "in": module.in_features,
        "out": module.out_features,
        "bias": module.second.bias is not None,
    }


def _describe_conv(module: LowRankConv2d) -> dict[str, Any]:
    return {
        "kind": module.kind,
        "rank": module.rank,
        "full_rank": module.full_rank,
        "in": module.in_channels,
        "out": module.out_channels,
        "kernel": list(module.kernel_size),
        "bias": module.second.bias is not None,
        **_conv_geometry(module),
    }


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` (``setattr`` on its parent keeps module order)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _expect(entry: dict[str, Any], key: str, actual: Any, name: str) -> None:
    if key in entry and entry[key] != actual:
        raise UserError(
            f"layer {name!r}: manifest says {key}={entry[key]!r} but the model has {actual!r}", hint=_HINT
        )


def _rank(entry: dict[str, Any], full_rank: int, name: str) -> int:
    rank = entry.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank:
        raise UserError(f"layer {name!r}: rank {rank!r} is not an integer in [1, {full_rank}]", hint=_HINT)
    return rank


def apply(model: nn.Module, structure: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace the named dense layers of ``model`` by low-rank layers of the recorded ranks (in place).

    The new layers are freshly initialised: their values are meant to be overwritten by
    ``load_state_dict(..., strict=True)``. Returns ``model`` for chaining. Unknown layer names, unknown
    kinds or shapes that disagree with the model raise UserError.
    """
    if not isinstance(structure, dict):
        raise UserError(
            f"structure must be a mapping of layer name to layer entry, got {type(structure).__name__}"
        )
    modules = dict(model.named_modules())
    for name, entry in structure.items():
        if not isinstance(entry, dict):
            raise UserError(
                f"layer {name!r}: entry must be a mapping, got {type(entry).__name__}", hint=_HINT
            )
        if name not in modules or name == "":
            raise UserError(f"layer {name!r} of the manifest does not exist in the model", hint=_HINT)
        dense = modules[name]
        kind = _KINDS.get(entry.get("kind"))  # type: ignore[arg-type]
        if kind is None:
            raise UserError(
                f"layer {name!r}: unknown layer kind {entry.get('kind')!r}",
                hint=f"known: {', '.join(_KINDS)}; upgrade lrdeploy or re-export",
            )
        new = kind.build(dense, entry, name)
        new.train(dense.training)
        set_submodule(model, name, new)
    return model


def _kind_mismatch(dense: nn.Module, entry: dict[str, Any], name: str) -> UserError:
    kind = entry.get("kind")
    return UserError(f"layer {name!r} is a {type(dense).__name__}, manifest says {kind}", hint=_HINT)


def check_linear(dense: nn.Module, entry: dict[str, Any], name: str) -> int:
    """Check a manifest entry against the fresh nn.Linear it replaces; returns the recorded rank."""
    if not isinstance(dense, nn.Linear):
        raise UserError(
            f"layer {name!r} is a {type(dense).__name__}, manifest says {entry.get('kind')}", hint=_HINT
        )
    _expect(entry, "in", dense.in_features, name)
    _expect(entry, "out", dense.out_features, name)
    _expect(entry, "bias", dense.bias is not None, name)
    return _rank(entry, min(dense.in_features, dense.out_features), name)


def check_conv(dense: nn.Module, entry: dict[str, Any], name: str) -> int:
    """Check a manifest entry against the fresh nn.Conv2d it replaces; returns the recorded rank."""
    if not isinstance(dense, nn.Conv2d) or dense.groups != 1:
        raise UserError(
            f"layer {name!r} is a {type(dense).__name__}, manifest says {entry.get('kind')}", hint=_HINT
        )
    _expect(entry, "in", dense.in_channels, name)
    _expect(entry, "out", dense.out_channels, name)
    _expect(entry, "kernel", list(dense.kernel_size), name)
    _expect(entry, "bias", dense.bias is not None, name)
    for key, value in _conv_geometry(dense).items():
        _expect(entry, key, value, name)
    kh, kw = dense.kernel_size
    return _rank(entry, min(dense.out_channels, dense.in_channels * kh * kw), name)


def _build_linear(dense: nn.Module, entry: dict[str, Any], name: str) -> nn.Module:
    rank = check_linear(dense, entry, name)
    w = dense.weight
    return LowRankLinear(
        dense.in_features, dense.out_features, rank, dense.bias is not None, w.device, w.dtype
    )


def conv_kwargs(dense: nn.Conv2d) -> dict[str, Any]:
    """Geometry, dtype and device of a dense conv, as keyword arguments for a factorised replacement."""
    return {
        "stride": dense.stride,
        "padding": dense.padding,
        "dilation": dense.dilation,
        "bias": dense.bias is not None,
        "padding_mode": dense.padding_mode,
        "device": dense.weight.device,
        "dtype": dense.weight.dtype,
    }


def _build_conv(dense: nn.Module, entry: dict[str, Any], name: str) -> nn.Module:
    rank = check_conv(dense, entry, name)
    return LowRankConv2d(dense.in_channels, dense.out_channels, dense.kernel_size, rank, **conv_kwargs(dense))


register_kind(LayerKind(LowRankLinear.kind, LowRankLinear, _describe_linear, _build_linear))
register_kind(LayerKind(LowRankConv2d.kind, LowRankConv2d, _describe_conv, _build_conv))
