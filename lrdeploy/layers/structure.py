"""Record which layers of a model are factorised, and rebuild that shape on a fresh dense model.

A bundle stores the dense architecture by name (model registry) plus this per-layer description; loading
builds the dense model, ``apply``-s the description, then loads weights with ``strict=True``. Layers are
addressed by fully-qualified module name, never by position in a state dict, so a mismatch is reported
instead of silently loading weights into the wrong layer.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.layers.lowrank import LowRankConv2d, LowRankLayer, LowRankLinear

_HINT = "the manifest does not match the model: re-export the bundle with this lrdeploy version"


def _conv_geometry(conv: nn.Conv2d | LowRankConv2d) -> dict[str, Any]:
    padding = conv.padding
    return {
        "stride": list(conv.stride),
        "padding": padding if isinstance(padding, str) else list(padding),
        "dilation": list(conv.dilation),
    }


def describe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per low-rank layer (by qualified name): kind, rank, full rank, in/out sizes, bias (+ conv geometry).

    JSON-serialisable; this is what the bundle manifest stores under "structure".
    """
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            out[name] = {
                "kind": module.kind,
                "rank": module.rank,
                "full_rank": module.full_rank,
                "in": module.in_features,
                "out": module.out_features,
                "bias": module.second.bias is not None,
            }
        elif isinstance(module, LowRankConv2d):
            out[name] = {
                "kind": module.kind,
                "rank": module.rank,
                "full_rank": module.full_rank,
                "in": module.in_channels,
                "out": module.out_channels,
                "kernel": list(module.kernel_size),
                "bias": module.second.bias is not None,
                **_conv_geometry(module),
            }
    return out


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
        kind = entry.get("kind")
        if kind == LowRankLinear.kind:
            if not isinstance(dense, nn.Linear):
                raise UserError(
                    f"layer {name!r} is a {type(dense).__name__}, manifest says {kind}", hint=_HINT
                )
            _expect(entry, "in", dense.in_features, name)
            _expect(entry, "out", dense.out_features, name)
            _expect(entry, "bias", dense.bias is not None, name)
            rank = _rank(entry, min(dense.in_features, dense.out_features), name)
            w = dense.weight
            new: LowRankLayer = LowRankLinear(
                dense.in_features, dense.out_features, rank, dense.bias is not None, w.device, w.dtype
            )
        elif kind == LowRankConv2d.kind:
            if not isinstance(dense, nn.Conv2d) or dense.groups != 1:
                raise UserError(
                    f"layer {name!r} is a {type(dense).__name__}, manifest says {kind}", hint=_HINT
                )
            _expect(entry, "in", dense.in_channels, name)
            _expect(entry, "out", dense.out_channels, name)
            _expect(entry, "kernel", list(dense.kernel_size), name)
            _expect(entry, "bias", dense.bias is not None, name)
            for key, value in _conv_geometry(dense).items():
                _expect(entry, key, value, name)
            kh, kw = dense.kernel_size
            rank = _rank(entry, min(dense.out_channels, dense.in_channels * kh * kw), name)
            w = dense.weight
            new = LowRankConv2d(
                dense.in_channels,
                dense.out_channels,
                dense.kernel_size,
                rank,
                stride=dense.stride,
                padding=dense.padding,
                dilation=dense.dilation,
                bias=dense.bias is not None,
                padding_mode=dense.padding_mode,
                device=w.device,
                dtype=w.dtype,
            )
        else:
            raise UserError(
                f"layer {name!r}: unknown layer kind {kind!r}",
                hint=f"known: {LowRankLinear.kind}, {LowRankConv2d.kind}; upgrade lrdeploy or re-export",
            )
        new.train(dense.training)
        set_submodule(model, name, new)
    return model
