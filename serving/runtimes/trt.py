"""TensorRT as a runtime: a serialised engine (.plan/.engine) run through the TRT 10/11 tensor-name API.

Why it is built this way:
- ``import tensorrt`` happens inside the constructor: CPU-only installs never need it, and a missing one
  is a one-line error that says what to install (PyPI alone cannot provide it, see baseline.md §6).
- Tensor-name I/O only (``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``, ``set_input_shape``,
  ``set_tensor_address``, ``execute_async_v3``): the binding-index API was removed in TRT 10.
- Device buffers are torch CUDA tensors (no pycuda): one input and one set of outputs per input shape,
  allocated once, so no allocation is timed; their memory shows in ``torch.cuda.max_memory_allocated``.
- One execution context and one CUDA stream for the runtime's life (TensorRT#4015: creating them per call
  is a classic benchmark bug), and a stream synchronise before ``run`` returns (TensorRT#3747).
- Transfers as in the other device runtimes: excluded by default (``stage(x)`` copies the input ahead of
  time, runs on that array object reuse it; the output is copied on demand); ``include_transfer=True``
  times both copies.
- A JSON sidecar next to the engine (``model.plan.json``, else ``model.json``), written by the exporter,
  says how the engine was built (precision, shapes, TensorRT version); ``describe()`` reports it, and a
  deserialisation failure says when the engine was built by another TensorRT version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy.errors import UserError

from .base import DeviceOutput, MeasuresMemory, cuda_device_info

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
_LIBS_HINT = "install the TensorRT libraries (libnvinfer) matching the Python package"


def import_tensorrt() -> Any:
    """``tensorrt``, or a one-line UserError saying what is missing (module, libraries, real package)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        if getattr(exc, "name", None) in (None, "tensorrt"):
            raise UserError("TensorRT is not installed: pip install tensorrt (needs NVIDIA's package index) "
                            "and a CUDA GPU", hint="or use --runtime ort-cuda / torch-cuda") from None
        raise UserError(f"TensorRT is installed but cannot be loaded ({exc})", hint=_LIBS_HINT) from None
    except OSError as exc:  # a shared library the bindings link against is missing
        raise UserError(f"TensorRT is installed but its libraries cannot be loaded ({exc})",
                        hint=_LIBS_HINT) from None
    if not hasattr(trt, "Runtime"):  # PyPI's placeholder wheels import but have no API
        version = getattr(trt, "__version__", "?")
        raise UserError(f"the installed 'tensorrt' package ({version}) is a placeholder without the "
                        "TensorRT API", hint="pip install tensorrt from NVIDIA's package index")
    return trt


