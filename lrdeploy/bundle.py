"""Save and load bundles: ``weights.safetensors`` + ``manifest.json`` in one directory.

A bundle is what ``train``/``compress`` write and everything downstream reads. It is safe to load from an
untrusted source: weights are safetensors (no pickle), their sha256 is checked against the manifest, and the
model is rebuilt from the registry plus the recorded low-rank structure, then filled with ``strict=True``.
The directory is written beside its destination and swapped in whole, so a crash never leaves half a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrdeploy import __version__, atomic
from lrdeploy.errors import UserError

FORMAT = "lrdeploy-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
BUNDLE_FILES = frozenset({MANIFEST, WEIGHTS})
_BUNDLE_HINT = "pass a directory written by lrdeploy train/compress"
_CORRUPT_HINT = "the bundle is corrupt; re-create it"
_RESERVED = frozenset({
    "format", "format_version", "lrdeploy_version", "created", "model", "structure", "method", "dataset",
    "metrics", "params", "flops", "weights_sha256", "weights_bytes",
})


@dataclass
class Bundle:
    """A loaded bundle: the rebuilt model (eval mode, on CPU) and its manifest."""

    path: Path
    manifest: dict[str, Any]
    model: nn.Module

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch dimension (e.g. ``(1, 28, 28)``)."""
        return tuple(int(d) for d in self.manifest["model"]["input_shape"])


def _weights_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    # Clones: safetensors refuses tensors that share storage (tied weights, views) and non-contiguous ones.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return save(tensors)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _is_bundle(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_output_dir(out_dir: str | os.PathLike) -> None:
    """Fail before any work if ``out_dir`` could not take a bundle (call it before training/compressing)."""
    _check_destination(Path(out_dir))


