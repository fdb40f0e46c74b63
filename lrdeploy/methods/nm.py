"""N:M structured sparsity (2:4): of every M consecutive weights along the input dimension, N are kept.

This is the one pattern NVIDIA GPUs run faster (Ampere and later: TensorRT's sparse tactics with
``--sparse-weights``, ``torch.sparse.to_sparse_semi_structured``); on the CPU it is just zeros in a dense
tensor. Groups run along the reduction (input) dimension, as the hardware wants: a Linear's rows of
``in_features``, a conv's ``C_in·kh·kw`` fan-in per output channel, in that memory order.

- :func:`nm_mask` — magnitude N:M mask of a weight (the largest |w| of each group kept);
- :func:`nm_eligible` — why a layer cannot take the pattern (its fan-in is not a multiple of M), or None;
- :func:`is_nm` — whether a tensor's zeros already form the pattern (the export lint before a TensorRT
  build asks this of each weight).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lrdeploy.errors import UserError


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` → (2, 4); anything else is a one-line error."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise UserError(f"{text!r} is not an N:M sparsity pattern",
                        "use e.g. 2:4 (2 of every 4 weights kept)")
    return int(match[1]), int(match[2])


def fan_in(weight: torch.Tensor) -> int:
    return int(weight[0].numel())


def nm_eligible(layer: nn.Module, m: int) -> str | None:
    """None when ``layer`` can take an N:M pattern of group size ``m``, else why not."""
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return f"grouped conv (groups={layer.groups})"
    size = fan_in(layer.weight)
    if size % m:
        return f"input size {size} is not a multiple of {m}: kept dense"
    return None


@torch.no_grad()
def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4, score: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest |``score``| (default |weight|) of every ``m`` along the input
    dimension; ties go to the earlier position (stable)."""
    size = fan_in(weight)
    if size % m:
        raise ValueError(f"fan-in {size} is not a multiple of {m}")
    s = (weight if score is None else score).detach().abs().float().reshape(weight.shape[0], size // m, m)
    order = torch.argsort(s, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(weight.shape)


@torch.no_grad()
def is_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether at most ``n`` of every ``m`` consecutive input weights are non-zero."""
    size = fan_in(weight)
    if size % m:
        return False
    nonzero = (weight.detach().reshape(weight.shape[0], size // m, m) != 0).sum(-1)
    return bool((nonzero <= n).all())
