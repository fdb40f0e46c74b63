"""Batch augmentation (random crop with padding + horizontal flip) and its TrainConfig option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrdeploy.data.augment import crop_flip, get_augmentation
from lrdeploy.errors import UserError
from lrdeploy.train import TrainConfig


def _windows(x: torch.Tensor, padding: int = 4) -> list[tuple[int, int, bool, torch.Tensor]]:
    padded = F.pad(x, (padding,) * 4)
    h, w = x.shape[-2:]
    out = []
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[..., top : top + h, left : left + w]
            out += [(top, left, False, crop), (top, left, True, crop.flip(-1))]
    return out


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_each_output_is_a_padded_window_possibly_flipped(shape):
    x = torch.randn(24, *shape)
    out = crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    flips, offsets = 0, set()
    for sample, result in zip(x, out, strict=True):
        matches = [(top, left, f) for top, left, f, crop in _windows(sample) if torch.equal(crop, result)]
        assert matches, "output is not a crop of the padded input"
        top, left, flipped = matches[0]
        flips += flipped
        offsets.add((top, left))
    assert 0 < flips < 24 and len(offsets) > 10


def test_seeded_and_statistically_sane():
    x = torch.randn(512, 3, 8, 8)
    a = crop_flip(x, torch.Generator().manual_seed(1))
    b = crop_flip(x, torch.Generator().manual_seed(1))
    c = crop_flip(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # half the samples are flipped; the centre window (no shift, no flip) is one case in 162
    unchanged = (a == x).flatten(1).all(1).float().mean().item()
    assert unchanged < 0.05


def test_config_option():
    assert TrainConfig().augment is None
    assert TrainConfig(augment="crop-flip").augment == "crop-flip"
    assert get_augmentation("crop-flip") is crop_flip
    with pytest.raises(UserError, match="unknown augmentation 'flip'") as err:
        TrainConfig(augment="flip")
    assert "crop-flip" in err.value.hint
