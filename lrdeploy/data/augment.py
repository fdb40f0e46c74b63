"""Batch-level data augmentation on normalised tensors, drawn from an explicit generator.

The training loop holds whole splits as tensors (see :class:`~lrdeploy.data.datasets.ArrayDataset`), so
augmentation works on a batch at once rather than per sample in a DataLoader: a vectorised gather is far
cheaper on a small CPU, and drawing every random number from the loop's ``torch.Generator`` keeps a run
reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lrdeploy.errors import UserError


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop of the input's own size from a ``padding``-padded copy, then a horizontal flip with p=½.

    The standard CIFAR recipe (Cuttlefish, Maestro, Sparse-IFT). Padding is zero in *normalised* space, i.e.
    the mean colour rather than torchvision's black border — the usual choice for on-tensor augmentation and
    immaterial to accuracy. Random numbers are drawn on the generator's device (CPU) and moved to ``x``'s.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = top[:, None] + torch.arange(h, device=x.device)  # b × h
    cols = left[:, None] + torch.arange(w, device=x.device)  # b × w
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # flipping = reading the columns backwards
    index_b = torch.arange(b, device=x.device)[:, None, None, None]
    index_c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[index_b, index_c, rows[:, None, :, None], cols[:, None, None, :]]


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {"crop-flip": crop_flip}


def get_augmentation(name: str) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    if name not in AUGMENTATIONS:
        raise UserError(f"unknown augmentation {name!r}", hint=f"use one of: {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]
