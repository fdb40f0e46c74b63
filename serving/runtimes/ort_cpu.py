"""ONNX Runtime on the CPU, configured the way baseline.md measured it, so numbers stay comparable.

Settings and why (see :func:`ort_session.session_options`):
- ``CPUExecutionProvider`` only, created through :func:`ort_session.make_session`, which asserts that the
  provider in use is the one asked for; ``describe()`` reports ``sess.get_providers()``, what is *in use*.
- ``ORT_ENABLE_ALL``: the CPU-specific fusions (FusedConv, NCHWc layouts) are part of what a user deploys.
- Several inputs (a translation model's int64 ``src``/``tgt_in``): ``run`` takes a dict name → array or a
  tuple in graph-input order; a single array still feeds a single-input model, as before.
- ``intra_op_num_threads`` pinned (default: the CPUs this process may use), ``inter_op_num_threads=1`` and
  sequential execution: ORT's default thread choice depends on the host and makes runs on two machines
  incomparable; one inter-op pool avoids two pools fighting over the same cores.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .base import MeasuresMemory, resolve_threads
from .ort_session import (
    CPU_PROVIDER,
    ORT_DTYPES,
    make_session,
    one_line,
    rejected_input,
    session_io,
    session_settings,
)

_ORT_DTYPES = ORT_DTYPES  # old private names, kept for importers
_one_line = one_line


class OrtCpuRuntime(MeasuresMemory):
    """An ``InferenceSession`` on the CPU with pinned threads; returns the first output.

    ``run(x)``: ``x`` is an array for a single-input model, or a dict (name → array) / tuple (graph-input
    order) for a model with several inputs.
    """

    backend = "onnxruntime"
    device = "cpu"

    def __init__(self, path: str | Path, threads: int | None = None, *, name: str = "ort-cpu") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.name = name
        self.threads = resolve_threads(threads)
        self.session = make_session(self.path, [CPU_PROVIDER], threads=self.threads)
        self.providers: list[str] = list(self.session.get_providers())
        self.version: str = ort.__version__

        io = session_io(self.session, self.path, multi_input=True)
        self.io = io
        self.input_names: tuple[str, ...] = tuple(i.name for i in io.inputs)
        self._dtypes = {i.name: i.dtype for i in io.inputs}
        self.input_name: str = io.input_name
        self.input_shape: list[int | str | None] = io.input_shape
        self.input_type: str = io.input_type
        self.input_dtype = io.input_dtype
        self.output_name: str = io.output_name
        self.output_shape: list[int | str | None] = io.output_shape

    def feeds(self, x: Any) -> dict[str, np.ndarray]:
        """The session's input dict for ``x`` (array, dict name → array, or tuple in graph-input order)."""
        from lrdeploy.errors import UserError

        if isinstance(x, Mapping):
            missing = [n for n in self.input_names if n not in x]
            extra = [n for n in x if n not in self._dtypes]
            if missing or extra:
                raise UserError(f"{self.path.name} takes inputs {', '.join(self.input_names)}; got "
                                f"{', '.join(map(str, x)) or 'none'}", hint="feed every graph input by name")
            items = [(n, x[n]) for n in self.input_names]
        elif isinstance(x, tuple):
            if len(x) != len(self.input_names):
                raise UserError(f"{self.path.name} takes {len(self.input_names)} inputs "
                                f"({', '.join(self.input_names)}); got {len(x)}",
                                hint="feed one array per graph input, in order")
            items = list(zip(self.input_names, x, strict=True))
        else:
            if len(self.input_names) != 1:
                raise UserError(f"{self.path.name} takes {len(self.input_names)} inputs "
                                f"({', '.join(self.input_names)}); got one array",
                                hint="pass a dict name → array or a tuple in input order")
            items = [(self.input_name, x)]
        # No-op (no copy) for the float32 C-contiguous arrays the bench feeds; a copy only for odd inputs.
        return {n: np.ascontiguousarray(a, dtype=self._dtypes[n]) for n, a in items}

    def run(self, x: Any) -> np.ndarray:
        feeds = self.feeds(x)
        try:
            return self.session.run([self.output_name], feeds)[0]
        except Exception as exc:  # wrong shape/dtype for this graph: the user's input, not our bug
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            first = next(iter(feeds.values()))
            expects = self.input_shape if len(feeds) == 1 else {i.name: i.shape for i in self.io.inputs}
            raise rejected_input(self.path, first, expects, exc) from None

    def describe(self) -> dict[str, Any]:
        return {
            **session_settings(self),
            "input": {"name": self.input_name, "shape": self.input_shape, "type": self.input_type},
            **({"inputs": [i.describe() for i in self.io.inputs]} if len(self.io.inputs) > 1 else {}),
            "output": {"name": self.output_name, "shape": self.output_shape},
            "memory": self.last_memory,
        }

    def __repr__(self) -> str:
        return f"OrtCpuRuntime({str(self.path)!r}, threads={self.threads}, name={self.name!r})"
