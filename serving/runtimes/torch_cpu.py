"""PyTorch eager as a runtime: the "before export" side of a comparison, under the same protocol as ORT.

Eval mode and ``torch.inference_mode`` so dropout/BN behave as deployed and no autograd bookkeeping is timed;
threads pinned with ``torch.set_num_threads`` because torch's default (all cores, OpenMP spinning) would make
it incomparable with an ORT session pinned to N threads. The thread count is process-global in torch, so it
is re-asserted on each call (a cheap integer check) in case other code changed it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lrdeploy.errors import UserError

from .base import resolve_threads


class TorchRuntime:
    """Run an ``nn.Module`` eagerly; the module is put in eval mode (in place) and moved to ``device``."""

    backend = "torch"

    def __init__(self, module: Any, device: str = "cpu", threads: int | None = None, *,
                 name: str = "torch-cpu") -> None:
        import torch

        self._torch = torch
        self.name = name
        self.threads = resolve_threads(threads)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise UserError(f"unknown torch device {device!r}: {exc}", hint="use 'cpu' or 'cuda'") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("device 'cuda' requested but torch sees no CUDA GPU", hint="use --device cpu")
        if not isinstance(module, torch.nn.Module):
            raise UserError(f"TorchRuntime needs a torch.nn.Module, got {type(module).__name__}")
        self.module = module.eval().to(self.device)
        torch.set_num_threads(self.threads)

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            out = self.module(t)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # time the work, not the launch
            return out.detach().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        torch = self._torch
        return {
            "backend": self.backend,
            "device": str(self.device),
            "providers": [f"torch-eager-{self.device.type}"],
            "threads": self.threads,
            "version": torch.__version__,
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
            "module": type(self.module).__name__,
        }

    def __repr__(self) -> str:
        module = type(self.module).__name__
        return f"TorchRuntime({module}, device={str(self.device)!r}, threads={self.threads})"
