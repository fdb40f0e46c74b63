"""Per-layer time breakdown from ONNX Runtime's built-in profiler: where does the time of one call go?

A speed-up number says *that* a factorised model is faster; this says *where*: which nodes and op types take
the time, and how much of a call is kernels at all (the rest is session overhead, which dominates tiny
models at batch 1 and is why a 8× FLOP cut can give 1.5×).

How: a separate ``InferenceSession`` with ``SessionOptions.enable_profiling`` and the same settings as the
ORT runtimes (``ort_session.session_options``: all graph optimisations, sequential, pinned intra-op threads,
one inter-op thread), run
after the benchmark so profiler overhead never touches the timed numbers. ORT writes a Chrome-trace JSON:
one ``cat: "Node"`` event per kernel call (``name: "<node>_kernel_time"``, ``dur`` in µs, ``args.op_name``,
``args.provider``) and one ``cat: "Session"`` ``model_run`` event per ``run()``. ``parse_ort_profile`` keeps
the kernel events inside the timed runs (the first ``skip_runs`` runs are warm-up) and aggregates them per
node and per op type: total µs, share of kernel time, calls, mean µs per call.

The node names are those of the *optimised* graph: fused nodes (``FusedMatMul``, ``FusedConv``…) appear as
ORT made them, which is what actually ran.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy.errors import UserError

_KERNEL_SUFFIX = "_kernel_time"


def _events(trace: Any) -> list[Mapping[str, Any]]:
    if isinstance(trace, Mapping):  # some writers wrap the list: {"traceEvents": [...]}
        trace = trace.get("traceEvents", [])
    if not isinstance(trace, list):
        raise ValueError("an ONNX Runtime profile is a JSON list of trace events")
    return [e for e in trace if isinstance(e, Mapping)]


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def parse_ort_profile(trace: Any, skip_runs: int = 0) -> dict[str, Any]:
    """Aggregate an ORT profiler trace (the parsed JSON) per node and per op type.

    ``skip_runs`` drops the kernel events of the first ``skip_runs`` ``model_run`` spans (warm-up). Without
    ``model_run`` events every kernel event counts. Rows are sorted by total time, largest first.
    """
    events = _events(trace)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: float(e.get("ts", 0)))
    kept_runs = runs[skip_runs:]
    spans = [(float(e.get("ts", 0)), float(e.get("ts", 0)) + float(e.get("dur", 0))) for e in kept_runs]

    def in_timed_run(ts: float) -> bool:
        return not runs or any(lo <= ts <= hi for lo, hi in spans)

    by_node: dict[str, dict[str, Any]] = {}
    durations: dict[str, list[float]] = {}
    arena_peak = None
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith(_KERNEL_SUFFIX):
            continue
        if not in_timed_run(float(e.get("ts", 0))):
            continue
        args = e.get("args") if isinstance(e.get("args"), Mapping) else {}
        node = name[: -len(_KERNEL_SUFFIX)]
        row = by_node.setdefault(node, {"node": node, "op_type": str(args.get("op_name", "?")),
                                        "provider": args.get("provider"), "total_us": 0.0, "calls": 0})
        row["total_us"] += float(e.get("dur", 0))
        row["calls"] += 1
        durations.setdefault(node, []).append(float(e.get("dur", 0)))
        peak = _int(args.get("mem_in_use_peak"))
        if peak is not None:
            arena_peak = max(peak, arena_peak or 0)

    kernel_total = sum(r["total_us"] for r in by_node.values())
    by_op: dict[str, dict[str, Any]] = {}
    for row in by_node.values():
        row["share"] = row["total_us"] / kernel_total if kernel_total > 0 else 0.0
        row["mean_us"] = row["total_us"] / row["calls"] if row["calls"] else 0.0
        row["median_us"] = statistics.median(durations[row["node"]])  # robust to a noisy machine
        op = by_op.setdefault(row["op_type"], {"op_type": row["op_type"], "total_us": 0.0, "calls": 0,
                                               "nodes": 0})
        op["total_us"] += row["total_us"]
        op["calls"] += row["calls"]
        op["nodes"] += 1
    for op in by_op.values():
        op["share"] = op["total_us"] / kernel_total if kernel_total > 0 else 0.0
        op["mean_us"] = op["total_us"] / op["calls"] if op["calls"] else 0.0

    run_us = [float(e.get("dur", 0)) for e in kept_runs]
    return {
        "runs": len(kept_runs) if runs else None,
        "skipped_runs": min(skip_runs, len(runs)),
        "run_us": {"median": statistics.median(run_us), "mean": statistics.fmean(run_us),
                   "total": float(sum(run_us))} if run_us else None,
        "kernel_total_us": kernel_total,
        # share of the run spent in kernels; the rest is session overhead (input checks, allocation, ...)
        "kernel_share_of_run": kernel_total / sum(run_us) if run_us and sum(run_us) > 0 else None,
        "arena_peak_bytes": arena_peak,
        "by_op_type": sorted(by_op.values(), key=lambda r: -r["total_us"]),
        "by_node": sorted(by_node.values(), key=lambda r: -r["total_us"]),
    }


def top_ops(profile: Mapping[str, Any], n: int = 5) -> list[tuple[str, float]]:
    """(op type, share of kernel time) of the ``n`` most expensive op types."""
    return [(r["op_type"], float(r["share"])) for r in list(profile.get("by_op_type") or [])[:n]]


def profile_onnx(
    path: str | Path,
    input_shape: Sequence[int],
    batch_size: int,
    *,
    threads: int | None = None,
    runs: int = 10,
    warmup_runs: int = 2,
    providers: Sequence[Any] = ("CPUExecutionProvider",),
    seed: int = 0,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Run ``path`` ``warmup_runs + runs`` times under ORT's profiler at ``batch_size``; aggregate the trace.

    ``feeds`` (input name → array, already at ``batch_size``: the task's real inputs, any number of them)
    are what is run; without them, synthetic inputs from the graph's input metadata
    (:func:`lrdeploy.serving.feeds.synthetic_feeds`; ``input_shape``, one sample without the batch
    dimension, overrides a one-input graph's declared shape; empty: the declared one). ``providers`` as for
    ``InferenceSession`` (names or ``(name, options)``). The session is made like the runtimes'
    (``ort_session.session_options``, and ``make_session``'s check that the first provider is really in
    use). The trace file is written to a temporary directory and removed. Returns ``parse_ort_profile``'s
    dict plus what was profiled.
    """
    from .feeds import synthetic_feeds
    from .runtimes.ort_session import CPU_PROVIDER, host_feeds, make_session, session_io, session_options

    if runs < 1 or warmup_runs < 0:
        raise UserError(f"profiling needs runs >= 1 and warmup_runs >= 0 (got {runs}, {warmup_runs})")
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="lrdeploy-profile-") as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort-profile")
        session = make_session(path, list(providers), sess_options=options)  # UserError if ORT is missing
        io = session_io(session)
        if feeds is None:
            shape = list(input_shape) if len(input_shape) else None
            feeds = synthetic_feeds(io.inputs, seed=seed, sample_shape=shape)(batch_size)
        feed = host_feeds(io, feeds, path.name)
        for _ in range(warmup_runs + runs):
            session.run(io.output_names, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
    import onnxruntime as ort  # installed: make_session succeeded

    summary = parse_ort_profile(trace, skip_runs=warmup_runs)
    in_use = list(session.get_providers())
    out = {
        "available": True,
        "backend": "onnxruntime",
        "version": ort.__version__,
        "providers": in_use,
        "threads": options.intra_op_num_threads,
        "batch_size": int(batch_size),
        "warmup_runs": warmup_runs,
        **summary,
    }
    if in_use[0] != CPU_PROVIDER:
        out["note"] = (f"{in_use[0]} node times are host-side (launch) times unless ONNX Runtime was built "
                       "with device profiling; use them for the op mix, not absolute GPU time")
    return out
