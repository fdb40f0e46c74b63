"""Export a Maestro model at a rank budget: one trained model, a family of smaller deployable models.

Maestro orders each layer's components by importance, so cutting every layer to a prefix is a sensible
smaller model without retraining (methods.md §1.6, §1.12). Across layers we rank components by their
importance imp_i = g_i(V)·g_i(U) (tail-block norms) and keep the longest prefix of that global order that
fits the budget. Within a layer importance is non-increasing and ties are broken by component index, so
every layer keeps a prefix.

What ``budget`` means: the share of the *factor weights of the Maestro layers at their current (trained)
ranks* that is kept. A component costs one row of Vᵀ plus one column of U (in·kh·kw + out weights). Biases,
dense layers, BatchNorm and everything else are not counted and never change. ``budget=0.5`` keeps the
most important components whose factor weights total at most half of the current ones; ``1.0`` keeps
everything (the model is unchanged). The kept share never exceeds the budget, except that each layer keeps
at least ``min_rank`` components (default 1: a layer cut to rank 0 would output a constant), so a very
small budget is floored there.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.layers.maestro import maestro_layers
from lrdeploy.layers.structure import set_submodule
from lrdeploy.layers.svd import check_fraction

_SLACK = 1e-9  # relative: a budget of exactly the current size must keep everything despite rounding


def plan_budget(model: nn.Module, budget: float, *, min_rank: int = 1) -> dict[str, int]:
    """Rank per Maestro layer (by qualified name) that ``truncate_to_budget`` would keep."""
    budget = check_fraction(budget, "rank budget", "--rank-budget")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 0:
        raise UserError(f"min_rank must be an integer ≥ 0, got {min_rank!r}")
    layers = maestro_layers(model)
    if not layers:
        raise UserError("the model has no Maestro layers to truncate",
                        hint="--rank-budget applies to models trained with --method maestro")
    total = sum(layer.rank * layer.component_params() for _, layer in layers)
    limit = budget * total * (1 + _SLACK)
    kept = {name: min(min_rank, layer.rank) for name, layer in layers}
    spent = sum(kept[name] * layer.component_params() for name, layer in layers)
    order = []
    for index, (name, layer) in enumerate(layers):
        importance = layer.importance().tolist()
        order += [(-importance[j], index, j) for j in range(kept[name], layer.rank)]
    order.sort()
    for _, index, _j in order:
        name, layer = layers[index]
        cost = layer.component_params()
        if spent + cost > limit:
            break
        spent += cost
        kept[name] += 1
    return kept


def truncate_to_budget(
    model: nn.Module, budget: float, *, min_rank: int = 1, calibration_x: Any = None
) -> nn.Module:
    """Deep copy of ``model`` with every Maestro layer physically cut to its budgeted rank.

    ``budget`` in (0, 1] (else UserError) as defined in this module's docstring. The caller's model is not
    touched. The truncated model changes the activations BatchNorm normalises, so pass ``calibration_x``
    (training images, or a dataset with ``.x``) to recompute BN statistics on the copy; without it they stay
    as trained. Fold the result with ``fold_model`` (or export it) as usual.
    """
    plan = plan_budget(model, budget, min_rank=min_rank)
    out = copy.deepcopy(model)
    for name, layer in maestro_layers(out):
        set_submodule(out, name, layer.sliced(plan[name]))
    if calibration_x is not None:
        from lrdeploy.methods.maestro import recalibrate_batchnorm

        recalibrate_batchnorm(out, calibration_x)
    return out.train(model.training)
