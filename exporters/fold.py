"""Turn a training-time model into a plain inference model whose exported graph has only standard ops.

Every module that knows how to fold itself (has ``fold(mode)``) is replaced by its plain torch form. This
works on a deep copy so the caller's model (and its optimiser state) is never touched.
"""

from __future__ import annotations

import copy

from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.layers.lowrank import FOLD_MODES


def _foldable(module: nn.Module) -> bool:
    return callable(getattr(module, "fold", None))


def fold_model(model: nn.Module, mode: str = "factored") -> nn.Module:
    """Deep copy of ``model`` in eval mode with every foldable module replaced by ``module.fold(mode)``.

    mode: "factored" keeps each factor pair as two plain layers (fewer FLOPs at low rank); "dense"
    multiplies them back into one layer. Both are exact up to floating-point rounding.
    """
    if mode not in FOLD_MODES:
        raise UserError(f"unknown fold mode {mode!r}", hint=f"use one of {', '.join(FOLD_MODES)}")
    if _foldable(model):
        return model.fold(mode).eval()
    folded = copy.deepcopy(model)
    _fold_children(folded, mode)
    return folded.eval()


def _fold_children(parent: nn.Module, mode: str) -> None:
    for name, child in list(parent.named_children()):
        if _foldable(child):
            setattr(parent, name, child.fold(mode))
        else:
            _fold_children(child, mode)
