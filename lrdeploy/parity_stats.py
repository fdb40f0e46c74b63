"""Output parity and task accuracy: how far a candidate's outputs are from the reference's.

Pure numpy, no runtime: the engine, the exporters (precision variants) and serving all judge with it
(DESIGN.md: exporters never import serving; ``serving.parity`` re-exports these names).

Why several statistics (peers.md §3.D): one absolute tolerance either fails every fp16 model that is fine
(Polygraphy's 1e-5 default, TensorRT#2709) or passes fp32 outputs whose near-zero entries are wrong and, at
a loose setting, outputs that are garbage (all-zero logits are "within 1e-2" of small logits). A mean alone
hides the one row that broke. So every output gets several views, and a per-precision preset
(:data:`TOLERANCES`) decides:

- absolute error ``|ref − cand|``: ``max_abs``, ``mean_abs``, ``median_abs``, ``p99_abs``;
- elementwise relative error, safe near zero: ``|ref − cand| / (|ref| + floor)`` with
  ``floor = rel_floor · RMS(ref)`` (default 1e-3 of the output's typical magnitude). Plain ``|Δ|/|ref|`` is
  unbounded at the zeros every logit vector crosses (TensorRT#2895: rel 1e-3 on max-abs 8.9e-6); the floor
  makes an entry a thousand times smaller than its neighbours be judged by its absolute error relative to
  them, and it is unit-free, unlike a fixed atol. ``max_rel``, ``mean_rel``, ``median_rel``, ``p99_rel``;
- per sample (rows along the first axis), the relative L2 error ``||ref_i − cand_i|| / (||ref_i|| + floor_i)``
  (the same floor, scaled to a row): ``max_row_rel`` (the worst sample), ``mean_row_rel``, ``median_row_rel``,
  ``p99_row_rel``. A row's norm is set by its large entries, so this is the relative error that is *not*
  governed by near-zero entries; it catches a bug that breaks a few samples and barely moves the mean;
- ``rel_l2`` = ||ref − cand|| / ||ref||: one scale-free number for the whole output; 0 when both are zero,
  ``inf`` when only the reference is;
- ``cosine``: direction agreement, 1 when both are zero, 0 when exactly one is;
- ``top1_agreement``: fraction of rows (last axis = classes) whose arg-max is unchanged;
  ``top5_agreement``: mean overlap of the top-5 class sets, ``|top5(ref) ∩ top5(cand)| / 5`` (None unless
  there are more than 5 classes: with exactly 5 the top-5 set is every class and agrees trivially);
- ``nonfinite``: NaN/Inf counts per side (``candidate``/``reference`` totals, ``candidate_nan``,
  ``candidate_inf``, ...). Any in the candidate fails every preset, named ("outputs contain 12 NaN / 3 Inf
  values"); any in the reference fails too (it cannot vouch for anything). Without this, an overflowed fp16
  output or a model with NaN weights shows up only as a NaN statistic, and NaN compares false with
  everything, so ``max``/``<`` give an answer that depends on the order of the operands.

Statistics are taken over entries finite on both sides, in float64, so the statistic adds no rounding error.
When no entry is finite on both sides nothing was compared: ``rel_l2``/``cosine`` are NaN (never the 0 / 1
of two empty vectors), and a NaN statistic fails its limit. A row holding a non-finite value never counts as
agreeing (top-k) or as correct (:func:`accuracy`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from lrdeploy.errors import UserError

REL_FLOOR = 1e-3  # floor of the relative-error denominator, as a fraction of the reference output's RMS
QUANTILE = 99  # the "p99" statistics (Polygraphy's --error-quantile default, 0.99)
ERROR_STATS = ("max", "mean", "median", "p99")


@dataclass(frozen=True)
class Tolerance:
    """Limits one output must meet; ``None`` switches a check off. See :data:`TOLERANCES` for the presets.

    ``row_rel`` bounds the worst sample's relative error (``max_row_rel``): a bug that breaks a few samples
    (the last partial batch, one padded sequence) hides in a whole-output ``rel_l2`` but not here.
    ``rel_err`` bounds the ``error_stat`` statistic (max / mean / median / p99, as Polygraphy's
    ``--check-error-stat``) of the elementwise near-zero-safe relative error; it is off in the presets
    because that statistic is governed by the near-zero entries and varies with the model (docs/parity.md).
    ``max_abs`` has the output's units, so it too is only for users who know their output's scale.
    """

    precision: str
    rel_l2: float | None
    cosine: float | None
    row_rel: float | None
    top1_agreement: float | None
    top5_agreement: float | None
    rel_err: float | None = None
    error_stat: str = "p99"
    max_abs: float | None = None
    why: str = ""

    def __post_init__(self) -> None:
        if self.error_stat not in ERROR_STATS:
            raise UserError(f"unknown error statistic {self.error_stat!r}",
                            hint=f"choose one of: {', '.join(ERROR_STATS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Artefact-vs-source parity presets (same weights, another runtime or precision). Compressed-vs-dense
# comparisons are judged by the accuracy budget instead: their outputs differ by design.
# Evidence (scripts/parity_presets.py, table in docs/parity.md): LeNet-5 trained on MNIST and Fashion-MNIST,
# 2,000 test images, against the fp32 ONNX model in ORT CPU. Correct conversions gave at most:
#   fp32 (no graph optimisation, eager PyTorch)  rel_l2 2.1e-7  max_row_rel 1.3e-6  top-1 1.0
#   fp16 (fp16 weights in ORT; fp16 arithmetic)  rel_l2 4.9e-4  max_row_rel 1.6e-3  top-1 1.0
#   bf16 (PyTorch bfloat16 weights + arithmetic) rel_l2 3.5e-3  max_row_rel 1.5e-2  top-1 0.9960
#   int8 (ORT dynamic; static QDQ)               rel_l2 3.4e-2  max_row_rel 1.6e-1  top-1 0.9835
# Limits sit 3-10× above those; one fp16 weight fault (a conv filter sign-flipped, fc3 scaled by 1.05, one
# fc2 unit zeroed) exceeds the fp16 limits by 2.6-50×, and the fp32 preset rejects a correct fp16 model.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(
        "fp32", rel_l2=1e-5, cosine=0.99999, row_rel=1e-4, top1_agreement=0.999, top5_agreement=0.999,
        why="export, folding and graph fusions only reorder float sums (≤ 2e-7 rel-L2 here, ≤ 7e-7 on 12 "
            "models in baseline.md); 1e-5 leaves room for other kernels, not for a precision change: a "
            "correct fp16 model (2.5e-4) fails it",
    ),
    "fp16": Tolerance(
        "fp16", rel_l2=5e-3, cosine=0.9999, row_rel=1e-2, top1_agreement=0.99, top5_agreement=0.98,
        why="11-bit significand (unit roundoff 4.9e-4): fp16 weights gave ≤ 2.5e-4 rel-L2, fp16 arithmetic "
            "≤ 4.9e-4, worst sample 1.6e-3; 10× headroom covers deeper nets and GPU kernels (TensorRT#2709)",
    ),
    "bf16": Tolerance(
        "bf16", rel_l2=3e-2, cosine=0.999, row_rel=1e-1, top1_agreement=0.98, top5_agreement=0.97,
        why="fp32's range but an 8-bit significand (unit roundoff 3.9e-3, 8× fp16's): measured 3.5e-3 "
            "rel-L2, worst sample 1.5e-2, top-1 ≥ 0.996",
    ),
    "int8": Tolerance(
        "int8", rel_l2=1e-1, cosine=0.99, row_rel=5e-1, top1_agreement=0.97, top5_agreement=0.95,
        why="quantisation noise is set by the calibration ranges, not by the format: 5.6e-3..3.4e-2 rel-L2 "
            "here, 3e-3..2.4e-2 in baseline.md; the preset catches a broken calibration or a wrong scale, "
            "the task metric (accuracy budget) carries the verdict on quality",
    ),
}


def get_tolerance(precision: str | Tolerance) -> Tolerance:
    """The preset for ``precision`` (or the :class:`Tolerance` given); an unknown name is a UserError."""
    if isinstance(precision, Tolerance):
        return precision
    tol = TOLERANCES.get(str(precision).lower())
    if tol is None:
        raise UserError(f"unknown precision {precision!r}", hint=f"choose one of: {', '.join(TOLERANCES)}")
    return tol


def tolerance_with(precision: str | Tolerance, **overrides: Any) -> Tolerance:
    """A preset with some limits replaced (``None`` values are ignored, so CLI defaults can pass through)."""
    tol = get_tolerance(precision)
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - set(Tolerance.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown tolerance field(s): {', '.join(sorted(unknown))}")
    return replace(tol, **changes) if changes else tol


def _as_float64(a: Any, what: str) -> np.ndarray:
    try:
        return np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what} output is not numeric: {exc}") from None


def _stats(values: np.ndarray, suffix: str) -> dict[str, float]:
    if values.size == 0:
        return {f"{stat}_{suffix}": math.nan for stat in ERROR_STATS}
    return {
        f"max_{suffix}": float(values.max()),
        f"mean_{suffix}": float(values.mean()),
        f"median_{suffix}": float(np.median(values)),
        f"p{QUANTILE}_{suffix}": float(np.percentile(values, QUANTILE)),
    }


def nonfinite_counts(a: Any) -> tuple[int, int]:
    """(NaN count, ±Inf count) of an array; (0, 0) for integer arrays."""
    x = np.asarray(a)
    if not np.issubdtype(x.dtype, np.inexact):
        return 0, 0
    return int(np.isnan(x).sum()), int(np.isinf(x).sum())


def describe_nonfinite(nan: int, inf: int) -> str:
    """``"12 NaN / 3 Inf values"`` (only the non-zero parts), the one wording every check uses."""
    parts = [f"{n} {name}" for n, name in ((nan, "NaN"), (inf, "Inf")) if n]
    return " / ".join(parts) + (" value" if nan + inf == 1 else " values")


def _nonfinite_record(a: np.ndarray, b: np.ndarray) -> dict[str, int]:
    (ra_nan, ra_inf), (cb_nan, cb_inf) = nonfinite_counts(a), nonfinite_counts(b)
    return {"reference": ra_nan + ra_inf, "candidate": cb_nan + cb_inf, "reference_nan": ra_nan,
            "reference_inf": ra_inf, "candidate_nan": cb_nan, "candidate_inf": cb_inf}


def output_parity(ref: Any, cand: Any, *, rel_floor: float = REL_FLOOR) -> dict[str, Any]:
    """Compare two outputs of the same shape; see the module docstring for each statistic."""
    a, b = _as_float64(ref, "reference"), _as_float64(cand, "candidate")
    if a.shape != b.shape:
        raise UserError(f"output shapes differ: reference {list(a.shape)} vs candidate {list(b.shape)}",
                        hint="compare models with the same input shape and number of outputs/classes")
    if a.size == 0:
        raise UserError("no outputs to compare (empty arrays)")
    if not rel_floor > 0:
        raise UserError(f"the relative-error floor must be positive, got {rel_floor!r}")
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    both = finite_a & finite_b
    fa, fb = a[both], b[both]
    d = fa - fb
    diff = np.abs(d)
    rms = float(np.sqrt(np.mean(fa * fa))) if fa.size else 0.0
    floor = rel_floor * rms if rms > 0 else rel_floor  # an all-zero reference: absolute error, scaled by 1
    rel = diff / (np.abs(fa) + floor)
    # per sample (first axis): each row's relative L2 error, with the same floor scaled to a row's norm
    za, zb = np.where(both, a, 0.0), np.where(both, b, 0.0)
    rows_a = za.reshape(za.shape[0], -1) if za.ndim > 1 else za.reshape(-1, 1)
    rows_d = (za - zb).reshape(rows_a.shape)
    row_floor = floor * math.sqrt(rows_a.shape[1])
    row_rel = np.linalg.norm(rows_d, axis=1) / (np.linalg.norm(rows_a, axis=1) + row_floor)
    norm_a, norm_b, norm_d = float(np.linalg.norm(fa)), float(np.linalg.norm(fb)), float(np.linalg.norm(d))
    rel_l2 = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else math.inf)
    if norm_a > 0 and norm_b > 0:
        cosine = float(np.clip(np.dot(fa, fb) / (norm_a * norm_b), -1.0, 1.0))
    else:
        cosine = 1.0 if norm_a == norm_b else 0.0
    if fa.size == 0:  # no entry finite on both sides: nothing was compared, so no number may look good
        rel_l2 = cosine = math.nan
    return {
        "shape": list(a.shape),
        "elements": int(a.size),
        **_stats(diff, "abs"),
        **_stats(rel, "rel"),
        **_stats(row_rel, "row_rel"),
        "rel_floor": floor,
        "reference_rms": rms,
        "rel_l2": rel_l2,
        "cosine": cosine,
        "top1_agreement": topk_agreement(a, b, 1),
        "top5_agreement": topk_agreement(a, b, 5),
        "nonfinite": _nonfinite_record(a, b),
    }


def topk_agreement(ref: Any, cand: Any, k: int) -> float | None:
    """Mean ``|topk(ref) ∩ topk(cand)| / k`` over rows (last axis = classes); for ``k = 1`` this is the share
    of rows with the same arg-max. None for outputs that are not class scores (1-D, or ≤ k classes but k > 1,
    where the top-k set would be every class). A row with a non-finite score on either side never agrees:
    NumPy's arg-max takes the first NaN as the maximum, so two all-NaN rows would otherwise "agree"."""
    a, b = np.asarray(ref), np.asarray(cand)
    if a.shape != b.shape or a.ndim < 2 or a.shape[-1] < 2 or (k > 1 and a.shape[-1] <= k):
        return None
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    finite = _finite_rows(a2) & _finite_rows(b2)
    if k == 1:
        return float(np.mean((a2.argmax(axis=-1) == b2.argmax(axis=-1)) & finite))
    ta = np.argpartition(-a2, k - 1, axis=-1)[:, :k]
    tb = np.argpartition(-b2, k - 1, axis=-1)[:, :k]
    hits = (ta[:, :, None] == tb[:, None, :]).any(axis=-1).sum(axis=-1)
    return float(np.mean(np.where(finite, hits, 0) / k))


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """Per row (last axis), whether every entry is finite; all True for integer arrays."""
    if not np.issubdtype(x.dtype, np.inexact):
        return np.ones(x.shape[0], dtype=bool)
    return np.isfinite(x).all(axis=-1)


