"""Old name of :mod:`torch_runtime` (the torch runtime now also runs on CUDA), kept for existing imports."""

from __future__ import annotations

from .torch_runtime import MODES, TorchRuntime

__all__ = ["MODES", "TorchRuntime"]
