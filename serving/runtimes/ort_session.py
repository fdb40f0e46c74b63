"""Creating ONNX Runtime sessions loudly: shared by the ORT runtimes (CPU, CUDA, any execution provider).

ONNX Runtime has two silent failure modes that make a "GPU" benchmark measure the CPU (baseline.md §6):
- a requested provider that is not compiled into the installed package is dropped with a Python warning;
- a provider that is compiled in but cannot load (missing CUDA/cuDNN/cuBLAS libraries, no GPU) makes
  ``InferenceSession`` print "EP Error … Falling back to ['CPUExecutionProvider']" and carry on.
:func:`make_session` turns both into a one-line :class:`UserError`: it pre-checks
``get_available_providers()``, disables ORT's creation-time fallback, and after creation asserts that
``sess.get_providers()[0]`` is the provider that was asked for.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy.errors import UserError
from lrdeploy.host import session_options  # engine-level: the fold cost model uses the same options

from .base import IOInfo, bind_feeds

CPU_PROVIDER = "CPUExecutionProvider"

# ONNX tensor element types as ORT names them -> numpy dtype, for inputs we feed.
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

# What to install when a provider is missing or cannot load; the runtime kind to use instead.
_PROVIDER_HINTS = {
    "CUDAExecutionProvider": "install onnxruntime-gpu with matching CUDA/cuDNN (in its own virtual "
                             "environment: it replaces the onnxruntime package), or use --runtime ort-cpu",
    "TensorrtExecutionProvider": "install onnxruntime-gpu and the TensorRT libraries it was built against, "
                                 "or use --runtime ort-cuda / trt",
}
_DEFAULT_HINT = "install the ONNX Runtime package that ships this provider, or use --runtime ort-cpu"

ProviderSpec = str | tuple[str, dict[str, Any]]


def one_line(exc: BaseException) -> str:
    """ORT's message without its ``[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :`` prefix, first line only."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^.*?\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    return re.sub(r"^Load model from .*? failed:\s*", "", text)


def provider_hint(provider: str) -> str:
    return _PROVIDER_HINTS.get(provider, _DEFAULT_HINT)


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise UserError(f"onnxruntime is not installed ({exc})", hint="pip install onnxruntime") from None
    return ort


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}", hint="check the path or re-export it")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty: not a valid ONNX model (truncated or corrupt)",
                        hint="re-export it")


def _model_error(path: Path, exc: BaseException) -> UserError:
    if type(exc).__name__ == "InvalidProtobuf" or "No graph was found" in str(exc):
        return UserError(f"{path} is not a valid ONNX model (truncated or corrupt): {one_line(exc)}",
                         hint="re-export it")
    return UserError(f"ONNX Runtime cannot load {path}: {one_line(exc)}",
                     hint="re-export it, or check that the graph only uses standard ONNX ops")


def fell_back_error(requested: str, in_use: Sequence[str], reason: str | None = None) -> UserError:
    """The one-line error for "asked for a GPU provider, got the CPU"."""
    short = "CPU" if in_use and in_use[0] == CPU_PROVIDER else (in_use[0] if in_use else "nothing")
    why = reason or "missing CUDA/cuDNN/cuBLAS libraries, a version mismatch, or no GPU"
    return UserError(f"ONNX Runtime fell back to {short}: {requested} could not be loaded ({why}; "
                     f"providers in use: {', '.join(in_use) or 'none'})", hint=provider_hint(requested))


