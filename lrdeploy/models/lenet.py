"""LeNet-5 for 28×28 inputs (the classic variant with a padded first conv): 61,706 parameters at 10 classes.

Every operation is a named module (no functional ReLU or pooling in ``forward``) so that compression,
hooks and export see the whole network through ``named_modules``, and layers can be swapped by name.
"""

from __future__ import annotations

import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.models.registry import register_model


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)  # 28×28 -> 28×28
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # -> 14×14
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)  # -> 10×10
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # -> 5×5
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


@register_model("lenet5", input_shape=(1, 28, 28), num_classes=10, description="LeNet-5, 28×28, 61.7k params",
                stem=("conv1",), classifier=("fc3",))
def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """LeNet-5 for 28×28 single-channel images."""
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"lenet5: {arg} must be a positive integer, got {value!r}")
    return LeNet5(num_classes=num_classes, in_channels=in_channels)
