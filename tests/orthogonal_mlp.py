"""A user's model for training tests: an MLP with orthogonal initial weights (``--model orthogonal_mlp:mlp``).

Orthogonal weights start at full stable rank (ξ = 1), and a few epochs at a high learning rate make the stable
ranks fall far enough that Cuttlefish really factorises the layers — LeNet-5's small layers never save
parameters in a short run, so a switch there would change no structure.
"""

from __future__ import annotations

from torch import nn


def mlp(width: int = 256) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.orthogonal_(module.weight)
    return model


mlp.lrdeploy_task = "classification"  # type: ignore[attr-defined]
mlp.lrdeploy_input_shape = (1, 28, 28)  # type: ignore[attr-defined]
