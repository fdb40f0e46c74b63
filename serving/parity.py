"""Output parity and task accuracy: how far a candidate's outputs are from the reference's.

Why these statistics (peers.md §3.D): a single absolute tolerance fails fp16 models that are fine and passes
fp32 outputs whose near-zero entries are wrong. So we report several views and let the preset decide:
- ``max_abs`` / ``mean_abs`` / ``p99_abs``: absolute error, worst and typical;
- ``rel_l2`` = ||ref − cand|| / ||ref||: scale-free, not dominated by near-zero entries (which elementwise
  relative error is); 0 when both are zero, ``inf`` when only the reference is;
- ``cosine``: direction agreement, 1 when both are zero, 0 when exactly one is;
- ``top1_agreement``: fraction of samples whose arg-max class is unchanged — what a classifier user sees;
- ``nonfinite``: NaN/Inf counts, because an overflowed output otherwise shows up only as a NaN statistic.
All computed in float64 so the statistic itself adds no rounding error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lrdeploy.errors import UserError

from .runtimes.base import Runtime

# Tolerance presets per precision for artefact-vs-source parity (same weights, different runtime/precision).
# Compressed-vs-dense comparisons are judged by the accuracy budget instead: their outputs differ by design.
# fp32: folding and ORT fusions reorder float sums only (baseline.md: rel-L2 <= 7e-7 on 12 models).
# fp16/bf16/int8: from baseline.md §5 (fp16 ~5e-4, int8 3e-3..2.4e-2 rel-L2) with headroom.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"rel_l2": 1e-5, "cosine": 0.99999, "top1_agreement": 0.999},
    "fp16": {"rel_l2": 5e-3, "cosine": 0.9999, "top1_agreement": 0.99},
    "bf16": {"rel_l2": 3e-2, "cosine": 0.999, "top1_agreement": 0.98},
    "int8": {"rel_l2": 6e-2, "cosine": 0.99, "top1_agreement": 0.97},
}


def _as_float64(a: Any, what: str) -> np.ndarray:
    try:
        return np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what} output is not numeric: {exc}") from None


def output_parity(ref: Any, cand: Any) -> dict[str, Any]:
    """Compare two outputs of the same shape; see the module docstring for each statistic."""
    a, b = _as_float64(ref, "reference"), _as_float64(cand, "candidate")
    if a.shape != b.shape:
        raise UserError(f"output shapes differ: reference {list(a.shape)} vs candidate {list(b.shape)}",
                        hint="compare models with the same input shape and number of outputs/classes")
    if a.size == 0:
        raise UserError("no outputs to compare (empty arrays)")
    diff = np.abs(a - b)
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    norm_d = float(np.linalg.norm(a - b))
    rel_l2 = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else math.inf)
    if norm_a > 0 and norm_b > 0:
        cosine = float(np.clip(np.dot(a.ravel(), b.ravel()) / (norm_a * norm_b), -1.0, 1.0))
    else:
        cosine = 1.0 if norm_a == norm_b else 0.0
    return {
        "shape": list(a.shape),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "p99_abs": float(np.percentile(diff, 99)),
        "rel_l2": rel_l2,
        "cosine": cosine,
        "top1_agreement": top1_agreement(a, b),
        "nonfinite": {"reference": int(a.size - np.isfinite(a).sum()),
                      "candidate": int(b.size - np.isfinite(b).sum())},
    }


def top1_agreement(ref: Any, cand: Any) -> float | None:
    """Fraction of rows (last axis = classes) with the same arg-max; None for outputs that are not logits."""
    a, b = np.asarray(ref), np.asarray(cand)
    if a.ndim < 2 or a.shape[-1] < 2 or a.shape != b.shape:
        return None
    return float(np.mean(a.argmax(axis=-1) == b.argmax(axis=-1)))


def accuracy(logits: Any, labels: Any) -> float:
    """Top-1 accuracy in [0, 1] of ``logits`` (N × classes) against integer ``labels`` (N)."""
    scores, y = np.asarray(logits), np.asarray(labels)
    if scores.ndim != 2 or y.ndim != 1 or scores.shape[0] != y.shape[0]:
        raise UserError(f"accuracy needs N×C logits and N labels, got {list(scores.shape)} and "
                        f"{list(y.shape)}")
    if y.shape[0] == 0:
        raise UserError("accuracy of an empty dataset is undefined")
    return float(np.mean(scores.argmax(axis=1) == y))


def run_batched(runtime: Runtime, x: Any, batch_size: int) -> np.ndarray:
    """Run ``x`` through ``runtime`` in batches of ``batch_size`` (last one smaller) and stack the outputs."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    data = np.asarray(x)
    if data.ndim == 0 or data.shape[0] == 0:
        raise UserError("no samples to run")
    outs = [np.asarray(runtime.run(data[i:i + batch_size])) for i in range(0, data.shape[0], batch_size)]
    return np.concatenate(outs, axis=0)


def check_tolerance(parity: dict[str, Any], precision: str = "fp32") -> list[str]:
    """Failures of ``parity`` (from ``output_parity``) against the preset; an empty list means it passed."""
    limits = TOLERANCES.get(precision)
    if limits is None:
        raise UserError(f"unknown precision {precision!r}", hint=f"choose one of: {', '.join(TOLERANCES)}")
    failures = []
    nonfinite = parity.get("nonfinite", {}).get("candidate", 0)
    if nonfinite:
        failures.append(f"candidate has {nonfinite} non-finite outputs")
    rel = parity.get("rel_l2")
    if rel is None or not rel <= limits["rel_l2"]:
        failures.append(f"rel_l2 {rel:.3g} > {limits['rel_l2']:.0e}" if rel is not None else "rel_l2 missing")
    cos = parity.get("cosine")
    if cos is not None and not cos >= limits["cosine"]:
        failures.append(f"cosine {cos:.6f} < {limits['cosine']}")
    top1 = parity.get("top1_agreement")
    if top1 is not None and not top1 >= limits["top1_agreement"]:
        failures.append(f"top-1 agreement {top1:.4f} < {limits['top1_agreement']}")
    return failures
