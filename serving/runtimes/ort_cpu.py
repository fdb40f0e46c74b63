"""ONNX Runtime on the CPU, configured the way baseline.md measured it, so numbers stay comparable.

Settings and why (see :func:`ort_session.session_options`):
- ``CPUExecutionProvider`` only, created through :func:`ort_session.make_session`, which asserts that the
  provider in use is the one asked for; ``describe()`` reports ``sess.get_providers()``, what is *in use*.
- ``ORT_ENABLE_ALL``: the CPU-specific fusions (FusedConv, NCHWc layouts) are part of what a user deploys.
- ``intra_op_num_threads`` pinned (default: the CPUs this process may use), ``inter_op_num_threads=1`` and
  sequential execution: ORT's default thread choice depends on the host and makes runs on two machines
  incomparable; one inter-op pool avoids two pools fighting over the same cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .base import MeasuresMemory, resolve_threads
from .ort_session import CPU_PROVIDER, ORT_DTYPES, make_session, one_line, rejected_input, session_io

_ORT_DTYPES = ORT_DTYPES  # old private names, kept for importers
_one_line = one_line


class OrtCpuRuntime(MeasuresMemory):
    """An ``InferenceSession`` on the CPU with pinned threads; runs single-input models (first output)."""

    backend = "onnxruntime"
    device = "cpu"

    def __init__(self, path: str | Path, threads: int | None = None, *, name: str = "ort-cpu") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.name = name
        self.threads = resolve_threads(threads)
        self.session = make_session(self.path, [CPU_PROVIDER], threads=self.threads)
        self.providers: list[str] = list(self.session.get_providers())
        self.version: str = ort.__version__

        io = session_io(self.session, self.path)
        self.io = io
        self.input_name: str = io.input_name
        self.input_shape: list[int | str | None] = io.input_shape
        self.input_type: str = io.input_type
        self.input_dtype = io.input_dtype
        self.output_name: str = io.output_name
        self.output_shape: list[int | str | None] = io.output_shape

    def run(self, x: np.ndarray) -> np.ndarray:
        # No-op (no copy) for the float32 C-contiguous arrays the bench feeds; a copy only for odd inputs.
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        try:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as exc:  # wrong shape/dtype for this graph: the user's input, not our bug
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise rejected_input(self.path, x, self.input_shape, exc) from None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "device": self.device,
            "providers": list(self.providers),
            "threads": self.threads,
            "inter_op_threads": 1,
            "execution_mode": "sequential",
            "graph_optimization": "all",
            "version": self.version,
            "path": str(self.path),
            "input": {"name": self.input_name, "shape": self.input_shape, "type": self.input_type},
            "output": {"name": self.output_name, "shape": self.output_shape},
            "memory": self.last_memory,
        }

    def __repr__(self) -> str:
        return f"OrtCpuRuntime({str(self.path)!r}, threads={self.threads}, name={self.name!r})"
