"""Inputs of models that take several tensors (or integer ids), for FLOP counts, export and benchmarks.

Most of the zoo takes one float tensor of ``(batch, *input_shape)``, and random normal data of that shape is a
valid input. A translation model takes ``(src, tgt_in)`` token ids, and only the model knows its vocabulary
and padding rules. Such a model declares, and everything downstream reads:

- ``input_names`` / ``output_names``: the graph's tensor names, in ``forward`` argument order;
- ``dynamic_axes()``: ``{tensor name: {axis: axis name}}`` (axis 0 is the batch); one name shared by
  several tensors (the target length of ``tgt_in`` and ``logits``) is one dimension;
- ``example_inputs(batch_size, <axis name>=size ..., generator=None)``: valid random inputs, a tuple in
  ``forward`` order; each keyword named after a length axis sets that axis (so callers can vary lengths
  without knowing the model: see :func:`example_inputs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn


def declares_inputs(model: nn.Module) -> bool:
    """Whether ``model`` follows the protocol above (else: one float input described by an input shape)."""
    return callable(getattr(model, "example_inputs", None)) and bool(getattr(model, "input_names", ()))


def input_names(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "input_names", ()))


def output_names(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "output_names", ()) or ("output",))


def dynamic_axes(model: nn.Module) -> dict[str, dict[int, str]]:
    fn = getattr(model, "dynamic_axes", None)
    return {k: dict(v) for k, v in fn().items()} if callable(fn) else {}


def length_axes(model: nn.Module) -> list[str]:
    """Names of the non-batch dynamic axes of the inputs, in first-seen order (e.g. src_len, tgt_len)."""
    axes = dynamic_axes(model)
    names: list[str] = []
    for inp in input_names(model):
        for axis, name in sorted(axes.get(inp, {}).items()):
            if axis >= 1 and name not in names:
                names.append(name)
    return names


def nominal_sizes(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Length axes at the nominal per-sample shape (the registry's ``input_shape``, e.g. (32,))."""
    axes = dynamic_axes(model)
    sizes: dict[str, int] = {}
    for inp in input_names(model):
        for axis, name in axes.get(inp, {}).items():
            if axis >= 1 and axis - 1 < len(input_shape):
                sizes.setdefault(name, int(input_shape[axis - 1]))
    return sizes


def example_inputs(
    model: nn.Module,
    batch_size: int,
    sizes: Mapping[str, int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """``model.example_inputs(batch_size, ...)`` as a tuple, passing only the sizes the model accepts.

    Lengths are capped at the model's ``max_len`` when it has one.
    """
    params = inspect.signature(model.example_inputs).parameters
    cap = getattr(model, "max_len", None)
    kwargs: dict[str, object] = {}
    for name, size in (sizes or {}).items():
        if name in params:
            kwargs[name] = min(int(size), int(cap)) if isinstance(cap, int) else int(size)
    if generator is not None and "generator" in params:
        kwargs["generator"] = generator
    out = model.example_inputs(batch_size, **kwargs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
