"""The one protocol every backend implements (Polygraphy's runner shape), so bench, parity, golden sets and
``compare`` never branch on the backend or on the number of inputs.

A runtime says what it takes and gives (``inputs()``/``outputs()``: :class:`IOInfo` name, dtype and shape,
with a name or None for a dynamic dimension), maps named inputs to named outputs (``run(feeds) -> dict``), and
``describe()`` says what actually executed it (providers in use, threads, library version) — a benchmark that
does not record this cannot be reproduced or trusted (ORT-GPU silently falls back to CPU, see baseline.md).
"""

from __future__ import annotations

import gc
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lrdeploy.errors import UserError
from lrdeploy.host import available_cpus as available_cpus  # re-exported: engine-level, exporters use it
from lrdeploy.host import resolve_threads as resolve_threads  # re-exported: idem

Dim = int | str | None  # a fixed size, a named dynamic axis ("batch", "src_len"), or an anonymous one
Feeds = Mapping[str, Any]


@dataclass(frozen=True)
class IOInfo:
    """One named input or output: numpy dtype and shape (``None`` when the rank is not declared, e.g. the
    inputs of a plain ``nn.Module``)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": np.dtype(self.dtype).name,
                "shape": None if self.shape is None else list(self.shape)}


@runtime_checkable
class Runtime(Protocol):
    """Something that runs a model on named numpy inputs and can say how it did so."""

    name: str

    def inputs(self) -> list[IOInfo]:
        """The inputs ``run`` takes, in graph (``forward``) order."""
        ...

    def outputs(self) -> list[IOInfo]:
        """The outputs ``run`` returns, in graph order."""
        ...

    def run(self, feeds: Feeds) -> dict[str, Any]:
        """Run one batch: input name → array in, output name → array out. Must block until done.

        Device runtimes built with ``include_transfer=False`` return :class:`DeviceOutput` values instead
        (the output stays on the device; ``np.asarray`` copies it to the host), so callers that need numpy
        wrap each value in ``np.asarray`` — a no-op for the CPU runtimes.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """{"backend", "device", "providers", "threads", "version", "inputs", "outputs", ...}."""
        ...


def bind_feeds(inputs: Sequence[IOInfo], feeds: Feeds, what: str) -> dict[str, Any]:
    """``feeds`` keyed by ``inputs``' names, in their order; anything missing or extra is a UserError.

    One exception, the only case without ambiguity: a one-input model fed one array under another name (a
    task's ``input`` for a graph whose input is called ``x``) gets it under its own name.
    """
    if not isinstance(feeds, Mapping):
        raise UserError(f"{what} takes named inputs (a dict name → array), got {type(feeds).__name__}",
                        hint="pass {input name: array}; run_single(runtime, x) feeds a one-input model")
    names = [i.name for i in inputs]
    if len(feeds) == len(names) and all(n in feeds for n in names):
        return {n: feeds[n] for n in names}
    if len(names) == 1 and len(feeds) == 1:
        return {names[0]: next(iter(feeds.values()))}
    got = ", ".join(map(str, feeds)) or "none"
    raise UserError(f"{what} takes inputs {', '.join(names) or '(none)'}; got {got}",
                    hint="feed every graph input by name")


