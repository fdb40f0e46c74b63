"""Runtimes: one small module per backend behind one protocol (:class:`Runtime`: ``inputs()``,
``outputs()``, ``run(feeds) -> outputs``, ``describe()``), registered by kind.

A backend is a module with a runtime class and a ``load`` function, plus its ``register_runtime`` line at
the end of this file: nothing else dispatches on the kind, and CLI choices (``--runtime``) are read from this
registry. The registry imports no backend (nor numpy): a backend module is imported when its kind is first
loaded, and imports onnxruntime, torch or tensorrt only then, so the CLI starts fast and a missing optional
backend (or missing hardware) fails with a one-line error that says what is missing.

| kind           | takes             | module              | notes                                          |
|----------------|-------------------|---------------------|------------------------------------------------|
| ``torch-cpu``  | ``nn.Module``     | ``torch_runtime``   | eager                                          |
| ``torch-cuda`` | ``nn.Module``     | ``torch_runtime``   | ``mode="eager"`` or ``"cuda-graph"``           |
| ``ort-cpu``    | ``.onnx`` path    | ``ort_cpu``         | CPUExecutionProvider                           |
| ``ort-cuda``   | ``.onnx`` path    | ``ort_cuda``        | CUDAExecutionProvider + I/O binding            |
| ``trt``        | ``.plan`` path    | ``trt``             | TensorRT engine, tensor-name API               |
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrdeploy.errors import UserError

if TYPE_CHECKING:
    from .base import Runtime

# The protocol's helpers, read from .base when first used (it imports numpy): ``from
# lrdeploy.serving.runtimes import IOInfo`` works, and ``import lrdeploy.serving.runtimes`` stays light.
_BASE_NAMES = ("DeviceOutput", "IOInfo", "Runtime", "available_cpus", "bind_feeds", "first_output",
               "measure_memory", "resolve_threads", "run_single", "to_numpy")


def __getattr__(name: str) -> Any:
    if name in _BASE_NAMES:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

TAKES = {"module": "an nn.Module", "onnx": "an .onnx file", "engine": "a serialised TensorRT engine "
         "(.plan/.engine)"}


@dataclass(frozen=True)
class RuntimeKind:
    """One registered backend: what it takes, how it is built, the options it understands."""

    kind: str
    loader: Callable[..., Runtime]
    takes: str  # a key of TAKES
    description: str = ""
    modes: tuple[str, ...] = ()  # execution modes it accepts (torch-cuda: eager, cuda-graph)
    dtypes: bool = False  # runs its source at a chosen dtype (modules); artefacts carry their own
    aliases: dict[str, str | None] = field(default_factory=dict)  # alias -> mode it implies


_KINDS: dict[str, RuntimeKind] = {}
_ALIASES: dict[str, tuple[str, str | None]] = {}  # what users type -> (kind, implied mode)


def register_runtime(kind: str, loader: Callable[..., Runtime], *, takes: str,
                     aliases: Iterable[str] | Mapping[str, str | None] = (), description: str = "",
                     modes: Iterable[str] = (), dtypes: bool = False) -> RuntimeKind:
    """Make ``load_runtime(kind, source, **options)`` call ``loader(source, threads=, name=, mode=,
    include_transfer=, device_id=, dtype=)``. ``aliases``: other names (a mapping gives each the mode it
    implies, e.g. ``torch-cuda-graph`` → ``cuda-graph``)."""
    key = kind.strip().lower()
    implied = dict(aliases) if isinstance(aliases, Mapping) else {a: None for a in aliases}
    names = [key, *(a.strip().lower() for a in implied)]
    taken = [n for n in names if n in _ALIASES]
    if taken or takes not in TAKES:
        raise ValueError(f"runtime {kind!r}: name(s) {taken} already registered or unknown takes={takes!r}")
    entry = RuntimeKind(key, loader, takes, description, tuple(modes), dtypes,
                        {a.strip().lower(): m for a, m in implied.items()})
    _KINDS[key] = entry
    _ALIASES[key] = (key, None)
    for alias, mode in entry.aliases.items():
        _ALIASES[alias] = (key, mode)
    return entry


def runtime_kinds(takes: str | None = None) -> list[str]:
    """Registered kinds (in registration order), optionally only those that take ``takes``."""
    return [k for k, e in _KINDS.items() if takes is None or e.takes == takes]


def get_runtime_kind(kind: str) -> RuntimeKind:
    return _KINDS[canonical_kind(kind)[0]]


def describe_kinds(takes: str | None = None) -> str:
    """``ort-cpu, ort-cuda (alias ort-gpu)…``: for CLI help and error hints."""
    parts = []
    for k in runtime_kinds(takes):
        aliases = [a for a, m in _KINDS[k].aliases.items() if m is None]
        parts.append(k + (f" (or {', '.join(aliases)})" if aliases else ""))
    return ", ".join(parts)


def canonical_kind(kind: str) -> tuple[str, str | None]:
    """(kind, implied mode) for a name or alias; unknown names are a UserError listing the kinds."""
    found = _ALIASES.get(str(kind).strip().lower())
    if found is None:
        close = difflib.get_close_matches(str(kind).strip().lower(), _ALIASES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        implied = [f"{a} = {k} in mode {m}" for k, e in _KINDS.items() for a, m in e.aliases.items() if m]
        raise UserError(f"unknown runtime {kind!r}",
                        hint=f"{hint}registered runtimes: {', '.join(_KINDS)}"
                             + (f" ({'; '.join(implied)})" if implied else ""))
    return found


def load_runtime(kind: str, source: Any, *, threads: int | None = None, name: str | None = None,
                 mode: str | None = None, include_transfer: bool = False, device_id: int = 0,
                 dtype: str = "float32") -> Runtime:
    """Build a runtime of ``kind`` on ``source`` (an ``nn.Module`` or a file path, as the kind takes).

    ``mode`` applies to kinds that have modes (torch-cuda: eager | cuda-graph); ``include_transfer`` times
    host↔device copies inside each run (device kinds; default off, as trtexec); ``device_id`` picks the GPU;
    ``dtype`` (float32 | float16 | bfloat16) applies to kinds that run a module (ONNX and TensorRT artefacts
    carry their own precision).
    """
    canonical, implied_mode = canonical_kind(kind)
    entry = _KINDS[canonical]
    if mode is not None and implied_mode is not None and mode != implied_mode:
        raise UserError(f"runtime {kind!r} implies mode {implied_mode!r}, but mode {mode!r} was given")
    mode = mode or implied_mode
    if mode is not None and not entry.modes:
        with_modes = [k for k, e in _KINDS.items() if e.modes]
        raise UserError(f"mode {mode!r} applies to runtime {', '.join(with_modes)} only, not {canonical}",
                        hint="drop --mode, or use --runtime " + " / ".join(with_modes))
    if mode is not None and mode not in entry.modes:
        raise UserError(f"unknown {canonical} mode {mode!r}", hint=f"choose one of: {', '.join(entry.modes)}")
    if dtype not in (None, "float32", "fp32") and not entry.dtypes:
        with_dtypes = [k for k, e in _KINDS.items() if e.dtypes]
        raise UserError(f"dtype {dtype!r} applies to the runtimes that run a module "
                        f"({', '.join(with_dtypes)}) only; {canonical} runs the precision its artefact "
                        "was exported/built with",
                        hint="export or build at that precision")
    is_path = isinstance(source, (str, Path))
    if entry.takes == "module" and is_path:
        files = [k for k, e in _KINDS.items() if e.takes != "module"]
        raise UserError(f"runtime {canonical} takes {TAKES['module']}, got the path {str(source)!r}",
                        hint=f"for artefact files use --runtime {' / '.join(files)}")
    if entry.takes != "module" and not is_path:
        modules = [k for k, e in _KINDS.items() if e.takes == "module"]
        raise UserError(f"runtime {canonical} takes a path to {TAKES[entry.takes]}, got "
                        f"{type(source).__name__}",
                        hint=f"for an nn.Module use --runtime {' or '.join(modules)}")
    return entry.loader(source if entry.takes == "module" else Path(source), threads=threads,
                        name=name or canonical, mode=mode, include_transfer=include_transfer,
                        device_id=device_id, dtype=dtype)


def backend(module: str, function: str = "load") -> Callable[..., Runtime]:
    """A loader that imports ``serving.runtimes.<module>`` on first use and calls its ``function``."""
    def loader(source: Any, **options: Any) -> Runtime:
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(source, **options)

    loader.__qualname__ = f"{module}.{function}"
    return loader


# Registration: one line per backend kind.
register_runtime("ort-cpu", backend("ort_cpu"), takes="onnx", aliases=("ort", "onnxruntime"),
                 description="ONNX Runtime, CPUExecutionProvider")
register_runtime("ort-cuda", backend("ort_cuda"), takes="onnx", aliases=("ort-gpu", "onnxruntime-cuda"),
                 description="ONNX Runtime, CUDAExecutionProvider with I/O binding")
register_runtime("torch-cpu", backend("torch_runtime"), takes="module", aliases=("torch",), dtypes=True,
                 description="PyTorch eager on the CPU")
register_runtime("torch-cuda", backend("torch_runtime", "load_cuda"), takes="module",
                 aliases={"torch-cuda-graph": "cuda-graph"}, modes=("eager", "cuda-graph"), dtypes=True,
                 description="PyTorch on a CUDA GPU, eager or CUDA-graph replay")
register_runtime("trt", backend("trt"), takes="engine", aliases=("tensorrt",),
                 description="TensorRT engine (tensor-name API)")

__all__ = [*_BASE_NAMES, "RuntimeKind", "backend", "canonical_kind", "describe_kinds", "get_runtime_kind",
           "load_runtime", "register_runtime", "runtime_kinds"]
