"""Runtimes: one small class per backend behind one protocol (``Runtime``: name, run, describe).

Backends are imported lazily by ``load_runtime`` so that importing serving never pulls in onnxruntime or torch
unless that backend is used (and a missing optional backend fails with a one-line error).
"""

from __future__ import annotations

from typing import Any

from lrdeploy.errors import UserError

from .base import Runtime, available_cpus, resolve_threads

# kind -> canonical kind; the aliases are what users type.
_KINDS = {"ort-cpu": "ort-cpu", "ort": "ort-cpu", "onnxruntime": "ort-cpu", "torch-cpu": "torch-cpu",
          "torch": "torch-cpu"}
RUNTIME_KINDS = ("ort-cpu", "torch-cpu")


def load_runtime(kind: str, source: Any, *, threads: int | None = None, name: str | None = None) -> Runtime:
    """Build a runtime: ``"ort-cpu"`` takes a path to an ``.onnx`` file, ``"torch-cpu"`` an ``nn.Module``."""
    canonical = _KINDS.get(str(kind).lower())
    if canonical is None:
        raise UserError(f"unknown runtime {kind!r}", hint=f"choose one of: {', '.join(RUNTIME_KINDS)}")
    if canonical == "ort-cpu":
        try:
            from .ort_cpu import OrtCpuRuntime
        except ImportError as exc:
            raise UserError(f"onnxruntime is not installed ({exc})", hint="pip install onnxruntime") from None
        return OrtCpuRuntime(source, threads=threads, name=name or canonical)
    from .torch_cpu import TorchRuntime

    return TorchRuntime(source, threads=threads, name=name or canonical)


__all__ = ["RUNTIME_KINDS", "Runtime", "available_cpus", "load_runtime", "resolve_threads"]
