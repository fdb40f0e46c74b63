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
    counter = _count(model, _example(model, input_shape))
    if not sparse:
        return int(counter.get_total_flops())
    from lrdeploy.layers.masked import masked_layers

    own = _per_module(model, counter)
    total = float(counter.get_total_flops())
    for name, layer in masked_layers(model):
        total -= (1.0 - layer.density) * own.get(name, 0.0)  # a masked layer does only its kept multiply-adds
    return int(round(total))


def flops_by_module(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    """FLOPs of every named module (its own and its children's) in one batch-1 forward, keyed like
    ``named_modules`` ("" is the whole model)."""
    return _per_module(model, _count(model, _example(model, input_shape)))


def _per_module(model: nn.Module, counter: FlopCounterMode) -> dict[str, float]:
    counts = counter.get_flop_counts()
    root = type(model).__name__
    return {name: float(sum(counts.get(f"{root}.{name}" if name else root, {}).values()))
            for name, _ in model.named_modules()}


def _example(model: nn.Module, input_shape: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """One batch-1 input on the model's device and dtype (multi-input models make their own)."""
    from lrdeploy.models.inputs import declares_inputs, example_inputs, nominal_sizes

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if declares_inputs(model):  # several or integer inputs (e.g. src, tgt_in): the model makes valid ones
        gen = torch.Generator().manual_seed(0)
        return tuple(t.to(device) for t in example_inputs(model, 1, nominal_sizes(model, input_shape), gen))
    return (torch.zeros((1, *tuple(input_shape)), device=device, dtype=dtype),)


def _count(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> FlopCounterMode:
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return counter
