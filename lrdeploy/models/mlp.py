"""A multilayer perceptron for 28×28 images: the Linear-heavy network where low rank pays off on a CPU.

LeNet-5's 61.7k parameters run in microseconds and its two convs have 6 and 16 channels, so no factorisation
can make it much faster: its time is spent in memory traffic and operator overhead, not in weight
multiplications. An MLP with wide hidden layers spends nearly all of its time in GEMMs whose cost is
proportional to the weights, which is what factorising W (out × in) into (out × r)(r × in) cuts.
"""

from __future__ import annotations

from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.models.registry import register_model


class MLP(nn.Module):
    """Flatten → (Linear → ReLU) × len(hidden) → Linear; layers ``fc1``, ``fc2`` …, the last ``head``."""

    def __init__(self, hidden: tuple[int, ...], num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        sizes = (in_features, *hidden)
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False), start=1):
            self.add_module(f"fc{i}", nn.Linear(n_in, n_out))
            self.add_module(f"relu{i}", nn.ReLU())
        self.head = nn.Linear(sizes[-1], num_classes)
        self.depth = len(hidden)

    def forward(self, x):
        x = self.flatten(x)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"fc{i}")(x))
        return self.head(x)


@register_model("mlp", input_shape=(1, 28, 28), num_classes=10,
                description="MLP 784→1024→1024→10 (width, depth as args), 1.86M params",
                stem=(), classifier=("head",))
def mlp(width: int = 1024, depth: int = 2, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """``depth`` hidden layers of ``width`` units for 28×28 images with ``in_channels`` channels."""
    for arg, value in (("width", width), ("depth", depth), ("num_classes", num_classes),
                       ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"mlp: {arg} must be a positive integer, got {value!r}")
    return MLP((width,) * depth, num_classes=num_classes, in_features=in_channels * 28 * 28)
