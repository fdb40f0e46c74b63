"""Training checkpoints: everything a killed run needs to continue as if it had never stopped.

A checkpoint is a directory written atomically (:class:`lrdeploy.atomic.Staging`: a crash while writing leaves
the previous checkpoint, never half of a new one)::

    weights.safetensors   the model's state dict (its structure — ranks, factorised layers — in the JSON)
    state.safetensors     every other tensor: optimiser moments, RNG states, a method's captured batch
    checkpoint.json       the rest: epoch/step, settings, structure, history, method state, with each tensor
                          replaced by {"__tensor__": key}; sha256 of both tensor files

No pickle anywhere: nested Python state is split into JSON and tensors by :func:`split_tensors` (tuples and
non-string dict keys are tagged so they round-trip exactly, e.g. an optimiser's integer parameter ids and
``random.Random.getstate()``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lrdeploy import atomic
from lrdeploy.errors import UserError

FORMAT = "lrdeploy.train-checkpoint/1"
META = "checkpoint.json"
WEIGHTS = "weights.safetensors"
STATE = "state.safetensors"


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """JSON-ready copy of ``obj`` with every tensor moved into ``tensors`` (CPU, contiguous) under a key."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: split_tensors(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[split_tensors(k, tensors, prefix), split_tensors(v, tensors, prefix)]
                              for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [split_tensors(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [split_tensors(v, tensors, prefix) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return {"__set__": [split_tensors(v, tensors, prefix) for v in sorted(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            items = obj["__items__"]
            return {_hashable(join_tensors(k, tensors)): join_tensors(v, tensors) for k, v in items}
        if set(obj) == {"__tuple__"}:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__set__"}:
            return {join_tensors(v, tensors) for v in obj["__set__"]}
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write a checkpoint directory at ``path`` atomically, replacing the previous one."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    meta = split_tensors(state, tensors)
    with atomic.Staging(path.parent) as stage:
        target = stage.path(path.name)
        target.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(target / WEIGHTS))
        save_file(tensors, str(target / STATE))
        record = {
            "format": FORMAT,
            "sha256": {WEIGHTS: _sha256(target / WEIGHTS), STATE: _sha256(target / STATE)},
            "state": meta,
        }
        atomic.write_text(target / META, json.dumps(record, indent=1, allow_nan=True))
    return path


def exists(path: str | os.PathLike) -> bool:
    """Whether a (complete) checkpoint is at ``path``; an interrupted write is finished or cleaned first."""
    path = Path(path)
    atomic.recover(path.parent)
    return (path / META).is_file()


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, state) of the checkpoint at ``path``; a missing, foreign or damaged one is a UserError."""
    path = Path(path)
    if not exists(path):
        raise UserError(f"no training checkpoint at {path}",
                        "train without --resume to start a run (it writes checkpoints there), or pass "
                        "--checkpoint-dir to point at the run's checkpoint")
    try:
        record = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"the training checkpoint {path} is unreadable ({exc})",
                        "start the run again without --resume (and --force)") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{path} is not a training checkpoint of this lrdeploy ({FORMAT})",
                        "start the run again without --resume")
    for name, want in record.get("sha256", {}).items():
        if _sha256(path / name) != want:
            raise UserError(f"the training checkpoint {path} is damaged: {name} does not match its sha256",
                            "start the run again without --resume (and --force)")
    weights = load_file(str(path / WEIGHTS))
    tensors = load_file(str(path / STATE))
    return weights, join_tensors(record["state"], tensors)


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a finished run's checkpoint (its bundle is the result now)."""
    path = Path(path)
    if (path / META).is_file():
        for name in (META, WEIGHTS, STATE):
            (path / name).unlink(missing_ok=True)
        if not any(path.iterdir()):
            path.rmdir()
