"""PyTorch as a runtime (CPU or CUDA; eager or CUDA-graph replay): the "before export" side of a comparison.

Why it is built this way:
- Eval mode and ``torch.inference_mode`` so dropout/BN behave as deployed and no autograd bookkeeping is
  timed. Threads pinned with ``torch.set_num_threads`` (process-global in torch, so re-asserted on each
  call, a cheap integer check) because torch's default would make it incomparable with a pinned ORT session.
- The module is moved to the device/dtype on a copy when it is not already there, so a ``torch-cpu``
  reference and a ``torch-cuda`` candidate built from the same module do not move each other's weights.
- Transfers (trtexec's ``--includeDataTransfers``, off by default): with ``include_transfer=False``,
  ``stage(x)`` copies ``x`` to the device ahead of time (the bench calls it before warm-up) and runs on that
  same array object reuse the copy; a CUDA run returns a :class:`DeviceOutput` that is copied to the host
  only when converted. Arrays that were not staged are copied in ``run`` (correct, just not free). With
  ``include_transfer=True`` every ``run`` copies host→device and device→host, and ``stage`` does nothing.
- CUDA work is asynchronous: ``torch.cuda.synchronize`` before returning, so a clock read after ``run`` is
  honest (TensorRT#3747: 197 ms vs "1 ms" without a sync).
- ``mode="cuda-graph"``: one ``torch.cuda.CUDAGraph`` per input shape with static input/output buffers,
  captured on first use after a warm-up on a side stream (the recipe in torch's CUDA-graph docs), then
  replayed: launch overhead disappears, as with trtexec's default ``--useCudaGraph``. A graph's output
  buffer is overwritten by the next replay, so its outputs refuse to convert once stale.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from lrdeploy.errors import UserError

from .base import DeviceOutput, MeasuresMemory, cuda_device_info, resolve_threads

MODES = ("eager", "cuda-graph")
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16",
           "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass
class _Graph:
    """One captured graph: its static buffers, the staged host array they hold (if any), a replay count."""

    graph: Any
    static_in: Any
    static_out: Any
    staged: np.ndarray | None = None
    generation: int = 0


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


class TorchRuntime(MeasuresMemory):
    """Run an ``nn.Module`` (put in eval mode in place) on ``device`` in ``mode`` at ``dtype``."""

    backend = "torch"

    def __init__(self, module: Any, device: str = "cpu", threads: int | None = None, *,
                 name: str | None = None, mode: str = "eager", include_transfer: bool = False,
                 dtype: str = "float32", graph_warmup: int = 3) -> None:
        import torch

        self._torch = torch
        self.threads = resolve_threads(threads)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise UserError(f"unknown torch device {device!r}: {exc}", hint="use 'cpu' or 'cuda'") from None
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                cuda = torch.version.cuda
                build = "a CPU-only build" if cuda is None else f"built for CUDA {cuda}"
                raise UserError(f"device 'cuda' requested but torch {torch.__version__} ({build}) sees no "
                                "CUDA GPU", hint="use --runtime torch-cpu, or install a CUDA build of torch")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.device.type != "cpu":
            raise UserError(f"unsupported torch device {device!r}", hint="use 'cpu' or 'cuda'")
        if mode not in MODES:
            raise UserError(f"unknown torch mode {mode!r}", hint=f"choose one of: {', '.join(MODES)}")
        if mode == "cuda-graph" and self.device.type != "cuda":
            raise UserError("mode 'cuda-graph' needs a CUDA device",
                            hint="use --runtime torch-cuda, or mode eager")
        if str(dtype) not in _DTYPES:
            raise UserError(f"unknown dtype {dtype!r}", hint="choose one of: float32, float16, bfloat16")
        if not isinstance(module, torch.nn.Module):
            raise UserError(f"the torch runtimes need a torch.nn.Module, got {type(module).__name__}",
                            hint="for an .onnx file use --runtime ort-cpu or ort-cuda")
        self.mode = mode
        self.dtype_name = _DTYPES[str(dtype)]
        self.dtype = getattr(torch, self.dtype_name)
        self.include_transfer = bool(include_transfer)
        self.graph_warmup = int(graph_warmup)
        self.name = name or f"torch-{self.device.type}"
        self.cuda_device_index = self.device.index if self.device.type == "cuda" else None
        self.module = self._place(module.eval())
        self._staged_host: np.ndarray | None = None
        self._staged: Any = None
        self._graphs: dict[tuple[tuple[int, ...], str], _Graph] = {}
        self._np_dtypes: dict[Any, np.dtype] = {}
        torch.set_num_threads(self.threads)

    def _place(self, module: Any) -> Any:
        """The module on our device/dtype: itself when already there, else a moved copy (see module doc)."""
        tensors = [*module.parameters(), *module.buffers()]
        floats = [t for t in tensors if t.is_floating_point()]
        if all(t.device == self.device for t in tensors) and all(t.dtype == self.dtype for t in floats):
            return module
        return copy.deepcopy(module).to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------------------------------ transfers
    def _host(self, x: np.ndarray) -> np.ndarray:
        """Floating inputs as float32 (cast to ``dtype`` on the device); integer inputs (token ids) kept."""
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            return np.ascontiguousarray(x, dtype=np.float32)
        return np.ascontiguousarray(x)

    def _device_dtype(self, t: Any) -> Any:
        return self.dtype if t.is_floating_point() else t.dtype

    def _to_device(self, x: np.ndarray) -> Any:
        """Host array → tensor on our device and dtype (on the CPU at float32: a zero-copy view)."""
        t = self._torch.from_numpy(self._host(x))
        return t.to(device=self.device, dtype=self._device_dtype(t))

    def _to_host(self, t: Any) -> np.ndarray:
        if t.dtype == self._torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        return t.detach().cpu().numpy()

    def stage(self, x: np.ndarray) -> None:
        """Copy ``x`` to the device now (untimed); later runs on this same array object reuse the copy.

        The copy is matched by identity, not content: after changing ``x`` in place, stage it again.
        In cuda-graph mode this also captures the graph for ``x``'s shape.
        """
        if self.include_transfer:
            return
        with self._torch.inference_mode():
            if self.mode == "cuda-graph":
                self._graph_for(x).staged = x
            else:
                self._staged, self._staged_host = self._to_device(x), x

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)  # time the work, not the launch

    def _output(self, out: Any, owner: Any = None) -> Any:
        if self.device.type == "cpu" or self.include_transfer:
            host = self._to_host(out)  # blocking D2H copy for CUDA
            self._sync()
            return host
        self._sync()
        return DeviceOutput(lambda: self._to_host(out), tuple(out.shape), self._numpy_dtype(out.dtype),
                            owner=owner)

    def _numpy_dtype(self, torch_dtype: Any) -> np.dtype:
        """The numpy dtype ``_to_host`` yields for a torch dtype (cached: it is asked on every timed run)."""
        cached = self._np_dtypes.get(torch_dtype)
        if cached is None:
            probe = self._torch.empty(0, dtype=torch_dtype)
            cached = self._np_dtypes[torch_dtype] = self._to_host(probe).dtype
        return cached

    # --------------------------------------------------------------------------------------------- running
    def run(self, x: np.ndarray) -> Any:
        torch = self._torch
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            if self.mode == "cuda-graph":
                g = self._graph_for(x)
                g.graph.replay()
                g.generation += 1
                return self._output(g.static_out, owner=g)
            staged = not self.include_transfer and x is self._staged_host
            t = self._staged if staged else self._to_device(x)
            return self._output(_first(self.module(t)))

    def _graph_for(self, x: np.ndarray) -> _Graph:
        """The graph for ``x``'s shape (captured on first use) with ``x`` in its static input buffer."""
        host = self._host(x)
        key = (tuple(host.shape), host.dtype.str)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(host)  # leaves ``x`` in the static input
        elif self.include_transfer or g.staged is not x:
            g.static_in.copy_(self._torch.from_numpy(host))
            g.staged = None  # the staged array's copy is gone from the buffer
        return g

    def _capture(self, host: np.ndarray) -> _Graph:
        torch = self._torch
        src = torch.from_numpy(host)
        with torch.cuda.device(self.device):
            static_in = torch.empty(src.shape, dtype=self._device_dtype(src), device=self.device)
            static_in.copy_(src)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(side):  # kernel selection, cuBLAS workspaces… before capture
                    for _ in range(max(1, self.graph_warmup)):
                        self.module(static_in)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = _first(self.module(static_in))
            except RuntimeError as exc:  # e.g. a host sync (.item(), data-dependent shapes) inside forward
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"cannot capture a CUDA graph of {type(self.module).__name__} at input "
                                f"{list(host.shape)}: {msg}", hint="use mode eager") from None
        return _Graph(graph, static_in, static_out)

    # ------------------------------------------------------------------------------------------- describing
    def describe(self) -> dict[str, Any]:
        torch = self._torch
        d: dict[str, Any] = {
            "backend": self.backend,
            "device": str(self.device),
            "providers": [f"torch-{self.mode}-{self.device.type}"],
            "mode": self.mode,
            "dtype": self.dtype_name,
            "threads": self.threads,
            "include_transfer": self.include_transfer,
            "version": torch.__version__,
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
            "module": type(self.module).__name__,
            "memory": self.last_memory,
        }
        if self.device.type == "cuda":
            d["transfers"] = ("timed (host→device and device→host in every run)" if self.include_transfer
                              else "excluded for staged inputs (stage(x)); output copied on demand")
            d["gpu"] = cuda_device_info(self.device.index)
            d["device_name"] = d["gpu"].get("name")
            d["cuda"] = torch.version.cuda
            d["driver"] = d["gpu"].get("driver_version")
        if self.mode == "cuda-graph":
            d["graphs"] = [list(shape) for shape, _ in self._graphs]
        return d

    def __repr__(self) -> str:
        module = type(self.module).__name__
        return (f"TorchRuntime({module}, device={str(self.device)!r}, mode={self.mode!r}, "
                f"dtype={self.dtype_name!r}, threads={self.threads})")
