"""Parity in serving: batched runs through a runtime, plus the comparison statistics and tolerance presets.

The statistics and presets live in :mod:`lrdeploy.parity_stats` (pure numpy, shared with the exporters, which
must not import serving); they are re-exported here so ``from lrdeploy.serving.parity import judge`` keeps
working. Only what needs a runtime is defined here.
"""

from __future__ import annotations

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

from .runtimes.base import Runtime

__all__ = [
    "ERROR_STATS", "QUANTILE", "REL_FLOOR", "TOLERANCES", "Tolerance", "accuracy", "check_tolerance",
    "get_tolerance", "judge", "output_parity", "run_batched", "tolerance_with", "top1_agreement",
    "topk_agreement",
]


def run_batched(runtime: Runtime, x: Any, batch_size: int) -> np.ndarray:
    """Run ``x`` through ``runtime`` in batches of ``batch_size`` (last one smaller) and stack the outputs."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    data = np.asarray(x)
    if data.ndim == 0 or data.shape[0] == 0:
        raise UserError("no samples to run")
    outs = [np.asarray(runtime.run(data[i:i + batch_size])) for i in range(0, data.shape[0], batch_size)]
    return np.concatenate(outs, axis=0)
