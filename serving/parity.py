"""Parity in serving: batched runs through a runtime, plus the comparison statistics and tolerance presets.

The statistics and presets live in :mod:`lrdeploy.parity_stats` (pure numpy, shared with the exporters, which
must not import serving); they are re-exported here so ``from lrdeploy.serving.parity import judge`` keeps
working. Only what needs a runtime is defined here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lrdeploy.errors import UserError
from lrdeploy.parity_stats import (
    ERROR_STATS,
    QUANTILE,
    REL_FLOOR,
    TOLERANCES,
    Tolerance,
    accuracy,
    check_tolerance,
    get_tolerance,
    judge,
    output_parity,
    tolerance_with,
    top1_agreement,
    topk_agreement,
)

from .runtimes.base import Runtime, bind_feeds

__all__ = [
    "ERROR_STATS", "QUANTILE", "REL_FLOOR", "TOLERANCES", "Tolerance", "accuracy", "check_tolerance",
    "get_tolerance", "judge", "output_parity", "run_batched", "tolerance_with", "top1_agreement",
    "topk_agreement",
]


def run_batched(runtime: Runtime, feeds: Mapping[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    """Run ``feeds`` (input name → array, the sample axis first; bound to the runtime's input names by
    :func:`~lrdeploy.serving.runtimes.base.bind_feeds`) through ``runtime`` in batches of ``batch_size``
    (last one smaller); every output, batches concatenated, as host arrays."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    if not isinstance(feeds, Mapping) or not feeds:
        raise UserError("run_batched takes named inputs (a dict name → array)",
                        hint="wrap one array as {input name: x}")
    arrays = {k: np.asarray(v) for k, v in bind_feeds(runtime.inputs(), feeds, runtime.name).items()}
    sizes = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    if len(sizes) != 1:
        raise UserError(f"inputs have different numbers of samples: {sorted(sizes)}")
    n = sizes.pop()
    if n == 0:
        raise UserError("no samples to run")
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, batch_size):
        out = runtime.run({k: a[i:i + batch_size] for k, a in arrays.items()})
        for name, value in out.items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(chunks, axis=0) for name, chunks in parts.items()}
