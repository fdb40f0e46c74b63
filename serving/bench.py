"""Latency/throughput harness: the same procedure for the reference and every candidate, interleaved.

Why it is built this way (see peers.md §3.I and baseline.md §3 for the failures it avoids):

- **Warm-up by time**, per runtime and batch size, before anything is timed (first calls allocate arenas,
  pick kernels, fault in weights), plus ``block_warmup_runs`` untimed calls at the start of every block so the
  first call after switching models (cold caches) is not counted against whoever happens to go first.
- **Interleaved blocks**: for each batch size, round 0 runs A B C…, round 1 runs …C B A, and so on. Slow
  drift of the machine (thermal, a neighbour's load) then hits every runtime alike, and reversing the order
  on alternate rounds cancels any advantage of a fixed position.
- **Blocks end on both conditions**: at least ``min_runs`` calls *and* ``min_seconds``, or ``max_seconds``
  (a hard cap for slow models). Percentiles from 5 samples are noise.
- **Speed-up is paired**: in every round, ratio = reference block median / candidate block median; the
  reported speed-up is the median of those per-round ratios (3 rounds by default: odd, so one disturbed
  round is outvoted). A ratio of pooled means would let one noisy block (bimodal latency is common on shared
  hosts) dominate. ``ratio_spread`` (max/min of the round ratios) says how far the rounds agreed.
- **Medians and tails**, not just the mean: median/p90/p99/mean/min/max/std in ms, throughput in samples/s.
- **Stability windows** (opt-in, ``stability_tol=``; ``lrdeploy bench`` turns it on): every block is a window;
  after the minimum ``rounds`` the harness keeps adding interleaved rounds until, for every runtime, the
  medians of the last ``stability_windows`` windows agree within ``stability_tol`` (``is_stable``), or
  ``time_limit_s`` / ``max_rounds`` is reached. Each (runtime, batch) reports whether it stabilised, its
  window medians and why the rounds stopped, so a number taken on a drifting machine says so.
- **Paired speed-ups at the tail too**: ``speedup_at["p90"]`` = median over rounds of (reference block p90 /
  candidate block p90); the same for p99. These are what ``serving.gates`` checks.
- **Peak memory** per (runtime, batch): the process's resident-set high-water mark while that runtime ran at
  that batch size (Linux ``VmHWM``, reset before each span; elsewhere the lifetime ``ru_maxrss``), and torch's
  CUDA allocator peak for runtimes on a GPU — ``runtimes.base.measure_memory`` around warm-up and blocks.
- **Named inputs, any number**: each batch size gets its feeds from a builder (``feeds(batch) -> {name:
  array}``): the task's real test examples (``compare``) or synthetic ones from the runtime's input
  metadata (:mod:`lrdeploy.serving.feeds`), built once per batch size, outside the timing, and bound to each
  runtime's own input names (:func:`runtimes.base.bind_feeds`) before its warm-up.
- **Environment recorded** with the result: CPU model, cores, threads per runtime, library versions, load,
  and the GPU/driver where one is present.

The clock is injectable (``clock=``) so tests drive the harness with a fake clock and check the statistics
exactly, without any timed assertion on the real wall clock.
"""

from __future__ import annotations

import functools
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import numpy as np

from lrdeploy.errors import UserError
from lrdeploy.host import cpu_info  # engine-level: the fold cost model keys its cache by the CPU model

from .feeds import FeedsFor, synthetic_feeds
from .runtimes.base import (
    Runtime,
    available_cpus,
    bind_feeds,
    cuda_device_info,
    gc_paused,
    measure_memory,
    nvidia_driver_version,
)

Clock = Callable[[], float]

_VERSIONED_PACKAGES = ("lrdeploy", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "tensorrt")
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_NUM_THREADS")
# Statistics a paired speed-up is computed at (block statistic -> LatencyStats attribute).
SPEEDUP_STATS = {"median": "median_ms", "p90": "p90_ms", "p99": "p99_ms"}


