"""The report's picture: latency against accuracy for the dense original and every candidate, and where the
time goes per operator when a profile was recorded.

One point per model and batch size: colour (and a legend entry) per model, marker per batch size, a model's
points joined by a faint line (accuracy does not depend on the batch, so they lie on one level). Candidates
are annotated with their speed-up over the reference at that batch. The latency axis is logarithmic when
the points span more than 10×, as they do as soon as batch 1 and batch 32 are both shown.

Built on ``matplotlib.figure.Figure`` with the Agg canvas, never ``pyplot``: no global state, no display,
no backend selection at import time; matplotlib is imported only when a plot is drawn. Files are written
atomically (PNG rendered in memory, then renamed into place).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrdeploy import atomic

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")
REFERENCE_COLOUR = "#333333"
LOG_SCALE_SPAN = 10.0  # use a log latency axis when max/min latency exceeds this
TOP_OPS = 8  # operator types shown by name in the profile chart; the rest are summed as "other"
LATENCY_AXES = "latency_accuracy"
PROFILE_AXES = "profile"


@dataclass(frozen=True)
class Point:
    model: str
    role: str  # "reference" or "candidate"
    batch: int
    latency_ms: float
    score: float  # accuracy in % (or the task metric)
    speedup: float | None


MIN_SCORE_SPAN = 2.0
"""Smallest score range the latency/accuracy axes show (2 points of accuracy, 2 BLEU): a 0.08-point
difference drawn across the whole axis looks like a trade-off that is not there."""


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def score_metric(summary: Mapping[str, Any]) -> tuple[str, str]:
    """(key, axis label) of the quality metric on the y axis: accuracy if any model has it, else the
    headline metric of the models' task (``merge_reports``' ``headline``), else BLEU (older reports)."""
    models = summary.get("models") or []
    if any(_num(m.get("accuracy")) is not None for m in models):
        return "accuracy", "top-1 accuracy (%)"
    for m in models:
        headline = m.get("headline") or {}
        if headline.get("key") and _num(headline.get("value")) is not None:
            unit = " (%)" if _percent(m, headline["key"]) else ""
            return str(headline["key"]), f"{headline.get('label') or headline['key']}{unit}"
    if any(_num((m.get("task") or {}).get("bleu")) is not None for m in models):
        return "bleu", "BLEU (0-100)"
    return "accuracy", "accuracy (%)"


def _percent(model: Mapping[str, Any], key: str) -> bool:
    """Whether the model's task shows ``key`` as a percentage (accuracy always is)."""
    if key == "accuracy":
        return True
    return any(d.get("key") == key and d.get("percent") for d in model.get("metrics") or [])


def points_of(summary: Mapping[str, Any]) -> list[Point]:
    """Every (model, batch size) with both a median latency and a score, in model order then batch order."""
    key, _ = score_metric(summary)
    points = []
    for m in summary.get("models") or []:
        score = _num(m.get("accuracy")) if key == "accuracy" else _num((m.get("task") or {}).get(key))
        if score is None:
            continue
        if _percent(m, key):
            score *= 100.0
        latency = m.get("latency") or {}
        for batch in sorted(latency, key=lambda b: int(b)):
            median = _num((latency[batch] or {}).get("median_ms"))
            if median is None or median <= 0:
                continue
            speedup = _num((m.get("speedup") or {}).get(str(batch)))
            points.append(Point(str(m.get("name")), str(m.get("role", "candidate")), int(batch), median,
                                score, speedup))
    return points


