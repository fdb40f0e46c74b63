"""The one protocol every backend implements, so the bench and parity code never branch on the backend.

A runtime is deliberately tiny: ``run`` maps one input batch (numpy) to the first output (numpy), and
``describe`` says what actually executed it (providers in use, threads, library version) — a benchmark that
does not record this cannot be reproduced or trusted (ORT-GPU silently falls back to CPU, see baseline.md).
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lrdeploy.errors import UserError


@runtime_checkable
class Runtime(Protocol):
    """Something that runs a model on a numpy batch and can say how it did so."""

    name: str

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run one batch; return the (first) output. Must block until the result is ready."""
        ...

    def describe(self) -> dict[str, Any]:
        """{"backend", "device", "providers", "threads", "version", ...}: what is really in use."""
        ...


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
