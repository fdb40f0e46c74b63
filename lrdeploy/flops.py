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


def count_flops(model: nn.Module, input_shape: Sequence[int], *, sparse: bool = False) -> int:
    """FLOPs for one sample: ``input_shape`` excludes the batch dimension (e.g. (1, 28, 28)).

    ``sparse``: count a masked layer's FLOPs at its density (Sparse-IFT's iso-FLOP bookkeeping); by default
    every weight counts, which is what a dense runtime executes.

    A model with several inputs (``lrdeploy.models.inputs``) gets its own ``example_inputs`` at batch 1 with
    every length axis at the nominal ``input_shape`` (a translation model: source and target of 32 tokens).

    Runs one batch-1 forward in eval mode without grad, on the model's device and dtype; the model's
    train/eval mode is restored afterwards.
    """
    from lrdeploy.models.inputs import declares_inputs, example_inputs, nominal_sizes

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if declares_inputs(model):  # several or integer inputs (e.g. src, tgt_in): the model makes valid ones
        gen = torch.Generator().manual_seed(0)
        inputs = example_inputs(model, 1, nominal_sizes(model, input_shape), gen)
        inputs = tuple(t.to(device) for t in inputs)
    else:
        inputs = (torch.zeros((1, *tuple(input_shape)), device=device, dtype=dtype),)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        model.train(was_training)
    if not sparse:
        return int(counter.get_total_flops())
    from lrdeploy.layers.masked import masked_layers

    per_module = counter.get_flop_counts()
    root = type(model).__name__
    total = float(counter.get_total_flops())
    for name, layer in masked_layers(model):
        own = sum(per_module.get(f"{root}.{name}" if name else root, {}).values())
        total -= (1.0 - layer.density) * own  # a masked layer does only its kept multiply-adds
    return int(round(total))