def _check_destination(out_dir: Path) -> None:
    """Refuse to replace anything that is not one of our bundles: never clobber the user's files."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise UserError(f"{out_dir} exists and is not a directory", "choose another --out path")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    if not _is_bundle(out_dir):
        raise UserError(
            f"{out_dir} is not empty and is not an lrdeploy bundle ({', '.join(entries[:3])}"
            f"{', ...' if len(entries) > 3 else ''})",
            "choose a new or empty --out directory; lrdeploy only replaces its own bundles",
        )
    foreign = [e for e in entries if e not in BUNDLE_FILES]
    if foreign:
        raise UserError(
            f"bundle {out_dir} also holds files lrdeploy did not write ({', '.join(foreign[:3])})",
            "move them elsewhere or choose another --out directory",
        )


def save_bundle(
    out_dir: str | os.PathLike,
    model: nn.Module,
    *,
    model_name: str,
    model_args: Mapping[str, Any],
    method: Mapping[str, Any],
    dataset: Mapping[str, Any],
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> Path:
    """Write ``model`` as a bundle at ``out_dir`` (replacing an existing bundle atomically); return the path.

    ``input_shape`` (one sample, no batch) defaults to the registry's shape for ``model_name``.
    """
    from lrdeploy.flops import count_flops, count_params
    from lrdeploy.layers.structure import describe
    from lrdeploy.models import get_spec

    out_dir = Path(out_dir)
    _check_destination(out_dir)
    if extra and (clash := sorted(set(extra) & _RESERVED)):
        raise ValueError(f"extra manifest keys {clash} would overwrite the bundle's own fields")
    if input_shape is None:
        input_shape = tuple(get_spec(model_name).input_shape)
    was_training = model.training
    model.eval()
    try:
        flops = count_flops(model, tuple(input_shape))
    finally:
        model.train(was_training)
    weights = _weights_bytes(model)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lrdeploy_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_name, "args": dict(model_args), "input_shape": [int(d) for d in input_shape]},
        "structure": describe(model),
        "method": dict(method),
        "dataset": dict(dataset),
        "metrics": dict(metrics),
        "params": count_params(model),
        "flops": flops,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "weights_bytes": len(weights),
        **(extra or {}),
    }
    text = json.dumps(manifest, indent=2) + "\n"  # before any write: unserialisable → no debris

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not mkdtemp) so the bundle gets the user's umask permissions rather than 0700; the
    # directory is the atomic unit, so the files inside need no rename dance of their own.
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.tmp"
    os.mkdir(tmp)
    try:
        _write_synced(tmp / WEIGHTS, weights)
        _write_synced(tmp / MANIFEST, text.encode("utf-8"))
        _check_destination(out_dir)  # again: something may have appeared while we were writing
        atomic.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate ``manifest.json`` of the bundle at ``path`` (cheap: does not touch the weights)."""
    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    if not path.exists():
        raise UserError(f"bundle {path} does not exist", _BUNDLE_HINT)
    if not path.is_dir():
        raise UserError(f"{path} is not a bundle directory", _BUNDLE_HINT)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{path} is not an lrdeploy bundle (no {MANIFEST})", _BUNDLE_HINT)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{manifest_path} is not valid JSON ({exc})", _CORRUPT_HINT) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path} is not an lrdeploy bundle manifest", _BUNDLE_HINT)
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"bundle {path} has format version {version!r}; this lrdeploy reads up to {FORMAT_VERSION}",
            "upgrade lrdeploy",
        )
    model = manifest.get("model")
    if (
        not isinstance(model, dict) or not isinstance(model.get("name"), str)
        or not isinstance(model.get("args", {}), dict) or not isinstance(model.get("input_shape"), list)
        or not isinstance(manifest.get("structure", {}), dict)
        or not isinstance(manifest.get("weights_sha256"), str)
    ):
        raise UserError(
            f"{manifest_path} lacks model name/args/input_shape, structure or weights_sha256", _CORRUPT_HINT
        )
    return manifest


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Load and verify a bundle; the model is rebuilt from the registry and returned in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from lrdeploy.layers.structure import apply
    from lrdeploy.models import create_model

    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    manifest = read_manifest(path)
    weights_path = path / WEIGHTS
    if not weights_path.is_file():
        raise UserError(f"bundle {path} has no {WEIGHTS}", "the bundle is incomplete; re-create it")
    data = weights_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["weights_sha256"]:
        raise UserError(
            f"{weights_path}: weights do not match the manifest checksum — "
            "the bundle was modified or truncated",
            "re-export it",
        )
    try:
        state = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise UserError(f"{weights_path} is not a readable safetensors file ({exc})", "re-export it") from exc

    spec = manifest["model"]
    model = create_model(spec["name"], **spec.get("args", {}))
    model = apply(model, manifest.get("structure", {}))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[1:3])
        raise UserError(
            f"weights in {path} do not fit model {spec['name']!r} with the recorded structure: "
            f"{detail[:300]}",
            "the manifest and weights disagree; re-export the bundle",
        ) from exc
    model.eval()
    return Bundle(path=path, manifest=manifest, model=model)


# --- plain PyTorch checkpoints (`lrdeploy init --from-checkpoint`) ---

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise UserError(
            f"{path} holds no state dict (expected name → tensor, or one under 'state_dict'/'model')",
            "save it with torch.save(model.state_dict(), path)",
        )
    state = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def load_state_dict_checkpoint(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a user's plain PyTorch checkpoint into ``model`` (in place) and return the model.

    Uses ``torch.load(weights_only=True)`` so a malicious pickle cannot run code; ``.safetensors`` also works.
    Every key and shape must match: a partial load would silently ship random weights.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist", "pass the path of a saved state dict (.pt)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a loadable checkpoint"
        raise UserError(
            f"{path} could not be read as a PyTorch checkpoint with weights_only=True "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})",
            "save a plain state dict: torch.save(model.state_dict(), path)",
        ) from exc
    state = _unwrap(obj, path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {_few(wrong)}")
    if problems:
        raise UserError(
            f"checkpoint {path} does not match the model: {'; '.join(problems)}",
            "the checkpoint must come from the same (dense) architecture and constructor arguments",
        )
    model.load_state_dict(state, strict=True)
    return model
