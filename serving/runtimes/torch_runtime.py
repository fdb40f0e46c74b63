"""PyTorch as a runtime (CPU or CUDA; eager or CUDA-graph replay): the "before export" side of a comparison.

Why it is built this way:
- Eval mode and ``torch.inference_mode`` so dropout/BN behave as deployed and no autograd bookkeeping is
  timed. Threads pinned with ``torch.set_num_threads`` (process-global in torch, so re-asserted on each
  call, a cheap integer check) because torch's default would make it incomparable with a pinned ORT session.
- The module is moved to the device/dtype on a copy when it is not already there, so a ``torch-cpu``
  reference and a ``torch-cuda`` candidate built from the same module do not move each other's weights.
- Named inputs and outputs: the module's ``input_names``/``output_names`` (the protocol of
  ``lrdeploy.models.inputs``), else ``input``/``output``; inputs are passed to ``forward`` in that order and
  a tuple, list or mapping of outputs is returned by name.
- Transfers (trtexec's ``--includeDataTransfers``, off by default): with ``include_transfer=False``,
  ``stage(feeds)`` copies the inputs to the device ahead of time (the bench calls it before warm-up) and runs
  on those same array objects reuse the copies; a CUDA run returns :class:`DeviceOutput` values that are
  copied to the host only when converted. Arrays that were not staged are copied in ``run`` (correct, just
  not free). With ``include_transfer=True`` every ``run`` copies host→device and device→host, and ``stage``
  does nothing.
- CUDA work is asynchronous: ``torch.cuda.synchronize`` before returning, so a clock read after ``run`` is
  honest (TensorRT#3747: 197 ms vs "1 ms" without a sync).
- ``mode="cuda-graph"``: one ``torch.cuda.CUDAGraph`` per set of input shapes with static input/output
  buffers, captured on first use after a warm-up on a side stream (the recipe in torch's CUDA-graph docs),
  then replayed: launch overhead disappears, as with trtexec's default ``--useCudaGraph``. A graph's output
  buffer is overwritten by the next replay, so its outputs refuse to convert once stale.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lrdeploy.errors import UserError

from .base import DeviceOutput, Feeds, IOInfo, MeasuresMemory, bind_feeds, cuda_device_info, resolve_threads

MODES = ("eager", "cuda-graph")
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16",
           "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass
class _Graph:
    """One captured graph: static buffers, the staged host arrays they hold (per input), a replay count."""

    graph: Any
    static_in: dict[str, Any]
    static_out: dict[str, Any]
    staged: dict[str, np.ndarray] = field(default_factory=dict)
    generation: int = 0


class TorchRuntime(MeasuresMemory):
    """Run an ``nn.Module`` (put in eval mode in place) on ``device`` in ``mode`` at ``dtype``.

    ``input_shape`` (one sample, e.g. ``(1, 28, 28)``) declares the shape of a one-input module that does
    not describe its inputs itself, for :meth:`inputs`.
    """

    backend = "torch"

    def __init__(self, module: Any, device: str = "cpu", threads: int | None = None, *,
                 name: str | None = None, mode: str = "eager", include_transfer: bool = False,
                 dtype: str = "float32", graph_warmup: int = 3,
                 input_shape: tuple[int, ...] | None = None) -> None:
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
        self.input_names = tuple(getattr(module, "input_names", ()) or ("input",))
        self.output_names = tuple(getattr(module, "output_names", ()) or ("output",))
        self._inputs = _declared_inputs(module, self.input_names, input_shape)
        self.module = self._place(module.eval())
        self._staged: dict[str, tuple[np.ndarray, Any]] = {}  # input name -> (host array, device copy)
        self._graphs: dict[tuple[tuple[tuple[int, ...], str], ...], _Graph] = {}
        self._np_dtypes: dict[Any, np.dtype] = {}
        torch.set_num_threads(self.threads)

    def inputs(self) -> list[IOInfo]:
        return list(self._inputs)

    def outputs(self) -> list[IOInfo]:
        return [IOInfo(n, np.dtype(np.float32), None) for n in self.output_names]

    def _place(self, module: Any) -> Any:
        """The module on our device/dtype: itself when already there, else a moved copy (see module doc)."""
        tensors = [*module.parameters(), *module.buffers()]
        floats = [t for t in tensors if t.is_floating_point()]
        if all(t.device == self.device for t in tensors) and all(t.dtype == self.dtype for t in floats):
            return module
        return copy.deepcopy(module).to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------------------------------ transfers
    def _host(self, x: Any) -> np.ndarray:
        """Floating inputs as float32 (cast to ``dtype`` on the device); integer inputs (token ids) kept."""
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            return np.ascontiguousarray(x, dtype=np.float32)
        return np.ascontiguousarray(x)

    def _device_dtype(self, t: Any) -> Any:
        return self.dtype if t.is_floating_point() else t.dtype

    def _to_device(self, x: Any) -> Any:
        """Host array → tensor on our device and dtype (on the CPU at float32: a zero-copy view)."""
        t = self._torch.from_numpy(self._host(x))
        return t.to(device=self.device, dtype=self._device_dtype(t))

    def _to_host(self, t: Any) -> np.ndarray:
        if t.dtype == self._torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        return t.detach().cpu().numpy()

    def _bind(self, feeds: Feeds) -> dict[str, Any]:
        return bind_feeds(self._inputs, feeds, f"{type(self.module).__name__} ({self.name})")

    def stage(self, feeds: Feeds) -> None:
        """Copy the inputs to the device now (untimed); later runs on these same array objects reuse the
        copies. Matched by identity, not content: after changing an array in place, stage it again.
        In cuda-graph mode this also captures the graph for these input shapes.
        """
        if self.include_transfer:
            return
        bound = self._bind(feeds)
        with self._torch.inference_mode():
            if self.mode == "cuda-graph":
                self._graph_for(bound).staged = dict(bound)
            else:
                self._staged = {n: (x, self._to_device(x)) for n, x in bound.items()}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)  # time the work, not the launch

    def _outputs(self, outs: Mapping[str, Any], owner: Any = None) -> dict[str, Any]:
        if self.device.type == "cpu" or self.include_transfer:
            hosts = {n: self._to_host(t) for n, t in outs.items()}  # blocking D2H copies for CUDA
            self._sync()
            return hosts
        self._sync()
        return {n: DeviceOutput(functools.partial(self._to_host, t), tuple(t.shape),
                                self._numpy_dtype(t.dtype), owner=owner) for n, t in outs.items()}

    def _named(self, out: Any) -> dict[str, Any]:
        """The module's output(s) by name: a tensor, a tuple/list in ``output_names`` order, or a mapping
        (a Hugging Face ``ModelOutput``), whose tensor entries keep their own names."""
        if isinstance(out, Mapping):
            return {str(k): v for k, v in out.items() if isinstance(v, self._torch.Tensor)}
        outs = out if isinstance(out, (tuple, list)) else (out,)
        names = [*self.output_names, *(f"output_{i}" for i in range(len(self.output_names), len(outs)))]
        return {n: t for n, t in zip(names, outs, strict=False) if isinstance(t, self._torch.Tensor)}

    def _numpy_dtype(self, torch_dtype: Any) -> np.dtype:
        """The numpy dtype ``_to_host`` yields for a torch dtype (cached: it is asked on every timed run)."""
        cached = self._np_dtypes.get(torch_dtype)
        if cached is None:
            probe = self._torch.empty(0, dtype=torch_dtype)
            cached = self._np_dtypes[torch_dtype] = self._to_host(probe).dtype
        return cached

    # --------------------------------------------------------------------------------------------- running
    def run(self, feeds: Feeds) -> dict[str, Any]:
        torch = self._torch
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        bound = self._bind(feeds)
        with torch.inference_mode():
            if self.mode == "cuda-graph":
                g = self._graph_for(bound)
                g.graph.replay()
                g.generation += 1
                return self._outputs(g.static_out, owner=g)
            tensors = []
            for n, x in bound.items():
                staged = self._staged.get(n)
                reuse = not self.include_transfer and staged is not None and staged[0] is x
                tensors.append(staged[1] if reuse else self._to_device(x))
            return self._outputs(self._named(self.module(*tensors)))

    def _graph_for(self, bound: Mapping[str, Any]) -> _Graph:
        """The graph for these input shapes (captured on first use) with the inputs in its static buffers."""
        hosts = {n: self._host(x) for n, x in bound.items()}
        key = tuple((tuple(h.shape), h.dtype.str) for h in hosts.values())
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(hosts)  # leaves the inputs in the static buffers
            return g
        for n, x in bound.items():
            if self.include_transfer or g.staged.get(n) is not x:
                g.static_in[n].copy_(self._torch.from_numpy(hosts[n]))
                g.staged.pop(n, None)  # the staged array's copy is gone from the buffer
        return g

    def _capture(self, hosts: Mapping[str, np.ndarray]) -> _Graph:
        torch = self._torch
        with torch.cuda.device(self.device):
            static_in = {}
            for n, h in hosts.items():
                src = torch.from_numpy(h)
                static_in[n] = torch.empty(src.shape, dtype=self._device_dtype(src), device=self.device)
                static_in[n].copy_(src)
            args = tuple(static_in.values())
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(side):  # kernel selection, cuBLAS workspaces… before capture
                    for _ in range(max(1, self.graph_warmup)):
                        self.module(*args)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self._named(self.module(*args))
            except RuntimeError as exc:  # e.g. a host sync (.item(), data-dependent shapes) inside forward
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                shapes = [list(h.shape) for h in hosts.values()]
                raise UserError(f"cannot capture a CUDA graph of {type(self.module).__name__} at input "
                                f"{shapes[0] if len(shapes) == 1 else shapes}: {msg}",
                                hint="use mode eager") from None
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
            "inputs": [i.describe() for i in self.inputs()],
            "outputs": [o.describe() for o in self.outputs()],
            "memory": self.last_memory,
        }
        if self.device.type == "cuda":
            d["transfers"] = ("timed (host→device and device→host in every run)" if self.include_transfer
                              else "excluded for staged inputs (stage(feeds)); outputs copied on demand")
            d["gpu"] = cuda_device_info(self.device.index)
            d["device_name"] = d["gpu"].get("name")
            d["cuda"] = torch.version.cuda
            d["driver"] = d["gpu"].get("driver_version")
        if self.mode == "cuda-graph":
            d["graphs"] = [[list(shape) for shape, _ in key] for key in self._graphs]
        return d

    def __repr__(self) -> str:
        module = type(self.module).__name__
        return (f"TorchRuntime({module}, device={str(self.device)!r}, mode={self.mode!r}, "
                f"dtype={self.dtype_name!r}, threads={self.threads})")


def _declared_inputs(module: Any, names: tuple[str, ...],
                     input_shape: tuple[int, ...] | None) -> list[IOInfo]:
    """The module's inputs as :class:`IOInfo`: dtypes and shapes from its own ``example_inputs`` and
    ``dynamic_axes`` where it declares them (``lrdeploy.models.inputs``), else a float input of
    ``("batch", *input_shape)`` (rank unknown without ``input_shape``)."""
    make, axes_of = getattr(module, "example_inputs", None), getattr(module, "dynamic_axes", None)
    if callable(make) and getattr(module, "input_names", None):
        example = make(1)
        example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
        axes = axes_of() if callable(axes_of) else {0: "batch"}
        out = []
        for n, t in zip(names, example, strict=False):
            dims = (axes or {}).get(n, {0: "batch"})
            shape = tuple(dims.get(i, int(d)) for i, d in enumerate(t.shape))
            out.append(IOInfo(n, np.dtype(str(t.dtype).replace("torch.", "")), shape))
        return out
    shape = None if input_shape is None else ("batch", *(int(d) for d in input_shape))
    return [IOInfo(n, np.dtype(np.float32), shape) for n in names]


def load(source: Any, *, threads: int | None, name: str, mode: str | None = None,
         include_transfer: bool = False, device_id: int = 0, dtype: str = "float32", device: str = "cpu",
         **_: Any) -> TorchRuntime:
    """The registry's loader (``torch-cpu``; ``torch-cuda`` passes ``device="cuda"``)."""
    where = "cpu" if device == "cpu" else f"cuda:{int(device_id)}"
    return TorchRuntime(source, device=where, threads=threads, name=name, mode=mode or "eager",
                        include_transfer=include_transfer, dtype=dtype or "float32")


def load_cuda(source: Any, **options: Any) -> TorchRuntime:
    """The registry's loader for ``torch-cuda``."""
    return load(source, **{**options, "device": "cuda"})