def make_session(path: str | Path, providers: Sequence[ProviderSpec], *, sess_options: Any = None,
                 threads: int | None = None, check_available: bool = True) -> Any:
    """An ``InferenceSession`` on exactly ``providers[0]`` (later entries may take nodes it cannot run).

    ``sess_options`` defaults to :func:`session_options` with ``threads``. ``check_available=False`` skips
    the pre-check against ``get_available_providers()``; the post-creation check still catches a fallback
    (that is what the flag is for: tests, and ORT builds whose provider list is not to be trusted).
    """
    ort = _import_ort()
    path = Path(path)
    _check_file(path)
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    if not names:
        raise UserError("no ONNX Runtime execution provider requested")
    if check_available:
        available = list(ort.get_available_providers())
        missing = [n for n in names if n not in available]
        if missing:
            raise UserError(f"{missing[0]} is not available in this ONNX Runtime build (onnxruntime "
                            f"{ort.__version__}; available: {', '.join(available)})",
                            hint=provider_hint(missing[0]))
    options = sess_options if sess_options is not None else session_options(threads)
    try:
        with warnings.catch_warnings():  # "not in available provider names": checked below, loudly
            warnings.simplefilter("ignore", UserWarning)
            # enable_fallback=0: an EP that fails to load raises instead of silently retrying on the CPU.
            session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers),
                                           enable_fallback=0)
    except Exception as exc:  # ORT raises unrelated pybind classes: InvalidProtobuf, Fail, InvalidGraph…
        if names == [CPU_PROVIDER] or names[0] == CPU_PROVIDER:
            raise _model_error(path, exc) from None
        try:  # the model or the provider? The CPU provider alone answers that.
            ort.InferenceSession(str(path), sess_options=options, providers=[CPU_PROVIDER])
        except Exception as cpu_exc:
            raise _model_error(path, cpu_exc) from None
        raise fell_back_error(names[0], [CPU_PROVIDER], one_line(exc)) from None

    in_use = list(session.get_providers())
    if not in_use or in_use[0] != names[0]:
        reason = None if names[0] in ort.get_available_providers() else "not in this build's providers"
        raise fell_back_error(names[0], in_use, reason)
    return session


def _io_info(arg: Any) -> IOInfo:
    return IOInfo(arg.name, np.dtype(ORT_DTYPES.get(arg.type, np.float32)), tuple(arg.shape))


@dataclass(frozen=True)
class SessionIO:
    """Every input and output of a session (graph order) and their ORT type names, for ``describe()``."""

    inputs: tuple[IOInfo, ...]
    outputs: tuple[IOInfo, ...]
    types: dict[str, str]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def describe(self) -> dict[str, Any]:
        return {key: [{**i.describe(), "type": self.types[i.name]} for i in infos]
                for key, infos in (("inputs", self.inputs), ("outputs", self.outputs))}


def session_io(session: Any) -> SessionIO:
    """Name, shape and dtype of every input and output of an ``InferenceSession``."""
    args = [*session.get_inputs(), *session.get_outputs()]
    return SessionIO(tuple(_io_info(i) for i in session.get_inputs()),
                     tuple(_io_info(o) for o in session.get_outputs()),
                     {a.name: a.type for a in args})


def host_feeds(io: SessionIO, feeds: Any, what: str) -> dict[str, np.ndarray]:
    """``feeds`` bound to the session's inputs (:func:`bind_feeds`) as contiguous arrays of their dtypes
    (no copy for the float32 C-contiguous arrays the bench feeds; a copy only for odd inputs)."""
    bound = bind_feeds(io.inputs, feeds, what)
    return {i.name: np.ascontiguousarray(bound[i.name], dtype=i.dtype) for i in io.inputs}


def rejected_input(path: Path, feeds: Mapping[str, Any], io: SessionIO, exc: BaseException) -> UserError:
    """A wrong shape/dtype for this graph is the user's input, not our bug: say which and what it expects."""
    if len(feeds) == 1 and len(io.inputs) == 1:
        got: Any = list(np.shape(next(iter(feeds.values()))))
        expects: Any = list(io.inputs[0].shape or ())
    else:
        got = {n: list(np.shape(a)) for n, a in feeds.items()}
        expects = {i.name: list(i.shape or ()) for i in io.inputs}
    return UserError(f"{path.name} rejected input {got} (expects {expects}): {one_line(exc)}",
                     hint="check the input shape and batch size")


def session_settings(runtime: Any) -> dict[str, Any]:
    """The ``describe()`` keys every ORT runtime shares: what ran, where, and with which session settings
    (:func:`lrdeploy.host.session_options`: sequential, one inter-op thread, all graph optimisations)."""
    return {
        "backend": runtime.backend,
        "device": runtime.device,
        "providers": list(runtime.providers),
        "threads": runtime.threads,
        "inter_op_threads": 1,
        "execution_mode": "sequential",
        "graph_optimization": "all",
        "version": runtime.version,
        "path": str(runtime.path),
    }
