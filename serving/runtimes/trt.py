"""TensorRT as a runtime: a serialised engine (.plan/.engine) run through the TRT 10/11 tensor-name API.

Why it is built this way:
- ``import tensorrt`` happens inside the constructor: CPU-only installs never need it, and a missing one
  is a one-line error that says what to install (PyPI alone cannot provide it, see baseline.md §6).
- Tensor-name I/O only (``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``, ``set_input_shape``,
  ``set_tensor_address``, ``execute_async_v3``): the binding-index API was removed in TRT 10.
- Named inputs and outputs, any number of each: ``set_input_shape`` for every input, then every output's
  shape from the context. Device buffers are torch CUDA tensors (no pycuda): one set of inputs and outputs
  per combination of input shapes, allocated once, so no allocation is timed; their memory shows in
  ``torch.cuda.max_memory_allocated``.
- One execution context and one CUDA stream for the runtime's life (TensorRT#4015: creating them per call
  is a classic benchmark bug), and a stream synchronise before ``run`` returns (TensorRT#3747).
- Transfers as in the other device runtimes: excluded by default (``stage(feeds)`` copies the inputs ahead
  of time, runs on those array objects reuse them; outputs are copied on demand); ``include_transfer=True``
  times every copy.
- A JSON sidecar next to the engine (``model.plan.json``, else ``model.json``), written by the exporter,
  says how the engine was built (precision, shapes, TensorRT version); ``describe()`` reports it, and a
  deserialisation failure says when the engine was built by another TensorRT version.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy.errors import UserError

from .base import DeviceOutput, Feeds, IOInfo, MeasuresMemory, bind_feeds, cuda_device_info

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
    """Device tensors for one combination of input shapes; ``generation`` counts runs that overwrote the
    outputs; ``staged`` holds, per input, the host array object whose copy is in the input buffer."""

    shapes: tuple[tuple[int, ...], ...]
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    staged: dict[str, np.ndarray] = field(default_factory=dict)
    generation: int = 0
    output_shapes: dict[str, list[int]] = field(default_factory=dict)


class TrtRuntime(MeasuresMemory):
    """A deserialised TensorRT engine on GPU ``device_id``: named inputs in, every output out."""

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
        if not self.input_names:
            raise UserError(f"{self.path} has no inputs", hint="rebuild the engine")
        if not self.output_names:
            raise UserError(f"{self.path} has no outputs", hint="rebuild the engine")
        self._dtypes = {n: _torch_dtype(trt, torch, self.engine.get_tensor_dtype(n)) for n in names}
        self._buffers: dict[tuple[tuple[int, ...], ...], _Buffers] = {}
        self._active: tuple[tuple[int, ...], ...] | None = None
        self._np_dtypes: dict[Any, np.dtype] = {}
        self._io = {n: IOInfo(n, self._numpy_dtype(self._dtypes[n]),
                              tuple(None if int(d) < 0 else int(d) for d in self.engine.get_tensor_shape(n)))
                    for n in names}

    def inputs(self) -> list[IOInfo]:
        return [self._io[n] for n in self.input_names]

    def outputs(self) -> list[IOInfo]:
        return [self._io[n] for n in self.output_names]

    # ------------------------------------------------------------------------------------------ buffers
    def _profile(self, name: str) -> str:
        try:
            lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
            return f"the engine accepts {name} {list(lo)} to {list(hi)}"
        except Exception:  # static engines have no profile
            return f"the engine was built for {name} {list(self.engine.get_tensor_shape(name))}"

    def _buffers_for(self, shapes: tuple[tuple[int, ...], ...]) -> _Buffers:
        """Buffers for these input shapes (graph order), with the context's input shapes and every tensor
        address pointing at them."""
        buf = self._buffers.get(shapes)
        if buf is None or self._active != shapes:
            for n, shape in zip(self.input_names, shapes, strict=True):
                if not self.context.set_input_shape(n, shape):
                    self._active = None  # the context's shapes are now unknown: set them again next call
                    raise UserError(f"{self.path.name} rejected input {n} {list(shape)}: {self._profile(n)}",
                                    hint="check the input shape and batch size, or rebuild with a wider "
                                         "profile")
        if buf is None:
            torch = self._torch
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                inputs = {n: torch.empty(s, dtype=self._dtypes[n], device=self.device)
                          for n, s in zip(self.input_names, shapes, strict=True)}
                outputs, out_shapes = {}, {}
                for n in self.output_names:
                    out_shape = [int(d) for d in self.context.get_tensor_shape(n)]
                    if any(d < 0 for d in out_shape):
                        raise UserError(f"{self.path.name}: output {n!r} has a data-dependent shape "
                                        f"{out_shape}, which this runtime does not support")
                    outputs[n] = torch.empty(out_shape, dtype=self._dtypes[n], device=self.device)
                    out_shapes[n] = out_shape
            buf = self._buffers[shapes] = _Buffers(shapes, inputs, outputs, output_shapes=out_shapes)
        if self._active != shapes:
            for n, t in (*buf.inputs.items(), *buf.outputs.items()):
                self.context.set_tensor_address(n, t.data_ptr())
            self._active = shapes
        return buf

    def _bound(self, feeds: Feeds) -> tuple[dict[str, Any], _Buffers]:
        bound = bind_feeds(self.inputs(), feeds, self.path.name)
        shapes = tuple(tuple(int(d) for d in np.shape(bound[n])) for n in self.input_names)
        return bound, self._buffers_for(shapes)

    def _host(self, name: str, x: Any) -> np.ndarray:
        x = np.asarray(x)
        if self._dtypes[name].is_floating_point:
            return np.ascontiguousarray(x, dtype=np.float32)  # cast to the engine's dtype on the device
        return np.ascontiguousarray(x)

    def _copy_in(self, buf: _Buffers, name: str, x: Any) -> None:
        buf.inputs[name].copy_(self._torch.from_numpy(self._host(name, x)))  # on self.stream (caller's)

    def _to_host(self, t: Any) -> np.ndarray:
        if t.dtype == self._torch.bfloat16 or "float8" in str(t.dtype):
            t = t.float()  # numpy has no bfloat16/fp8
        return t.cpu().numpy()

    def stage(self, feeds: Feeds) -> None:
        """Copy every input into the device buffers for their shapes, untimed; runs on these same array
        objects reuse them. Matched by identity, not content: after changing an array in place, stage it
        again."""
        if self.include_transfer:
            return
        torch = self._torch
        bound, buf = self._bound(feeds)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for n, x in bound.items():
                self._copy_in(buf, n, x)
        self.stream.synchronize()
        buf.staged = dict(bound)

    # ------------------------------------------------------------------------------------------ running
    def run(self, feeds: Feeds) -> dict[str, Any]:
        torch = self._torch
        bound, buf = self._bound(feeds)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for n, x in bound.items():
                if self.include_transfer or buf.staged.get(n) is not x:
                    self._copy_in(buf, n, x)
                    buf.staged.pop(n, None)  # the staged array's copy is gone from the buffer
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.path.name} (see its log)")
            buf.generation += 1
            if self.include_transfer:
                hosts = {n: self._to_host(t) for n, t in buf.outputs.items()}  # on self.stream, blocking
                self.stream.synchronize()
                return hosts
        self.stream.synchronize()
        return {n: DeviceOutput(functools.partial(self._to_host, t), t.shape, self._numpy_dtype(t.dtype),
                                owner=buf) for n, t in buf.outputs.items()}

    def _numpy_dtype(self, torch_dtype: Any) -> np.dtype:
        cached = self._np_dtypes.get(torch_dtype)
        if cached is None:
            probe = self._torch.empty(0, dtype=torch_dtype)  # a host probe: the dtype _to_host yields
            cached = self._np_dtypes[torch_dtype] = self._to_host(probe).dtype
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
            "inputs": [i.describe() for i in self.inputs()],
            "outputs": [o.describe() for o in self.outputs()],
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


def load(source: Path, *, threads: int | None, name: str, device_id: int = 0, include_transfer: bool = False,
         **_: Any) -> TrtRuntime:
    """The registry's loader (``trt``)."""
    return TrtRuntime(source, threads=threads, name=name, device_id=device_id,
                      include_transfer=include_transfer)
