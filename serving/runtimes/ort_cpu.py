"""ONNX Runtime on the CPU, configured the way baseline.md measured it, so numbers stay comparable.

Settings and why (see :func:`ort_session.session_options`):
- ``CPUExecutionProvider`` only, created through :func:`ort_session.make_session`, which asserts that the
  provider in use is the one asked for; ``describe()`` reports ``sess.get_providers()``, what is *in use*.
- ``ORT_ENABLE_ALL``: the CPU-specific fusions (FusedConv, NCHWc layouts) are part of what a user deploys.
- Named inputs and outputs, any number of each (a translation model's int64 ``src``/``tgt_in``, an encoder's
  ``input_ids``/``attention_mask``): ``run(feeds)`` returns every output by name.
- ``intra_op_num_threads`` pinned (default: the CPUs this process may use), ``inter_op_num_threads=1`` and
  sequential execution: ORT's default thread choice depends on the host and makes runs on two machines
  incomparable; one inter-op pool avoids two pools fighting over the same cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .base import Feeds, IOInfo, MeasuresMemory, resolve_threads
from .ort_session import CPU_PROVIDER, host_feeds, make_session, rejected_input, session_io, session_settings


class OrtCpuRuntime(MeasuresMemory):
    """An ``InferenceSession`` on the CPU with pinned threads; named inputs in, every output out."""

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
        self.io = session_io(self.session)

    def inputs(self) -> list[IOInfo]:
        return list(self.io.inputs)

    def outputs(self) -> list[IOInfo]:
        return list(self.io.outputs)

    def run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        arrays = host_feeds(self.io, feeds, self.path.name)
        try:
            values = self.session.run(self.io.output_names, arrays)
        except Exception as exc:  # wrong shape/dtype for this graph: the user's input, not our bug
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise rejected_input(self.path, arrays, self.io, exc) from None
        return dict(zip(self.io.output_names, values, strict=True))

    def describe(self) -> dict[str, Any]:
        return {**session_settings(self), **self.io.describe(), "memory": self.last_memory}

    def __repr__(self) -> str:
        return f"OrtCpuRuntime({str(self.path)!r}, threads={self.threads}, name={self.name!r})"


def load(source: Path, *, threads: int | None, name: str, **_: Any) -> OrtCpuRuntime:
    """The registry's loader (``ort-cpu``)."""
    from .ort_session import _import_ort

    _import_ort()  # a missing onnxruntime: one line saying what to install
    return OrtCpuRuntime(source, threads=threads, name=name)
