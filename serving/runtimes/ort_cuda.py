"""ONNX Runtime on a GPU (CUDA execution provider), with I/O binding so a timed call times the model.

Why it is built this way:
- The session comes from :func:`ort_session.make_session`: ``[CUDAExecutionProvider, CPUExecutionProvider]``,
  and a session whose first provider in use is not CUDA is an error, never a CPU benchmark labelled "GPU".
- I/O binding (ORT issue #8166: "GPU 5x slower" was host↔device copies inside the timing), by input and
  output name, so models with several inputs (token ids + attention mask) and outputs run the same way. With
  ``include_transfer=False`` (the default, as trtexec) ``stage(feeds)`` copies each input to the device ahead
  of time (the bench calls it before warm-up) and binds it; runs on those same array objects use them, and
  each ``run`` binds every output on the device and returns :class:`DeviceOutput` values that are copied to
  the host only when converted (``np.asarray``). Arrays that were not staged are bound from the host (ORT
  copies them inside the call). With ``include_transfer=True`` each ``run`` binds the host arrays and host
  outputs, so ORT does every copy inside the call (what a user serving numpy requests pays).
- ``synchronize_outputs()`` before returning, so a clock read after ``run`` sees finished work.

:class:`OrtIoBindingRuntime` is provider-generic; on ``CPUExecutionProvider`` with ``device_type="cpu"``
it runs the same binding code on any machine, which is how the CPU test suite exercises it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .base import DeviceOutput, Feeds, IOInfo, MeasuresMemory, bind_feeds, cuda_device_info, resolve_threads
from .ort_session import (
    CPU_PROVIDER,
    ORT_DTYPES,
    make_session,
    rejected_input,
    session_io,
    session_settings,
)

CUDA_PROVIDER = "CUDAExecutionProvider"


class OrtIoBindingRuntime(MeasuresMemory):
    """An ORT session on ``provider`` fed through I/O binding on ``device_type:device_id``.

    A staged copy is matched by identity, not content: after changing a staged array in place, stage it
    again.
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, *, name: str = "ort-cuda",
                 provider: str = CUDA_PROVIDER, device_type: str = "cuda", device_id: int = 0,
                 include_transfer: bool = False, provider_options: dict[str, Any] | None = None,
                 check_available: bool = True) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.name = name
        self.threads = resolve_threads(threads)
        self.provider = provider
        self.device_type = device_type
        self.device_id = int(device_id)
        self.include_transfer = bool(include_transfer)
        self.cuda_device_index = self.device_id if device_type == "cuda" else None
        options = dict(provider_options or {})
        if provider != CPU_PROVIDER:
            options.setdefault("device_id", self.device_id)
        providers: list[Any] = [(provider, options)] if options else [provider]
        if provider != CPU_PROVIDER:
            providers.append(CPU_PROVIDER)  # for the few nodes the GPU provider does not implement
        self.session = make_session(self.path, providers, threads=self.threads,
                                    check_available=check_available)
        self.providers: list[str] = list(self.session.get_providers())
        self.version: str = ort.__version__
        self._ort = ort
        self.io = session_io(self.session)
        self._binding = self.session.io_binding()
        # input name -> (the host array object whose device copy is bound, that OrtValue)
        self._staged: dict[str, tuple[np.ndarray, Any]] = {}
        self._host_bound: dict[str, np.ndarray] = {}  # host arrays bound with bind_cpu_input, kept alive

    @property
    def device(self) -> str:
        return self.device_type if self.device_type == "cpu" else f"{self.device_type}:{self.device_id}"

    def inputs(self) -> list[IOInfo]:
        return list(self.io.inputs)

    def outputs(self) -> list[IOInfo]:
        return list(self.io.outputs)

    def _host(self, info: IOInfo, x: Any) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=info.dtype)

    def stage(self, feeds: Feeds) -> None:
        """Copy every input to the device and bind it, untimed; later runs on these same array objects reuse
        the copies."""
        if self.include_transfer:
            return
        bound = bind_feeds(self.io.inputs, feeds, self.path.name)
        for i in self.io.inputs:
            host = self._host(i, bound[i.name])
            value = self._ort.OrtValue.ortvalue_from_numpy(host, self.device_type, self.device_id)
            self._binding.bind_ortvalue_input(i.name, value)
            self._staged[i.name] = (bound[i.name], value)
            self._host_bound.pop(i.name, None)
        self._binding.synchronize_inputs()

    def run(self, feeds: Feeds) -> dict[str, Any]:
        binding, names = self._binding, self.io.output_names
        bound = bind_feeds(self.io.inputs, feeds, self.path.name)
        for i in self.io.inputs:
            x, staged = bound[i.name], self._staged.get(i.name)
            if self.include_transfer or staged is None or staged[0] is not x:
                host = self._host(i, x)
                binding.bind_cpu_input(i.name, host)  # ORT copies it in inside run
                self._host_bound[i.name] = host
                self._staged.pop(i.name, None)  # the staged copy is no longer bound
        for n in names:
            if self.include_transfer:
                binding.bind_output(n, "cpu")  # … and the outputs back
            else:
                binding.bind_output(n, self.device_type, self.device_id)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # run_with_iobinding reports a bad input shape as a plain RuntimeError
            if not (type(exc).__module__.startswith("onnxruntime") or isinstance(exc, RuntimeError)):
                raise
            self._staged.clear()
            raise rejected_input(self.path, bound, self.io, exc) from None
        binding.synchronize_outputs()
        if self.include_transfer:
            return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))
        values = binding.get_outputs()  # fresh ORT allocations each run: no later run overwrites them
        return {n: DeviceOutput(v.numpy, v.shape(), ORT_DTYPES.get(v.data_type(), np.float32))
                for n, v in zip(names, values, strict=True)}

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            **session_settings(self),
            "io_binding": True,
            "include_transfer": self.include_transfer,
            "transfers": "timed (host inputs and outputs bound)" if self.include_transfer
            else "excluded for staged inputs (stage(feeds)); outputs copied on demand",
            **self.io.describe(),
            "memory": self.last_memory,
        }
        if self.device_type == "cuda":
            d["provider_options"] = self.session.get_provider_options().get(self.provider, {})
            d["gpu"] = cuda_device_info(self.device_id)
        return d

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, provider={self.provider!r}, "
                f"device={self.device!r}, include_transfer={self.include_transfer}, name={self.name!r})")


class OrtCudaRuntime(OrtIoBindingRuntime):
    """ONNX Runtime's CUDA execution provider on GPU ``device_id`` (see the module docstring)."""

    def __init__(self, path: str | Path, threads: int | None = None, *, name: str = "ort-cuda",
                 device_id: int = 0, include_transfer: bool = False,
                 provider_options: dict[str, Any] | None = None) -> None:
        super().__init__(path, threads, name=name, provider=CUDA_PROVIDER, device_type="cuda",
                         device_id=device_id, include_transfer=include_transfer,
                         provider_options=provider_options)


def load(source: Path, *, threads: int | None, name: str, device_id: int = 0, include_transfer: bool = False,
         **_: Any) -> OrtCudaRuntime:
    """The registry's loader (``ort-cuda``)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        from lrdeploy.errors import UserError

        raise UserError(f"onnxruntime is not installed ({exc})", hint="pip install onnxruntime-gpu") from None
    return OrtCudaRuntime(source, threads=threads, name=name, device_id=device_id,
                          include_transfer=include_transfer)
