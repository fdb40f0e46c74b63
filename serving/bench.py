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
- **Environment recorded** with the result: CPU model, cores, threads per runtime, library versions, load.

The clock is injectable (``clock=``) so tests drive the harness with a fake clock and check the statistics
exactly, without any timed assertion on the real wall clock.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy.errors import UserError

from .runtimes.base import Runtime, available_cpus

Clock = Callable[[], float]

# ISA features that change CPU inference speed; recorded so a result says what the CPU could do.
_CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                          "amx_bf16", "amx_int8", "neon", "asimd", "sve")
_VERSIONED_PACKAGES = ("lrdeploy", "numpy", "onnxruntime", "onnx", "torch")
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_NUM_THREADS")


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


@dataclass
class BatchResult:
    """All runtimes at one batch size: pooled stats, per-round paired ratios and the median speed-up."""

    batch_size: int
    stats: dict[str, LatencyStats]
    round_ratios: dict[str, list[float]]  # reference median / runtime median, one per round
    speedup: dict[str, float]  # median of round_ratios; 1.0 for the reference itself

    @property
    def ratio_spread(self) -> dict[str, float]:
        """max/min of the per-round ratios: 1.0 = rounds agree; well above 1 = the machine was disturbed."""
        return {name: ratio_spread(r) for name, r in self.round_ratios.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "stats": {name: s.to_dict() for name, s in self.stats.items()},
            "round_ratios": {name: list(r) for name, r in self.round_ratios.items()},
            "ratio_spread": self.ratio_spread,
            "speedup": dict(self.speedup),
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

    def speedup(self, runtime: str, batch_size: int) -> float:
        return self.batches[batch_size].speedup[runtime]

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
def cpu_info(path: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU model, physical core count and inference-relevant ISA flags, from /proc/cpuinfo if present."""
    model, flags, cores = None, set(), set()
    physical_id = None
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if model is None and key in ("model name", "hardware", "cpu model", "processor") and value \
                and not value.isdigit():
            model = value
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    return {
        "model": model or platform.processor() or platform.machine() or "unknown",
        "physical_cores": len(cores) or None,
        "flags": [f for f in _CPU_FLAGS_OF_INTEREST if f in flags],
    }


def _versions() -> dict[str, str]:
    out = {}
    for pkg in _VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


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
    }
    try:
        env["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        env["loadavg"] = None
    if runtimes is not None:
        env["runtimes"] = {name: rt.describe() for name, rt in runtimes.items()}
        env["threads"] = {name: d.get("threads") for name, d in env["runtimes"].items()}
    return env


# ------------------------------------------------------------------------------------------------ harness
@contextmanager
def _gc_paused() -> Iterator[None]:
    """Keep the cyclic GC out of the timed calls (as timeit does); the caller collects between batch sizes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _warm_up(runtime: Runtime, x: np.ndarray, seconds: float, clock: Clock) -> int:
    """Call until ``seconds`` have passed, at least once. Returns the number of calls."""
    start, calls = clock(), 0
    while True:
        runtime.run(x)
        calls += 1
        if clock() - start >= seconds:
            return calls


def _time_block(runtime: Runtime, x: np.ndarray, *, min_runs: int, min_seconds: float, max_seconds: float,
                warmup_runs: int, clock: Clock) -> list[float]:
    for _ in range(warmup_runs):
        runtime.run(x)
    durations: list[float] = []
    with _gc_paused():
        start = clock()
        while True:
            t0 = clock()
            runtime.run(x)
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


def benchmark(
    runtimes: Mapping[str, Runtime],
    input_shape: Sequence[int],
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
) -> BenchResult:
    """Time every runtime at every batch size; the first runtime in ``runtimes`` is the reference.

    ``input_shape`` is the per-sample shape (e.g. ``(1, 28, 28)``); each batch is ``(batch, *input_shape)``
    float32 standard-normal data from ``seed``, the same array for every runtime. Total blocks =
    ``len(batch_sizes) * rounds * len(runtimes)``. ``warmup_s`` is spent per runtime and batch size (at
    least one call); ``block_warmup_runs`` untimed calls open every block; ``progress`` draws a Rich bar on
    stderr; ``clock`` is any monotonic seconds counter (tests pass a fake one).

    ``rounds`` defaults to 3, an odd number, so the median speed-up is one real round's ratio and a single
    disturbed round (a neighbour's burst of load on a shared host) is discarded; with 2 rounds the median is
    the mean of the two and one bad block can move it arbitrarily far.
    """
    names = list(runtimes)
    batch_sizes = list(batch_sizes)
    _check_settings(runtimes, batch_sizes, warmup_s, min_runs, min_seconds, max_seconds, rounds,
                    block_warmup_runs)
    reference = names[0]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    environment = capture_environment(runtimes)
    rng = np.random.default_rng(seed)

    blocks: list[BlockResult] = []
    batches: dict[int, BatchResult] = {}
    with _progress(progress, total=len(batch_sizes) * rounds * len(names)) as advance:
        for batch in batch_sizes:
            x = rng.standard_normal((batch, *input_shape), dtype=np.float32)
            for name in names:
                advance(f"b{batch} warm-up {name}", 0)
                _warm_up(runtimes[name], x, warmup_s, clock)
            gc.collect()  # once per batch size: a full collection costs ~0.1 s with torch loaded
            by_round: list[dict[str, BlockResult]] = []
            for rnd in range(rounds):
                order = names if rnd % 2 == 0 else names[::-1]
                this_round: dict[str, BlockResult] = {}
                for position, name in enumerate(order):
                    advance(f"b{batch} round {rnd + 1}/{rounds} {name}", 0)
                    durations = _time_block(runtimes[name], x, min_runs=min_runs, min_seconds=min_seconds,
                                            max_seconds=max_seconds, warmup_runs=block_warmup_runs,
                                            clock=clock)
                    stats = LatencyStats.from_durations(durations, batch)
                    block = BlockResult(name, batch, rnd, position, stats, durations)
                    blocks.append(block)
                    this_round[name] = block
                    advance(None, 1)
                by_round.append(this_round)
            batches[batch] = _summarise_batch(batch, names, reference, by_round)

    try:  # load at the end too: a neighbour that started mid-run shows up here (and in the round ratios)
        environment["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        environment["loadavg_end"] = None
    settings = {
        "input_shape": list(input_shape), "batch_sizes": batch_sizes, "warmup_s": warmup_s,
        "block_warmup_runs": block_warmup_runs, "min_runs": min_runs, "min_seconds": min_seconds,
        "max_seconds": max_seconds, "rounds": rounds, "seed": seed,
        "order": "interleaved blocks, reversed on odd rounds", "speedup": "median of per-round median ratios",
        "clock": getattr(clock, "__qualname__", type(clock).__name__),
    }
    return BenchResult(reference, names, batch_sizes, settings, batches, blocks, environment, started)


def _summarise_batch(batch: int, names: list[str], reference: str,
                     by_round: list[dict[str, BlockResult]]) -> BatchResult:
    stats, ratios, speedup = {}, {}, {}
    for name in names:
        pooled = [t for rnd in by_round for t in rnd[name].durations_s]
        stats[name] = LatencyStats.from_durations(pooled, batch)
        ratios[name] = [rnd[reference].stats.median_ms / rnd[name].stats.median_ms
                        if rnd[name].stats.median_ms > 0 else float("inf") for rnd in by_round]
        speedup[name] = float(statistics.median(ratios[name]))
    return BatchResult(batch, stats, ratios, speedup)


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str | None, int], None]]:
    """Yield ``advance(description, steps)``; a Rich bar on stderr when enabled, a no-op otherwise."""
    if not enabled:
        yield lambda description, steps: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=total)

        def advance(description: str | None, steps: int) -> None:
            if description is not None:
                bar.update(task, description=description)
            if steps:
                bar.advance(task, steps)

        yield advance
