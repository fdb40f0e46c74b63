"""Where training runs: ``--device auto|cpu|cuda|cuda:N``, mixed precision (``--amp``) and channels-last.

Every check happens before any work, so a GPU asked for on a machine without one is a one-line error (exit 2)
rather than a traceback minutes into data loading. Under ``torchrun`` the device index comes from
``LOCAL_RANK`` (one GPU per process), as ``torch.distributed`` expects.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrdeploy.errors import UserError

AMP_MODES = ("off", "bf16", "fp16")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names; ``auto``: CUDA if present (this process's ``LOCAL_RANK`` GPU), else CPU."""
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if text == "auto":
        return torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if torch.cuda.is_available() \
            else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2]
        if index_text and not index_text.isdigit():
            raise UserError(f"--device {spec!r} is not a device", "use auto, cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec} asks for a GPU, but PyTorch sees no CUDA device here",
                            "use --device cpu (or auto), or install a CUDA build of torch on a GPU machine")
        count = torch.cuda.device_count()
        index = int(index_text) if index_text else local
        if index >= count:
            raise UserError(f"--device {spec}: this machine has {count} CUDA device(s) (0..{count - 1})",
                            "pick an index that exists, or use --device cuda")
        return torch.device("cuda", index)
    raise UserError(f"--device {spec!r} is not a device", "use auto, cpu, cuda or cuda:N (N = 0, 1, …)")


@dataclass(frozen=True)
class Precision:
    """Mixed precision of a training run: autocast dtype (None = fp32) and whether gradients are scaled."""

    mode: str = "off"
    device_type: str = "cpu"

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mode)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scaler(self) -> Any:
        """A GradScaler for fp16 (its small exponent range underflows gradients otherwise); None otherwise."""
        if self.mode != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)


def resolve_amp(mode: str | None, device: torch.device) -> Precision:
    """``--amp off|bf16|fp16`` checked against the device: fp16 needs CUDA; bf16 also runs on the CPU."""
    text = (mode or "off").strip().lower()
    if text not in AMP_MODES:
        raise UserError(f"--amp {mode!r} is not a precision", f"use one of: {', '.join(AMP_MODES)}")
    if text == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (CPU autocast supports bf16 only)",
                        "use --amp bf16 on the CPU, or --device cuda")
    if text == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bf16 support",
                        "use --amp fp16 on this GPU")
    return Precision(text, device.type)


def wants_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Channels-last pays off for convolutions on CUDA (Tensor Core kernels are NHWC); on the CPU it does not
    reliably, and for models without Conv2d it is meaningless."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_device(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """A function that runs ``fn`` once and returns its seconds: CUDA events on a GPU (kernels run
    asynchronously, so wall time around a launch measures nothing), ``perf_counter`` on the CPU."""
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0

        return cuda_time

    def cpu_time(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return cpu_time
