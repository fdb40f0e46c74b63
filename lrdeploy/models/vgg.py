"""CIFAR-style VGG-19 with BatchNorm: 16 conv-BN-ReLU blocks, five max-pools, one classifier layer.

The form Maestro and Cuttlefish train on CIFAR-10 (``vggs.py``/``lowrank_vgg.py``: conv-BN-ReLU, FC 512→C,
no 4096-wide head). Two deliberate differences from the reference code, neither of which changes a 32×32
forward pass: max-pools use ``ceil_mode=True`` and an adaptive average pool precedes the classifier, so
28×28 inputs (Fashion-MNIST) also reach a 1×1 map (28→14→7→4→2→1) instead of failing at the fifth pool.

Names are readable and stable for selection by pattern: ``features.<i>.conv`` / ``.bn`` / ``.relu`` for the
i-th conv block (0–15, in network order), ``features.pool<k>`` after stage k, and ``fc``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from lrdeploy.models.registry import register_model
from lrdeploy.models.resnet import check_positive_ints

# Channels per conv block at width 64; "M" is a 2×2 max-pool.
VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


class ConvBNReLU(nn.Sequential):
    """One VGG block; a Sequential with named children so ``features.3.conv`` addresses the conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(out_channels),
                relu=nn.ReLU(),
            )
        )


class VGG(nn.Module):
    def __init__(
        self,
        cfg: tuple[int | str, ...] = VGG19_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels, block, pool = in_channels, 0, 0
        for item in cfg:
            if item == "M":
                pool += 1
                layers[f"pool{pool}"] = nn.MaxPool2d(2, ceil_mode=True)
            else:
                out = int(item) * width // 64
                layers[str(block)] = ConvBNReLU(channels, out)
                channels, block = out, block + 1
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.features(x))))


@register_model(
    "vgg19", input_shape=(3, 32, 32), num_classes=10,
    description="VGG-19 with BatchNorm, CIFAR form (one FC), 20.0M params at width 64",
    stem=("features.0.conv",), classifier=("fc",),
)  # fmt: skip
def vgg19(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    """CIFAR VGG-19-BN; ``width`` scales every conv (64 is the paper's; 8–16 make fast tests)."""
    check_positive_ints("vgg19", num_classes=num_classes, in_channels=in_channels, width=width)
    return VGG(VGG19_CFG, num_classes=num_classes, in_channels=in_channels, width=width)
