"""Runtimes: one small module per backend behind one protocol (``Runtime``: name, run, describe).

Backends are imported lazily by ``load_runtime`` so that importing serving never pulls in onnxruntime, torch
or tensorrt unless that backend is used, and a missing optional backend (or missing hardware) fails with a
one-line error that says what is missing.

| kind         | source            | module              | notes                                          |
|--------------|-------------------|---------------------|------------------------------------------------|
| ``torch-cpu``  | ``nn.Module``     | ``torch_runtime``   | eager                                          |
| ``torch-cuda`` | ``nn.Module``     | ``torch_runtime``   | ``mode="eager"`` or ``"cuda-graph"``           |
| ``ort-cpu``    | ``.onnx`` path    | ``ort_cpu``         | CPUExecutionProvider                           |
| ``ort-cuda``   | ``.onnx`` path    | ``ort_cuda``        | CUDAExecutionProvider + I/O binding            |
| ``trt``        | ``.plan`` path    | ``trt``             | TensorRT engine, tensor-name API               |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lrdeploy.errors import UserError

from .base import DeviceOutput, Runtime, available_cpus, measure_memory, resolve_threads, to_numpy

RUNTIME_KINDS = ("torch-cpu", "torch-cuda", "ort-cpu", "ort-cuda", "trt")
TORCH_MODES = ("eager", "cuda-graph")
# what users type -> (canonical kind, torch mode implied by the alias or None)
_ALIASES: dict[str, tuple[str, str | None]] = {
    **{k: (k, None) for k in RUNTIME_KINDS},
    "torch": ("torch-cpu", None),
    "ort": ("ort-cpu", None),
    "onnxruntime": ("ort-cpu", None),
    "onnxruntime-cuda": ("ort-cuda", None),
    "ort-gpu": ("ort-cuda", None),
    "tensorrt": ("trt", None),
    "torch-cuda-graph": ("torch-cuda", "cuda-graph"),
}


def canonical_kind(kind: str) -> tuple[str, str | None]:
    """(kind, implied torch mode) for a name or alias; unknown names are a UserError listing the kinds."""
    found = _ALIASES.get(str(kind).strip().lower())
    if found is None:
        raise UserError(f"unknown runtime {kind!r}",
                        hint=f"choose one of: {', '.join(RUNTIME_KINDS)} (torch-cuda-graph = torch-cuda in "
                             "mode cuda-graph)")
    return found


def _need_path(kind: str, source: Any, what: str) -> Path:
    if not isinstance(source, (str, Path)):
        raise UserError(f"runtime {kind} takes a path to {what}, got {type(source).__name__}",
                        hint="for an nn.Module use --runtime torch-cpu or torch-cuda")
    return Path(source)


def load_runtime(kind: str, source: Any, *, threads: int | None = None, name: str | None = None,
                 mode: str | None = None, include_transfer: bool = False, device_id: int = 0,
                 dtype: str = "float32") -> Runtime:
    """Build a runtime of ``kind`` on ``source`` (an ``nn.Module`` for torch kinds, a file path otherwise).

    ``mode`` (eager | cuda-graph) applies to ``torch-cuda`` only; ``include_transfer`` times host↔device
    copies inside each run (device kinds; default off, as trtexec); ``device_id`` picks the GPU; ``dtype``
    (float32 | float16 | bfloat16) applies to torch kinds (ONNX and TensorRT artefacts carry their own).
    """
    canonical, implied_mode = canonical_kind(kind)
    if mode is not None and implied_mode is not None and mode != implied_mode:
        raise UserError(f"runtime {kind!r} implies mode {implied_mode!r}, but mode {mode!r} was given")
    mode = mode or implied_mode
    if mode is not None and canonical != "torch-cuda":
        raise UserError(f"mode {mode!r} applies to runtime torch-cuda only, not {canonical}",
                        hint="drop --mode, or use --runtime torch-cuda")
    if mode is not None and mode not in TORCH_MODES:
        raise UserError(f"unknown torch mode {mode!r}", hint=f"choose one of: {', '.join(TORCH_MODES)}")
    if dtype not in (None, "float32", "fp32") and not canonical.startswith("torch"):
        raise UserError(f"dtype {dtype!r} applies to the torch runtimes only; {canonical} runs the precision "
                        "its artefact was exported/built with", hint="export or build at that precision")
    name = name or canonical

    if canonical in ("torch-cpu", "torch-cuda"):
        if isinstance(source, (str, Path)):
            raise UserError(f"runtime {canonical} takes an nn.Module, got the path {str(source)!r}",
                            hint="for .onnx files use --runtime ort-cpu / ort-cuda; for engines, trt")
        from .torch_runtime import TorchRuntime

        device = "cpu" if canonical == "torch-cpu" else f"cuda:{int(device_id)}"
        return TorchRuntime(source, device=device, threads=threads, name=name, mode=mode or "eager",
                            include_transfer=include_transfer, dtype=dtype or "float32")

    if canonical == "trt":
        path = _need_path(canonical, source, "a serialised TensorRT engine (.plan/.engine)")
        from .trt import TrtRuntime

        return TrtRuntime(path, threads=threads, name=name, device_id=device_id,
                          include_transfer=include_transfer)

    path = _need_path(canonical, source, "an .onnx file")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        package = "onnxruntime-gpu" if canonical == "ort-cuda" else "onnxruntime"
        raise UserError(f"onnxruntime is not installed ({exc})", hint=f"pip install {package}") from None
    if canonical == "ort-cpu":
        from .ort_cpu import OrtCpuRuntime

        return OrtCpuRuntime(path, threads=threads, name=name)
    from .ort_cuda import OrtCudaRuntime

    return OrtCudaRuntime(path, threads=threads, name=name, device_id=device_id,
                          include_transfer=include_transfer)


__all__ = ["RUNTIME_KINDS", "TORCH_MODES", "DeviceOutput", "Runtime", "available_cpus", "canonical_kind",
           "load_runtime", "measure_memory", "resolve_threads", "to_numpy"]
