"""The host a number is measured on: usable CPUs, the thread count to pin, the CPU model, ORT session options.

Engine-level because both sides of the pipeline need the *same* answers: ``serving`` (runtimes pin threads
and record the CPU; ``bench`` captures the environment) and ``exporters`` (the fold cost model times tiny
ONNX graphs, keys its cache by thread count and CPU model, and must build its sessions exactly as the ORT
runtimes do, or the factored-vs-dense choice is calibrated on a different configuration than the one that
is served). ``exporters`` never imports ``serving`` (DESIGN.md), so the shared helpers live here and
``serving`` re-exports them from their old places.

Light on purpose: standard library only at import time; onnxruntime is imported inside
:func:`session_options`, so importing this module costs nothing and works without onnxruntime installed.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from lrdeploy.errors import UserError

# ISA features that change CPU inference speed; recorded so a result says what the CPU could do.
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                         "amx_bf16", "amx_int8", "neon", "asimd", "sve")


# ------------------------------------------------------------------------------------------------ threads
def available_cpus() -> int:
    """CPUs this process may run on (affinity/cgroup-limited where the OS says so), at least 1.

    ``os.cpu_count()`` reports the host's CPUs even inside a restricted container or under ``taskset``;
    pinning more threads than we may use makes thread pools fight and latency bimodal.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """The thread count to pin: the caller's, or every CPU we may use. Rejects nonsense early."""
    if threads is None:
        return available_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads must be a positive integer, got {threads!r}", hint="pass e.g. --threads 2")
    return threads


# ---------------------------------------------------------------------------------------------------- CPU
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
        "flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags],
    }


# ------------------------------------------------------------------------------------------- ONNX Runtime
def session_options(threads: int | None = None) -> Any:
    """The options baseline.md measured with, so numbers stay comparable across runtimes and machines.

    ``ORT_ENABLE_ALL`` (the provider-specific fusions are part of what a user deploys); intra-op threads
    pinned (default: the CPUs this process may use) and one inter-op pool with sequential execution, because
    ORT's own default depends on the host and two pools fight over the same cores. The serving runtimes and
    the fold cost model's micro-benchmarks both use these, so a layer is timed as it will be served.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: warnings would interleave with the progress display
    return options