def run_single(runtime: Runtime, x: Any) -> Any:
    """The first output of a one-input ``runtime`` on the array ``x`` (for callers that hold one array)."""
    inputs = runtime.inputs()
    if len(inputs) != 1:
        raise UserError(f"{runtime.name} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                        "got one array", hint="pass a dict name → array to run()")
    return first_output(runtime.run({inputs[0].name: x}))


def first_output(outputs: Mapping[str, Any]) -> Any:
    """The first value of a ``run`` result (graph order)."""
    return next(iter(outputs.values()))


# ------------------------------------------------------------------------------------------ device outputs
class DeviceOutput:
    """A run's output left on the device; ``np.asarray(out)`` or ``out.numpy()`` copies it to the host.

    Device runtimes return this instead of a numpy array when ``include_transfer=False``, so the timed call
    covers the compute and not the device→host copy (trtexec's default; ORT issue #8166 is the classic
    "GPU 5x slower" caused by timed copies). Parity code calls ``np.asarray`` on outputs, which works on
    both. Runtimes that reuse a static output buffer (CUDA graphs, TensorRT) pass ``owner``: an object
    whose ``generation`` counter they bump on every run, so reading an output after a later run raises
    instead of silently returning the later run's numbers.
    """

    __slots__ = ("_fetch", "_generation", "_owner", "dtype", "shape")

    def __init__(self, fetch: Callable[[], np.ndarray], shape: Sequence[int], dtype: Any, *,
                 owner: Any = None) -> None:
        self._fetch = fetch
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self._owner = owner
        self._generation = getattr(owner, "generation", None)

    def numpy(self) -> np.ndarray:
        if self._owner is not None and self._owner.generation != self._generation:
            raise RuntimeError("this output's device buffer was overwritten by a later run(): convert it "
                               "with np.asarray(...) before running the runtime again")
        return self._fetch()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceOutput(shape={self.shape}, dtype={self.dtype})"


def to_numpy(y: Any) -> np.ndarray:
    """A runtime's output as a host numpy array, whichever kind of runtime produced it."""
    return np.asarray(y)


# ----------------------------------------------------------------------------------------------- memory
def _proc_status_bytes(*keys: str) -> dict[str, int]:
    """``VmRSS``/``VmHWM``… from /proc/self/status in bytes (empty where /proc is missing)."""
    out: dict[str, int] = {}
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            parts = value.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024  # the kernel reports kB
    return out


# How far VmHWM may sit above VmRSS right after a reset and still count as reset: the two are read together,
# but the interpreter may free a little between the write and the read.
_RESET_SLACK_BYTES = 1 << 20


def _reset_rss_peak() -> str | None:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; None if done, else why not.

    Writing "5" to /proc/self/clear_refs (Linux >= 4.0) only resets the peak counter: it does not touch
    page reference bits, so it costs nothing and changes no later behaviour. A successful write is not
    trusted: some kernels and sandboxes accept it and change nothing, so VmHWM is read back and must have
    come down to VmRSS (within ``_RESET_SLACK_BYTES``). Either way a peak read later is exact: VmHWM at or
    near the current RSS is what a reset would have left.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        return f"cannot reset VmHWM via /proc/self/clear_refs ({exc.strerror or exc})"
    status = _proc_status_bytes("VmRSS", "VmHWM")
    if "VmHWM" not in status or "VmRSS" not in status:
        return "no VmHWM/VmRSS in /proc/self/status"
    if status["VmHWM"] > status["VmRSS"] + _RESET_SLACK_BYTES:
        return (f"writing 5 to /proc/self/clear_refs did not reset VmHWM ({status['VmHWM']} bytes stayed "
                f"above VmRSS {status['VmRSS']})")
    return None


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside a measured window (timed calls, as timeit does; memory windows).

    A collection that runs inside a memory window frees what earlier code left behind (a test suite's dead
    models), so RSS first drops and the window's own peak is hidden: a 64 MiB transient measured as 6 MiB.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _ru_maxrss_bytes() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB, macOS bytes


def _cuda_torch(cuda_device: int | None) -> Any:
    """torch when it is already imported and ``cuda_device`` is usable; never imports torch itself."""
    if cuda_device is None:
        return None
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch


def measure_memory(fn: Callable[[], Any], *, runs: int = 1, cuda_device: int | None = None) -> dict[str, Any]:
    """Peak memory while ``fn`` is called ``runs`` times, as deltas over the state just before.

    What is measured, and its limits:
    - ``rss_peak_delta_bytes``: host resident-set peak minus the RSS at the start. On Linux the kernel's
      peak counter is reset first and the reset read back (``rss_method="VmHWM"``), so the number is exact
      for this window. Where that is not possible (``rss_reset_error`` says why) it falls back to
      ``getrusage`` (``rss_method="ru_maxrss"``), a lifetime peak: the delta is then a lower bound, 0
      unless this window set a new peak for the whole process. The cyclic GC is paused in the window, so
      garbage left by earlier code cannot be freed there and mask the peak (``fn``'s own frees still count).
    - ``cuda_peak_delta_bytes``: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the
      start (the peak counter is reset: process-wide, so do not measure two things at once). Only
      allocations made through torch's caching allocator are counted: torch runtimes and the buffers the
      TensorRT runtime allocates, but not ONNX Runtime's own CUDA arena nor TensorRT's internal activation
      memory. ``cuda_device_used_delta_bytes`` (``cudaMemGetInfo`` after minus before, device-wide, all
      processes) sees those, but only what is still held at the end, not a peak.
    Both are process-global counters: measure one runtime at a time, outside any timed loop.
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise UserError(f"runs must be a positive integer, got {runs!r}")
    torch = _cuda_torch(cuda_device)
    cuda: dict[str, Any] = {"cuda_device": cuda_device if torch is not None else None}
    if torch is not None:
        torch.cuda.synchronize(cuda_device)
        torch.cuda.reset_peak_memory_stats(cuda_device)
        cuda_before = torch.cuda.memory_allocated(cuda_device)
        free, total = torch.cuda.mem_get_info(cuda_device)
        used_before = total - free

    with gc_paused():
        reset_error = _reset_rss_peak()
        rss_before = _proc_status_bytes("VmRSS").get("VmRSS")
        maxrss_before = _ru_maxrss_bytes()
        for _ in range(runs):
            fn()
        if torch is not None:
            torch.cuda.synchronize(cuda_device)
        status = _proc_status_bytes("VmRSS", "VmHWM")

    if reset_error is None and "VmHWM" in status and rss_before is not None:
        method, peak = "VmHWM", status["VmHWM"]
        delta = max(0, peak - rss_before)
    else:
        method, peak = "ru_maxrss", _ru_maxrss_bytes()
        delta = max(0, peak - maxrss_before)
    out: dict[str, Any] = {
        "runs": runs,
        "rss_method": method,
        "rss_reset_error": reset_error,
        "rss_before_bytes": rss_before,
        "rss_peak_bytes": peak,
        "rss_after_bytes": status.get("VmRSS"),
        "rss_peak_delta_bytes": delta,
        **cuda,
        "cuda_allocated_before_bytes": None,
        "cuda_peak_allocated_bytes": None,
        "cuda_peak_delta_bytes": None,
        "cuda_device_used_delta_bytes": None,
    }
    if torch is not None:
        peak_alloc = torch.cuda.max_memory_allocated(cuda_device)
        free, total = torch.cuda.mem_get_info(cuda_device)
        out.update(cuda_allocated_before_bytes=cuda_before, cuda_peak_allocated_bytes=peak_alloc,
                   cuda_peak_delta_bytes=max(0, peak_alloc - cuda_before),
                   cuda_device_used_delta_bytes=(total - free) - used_before)
    return out


class MeasuresMemory:
    """Mixin: ``runtime.memory(feeds)`` = :func:`measure_memory` around ``runtime.run(feeds)`` on its device.

    The first run on a new input shape includes one-off costs (staging the input, capturing a CUDA graph,
    allocating output buffers): warm the runtime up on ``feeds`` first to see the steady state.
    """

    cuda_device_index: int | None = None
    last_memory: dict[str, Any] | None = None

    def memory(self, feeds: Feeds, runs: int = 3) -> dict[str, Any]:
        result = measure_memory(lambda: self.run(feeds), runs=runs, cuda_device=self.cuda_device_index)
        self.last_memory = result
        return result

    def run(self, feeds: Feeds) -> Any:  # pragma: no cover - provided by the runtime
        raise NotImplementedError


# ------------------------------------------------------------------------------------- device description
def nvidia_driver_version() -> str | None:
    """The kernel driver version (e.g. "550.54.15") from /proc, as ``nvidia-smi`` would print it."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return match.group(1) if match else None


def cuda_driver_api_version() -> str | None:
    """The newest CUDA version the driver supports (``cuDriverGetVersion``), e.g. "12.4"."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def cuda_device_info(index: int = 0) -> dict[str, Any]:
    """What a GPU number needs next to it: device name, capability, memory, CUDA runtime/driver, cuDNN."""
    info: dict[str, Any] = {"index": index, "driver_version": nvidia_driver_version(),
                            "cuda_driver_api": cuda_driver_api_version()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(index)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            total_memory_bytes=int(props.total_memory),
            cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        )
    return info
