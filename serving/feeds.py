"""Synthetic inputs from a runtime's input metadata (Polygraphy's data loader), for timing without data.

Timing needs inputs of the right names, dtypes and shapes, not real ones (``compare`` uses the task's real
test examples instead: :meth:`lrdeploy.tasks.Task.feeds`). Per input:

- float: standard normal; bool: all true;
- integer whose name contains ``mask`` (an attention mask): all ones, so no position is masked out;
- other integers (token ids): uniform in ``[0, int_high)``; the vocabulary is not in the graph, so the
  default stays small (100) and valid for any real vocabulary;
- shape: the batch (first axis) at the requested size; fixed dimensions as declared; a dynamic one by its
  name from ``sizes`` (``{"src_len": 16}``), else :data:`DEFAULT_LENGTH`. One name shared by several inputs
  (``input_ids`` and ``attention_mask`` both of ``sequence``) is one size.

The arrays depend only on the seed and the batch size, so every runtime of a run gets the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lrdeploy.errors import UserError

from .runtimes.base import IOInfo

DEFAULT_LENGTH = 32  # a dynamic non-batch dimension with no size given (a typical sentence length)
DEFAULT_INT_HIGH = 100

FeedsFor = Callable[[int], dict[str, np.ndarray]]


def sample_dims(info: IOInfo, sizes: Mapping[str, int] | None = None,
                sample_shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """One sample's shape of ``info`` (batch axis dropped), dynamic dimensions resolved as documented."""
    if sample_shape is not None:
        return tuple(int(d) for d in sample_shape)
    if info.shape is None:
        raise UserError(f"input {info.name!r} does not declare its shape",
                        hint="pass the shape of one sample, e.g. --input-shape 3,32,32")
    sizes = sizes or {}
    dims = []
    for d in info.shape[1:]:
        if isinstance(d, int) and not isinstance(d, bool) and d > 0:
            dims.append(d)
        else:
            size = sizes.get(d, DEFAULT_LENGTH) if isinstance(d, str) else DEFAULT_LENGTH
            dims.append(int(size))
    return tuple(dims)


def synthetic_feeds(inputs: Sequence[IOInfo], *, seed: int = 0, sizes: Mapping[str, int] | None = None,
                    sample_shape: Sequence[int] | None = None, int_high: int = DEFAULT_INT_HIGH) -> FeedsFor:
    """``feeds_for(batch)`` → ``{name: array}`` for ``inputs`` (see the module docstring).

    ``sample_shape`` overrides the declared shape of a one-input model (``--input-shape``).
    """
    inputs = list(inputs)
    if not inputs:
        raise UserError("the model declares no inputs to feed")
    if sample_shape is not None and len(inputs) != 1:
        raise UserError(f"--input-shape gives one sample shape, but the model takes {len(inputs)} inputs "
                        f"({', '.join(i.name for i in inputs)})",
                        hint="set its dynamic dimensions by name instead, e.g. --dim src_len=16")
    shapes = {i.name: sample_dims(i, sizes, sample_shape) for i in inputs}

    def feeds_for(batch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, batch])
        return {i.name: _array(i, (batch, *shapes[i.name]), rng, int_high) for i in inputs}

    return feeds_for


def _array(info: IOInfo, shape: tuple[int, ...], rng: np.random.Generator, int_high: int) -> np.ndarray:
    dtype = np.dtype(info.dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    if dtype.kind == "b":
        return np.ones(shape, dtype=dtype)
    if dtype.kind in "iu":
        if "mask" in info.name.lower():
            return np.ones(shape, dtype=dtype)
        return rng.integers(0, max(int(int_high), 1), shape).astype(dtype)
    raise UserError(f"input {info.name!r} has dtype {dtype}, which lrdeploy cannot make synthetic data for")


def feeds_nbytes(feeds: Mapping[str, Any]) -> int:
    """Bytes held by one batch of feeds (for the available-memory check before allocating bigger ones)."""
    return int(sum(np.asarray(a).nbytes for a in feeds.values()))