def profile_of(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``summary["profile"]``: model name → operator type → milliseconds (empty when none was recorded)."""
    profile = summary.get("profile")
    if not isinstance(profile, Mapping):
        return {}
    out = {}
    for model, ops in profile.items():
        if isinstance(ops, Mapping):
            clean = {str(k): float(v) for k, v in ops.items() if _num(v) is not None and float(v) > 0}
            if clean:
                out[str(model)] = clean
    return out


def plot_summary(summary: Mapping[str, Any], *, title: str | None = None) -> Any:
    """A ``matplotlib.figure.Figure`` for a merged summary (:func:`lrdeploy.serving.report.merge_reports`).

    The latency/accuracy axes carry the label ``"latency_accuracy"`` (one scatter collection per model and
    batch size), the profile axes ``"profile"``; ``fig.lrdeploy_points`` lists the plotted points.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = points_of(summary)
    profile = profile_of(summary)
    width = 13.5 if profile else 9.0
    fig = Figure(figsize=(width, 5.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    if profile:
        ax, ax_prof = fig.subplots(1, 2, width_ratios=[1.25, 1])
    else:
        ax, ax_prof = fig.subplots(1, 1), None
    ax.set_label(LATENCY_AXES)
    _draw_latency_accuracy(ax, summary, points, title)
    if ax_prof is not None:
        ax_prof.set_label(PROFILE_AXES)
        _draw_profile(ax_prof, profile, summary.get("profile_batch"))
    caption = summary.get("caption")
    if caption:
        fig.get_layout_engine().set(h_pad=0.1)
        fig.supxlabel(str(caption), fontsize=7.5, color="#555555")
    fig.lrdeploy_points = points
    return fig


def _model_colours(points: Sequence[Point], models: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    colours: dict[str, str] = {}
    names = [str(m.get("name")) for m in models]
    k = 0
    for name in dict.fromkeys([*names, *(p.model for p in points)]):
        role = next((m.get("role") for m in models if str(m.get("name")) == name), "candidate")
        if role == "reference":
            colours[name] = REFERENCE_COLOUR
        else:
            colours[name] = palette[k % len(palette)]
            k += 1
    return colours


def _draw_latency_accuracy(ax: Any, summary: Mapping[str, Any], points: Sequence[Point],
                           title: str | None) -> None:
    from matplotlib.lines import Line2D

    _, ylabel = score_metric(summary)
    models = summary.get("models") or []
    if title is None:
        dataset = summary.get("dataset")
        title = "Latency vs accuracy" + (f" ({dataset})" if dataset else "")
    ax.set_title(title, fontsize=12)
    ax.set_ylabel(ylabel)
    if not points:
        ax.text(0.5, 0.5, "no model has both a latency and an accuracy to plot", ha="center", va="center",
                transform=ax.transAxes, color="#777777")
        ax.set_xlabel("median latency per batch (ms)")
        return
    colours = _model_colours(points, models)
    batches = sorted({p.batch for p in points})
    markers = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(batches)}
    order = list(dict.fromkeys(p.model for p in points))
    for name in order:
        own = sorted((p for p in points if p.model == name), key=lambda p: p.latency_ms)
        if len(own) > 1:
            ax.plot([p.latency_ms for p in own], [p.score for p in own], color=colours[name], alpha=0.35,
                    linewidth=1.2, zorder=1)
        for p in own:
            if p.role == "reference":  # hollow and on top: a candidate at the same spot stays visible
                ax.scatter([p.latency_ms], [p.score], s=150, marker=markers[p.batch], facecolors="none",
                           edgecolors=colours[name], linewidths=1.8, zorder=4, label=f"_{name} b{p.batch}")
            else:
                ax.scatter([p.latency_ms], [p.score], s=80, marker=markers[p.batch], color=colours[name],
                           edgecolors="white", linewidths=0.8, zorder=3, label=f"_{name} b{p.batch}")
            if p.role != "reference" and p.speedup is not None:
                ax.annotate(f"{p.speedup:.2f}×", (p.latency_ms, p.score), xytext=(6, 6),
                            textcoords="offset points", fontsize=8, color=colours[name])
    lat = [p.latency_ms for p in points]
    log = max(lat) / min(lat) > LOG_SCALE_SPAN
    if log:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("median latency per batch (ms" + (", log scale)" if log else ")"))
    ax.margins(x=0.12, y=0.25)
    scores = [p.score for p in points]
    low, high = min(scores), max(scores)
    if high - low < MIN_SCORE_SPAN:  # never magnify a tiny difference to fill the axis: show ≥ 2 units
        middle = (low + high) / 2
        ax.set_ylim(middle - MIN_SCORE_SPAN / 2 * 1.25, middle + MIN_SCORE_SPAN / 2 * 1.25)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)

    model_handles = [Line2D([], [], color=colours[n], marker="o", linestyle="-", linewidth=1.2,
                            markerfacecolor="none" if _role(models, n) == "reference" else colours[n],
                            label=n + (" (reference)" if _role(models, n) == "reference" else ""))
                     for n in order]
    batch_handles = [Line2D([], [], color="#777777", marker=markers[b], linestyle="", label=f"batch {b}")
                     for b in batches]
    # one legend (constrained layout makes room for an axes' own legend, not for extra artists)
    spacer = Line2D([], [], linestyle="", label=" ")
    ax.legend(handles=[*model_handles, spacer, *batch_handles], title="model · batch size", loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8.5, title_fontsize=9, frameon=False)


def _role(models: Sequence[Mapping[str, Any]], name: str) -> str:
    return next((str(m.get("role")) for m in models if str(m.get("name")) == name), "candidate")


def _draw_profile(ax: Any, profile: Mapping[str, Mapping[str, float]], batch: Any) -> None:
    from matplotlib import colormaps

    totals: dict[str, float] = {}
    for ops in profile.values():
        for op, ms in ops.items():
            totals[op] = totals.get(op, 0.0) + ms
    named = [op for op, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:TOP_OPS]]
    has_other = len(totals) > len(named)
    columns = named + (["other"] if has_other else [])
    palette = colormaps["tab20"].colors
    models = list(profile)
    y = list(range(len(models)))
    left = [0.0] * len(models)
    for i, op in enumerate(columns):
        widths = []
        for m in models:
            ops = profile[m]
            other = sum(v for k, v in ops.items() if k not in named)
            widths.append(other if op == "other" else ops.get(op, 0.0))
        ax.barh(y, widths, left=left, color=palette[i % len(palette)], label=op, edgecolor="white",
                linewidth=0.5)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for yi, total in zip(y, left, strict=True):
        ax.text(total, yi, f" {total:.3g} ms", va="center", fontsize=8)
    ax.set_yticks(y, models)
    ax.invert_yaxis()
    ax.set_xlabel("operator time per run (ms, summed over nodes of each type)")
    ax.set_title("Where the time goes" + (f" (batch {batch})" if batch else ""), fontsize=12)
    ax.margins(x=0.15)
    ax.legend(title="operator", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8,
              title_fontsize=9, frameon=False)
    ax.grid(True, axis="x", alpha=0.3)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Render ``fig`` to PNG in memory and write it atomically."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic.write_bytes(path, buf.getvalue())
    return path


def plot_report(report: Mapping[str, Any], **kwargs: Any) -> Any:
    """The figure for one compare report (dense vs its candidate)."""
    from .report import merge_reports

    return plot_summary(merge_reports([report]), **kwargs)
