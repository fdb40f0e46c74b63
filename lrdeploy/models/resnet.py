"""CIFAR-style ResNet-18: 3×3 stem at stride 1 and no max-pool, so 32×32 inputs keep enough resolution.

This is the network the Cuttlefish paper trains on CIFAR-10 (``resnet_cifar10.py``; 11,173,962 parameters at
width 64 and 10 classes) — not torchvision's ImageNet ResNet-18, whose 7×7 stride-2 stem and max-pool throw
away three quarters of a 32×32 image before the first block (Maestro's CIFAR script uses that one by
accident, see methods.md §1.8). Global average pooling instead of a fixed ``avg_pool(4)`` lets the same
network take 28×28 Fashion-MNIST images.

Every layer is a named module (``conv1``, ``layer2.0.conv1``, ``layer2.0.shortcut.conv`` …, ReLUs too) so
compression and method hooks select layers by qualified name, and ``torch.fx``/ONNX see no hidden functions.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.models.registry import register_model


def check_positive_ints(model: str, **values: object) -> None:
    """Builder arguments come from flags and manifests: reject bad ones as a UserError, not a torch crash."""
    for arg, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{model}: {arg} must be a positive integer, got {value!r}")


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN pairs plus the identity, or a 1×1 conv-BN projection when the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(channels),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, four stages of BasicBlocks (widths w, 2w, 4w, 8w; stride 2 from stage 2), pool, classifier."""

    def __init__(
        self,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        channels = width
        for stage, count in enumerate(blocks):
            out = width * 2**stage
            stride = 1 if stage == 0 else 2
            layers = []
            for i in range(count):
                layers.append(BasicBlock(channels, out, stride if i == 0 else 1))
                channels = out
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        self.num_stages = len(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


@register_model(
    "resnet18", input_shape=(3, 32, 32), num_classes=10,
    description="ResNet-18, CIFAR form (3×3 stem, no max-pool), 11.2M params at width 64",
    stem=("conv1",), classifier=("fc",),
)  # fmt: skip
def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    """CIFAR ResNet-18; ``width`` scales every stage (64 is the paper's; 8–16 make fast tests)."""
    check_positive_ints("resnet18", num_classes=num_classes, in_channels=in_channels, width=width)
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width)