# --------------------------------------------------------------------------------------------- statistics
@dataclass
class LatencyStats:
    """Per-call latency of one runtime at one batch size. Percentiles interpolate linearly (numpy default)."""

    batch_size: int
    runs: int
    total_s: float
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    throughput: float  # samples/s = batch_size * runs / total time of the timed calls

    @classmethod
    def from_durations(cls, durations_s: Sequence[float], batch_size: int) -> LatencyStats:
        if len(durations_s) == 0:
            raise ValueError("no timed runs to summarise")
        ms = np.asarray(durations_s, dtype=np.float64) * 1e3
        total_s = float(ms.sum()) / 1e3
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(
            batch_size=int(batch_size),
            runs=int(ms.size),
            total_s=total_s,
            median_ms=p50,
            p90_ms=p90,
            p99_ms=p99,
            mean_ms=float(ms.mean()),
            min_ms=float(ms.min()),
            max_ms=float(ms.max()),
            std_ms=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
            throughput=batch_size * ms.size / total_s if total_s > 0 else float("inf"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size, "runs": self.runs, "total_s": self.total_s,
            "median_ms": self.median_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms,
            "mean_ms": self.mean_ms, "min_ms": self.min_ms, "max_ms": self.max_ms, "std_ms": self.std_ms,
            "throughput": self.throughput,
        }


@dataclass
class BlockResult:
    """One timed block: ``runtime`` at ``batch_size`` in ``round``, ``position``-th in that round's order."""

    runtime: str
    batch_size: int
    round: int
    position: int
    stats: LatencyStats
    durations_s: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = {"runtime": self.runtime, "batch_size": self.batch_size, "round": self.round,
             "position": self.position, "stats": self.stats.to_dict()}
        if samples:
            d["durations_ms"] = [t * 1e3 for t in self.durations_s]
        return d


def ratio_spread(ratios: Sequence[float]) -> float:
    """max/min of per-round ratios (1.0 for fewer than two); inf when a ratio is zero."""
    if len(ratios) < 2:
        return 1.0
    low, high = min(ratios), max(ratios)
    return high / low if low > 0 else float("inf")


def window_spread(window_medians: Sequence[float]) -> float:
    """(max − min) / median of the given window medians: 0.0 = identical windows; inf if undefined."""
    values = [float(v) for v in window_medians]
    if not values or not all(np.isfinite(values)):
        return float("inf")
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid > 0 else float("inf")


def is_stable(window_medians: Sequence[float], tol: float = 0.02, windows: int = 3) -> bool:
    """The stopping rule: the last ``windows`` window medians agree within ``tol`` of their median.

    ``(max − min) / median <= tol`` over the last ``windows`` values; False while fewer windows exist, and for
    non-finite or non-positive medians. Max − min over the whole tail, not neighbour to neighbour: a steady
    drift of ``d`` per window shows as ``(windows − 1)·d``, so with 3 windows any drift above ``tol / 2`` per
    window keeps the run going instead of creeping through. ``windows >= 2`` (one window agrees with nothing).
    """
    if windows < 2:
        raise ValueError(f"windows must be >= 2, got {windows}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if len(window_medians) < windows:
        return False
    tail = [float(v) for v in window_medians[-windows:]]
    if min(tail) <= 0:
        return False
    return window_spread(tail) <= tol


@dataclass
class Stability:
    """Did the window medians of one runtime at one batch size settle? None when no tolerance was set."""

    stable: bool | None
    window_medians_ms: list[float]
    spread: float  # window_spread of the last ``windows`` medians (inf while fewer)
    tolerance: float | None
    windows: int

    def to_dict(self) -> dict[str, Any]:
        return {"stable": self.stable, "window_medians_ms": list(self.window_medians_ms),
                "spread": self.spread, "tolerance": self.tolerance, "windows": self.windows}


@dataclass
class BatchResult:
    """All runtimes at one batch size: pooled stats, per-round paired ratios and the median speed-up."""

    batch_size: int
    stats: dict[str, LatencyStats]
    round_ratios: dict[str, list[float]]  # reference median / runtime median, one per round
    speedup: dict[str, float]  # median of round_ratios; 1.0 for the reference itself
    # stat ("median", "p90", "p99") -> runtime -> per-round ratios / their median
    round_ratios_at: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    speedup_at: dict[str, dict[str, float]] = field(default_factory=dict)
    stability: dict[str, Stability] = field(default_factory=dict)
    rounds: int = 0
    stop_reason: str = "rounds"  # rounds (fixed count) | stable | time_limit | max_rounds
    elapsed_s: float = 0.0  # clock time of the timed rounds (warm-up excluded)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ratio_spread(self) -> dict[str, float]:
        """max/min of the per-round ratios: 1.0 = rounds agree; well above 1 = the machine was disturbed."""
        return {name: ratio_spread(r) for name, r in self.round_ratios.items()}

    @property
    def stable(self) -> bool | None:
        """Every runtime's windows settled; None when stability was not checked (fixed rounds)."""
        if not self.stability or any(s.tolerance is None for s in self.stability.values()):
            return None
        return all(s.stable for s in self.stability.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "stats": {name: s.to_dict() for name, s in self.stats.items()},
            "round_ratios": {name: list(r) for name, r in self.round_ratios.items()},
            "ratio_spread": self.ratio_spread,
            "speedup": dict(self.speedup),
            "speedup_at": {stat: dict(v) for stat, v in self.speedup_at.items()},
            "round_ratios_at": {stat: {n: list(r) for n, r in v.items()}
                                for stat, v in self.round_ratios_at.items()},
            "rounds": self.rounds,
            "stop_reason": self.stop_reason,
            "elapsed_s": self.elapsed_s,
            "stable": self.stable,
            "stability": {name: s.to_dict() for name, s in self.stability.items()},
            "memory": {name: dict(m) for name, m in self.memory.items()},
        }


@dataclass
class BenchResult:
    """Everything a benchmark produced; ``to_dict()`` is JSON-ready (batch sizes become string keys)."""

    reference: str
    runtimes: list[str]
    batch_sizes: list[int]
    settings: dict[str, Any]
    batches: dict[int, BatchResult]
    blocks: list[BlockResult]  # in execution order
    environment: dict[str, Any]
    started: str = ""

    @property
    def order(self) -> list[tuple[int, int, str]]:
        """(batch_size, round, runtime) of every block, in the order they ran."""
        return [(b.batch_size, b.round, b.runtime) for b in self.blocks]

    def stats(self, runtime: str, batch_size: int) -> LatencyStats:
        return self.batches[batch_size].stats[runtime]

    def speedup(self, runtime: str, batch_size: int, stat: str = "median") -> float:
        if stat == "median":
            return self.batches[batch_size].speedup[runtime]
        return self.batches[batch_size].speedup_at[stat][runtime]

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "runtimes": list(self.runtimes),
            "batch_sizes": list(self.batch_sizes),
            "started": self.started,
            "settings": dict(self.settings),
            "batches": {str(b): r.to_dict() for b, r in self.batches.items()},
            "blocks": [blk.to_dict(samples=samples) for blk in self.blocks],
            "environment": self.environment,
        }


# -------------------------------------------------------------------------------------------- environment
def _versions() -> dict[str, str]:
    out = {}
    for pkg in _VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def gpu_info() -> dict[str, Any] | None:
    """CUDA GPUs (name, capability, memory, CUDA runtime, cuDNN) and the driver; None without a GPU driver.

    torch is imported only when an NVIDIA driver is present (no driver, no CUDA), so a CPU-only benchmark does
    not pay torch's import time just to learn there is no GPU.
    """
    driver = nvidia_driver_version()
    if driver is None and "torch" not in sys.modules:
        return None
    try:
        import torch
    except ImportError:
        return {"driver": driver, "cuda_available": None, "devices": [],
                "note": "torch is not installed: devices not listed"}
    try:
        if not torch.cuda.is_available():
            return {"driver": driver, "cuda_available": False, "devices": []} if driver else None
        return {"driver": driver, "cuda_available": True,
                "devices": [cuda_device_info(i) for i in range(torch.cuda.device_count())],
                "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    except Exception as exc:  # a broken CUDA install must not break a CPU benchmark's report
        return {"driver": driver, "devices": [], "error": f"{type(exc).__name__}: {exc}"}


def capture_environment(runtimes: Mapping[str, Runtime] | None = None) -> dict[str, Any]:
    """What a reader needs to reproduce or distrust a number: hardware, threads, versions, load."""
    cpu = cpu_info()
    env: dict[str, Any] = {
        "cpu_model": cpu["model"],
        "logical_cpus": os.cpu_count(),
        "available_cpus": available_cpus(),
        "physical_cores": cpu["physical_cores"],
        "cpu_flags": cpu["flags"],
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "thread_env": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
        "gpu": gpu_info(),
    }
    try:
        env["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        env["loadavg"] = None
    if runtimes is not None:
        env["runtimes"] = {name: rt.describe() for name, rt in runtimes.items()}
        env["threads"] = {name: d.get("threads") for name, d in env["runtimes"].items()}
    return env


# ------------------------------------------------------------------------------------------------- memory
class _MemoryTracker:
    """Peak memory per (runtime, batch) over its warm-up and all blocks, by ``runtimes.base.measure_memory``.

    Host: the process RSS high-water mark (exact per span on Linux, where the kernel's counter is reset; a
    lifetime lower bound elsewhere, ``rss_method`` says which). Device: torch's allocator peak on the
    runtime's ``cuda_device_index`` when it has one (torch runtimes, TensorRT buffers; not ORT's CUDA
    arena). Spans wrap whole blocks, so the counters are read outside the timed calls.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.data: dict[tuple[int, str], dict[str, Any]] = {}

    def run(self, batch: int, name: str, runtime: Runtime, fn: Callable[[], Any], *,
            warmup: bool = False) -> Any:
        if not self.enabled:
            return fn()
        box: list[Any] = []
        device = getattr(runtime, "cuda_device_index", None)
        m = measure_memory(lambda: box.append(fn()), runs=1, cuda_device=device)
        entry = self.data.setdefault((batch, name), {"rss_method": m["rss_method"], "peak_rss_bytes": None})
        _max_into(entry, "peak_rss_bytes", m["rss_peak_bytes"])
        _max_into(entry, "cuda_peak_allocated_bytes", m.get("cuda_peak_allocated_bytes"))
        if warmup:  # growth while this runtime first met this batch size: arenas, kernels, weights paged in
            entry["rss_before_warmup_bytes"] = m["rss_before_bytes"]
            entry["warmup_rss_growth_bytes"] = m["rss_peak_delta_bytes"]
        return box[0]

    def for_batch(self, batch: int, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {name: self.data[(batch, name)] for name in names if (batch, name) in self.data}


def _max_into(entry: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, (int, float)):
        entry[key] = max(int(value), entry.get(key) or 0)


# ------------------------------------------------------------------------------------------------ harness
def _warm_up(runtime: Runtime, feeds: Mapping[str, Any], seconds: float, clock: Clock) -> int:
    """Call until ``seconds`` have passed, at least once. Returns the number of calls."""
    start, calls = clock(), 0
    while True:
        runtime.run(feeds)
        calls += 1
        if clock() - start >= seconds:
            return calls


def _time_block(runtime: Runtime, feeds: Mapping[str, Any], *, min_runs: int, min_seconds: float,
                max_seconds: float, warmup_runs: int, clock: Clock) -> list[float]:
    for _ in range(warmup_runs):
        runtime.run(feeds)
    durations: list[float] = []
    with gc_paused():  # the caller collects between batch sizes
        start = clock()
        while True:
            t0 = clock()
            runtime.run(feeds)
            t1 = clock()
            durations.append(t1 - t0)
            elapsed = t1 - start
            if (len(durations) >= min_runs and elapsed >= min_seconds) or elapsed >= max_seconds:
                return durations


def _check_settings(runtimes: Mapping[str, Runtime], batch_sizes: Sequence[int], warmup_s: float,
                    min_runs: int, min_seconds: float, max_seconds: float, rounds: int,
                    block_warmup_runs: int) -> None:
    if not runtimes:
        raise UserError("nothing to benchmark: no runtimes given")
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise UserError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if min_runs < 1 or rounds < 1 or block_warmup_runs < 0:
        raise UserError(f"need min_runs >= 1, rounds >= 1, block_warmup_runs >= 0 "
                        f"(got {min_runs}, {rounds}, {block_warmup_runs})")
    if warmup_s < 0 or min_seconds < 0:
        raise UserError(f"warm-up and minimum seconds must be >= 0 (got {warmup_s}, {min_seconds})")
    if max_seconds < min_seconds:
        raise UserError(f"max_seconds ({max_seconds}) is below min_seconds ({min_seconds})",
                        hint="raise --max-seconds or lower --min-seconds")


def _check_stability(tol: float | None, windows: int, time_limit_s: float | None, max_rounds: int | None,
                     rounds: int) -> None:
    if tol is None:
        return
    if not np.isfinite(tol) or tol < 0:
        raise UserError(f"stability tolerance must be a finite number >= 0, got {tol}", hint="e.g. 0.02")
    if windows < 2:
        raise UserError(f"stability needs at least 2 windows to compare, got {windows}")
    if time_limit_s is None and max_rounds is None:
        raise UserError("a stability tolerance needs a time limit or a maximum number of rounds",
                        hint="pass time_limit_s or max_rounds")
    if time_limit_s is not None and time_limit_s <= 0:
        raise UserError(f"the stability time limit must be > 0 s, got {time_limit_s}")
    if max_rounds is not None and max_rounds < rounds:
        raise UserError(f"max_rounds ({max_rounds}) is below the minimum rounds ({rounds})")


def benchmark(
    runtimes: Mapping[str, Runtime],
    feeds: FeedsFor | Sequence[int],
    batch_sizes: Sequence[int] = (1, 32),
    *,
    warmup_s: float = 0.5,
    min_runs: int = 30,
    min_seconds: float = 1.0,
    max_seconds: float = 10.0,
    rounds: int = 3,
    seed: int = 0,
    progress: bool = True,
    clock: Clock = time.perf_counter,
    block_warmup_runs: int = 1,
    stability_tol: float | None = None,
    stability_windows: int = 3,
    time_limit_s: float | None = 60.0,
    max_rounds: int | None = None,
    memory: bool = True,
) -> BenchResult:
    """Time every runtime at every batch size; the first runtime in ``runtimes`` is the reference.

    ``feeds(batch)`` gives one batch of named inputs (the same arrays for every runtime, bound to each one's
    input names); a per-sample shape instead (e.g. ``(1, 28, 28)``) means synthetic inputs of that shape
    from ``seed`` for the reference's single input (:func:`lrdeploy.serving.feeds.synthetic_feeds`).
    ``warmup_s`` is spent per
    runtime and batch size (at least one call); ``block_warmup_runs`` untimed calls open every block;
    ``progress`` draws a Rich bar on stderr; ``clock`` is any monotonic seconds counter (tests pass a fake).

    Rounds: with ``stability_tol=None`` exactly ``rounds`` rounds per batch size (total blocks =
    ``len(batch_sizes) * rounds * len(runtimes)``). With a tolerance, ``rounds`` is the minimum and rounds
    continue until every runtime ``is_stable`` over its last ``stability_windows`` block medians, or the
    timed rounds of this batch size have used ``time_limit_s`` of clock time, or ``max_rounds`` ran.

    ``rounds`` defaults to 3, an odd number, so the median speed-up is one real round's ratio and a single
    disturbed round (a neighbour's burst of load on a shared host) is discarded; with 2 rounds the median is
    the mean of the two and one bad block can move it arbitrarily far. ``memory`` records peak RSS (and the
    CUDA allocator peak of GPU runtimes) per runtime and batch size, read outside the timed calls. Runtimes
    with a ``stage(feeds)`` method (device runtimes) get the batch staged before their warm-up, untimed.
    """
    names = list(runtimes)
    sample_shape = None
    if not callable(feeds):
        sample_shape = [int(d) for d in feeds]
        reference_inputs = runtimes[names[0]].inputs() if names else []
        feeds = synthetic_feeds(reference_inputs, seed=seed, sample_shape=sample_shape)
    batch_sizes = list(batch_sizes)
    _check_settings(runtimes, batch_sizes, warmup_s, min_runs, min_seconds, max_seconds, rounds,
                    block_warmup_runs)
    _check_stability(stability_tol, stability_windows, time_limit_s, max_rounds, rounds)
    reference = names[0]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    environment = capture_environment(runtimes)
    fed: dict[str, dict[str, Any]] = {}
    tracker = _MemoryTracker(memory)

    def stop_reason(done: int, by_round: list[dict[str, BlockResult]], elapsed: float) -> str | None:
        if stability_tol is None:
            return "rounds" if done >= rounds else None
        if done < rounds:
            return None
        if all(is_stable([r[n].stats.median_ms for r in by_round], stability_tol, stability_windows)
               for n in names):
            return "stable"
        if time_limit_s is not None and elapsed >= time_limit_s:
            return "time_limit"
        if max_rounds is not None and done >= max_rounds:
            return "max_rounds"
        return None

    blocks: list[BlockResult] = []
    batches: dict[int, BatchResult] = {}
    total = len(batch_sizes) * rounds * len(names) if stability_tol is None else None
    with _progress(progress, total=total) as advance:
        for batch in batch_sizes:
            batch_feeds = feeds(batch)
            fed[str(batch)] = {k: {"shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.name}
                               for k, v in batch_feeds.items()}
            own = {name: bind_feeds(runtimes[name].inputs(), batch_feeds, name) for name in names}
            for name in names:
                advance(f"b{batch} warm-up {name}", 0)
                stage = getattr(runtimes[name], "stage", None)
                if callable(stage):  # device runtimes: put the inputs on the device once, untimed
                    stage(own[name])
                warm = functools.partial(_warm_up, runtimes[name], own[name], warmup_s, clock)
                tracker.run(batch, name, runtimes[name], warm, warmup=True)
            gc.collect()  # once per batch size: a full collection costs ~0.1 s with torch loaded
            by_round: list[dict[str, BlockResult]] = []
            t_start = clock()
            reason = None
            while reason is None:
                rnd = len(by_round)
                order = names if rnd % 2 == 0 else names[::-1]
                this_round: dict[str, BlockResult] = {}
                for position, name in enumerate(order):
                    advance(f"b{batch} round {rnd + 1}" + (f"/{rounds}" if total else "") + f" {name}", 0)
                    timed = functools.partial(_time_block, runtimes[name], own[name], min_runs=min_runs,
                                              min_seconds=min_seconds, max_seconds=max_seconds,
                                              warmup_runs=block_warmup_runs, clock=clock)
                    durations = tracker.run(batch, name, runtimes[name], timed)
                    stats = LatencyStats.from_durations(durations, batch)
                    block = BlockResult(name, batch, rnd, position, stats, durations)
                    blocks.append(block)
                    this_round[name] = block
                    advance(None, 1)
                by_round.append(this_round)
                reason = stop_reason(len(by_round), by_round, clock() - t_start)
            result = _summarise_batch(batch, names, reference, by_round, stability_tol, stability_windows)
            result.stop_reason, result.elapsed_s = reason, clock() - t_start
            result.memory = tracker.for_batch(batch, names)
            batches[batch] = result

    try:  # load at the end too: a neighbour that started mid-run shows up here (and in the round ratios)
        environment["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        environment["loadavg_end"] = None
    settings = {
        "input_shape": sample_shape if sample_shape is not None else _one_input_shape(fed),
        "inputs": fed, "batch_sizes": batch_sizes, "warmup_s": warmup_s,
        "block_warmup_runs": block_warmup_runs, "min_runs": min_runs, "min_seconds": min_seconds,
        "max_seconds": max_seconds, "rounds": rounds, "seed": seed,
        "order": "interleaved blocks, reversed on odd rounds", "speedup": "median of per-round median ratios",
        "speedup_at": "median over rounds of reference block statistic / runtime block statistic",
        "stability": None if stability_tol is None else {
            "tolerance": stability_tol, "windows": stability_windows, "min_rounds": rounds,
            "time_limit_s": time_limit_s, "max_rounds": max_rounds,
            "rule": "(max - min) / median of the last `windows` block medians <= tolerance, every runtime",
        },
        "memory": "peak per runtime and batch over warm-up and blocks (runtimes.base.measure_memory)"
        if memory else None,
        "clock": getattr(clock, "__qualname__", type(clock).__name__),
    }
    return BenchResult(reference, names, batch_sizes, settings, batches, blocks, environment, started)


def _one_input_shape(fed: Mapping[str, Mapping[str, Any]]) -> list[int] | None:
    """One sample's shape when every batch fed a single input of one per-sample shape (else None)."""
    shapes = {tuple(v["shape"][1:]) for batch in fed.values() for v in batch.values()}
    if len(shapes) != 1 or any(len(batch) != 1 for batch in fed.values()):
        return None
    return list(shapes.pop())


def paired_ratios(by_round: Sequence[Mapping[str, BlockResult]], reference: str, name: str,
                  stat: str = "median") -> list[float]:
    """Per round: reference block ``stat`` / ``name`` block ``stat`` (inf when the latter is 0)."""
    attr = SPEEDUP_STATS[stat]
    out = []
    for rnd in by_round:
        ref, cand = getattr(rnd[reference].stats, attr), getattr(rnd[name].stats, attr)
        out.append(ref / cand if cand > 0 else float("inf"))
    return out


def _summarise_batch(batch: int, names: list[str], reference: str, by_round: list[dict[str, BlockResult]],
                     tol: float | None = None, windows: int = 3) -> BatchResult:
    stats, ratios_at, speedup_at, stability = {}, {}, {}, {}
    for stat in SPEEDUP_STATS:
        ratios_at[stat] = {name: paired_ratios(by_round, reference, name, stat) for name in names}
        speedup_at[stat] = {name: float(statistics.median(r)) for name, r in ratios_at[stat].items()}
    for name in names:
        pooled = [t for rnd in by_round for t in rnd[name].durations_s]
        stats[name] = LatencyStats.from_durations(pooled, batch)
        medians = [rnd[name].stats.median_ms for rnd in by_round]
        spread = window_spread(medians[-windows:]) if len(medians) >= windows else float("inf")
        stable = None if tol is None else is_stable(medians, tol, windows)
        stability[name] = Stability(stable, medians, spread, tol, windows)
    return BatchResult(batch, stats, ratios_at["median"], speedup_at["median"], ratios_at, speedup_at,
                       stability, rounds=len(by_round))


@contextmanager
def _progress(enabled: bool, total: int | None) -> Iterator[Callable[[str | None, int], None]]:
    """Yield ``advance(description, steps)``; a Rich bar on stderr when enabled, a no-op otherwise."""
    if not enabled:
        yield lambda description, steps: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lrdeploy import terminal

    with Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=terminal.info, transient=True) as bar:
        task = bar.add_task("", total=total)

        def advance(description: str | None, steps: int) -> None:
            if description is not None:
                bar.update(task, description=description)
            if steps:
                bar.advance(task, steps)

        yield advance