def read_sidecar(path: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """(metadata, problem) from ``<engine>.json`` or ``<stem>.json``; a bad sidecar never blocks a run."""
    path = Path(path)
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate == path or not candidate.is_file():
            continue
        try:
            data = json.loads(candidate.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, f"{candidate.name}: {exc}"
        if not isinstance(data, dict):
            return None, f"{candidate.name}: not a JSON object"
        return {"path": str(candidate), **data}, None
    return None, None


def _torch_dtype(trt: Any, torch: Any, trt_dtype: Any) -> Any:
    pairs = (("FLOAT", "float32"), ("HALF", "float16"), ("BF16", "bfloat16"), ("INT8", "int8"),
             ("INT32", "int32"), ("INT64", "int64"), ("BOOL", "bool"), ("UINT8", "uint8"),
             ("FP8", "float8_e4m3fn"))
    for trt_name, torch_name in pairs:
        if hasattr(trt.DataType, trt_name) and trt_dtype == getattr(trt.DataType, trt_name) \
                and hasattr(torch, torch_name):
            return getattr(torch, torch_name)
    raise UserError(f"engine tensor type {trt_dtype} is not supported by the lrdeploy TensorRT runtime",
                    hint="export with float32/float16/bfloat16/int inputs and outputs")


@dataclass
class _Buffers:
    """Device tensors for one input shape; ``generation`` counts runs that overwrote the outputs."""

    shape: tuple[int, ...]
    input: Any
    outputs: dict[str, Any]
    staged: np.ndarray | None = None
    generation: int = 0
    output_shapes: dict[str, list[int]] = field(default_factory=dict)


class TrtRuntime(MeasuresMemory):
    """A deserialised TensorRT engine on GPU ``device_id``; single-input engines, first output returned."""

    backend = "tensorrt"

    def __init__(self, path: str | Path, threads: int | None = None, *, name: str = "trt", device_id: int = 0,
                 include_transfer: bool = False) -> None:
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise UserError("the TensorRT runtime needs a CUDA GPU, and torch sees none",
                            hint="run on a machine with an NVIDIA GPU and a CUDA build of torch")
        self._trt, self._torch = trt, torch
        self.path = Path(path)
        self.name = name
        self.threads = threads  # TensorRT has no host thread pool to pin; recorded as given
        self.include_transfer = bool(include_transfer)
        self.device = torch.device("cuda", int(device_id))
        self.cuda_device_index = int(device_id)
        if not self.path.is_file():
            raise UserError(f"TensorRT engine not found: {self.path}", hint="check the path or rebuild it")
        if self.path.stat().st_size == 0:
            raise UserError(f"{self.path} is empty: not a TensorRT engine", hint="rebuild it")
        self.sidecar, self.sidecar_error = read_sidecar(self.path)

        with torch.cuda.device(self.device):
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._trt_runtime = trt.Runtime(self._logger)
            self.engine = self._trt_runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                built = (self.sidecar or {}).get("tensorrt_version") or (self.sidecar or {}).get("tensorrt")
                why = (f"built with TensorRT {built}" if built and str(built) != trt.__version__
                       else "corrupt, or built for another GPU / TensorRT version")
                raise UserError(f"TensorRT {trt.__version__} cannot deserialise {self.path} ({why})",
                                hint="rebuild the engine on this machine: engines are specific to the "
                                     "TensorRT version and GPU")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise UserError(f"TensorRT could not create an execution context for {self.path} "
                                "(out of GPU memory?)", hint="free GPU memory or use a smaller engine")
            self.stream = torch.cuda.Stream(self.device)

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.input_names) != 1:
            listed = ", ".join(self.input_names)
            raise UserError(f"{self.path} has {len(self.input_names)} inputs ({listed}); lrdeploy serving "
                            "runs single-input models", hint="export with one input tensor")
        if not self.output_names:
            raise UserError(f"{self.path} has no outputs", hint="rebuild the engine")
        self.input_name = self.input_names[0]
        self._dtypes = {n: _torch_dtype(trt, torch, self.engine.get_tensor_dtype(n)) for n in names}
        self._buffers: dict[tuple[int, ...], _Buffers] = {}
        self._active: tuple[int, ...] | None = None
        self._np_dtypes: dict[Any, np.dtype] = {}

    # ------------------------------------------------------------------------------------------ buffers
    def _profile(self) -> str:
        try:
            lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
            return f"the engine accepts {list(lo)} to {list(hi)}"
        except Exception:  # static engines have no profile
            return f"the engine was built for {list(self.engine.get_tensor_shape(self.input_name))}"

    def _buffers_for(self, shape: tuple[int, ...]) -> _Buffers:
        """Buffers for ``shape``, with the context's input shape and tensor addresses pointing at them."""
        buf = self._buffers.get(shape)
        switching = buf is None or self._active != shape
        if switching and not self.context.set_input_shape(self.input_name, shape):
            self._active = None  # the context's shape is now unknown: set it again on the next call
            raise UserError(f"{self.path.name} rejected input {list(shape)}: {self._profile()}",
                            hint="check the input shape and batch size, or rebuild with a wider profile")
        if buf is None:
            torch = self._torch
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                inp = torch.empty(shape, dtype=self._dtypes[self.input_name], device=self.device)
                outputs, shapes = {}, {}
                for n in self.output_names:
                    out_shape = [int(d) for d in self.context.get_tensor_shape(n)]
                    if any(d < 0 for d in out_shape):
                        raise UserError(f"{self.path.name}: output {n!r} has a data-dependent shape "
                                        f"{out_shape}, which this runtime does not support")
                    outputs[n] = torch.empty(out_shape, dtype=self._dtypes[n], device=self.device)
                    shapes[n] = out_shape
            buf = self._buffers[shape] = _Buffers(shape, inp, outputs, output_shapes=shapes)
        if self._active != shape:
            self.context.set_tensor_address(self.input_name, buf.input.data_ptr())
            for n, t in buf.outputs.items():
                self.context.set_tensor_address(n, t.data_ptr())
            self._active = shape
        return buf

    def _host(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if self._dtypes[self.input_name].is_floating_point:
            return np.ascontiguousarray(x, dtype=np.float32)  # cast to the engine's dtype on the device
        return np.ascontiguousarray(x)

    def _copy_in(self, buf: _Buffers, x: np.ndarray) -> None:
        buf.input.copy_(self._torch.from_numpy(self._host(x)))  # on self.stream (the caller's context)

    def _to_host(self, t: Any) -> np.ndarray:
        if t.dtype == self._torch.bfloat16 or "float8" in str(t.dtype):
            t = t.float()  # numpy has no bfloat16/fp8
        return t.cpu().numpy()

    def stage(self, x: np.ndarray) -> None:
        """Copy ``x`` into the device input buffer for its shape, untimed; runs on this array reuse it.

        Matched by identity, not content: after changing ``x`` in place, stage it again.
        """
        if self.include_transfer:
            return
        torch = self._torch
        buf = self._buffers_for(tuple(np.shape(x)))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self._copy_in(buf, x)
        self.stream.synchronize()
        buf.staged = x

    # ------------------------------------------------------------------------------------------ running
    def run(self, x: np.ndarray) -> Any:
        torch = self._torch
        buf = self._buffers_for(tuple(np.shape(x)))
        first = buf.outputs[self.output_names[0]]
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if self.include_transfer or buf.staged is not x:
                self._copy_in(buf, x)
                buf.staged = None  # the staged array's copy is gone from the buffer
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.path.name} (see its log)")
            buf.generation += 1
            if self.include_transfer:
                host = self._to_host(first)  # device→host on self.stream, blocking
                self.stream.synchronize()
                return host
        self.stream.synchronize()
        return DeviceOutput(lambda: self._to_host(first), first.shape, self._numpy_dtype(first.dtype),
                            owner=buf)

    def _numpy_dtype(self, torch_dtype: Any) -> np.dtype:
        cached = self._np_dtypes.get(torch_dtype)
        if cached is None:
            cached = self._np_dtypes[torch_dtype] = self._to_host(
                self._torch.empty(0, dtype=torch_dtype, device=self.device)).dtype
        return cached

    # ------------------------------------------------------------------------------------------ describing
    def describe(self) -> dict[str, Any]:
        trt, engine = self._trt, self.engine
        activation = getattr(engine, "device_memory_size_v2", None)
        if activation is None:
            activation = getattr(engine, "device_memory_size", None)
        tensors = {n: {"mode": "input" if n in self.input_names else "output",
                       "shape": [int(d) for d in engine.get_tensor_shape(n)],
                       "dtype": str(self._dtypes[n]).replace("torch.", "")}
                   for n in (*self.input_names, *self.output_names)}
        gpu = cuda_device_info(self.cuda_device_index)
        return {
            "backend": self.backend,
            "device": str(self.device),
            "device_name": gpu.get("name"),
            "providers": [f"tensorrt-{trt.__version__}"],
            "threads": self.threads,
            "version": trt.__version__,
            "path": str(self.path),
            "include_transfer": self.include_transfer,
            "transfers": ("timed (host→device and device→host in every run)" if self.include_transfer
                          else "excluded for staged inputs (stage(x)); output copied on demand"),
            "tensors": tensors,
            "optimization_profiles": int(engine.num_optimization_profiles),
            "activation_memory_bytes": int(activation) if activation is not None else None,
            "sidecar": self.sidecar,
            "sidecar_error": self.sidecar_error,
            "gpu": gpu,
            "cuda": self._torch.version.cuda,
            "driver": gpu.get("driver_version"),
            "memory": self.last_memory,
        }

    def __repr__(self) -> str:
        return f"TrtRuntime({str(self.path)!r}, device={str(self.device)!r}, name={self.name!r})"
