"""Parameter and FLOP counts, measured on the real module rather than derived from a layer table.

FLOPs come from torch's own FlopCounterMode (2·MAC for matmul and convolution), so factorised layers,
custom forwards and anything the model does functionally are counted the same way for dense and
compressed models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of distinct parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs for one sample: ``input_shape`` excludes the batch dimension (e.g. (1, 28, 28)).

    Runs one batch-1 forward in eval mode without grad, on the model's device and dtype; the model's
    train/eval mode is restored afterwards.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((1, *tuple(input_shape)), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