def top1_agreement(ref: Any, cand: Any) -> float | None:
    """Fraction of rows with the same arg-max; None for outputs that are not logits."""
    return topk_agreement(ref, cand, 1)


def accuracy(logits: Any, labels: Any) -> float:
    """Top-1 accuracy in [0, 1] of ``logits`` (N × classes) against integer ``labels`` (N)."""
    scores, y = np.asarray(logits), np.asarray(labels)
    if scores.ndim != 2 or y.ndim != 1 or scores.shape[0] != y.shape[0]:
        raise UserError(f"accuracy needs N×C logits and N labels, got {list(scores.shape)} and "
                        f"{list(y.shape)}")
    if y.shape[0] == 0:
        raise UserError("accuracy of an empty dataset is undefined")
    # a row with a NaN/Inf score is wrong, whatever arg-max makes of it (NumPy picks the first NaN)
    return float(np.mean((scores.argmax(axis=1) == y) & _finite_rows(scores)))


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def check_tolerance(parity: dict[str, Any], precision: str | Tolerance = "fp32") -> list[str]:
    """Failures of ``parity`` (from :func:`output_parity`) against a preset; an empty list means it passed.

    Each failure names the statistic, its value, the limit and the preset, e.g.
    ``"p99_rel 4.1e-02 > 2e-02 (fp16)"``. A statistic absent from ``parity`` is not checked, except
    ``rel_l2``, which every parity record has; a None top-k agreement (not class scores) is skipped.
    """
    tol = get_tolerance(precision)
    tag = f"({tol.precision})"
    failures: list[str] = []
    nonfinite = parity.get("nonfinite") or {}
    sides = (("candidate", "outputs contain", ""),
             ("reference", "reference outputs contain", ": it cannot vouch for the candidate"))
    for side, prefix, suffix in sides:
        if nonfinite.get(side):
            nan, inf = nonfinite.get(f"{side}_nan"), nonfinite.get(f"{side}_inf")
            what = (describe_nonfinite(nan, inf) if nan is not None and inf is not None
                    else f"{nonfinite[side]} NaN/Inf values")  # a record written before the split counts
            failures.append(f"{prefix} {what}{suffix} {tag}")

    def upper(key: str, limit: float | None, required: bool = False) -> None:
        if limit is None:
            return
        value = parity.get(key)
        if value is None:
            if required:
                failures.append(f"{key} missing {tag}")
            return
        if math.isnan(value):
            failures.append(f"{key} is NaN (nothing finite to compare) {tag}")
        elif not value <= limit:
            failures.append(f"{key} {_fmt(value)} > {limit:g} {tag}")

    def lower(key: str, limit: float | None) -> None:
        value = parity.get(key)
        if limit is None or value is None:
            return
        if math.isnan(value):
            failures.append(f"{key} is NaN (nothing finite to compare) {tag}")
        elif not value >= limit:
            failures.append(f"{key} {value:.6g} < {limit:g} {tag}")

    upper("rel_l2", tol.rel_l2, required=True)
    lower("cosine", tol.cosine)
    upper("max_row_rel", tol.row_rel)
    upper(f"{tol.error_stat}_rel", tol.rel_err)
    upper("max_abs", tol.max_abs)
    lower("top1_agreement", tol.top1_agreement)
    lower("top5_agreement", tol.top5_agreement)
    return failures


def judge(parity: dict[str, Any], precision: str | Tolerance) -> dict[str, Any]:
    """``parity`` plus the verdict: ``precision``, ``tolerance`` (the limits), ``failures``, ``passed``."""
    tol = get_tolerance(precision)
    failures = check_tolerance(parity, tol)
    return {**parity, "precision": tol.precision, "tolerance": tol.to_dict(), "failures": failures,
            "passed": not failures}
