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
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrdeploy import __version__, atomic, run_record
from lrdeploy.errors import UserError
from lrdeploy.manifest_schema import (
    BUNDLE_HINT,
    DIGEST_KEY,
    manifest_digest,
    read_json_file,
    validate_manifest,
)
from lrdeploy.outputs import BUNDLE_FORMAT, BUNDLE_MANIFEST, BUNDLE_WEIGHTS, check_bundle_destination

FORMAT = BUNDLE_FORMAT
FORMAT_VERSION = 1
MANIFEST = BUNDLE_MANIFEST
WEIGHTS = BUNDLE_WEIGHTS
_BUNDLE_HINT = "pass a directory written by lrdeploy train/compress"
_CORRUPT_HINT = "the bundle is corrupt; re-create it"
_RESERVED = frozenset({
    "format", "format_version", "lrdeploy_version", "created", "model", "structure", "method", "dataset",
    "metrics", "params", "flops", "weights_sha256", "weights_bytes", "manifest_sha256", "run",
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


def check_output_dir(out_dir: str | os.PathLike, *, force: bool = False,
                     inputs: tuple[str | os.PathLike | None, ...] = ()) -> None:
    """Fail before any work if ``out_dir`` could not take a bundle (call it before training/compressing):
    new or empty, or with ``force`` one of our bundles; never anything else."""
    check_bundle_destination(out_dir, force=force, inputs=inputs)


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
    task: str | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` as a bundle at ``out_dir``; return the path.

    An existing bundle there is replaced (atomically, crash-safe) only with ``force``.

    ``input_shape`` (one sample, no batch) defaults to the registry's shape for ``model_name``; ``task``
    to the task the model spec declares. The manifest records both, and how the model is built (its source:
    the zoo, a user's module imported by name, a Hugging Face directory).
    """
    from lrdeploy.flops import count_flops, count_params
    from lrdeploy.layers.structure import describe
    from lrdeploy.models import get_spec

    out_dir = Path(out_dir)
    check_bundle_destination(out_dir, force=force)
    if extra and (clash := sorted(set(extra) & _RESERVED)):
        raise ValueError(f"extra manifest keys {clash} would overwrite the bundle's own fields")
    spec = get_spec(model_name)
    if input_shape is None:
        input_shape = tuple(spec.input_shape)
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
        "model": {"name": model_name, "args": dict(model_args), "input_shape": [int(d) for d in input_shape],
                  "task": task or spec.task, "source": spec.source,
                  **({"inputs": [i.to_dict() for i in spec.inputs]} if spec.inputs else {})},
        "structure": describe(model),
        "method": dict(method),
        "dataset": dict(dataset),
        "metrics": dict(metrics),
        "params": count_params(model),
        "flops": flops,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "weights_bytes": len(weights),
        **({"run": run} if (run := run_record.current()) else {}),  # the command line that wrote it
        **(extra or {}),
    }
    text = manifest_text(manifest, out_dir)

    # The directory is staged beside its destination and installed by a journalled rename, so a crash leaves
    # the old bundle or the new one; os.mkdir gives the user's umask permissions (not mkdtemp's 0700).
    with atomic.Staging(out_dir.parent) as stage:
        tmp = stage.path(out_dir.name)
        os.mkdir(tmp)
        _write_synced(tmp / WEIGHTS, weights)
        _write_synced(tmp / MANIFEST, text.encode("utf-8"))
        check_bundle_destination(out_dir, force=force)  # again: something may have appeared meanwhile
    return out_dir


def manifest_text(manifest: dict[str, Any], out_dir: str | os.PathLike) -> str:
    """The manifest as written: JSON-round-tripped (unserialisable → an error before any write), validated
    (a manifest this lrdeploy could not read back is refused) and covered by its digest, like the weights."""
    manifest = json.loads(json.dumps({k: v for k, v in manifest.items() if k != DIGEST_KEY}))
    validate_manifest(manifest, f"manifest of bundle {out_dir}",
                      hint="lrdeploy could not load this bundle back; check the model arguments and metadata")
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    return json.dumps(manifest, indent=2) + "\n"


def update_manifest(path: str | os.PathLike, key: str, value: Any) -> None:
    """Set ``manifest["method"][key]`` of the bundle at ``path`` in place, re-validated and re-digested
    (e.g. the λ search's record on the trial it chose, before that bundle is installed)."""
    manifest = read_manifest(path)
    manifest["method"][key] = value
    atomic.write_text(Path(path) / MANIFEST, manifest_text(manifest, path))


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
    manifest = read_json_file(manifest_path, _CORRUPT_HINT)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path} is not an lrdeploy bundle manifest", _BUNDLE_HINT)
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise UserError(
            f"bundle {path} has format version {version!r}; this lrdeploy reads up to {FORMAT_VERSION}",
            "upgrade lrdeploy",
        )
    # Every value first (a precise message for the edit that broke something), then the digest (an edit
    # that left the manifest well-formed). Bundles written before the digest existed are only validated.
    validate_manifest(manifest, str(manifest_path))
    digest = manifest.get(DIGEST_KEY)
    if digest is not None and digest != manifest_digest(manifest):
        raise UserError(
            f"{manifest_path} was tampered or hand-edited: its checksum ({DIGEST_KEY}) does not match its "
            "contents", "re-create the bundle with lrdeploy train/compress/init; never edit manifest.json",
        )
    return manifest


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Load and verify a bundle; the model is rebuilt from the registry and returned in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load

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
    model = _build_model(spec, manifest.get("structure", {}), state, path)
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


def _build_model(spec: dict[str, Any], structure: dict[str, Any], state: Mapping[str, torch.Tensor],
                 path: Path) -> nn.Module:
    """Rebuild the recorded architecture, first on the meta device (no memory) to prove it fits the weights.

    The manifest's values are validated, but a size argument can be in range and still wrong (``width`` of
    a ResNet): the dry build turns that into a one-line error instead of an allocation of terabytes.
    """
    from lrdeploy.layers.structure import apply
    from lrdeploy.models import create_model
    from lrdeploy.models.registry import model_source

    source = model_source(spec["name"])
    if source is not None and source.kind == "import":  # rebuilding it runs the user's module: say so first
        from lrdeploy.models.user_module import announce_bundle_import

        announce_bundle_import(spec["name"], path)

    def build() -> nn.Module:
        return apply(create_model(spec["name"], **spec.get("args", {})), structure)

    try:
        with torch.device("meta"):
            probe: nn.Module | None = build()
    except UserError:
        raise
    except Exception:  # a builder that cannot run on the meta device: the real build below reports
        probe = None
    if probe is not None:
        want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in state.items()}
        if want != have:
            missing, unexpected = [k for k in want if k not in have], [k for k in have if k not in want]
            wrong = [f"{k} {have[k]} vs {v}" for k, v in want.items() if k in have and have[k] != v]
            problems = [f"{label} {_few(names)}" for label, names in
                        (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
            raise UserError(
                f"weights in {path} do not fit model {spec['name']!r} with the recorded structure: "
                f"{'; '.join(problems)[:300]}",
                "the manifest and weights disagree; re-export the bundle",
            )
    try:
        return build()
    except UserError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"model {spec['name']!r} cannot be built from the arguments in {path / MANIFEST} "
                        f"({type(exc).__name__}: {first})", BUNDLE_HINT) from None


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
    Every key and shape must match: a partial load would silently ship random weights. Every tensor must be
    dense, hold data and, where the model has floats, be a finite real float (:func:`_check_tensor_values`):
    NaN weights would otherwise become a bundle that exports, benchmarks and "passes" as garbage.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory", "pass the path of a saved state dict file (.pt)")
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
            f"({type(exc).__name__}: {_load_error_detail(exc)})",
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
    for key, reference in expected.items():  # model order: the first offending key is the one named
        _check_tensor_values(path, key, state[key], reference)
    model.load_state_dict(state, strict=True)
    return model


_BLOCKED_GLOBAL = re.compile(  # "Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y whose module ..."
    r"unsupported\s+(?:global:\s*)?GLOBAL\s+[\w.]+(?:\s+whose module [\w.]+ is blocked)?", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _load_error_detail(exc: BaseException, limit: int = 200) -> str:
    """One line saying why ``torch.load`` refused the file.

    The weights-only unpickler's message opens with three lines of advice (PyTorch 2.6's default change,
    "Re-running with weights_only=False ...") and names what it blocked only later ("Unsupported global:
    GLOBAL os.system ..."); the first line cut at 200 characters never said what was blocked, so that part
    is kept whole when present.
    """
    text = _ANSI.sub("", str(exc)).strip()
    blocked = _BLOCKED_GLOBAL.search(text)
    if blocked:
        return f"the weights-only unpickler blocked it: {blocked.group(0)}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first[:limit]


def _check_tensor_values(path: Path, key: str, value: torch.Tensor, reference: torch.Tensor) -> None:
    """UserError naming ``key`` if ``value`` cannot stand in for the model's ``reference`` tensor.

    Sparse and meta tensors carry no dense data to load (a meta tensor has none at all; ``load_state_dict``
    would copy garbage or fail deep inside torch). Where the model holds floats, a complex tensor would lose
    its imaginary part and an integer/bool one would be a different quantity, silently cast; a NaN/Inf
    weight makes every output NaN.
    """
    where = f"checkpoint {path}: tensor {key!r}"
    if value.is_meta or value.device.type == "meta":
        raise UserError(f"{where} is a meta tensor (shape only, no data)",
                        "save the state dict of a model whose weights were materialised")
    if value.layout != torch.strided:
        raise UserError(f"{where} is a sparse tensor (layout {str(value.layout).removeprefix('torch.')})",
                        "save dense weights: call .to_dense() on each tensor before torch.save")
    if not reference.is_floating_point():
        return
    dtype = str(value.dtype).removeprefix("torch.")
    want = str(reference.dtype).removeprefix("torch.")
    if value.is_complex():
        raise UserError(f"{where} is complex ({dtype}) where the model has real {want} weights",
                        "save the real-valued state dict of the same architecture")
    if not value.is_floating_point():
        raise UserError(f"{where} is {dtype} where the model has floating-point {want} weights",
                        "save the model's own state dict: torch.save(model.state_dict(), path)")
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        nan = int(torch.isnan(value).sum())
        inf = int(value.numel() - int(finite.sum()) - nan)
        from lrdeploy.parity_stats import describe_nonfinite

        raise UserError(f"{where} contains {describe_nonfinite(nan, inf)} (of {value.numel()})",
                        "the checkpoint is broken (a diverged training run?): use an earlier one")
