"""ONNX Runtime on the CPU, configured the way baseline.md measured it, so numbers stay comparable.

Settings and why:
- ``CPUExecutionProvider`` only, and ``describe()`` reports ``sess.get_providers()``: ORT silently falls back
  to the CPU when a requested provider cannot load, so we record what is *in use*, never what was asked for.
- ``ORT_ENABLE_ALL``: the CPU-specific fusions (FusedConv, NCHWc layouts) are part of what a user deploys.
- ``intra_op_num_threads`` pinned (default: the CPUs this process may use), ``inter_op_num_threads=1`` and
  sequential execution: ORT's default thread choice depends on the host and makes runs on two machines
  incomparable; one inter-op pool avoids two pools fighting over the same cores.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy.errors import UserError

from .base import resolve_threads

# ONNX tensor element types as ORT names them -> numpy dtype, for inputs we feed.
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _one_line(exc: BaseException) -> str:
    """ORT's message without its ``[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :`` prefix, first line only."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    return re.sub(r"^Load model from .*? failed:\s*", "", text)


class OrtCpuRuntime:
    """An ``InferenceSession`` on the CPU with pinned threads; runs single-input models (first output)."""

    backend = "onnxruntime"
    device = "cpu"

    def __init__(self, path: str | Path, threads: int | None = None, *, name: str = "ort-cpu") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.name = name
        self.threads = resolve_threads(threads)
        if not self.path.is_file():
            raise UserError(f"ONNX model not found: {self.path}", hint="check the path or re-export it")

        if self.path.stat().st_size == 0:
            raise UserError(f"{self.path} is empty: not a valid ONNX model (truncated or corrupt)",
                            hint="re-export it")

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: warnings would interleave with the progress display
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises unrelated pybind classes: InvalidProtobuf, Fail, InvalidGraph…
            if type(exc).__name__ == "InvalidProtobuf" or "No graph was found" in str(exc):
                raise UserError(
                    f"{self.path} is not a valid ONNX model (truncated or corrupt): {_one_line(exc)}",
                    hint="re-export it",
                ) from None
            raise UserError(
                f"ONNX Runtime cannot load {self.path}: {_one_line(exc)}",
                hint="re-export it, or check that the graph only uses standard ONNX ops",
            ) from None

        self.providers: list[str] = list(self.session.get_providers())
        if "CPUExecutionProvider" not in self.providers:  # cannot happen today; guards a silent fallback
            raise UserError(f"ONNX Runtime did not use the CPU provider (in use: {self.providers})")
        self.version: str = ort.__version__

        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise UserError(
                f"{self.path} has {len(inputs)} inputs ({names}); lrdeploy serving runs single-input models",
                hint="export the model with one input tensor",
            )
        self.input_name: str = inputs[0].name
        self.input_shape: list[int | str | None] = list(inputs[0].shape)
        self.input_type: str = inputs[0].type
        self.input_dtype = np.dtype(_ORT_DTYPES.get(self.input_type, np.float32))
        output = self.session.get_outputs()[0]
        self.output_name: str = output.name
        self.output_shape: list[int | str | None] = list(output.shape)

    def run(self, x: np.ndarray) -> np.ndarray:
        # No-op (no copy) for the float32 C-contiguous arrays the bench feeds; a copy only for odd inputs.
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        try:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as exc:  # wrong shape/dtype for this graph: the user's input, not our bug
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise UserError(
                f"{self.path.name} rejected input {list(x.shape)} (expects {self.input_shape}): "
                f"{_one_line(exc)}",
                hint="check the input shape and batch size",
            ) from None

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
        }

    def __repr__(self) -> str:
        return f"OrtCpuRuntime({str(self.path)!r}, threads={self.threads}, name={self.name!r})"
