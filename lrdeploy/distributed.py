"""Several training processes under ``torchrun``: the process group, sharding, and agreeing on decisions.

``torchrun --nproc-per-node N -m lrdeploy train …`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``; :func:`session` joins the group (``gloo`` on the CPU, ``nccl`` on CUDA) for the length of a
command. Without those variables everything here is the single-process identity, so the trainer calls these
functions unconditionally.

Rules the methods follow (methods.md: decisions that change the model must not diverge between replicas):
- a decision that changes the model (a switch epoch, ranks, a shrink, mask updates) is computed on rank 0
  (:func:`on_main`) or computed everywhere and replaced by rank 0's answer (:func:`agree`);
- after a module swap the DistributedDataParallel wrapper is rebuilt, which broadcasts rank 0's parameters
  and buffers, and :func:`replica_digests` checks that every rank holds the same bits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def launched_as_main() -> bool:
    """Rank 0 of a torchrun launch (or a plain process), also outside :func:`session`."""
    return (os.environ.get("RANK", "0") or "0") == "0"


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the block (a no-op for one process); leave it afterwards."""
    if not launched() or active():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def agree(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object); the value itself in one process."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank (e.g. a timing that must not differ)."""
    if not active():
        return fn()
    return agree(fn() if is_main() else None)  # type: ignore[arg-type]


def gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not active():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place and returned)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of a global batch. A batch smaller than the world is used whole on every
    rank (DDP needs every rank to step; identical gradients average to the same update)."""
    n = world_size()
    if n == 1 or tensor.shape[0] < n:
        return tensor
    return tensor.tensor_split(n)[rank()]


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` inside DistributedDataParallel when several processes train, else ``model`` itself.

    Constructing DDP broadcasts rank 0's parameters and buffers, so calling this again after a hook swapped
    the module (Cuttlefish's switch) puts every replica on rank 0's bits.
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def sync_module(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every replica (after work only rank 0 did)."""
    if not active():
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def digest(model: nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes, bytes): equal digests mean equal bits."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def replica_digests(model: nn.Module) -> list[str]:
    """Every rank's :func:`digest`; raises if they differ (a replica drifted: a bug, never to train on)."""
    digests = gather(digest(model))
    if len(set(digests)) > 1:
        raise RuntimeError(f"replicas hold different weights after synchronisation: {digests}")
    return digests
