"""ONNX Runtime on a GPU (CUDA execution provider), with I/O binding so a timed call times the model.

Why it is built this way:
- The session comes from :func:`ort_session.make_session`: ``[CUDAExecutionProvider, CPUExecutionProvider]``,
  and a session whose first provider in use is not CUDA is an error, never a CPU benchmark labelled "GPU".
- I/O binding (ORT issue #8166: "GPU 5x slower" was host↔device copies inside the timing). With
  ``include_transfer=False`` (the default, as trtexec) ``stage(x)`` copies ``x`` to the device ahead of
  time (the bench calls it before warm-up) and binds it; runs on that same array object use it, and each
  ``run`` binds the output on the device and returns a :class:`DeviceOutput` that is copied to the host
  only when converted (``np.asarray``). Arrays that were not staged are bound from the host (ORT copies
  them inside the call). With ``include_transfer=True`` each ``run`` binds the host array and a host
  output, so ORT does both copies inside the call (what a user serving numpy requests pays).
- ``synchronize_outputs()`` before returning, so a clock read after ``run`` sees finished work.

:class:`OrtIoBindingRuntime` is provider-generic; on ``CPUExecutionProvider`` with ``device_type="cpu"``
it runs the same binding code on any machine, which is how the CPU test suite exercises it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .base import DeviceOutput, MeasuresMemory, cuda_device_info, resolve_threads
from .ort_session import CPU_PROVIDER, ORT_DTYPES, make_session, rejected_input, session_io, session_settings

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
        self.io = session_io(self.session, self.path)
        self._binding = self.session.io_binding()
        self._staged_host: np.ndarray | None = None  # the array object whose copy is bound on the device
        self._staged_value: Any = None

    @property
    def device(self) -> str:
        return self.device_type if self.device_type == "cpu" else f"{self.device_type}:{self.device_id}"

    def _host(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=self.io.input_dtype)

    def stage(self, x: np.ndarray) -> None:
        """Copy ``x`` to the device and bind it, untimed; later runs on this same array object reuse it."""
        if self.include_transfer:
            return
        host = self._host(x)
        value = self._ort.OrtValue.ortvalue_from_numpy(host, self.device_type, self.device_id)
        self._binding.bind_ortvalue_input(self.io.input_name, value)
        self._binding.synchronize_inputs()
        self._staged_host, self._staged_value = x, value

    def run(self, x: np.ndarray) -> Any:
        binding, name = self._binding, self.io.output_name
        if self.include_transfer or x is not self._staged_host:
            binding.bind_cpu_input(self.io.input_name, self._host(x))  # ORT copies it in inside run
            self._staged_host = self._staged_value = None  # the staged copy is no longer bound
        if self.include_transfer:
            binding.bind_output(name, "cpu")  # … and the output back
        else:
            binding.bind_output(name, self.device_type, self.device_id)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # run_with_iobinding reports a bad input shape as a plain RuntimeError
            if not (type(exc).__module__.startswith("onnxruntime") or isinstance(exc, RuntimeError)):
                raise
            self._staged_host = self._staged_value = None
            raise rejected_input(self.path, np.asarray(x), self.io.input_shape, exc) from None
        binding.synchronize_outputs()
        if self.include_transfer:
            return binding.copy_outputs_to_cpu()[0]
        value = binding.get_outputs()[0]  # a fresh ORT allocation each run: no later run overwrites it
        dtype = ORT_DTYPES.get(value.data_type(), np.float32)
        return DeviceOutput(value.numpy, value.shape(), dtype)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            **session_settings(self),
            "io_binding": True,
            "include_transfer": self.include_transfer,
            "transfers": "timed (host input and output bound)" if self.include_transfer
            else "excluded for staged inputs (stage(x)); output copied on demand",
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
