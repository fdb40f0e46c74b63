"""Golden outputs: a reference model's inputs and outputs frozen on disk, so a later artefact can be checked
against them in CI without the reference model (Polygraphy's ``--save-outputs``/``--load-outputs``).

A golden directory holds two files, written together and atomically (a temporary sibling directory renamed
into place, so a crash leaves the old golden set or the new one):

- ``golden.npz`` — ``inputs/<name>`` per model input (N × sample shape: token ids and a mask, or one image
  batch), ``outputs/<name>`` per output (the reference's, as it produced them), ``labels`` (N…, optional:
  lets a check report top-1 accuracy too). Plain arrays only: loaded with ``allow_pickle=False``.
  Sets written before named inputs (``lrdeploy.golden/1``) hold one unnamed ``inputs`` array; they still
  load, as the input ``input`` (a one-input model takes it under its own name).
- ``golden.json`` — the manifest::

      {"schema": "lrdeploy.golden/2", "created", "lrdeploy_version", "command",
       "dataset": {"name", "split", "samples": N, "selection": "first N test examples"},
       "precision": "fp16",                 # the preset a check applies unless told otherwise
       "tolerance": {...},                  # that preset's limits when the set was saved (for the record)
       "reference": {...artefact summary: name, source, model, method, params...},
       "arrays": {"inputs/input": {"shape", "dtype", "sha256"}, "outputs/output": {...}, "labels": {...}},
       "files": {"golden.npz": sha256 of the file}}

Each array's sha256 covers its dtype, shape and C-order bytes; the file's sha256 is checked first. A golden
set that fails either check is refused with a one-line error: a tampered or truncated reference must never
pass a candidate.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy import atomic
from lrdeploy.errors import UserError
from lrdeploy.manifest_schema import GOLDEN_HINT, read_json_file, validate_golden

from .parity import Tolerance, accuracy, get_tolerance, judge, output_parity, run_batched
from .report import command_line
from .runtimes.base import Runtime

GOLDEN_SCHEMA = "lrdeploy.golden/2"
READABLE_SCHEMAS = ("lrdeploy.golden/1", GOLDEN_SCHEMA)
LEGACY_INPUT = "input"  # the name a /1 set's unnamed inputs are read under
ARRAYS_FILE = "golden.npz"
MANIFEST_FILE = "golden.json"
GOLDEN_FILES = frozenset({ARRAYS_FILE, MANIFEST_FILE})
DEFAULT_SAMPLES = 256


def array_sha256(a: np.ndarray) -> str:
    """sha256 over dtype, shape and C-order bytes (two arrays with equal bytes but other shapes differ)."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}|{','.join(map(str, a.shape))}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _record(a: np.ndarray) -> dict[str, Any]:
    return {"shape": list(a.shape), "dtype": a.dtype.str, "sha256": array_sha256(a)}


@dataclass
class Golden:
    """A loaded, verified golden set."""

    path: Path
    inputs: dict[str, np.ndarray]  # input name -> N × sample shape
    outputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision") or "fp32")

    @property
    def samples(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def is_golden_dir(path: Path) -> bool:
    """A directory holding only the files of a golden set (replaceable with --force)."""
    entries = {p.name for p in path.iterdir()}
    return bool(entries) and entries <= set(GOLDEN_FILES)


def check_destination(out: str | Path, force: bool = False) -> None:
    """Fail before any work when ``out`` could not take a golden set: new or empty, or with ``force`` a
    golden set; never the user's other files."""
    from lrdeploy.outputs import Outputs

    Outputs(force=force).directory(out, "--save-golden", what="golden set", is_ours=is_golden_dir)


def save_golden(
    out_dir: str | Path,
    inputs: Mapping[str, Any] | Any,
    outputs: Mapping[str, Any] | Any,
    *,
    labels: Any = None,
    dataset: Mapping[str, Any] | None = None,
    precision: str | Tolerance = "fp32",
    reference: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write a golden set to ``out_dir`` (see the module docstring); returns the directory.

    ``inputs`` is ``{name: array}`` (the model's named inputs) or one array (stored as ``input``);
    ``outputs`` is ``{name: array}`` or one array (stored as ``output``). Every array's first axis is the
    sample axis and must agree across inputs, outputs and labels.
    """
    from lrdeploy import __version__

    out = Path(out_dir)
    check_destination(out, force)
    tol = get_tolerance(precision)
    ins = dict(inputs) if isinstance(inputs, Mapping) else {LEGACY_INPUT: inputs}
    outs = dict(outputs) if isinstance(outputs, Mapping) else {"output": outputs}
    if not ins:
        raise UserError("a golden set needs at least one input")
    arrays: dict[str, np.ndarray] = {}
    for kind, named in (("inputs", ins), ("outputs", outs)):
        for name, a in named.items():
            if not name or "/" in name:
                raise UserError(f"{kind[:-1]} name {name!r} cannot be stored in a golden set")
            arrays[f"{kind}/{name}"] = np.ascontiguousarray(np.asarray(a))
    if labels is not None:
        arrays["labels"] = np.ascontiguousarray(np.asarray(labels))
    x = next(iter(arrays.values()))
    if x.ndim == 0 or x.shape[0] == 0:
        raise UserError("a golden set needs at least one input sample")
    for name, a in arrays.items():
        if a.dtype == object:
            raise UserError(f"golden array {name} is not numeric")
        if name.startswith("outputs/") and a.dtype.kind in "fc" and not np.isfinite(a).all():
            from lrdeploy.parity_stats import describe_nonfinite, nonfinite_counts

            raise UserError(f"golden output {name.split('/', 1)[1]!r} contains "
                            f"{describe_nonfinite(*nonfinite_counts(a))}: it could not judge any candidate",
                            "save the golden set from a working reference model")
        if a.ndim == 0 or a.shape[0] != x.shape[0]:
            raise UserError(f"golden array {name} has {a.shape[0] if a.ndim else 0} samples, inputs have "
                            f"{x.shape[0]}")
    for name, a in arrays.items():
        if name.startswith("inputs/") and a.dtype.kind not in "fiub":
            raise UserError(f"golden input {name.split('/', 1)[1]!r} has dtype {a.dtype}: not a model input")

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    blob = buf.getvalue()
    manifest = {
        "schema": GOLDEN_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lrdeploy_version": __version__,
        "command": command_line(),
        "dataset": {**(dict(dataset) if dataset else {}), "samples": int(x.shape[0])},
        "precision": tol.precision,
        "tolerance": tol.to_dict(),
        "reference": dict(reference) if reference else {},
        "arrays": {name: _record(a) for name, a in arrays.items()},
        "files": {ARRAYS_FILE: hashlib.sha256(blob).hexdigest()},
    }
    text = json.dumps(manifest, indent=2, allow_nan=False, default=str) + "\n"
    with atomic.Staging(out.parent) as stage:  # the directory appears whole, replacing the old one
        tmp = stage.path(out.name)
        tmp.mkdir()
        (tmp / ARRAYS_FILE).write_bytes(blob)
        (tmp / MANIFEST_FILE).write_text(text, encoding="utf-8")
    return out


def load_golden(path: str | Path) -> Golden:
    """Read and verify a golden set; anything missing, altered or not ours is a one-line UserError."""
    root = Path(path)
    manifest_path, arrays_path = root / MANIFEST_FILE, root / ARRAYS_FILE
    if not root.is_dir():
        raise UserError(f"golden set {root} does not exist", "create one with `lrdeploy compare DENSE CAND "
                        "--save-golden DIR`")
    if not manifest_path.is_file() or not arrays_path.is_file():
        raise UserError(f"{root} is not a golden set (needs {MANIFEST_FILE} and {ARRAYS_FILE})")
    manifest = read_json_file(manifest_path, GOLDEN_HINT, invalid="is not readable JSON")
    if not isinstance(manifest, dict) or manifest.get("schema") not in READABLE_SCHEMAS:
        found = manifest.get("schema") if isinstance(manifest, dict) else None
        found = found[:60] if isinstance(found, str) else None
        raise UserError(f"{manifest_path} is not a {GOLDEN_SCHEMA} manifest (schema {found!r})")
    validate_golden(manifest, str(manifest_path))  # every field: types, sizes, finite numbers, depth
    blob = arrays_path.read_bytes()
    expected = (manifest.get("files") or {}).get(ARRAYS_FILE)
    if hashlib.sha256(blob).hexdigest() != expected:
        raise UserError(f"golden set {root}: {ARRAYS_FILE} checksum mismatch (altered or truncated)",
                        "regenerate it with --save-golden; never edit a golden set by hand")
    _check_unpacked_size(root, blob)
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (ValueError, OSError) as exc:
        raise UserError(f"golden set {root}: {ARRAYS_FILE} is not readable ({exc})") from None
    records = manifest.get("arrays") or {}
    if set(records) != set(arrays):
        raise UserError(f"golden set {root}: arrays {sorted(arrays)} do not match the manifest "
                        f"{sorted(records)}")
    for name, a in arrays.items():
        if array_sha256(a) != (records[name] or {}).get("sha256"):
            raise UserError(f"golden set {root}: array {name} checksum mismatch (altered)",
                            "regenerate it with --save-golden")
    outputs = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("outputs/")}
    inputs = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("inputs/")}
    if "inputs" in arrays:  # lrdeploy.golden/1: one unnamed input
        inputs = {LEGACY_INPUT: arrays["inputs"], **inputs}
    if not inputs or not outputs:
        raise UserError(f"golden set {root} holds no inputs or no outputs")
    get_tolerance(manifest.get("precision") or "fp32")  # an unknown preset is reported now, not mid-check
    return Golden(root, inputs, outputs, arrays.get("labels"), manifest)


MAX_UNPACKED_BYTES = 4 << 30  # a golden set holds a few hundred samples: MBs, not GBs


def _check_unpacked_size(root: Path, blob: bytes) -> None:
    """Refuse an archive whose members would unpack past :data:`MAX_UNPACKED_BYTES` (a zip bomb), before
    numpy allocates anything: the sizes come from the zip directory, not from decompressing."""
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"golden set {root}: {ARRAYS_FILE} is not readable ({exc})") from None
    if total > MAX_UNPACKED_BYTES:
        raise UserError(f"golden set {root}: {ARRAYS_FILE} would unpack to {total / 2**30:.1f} GiB (at most "
                        f"{MAX_UNPACKED_BYTES / 2**30:.0f} GiB)", "regenerate it with --save-golden")


def _check_reference_finite(golden: Golden, name: str, ref: np.ndarray) -> None:
    """A golden output holding NaN/Inf cannot vouch for any candidate: a one-line UserError, not a verdict."""
    from lrdeploy.parity_stats import describe_nonfinite, nonfinite_counts

    nan, inf = nonfinite_counts(ref)
    if nan or inf:
        raise UserError(f"golden set {golden.path}: reference output {name!r} contains "
                        f"{describe_nonfinite(nan, inf)}, so it cannot judge a candidate",
                        "re-create it with --save-golden from a working reference model")


def check_golden(
    golden: Golden,
    runtime: Runtime,
    *,
    precision: str | Tolerance | None = None,
    batch_size: int = 256,
    candidate: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``golden.inputs`` (named) through ``runtime`` and judge every golden output against the
    candidate's output of the same name.

    Returns ``{"schema": "lrdeploy.check/1", "golden": {...}, "candidate": {...}, "precision", "outputs":
    {name: parity + verdict}, "accuracy": {...} | absent, "failures": [...], "passed"}``. A golden output
    the candidate does not produce is a failure; a set with one output judges a one-output candidate
    whatever its output is called (``matched_by``: "position"); outputs the golden set does not hold are
    listed under ``unchecked_outputs``.
    """
    tol = get_tolerance(precision if precision is not None else golden.precision)
    for name, ref in golden.outputs.items():  # before running the candidate: nothing could pass against them
        _check_reference_finite(golden, name, ref)
    outs = run_batched(runtime, golden.inputs, batch_size)
    pairs = _pair_outputs(golden.outputs, outs)
    results: dict[str, Any] = {}
    failures: list[str] = []
    for name, ref in golden.outputs.items():
        got = pairs.get(name)
        if got is None:
            results[name] = {"failures": [f"the candidate has no output {name!r}"], "passed": False}
            failures.append(f"{name}: missing from the candidate (outputs: {', '.join(outs)})")
            continue
        parity = judge(output_parity(ref, got[1]), tol)  # NaN/Inf in the candidate: a named failure
        if got[0] != name:
            parity["matched_by"] = f"position (candidate output {got[0]!r})"
        results[name] = parity
        failures += [f"{name}: {f}" for f in parity["failures"]]
    result: dict[str, Any] = {
        "schema": "lrdeploy.check/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "golden": {"path": str(golden.path), "dataset": golden.manifest.get("dataset"),
                   "reference": golden.manifest.get("reference"), "saved_precision": golden.precision,
                   "created": golden.manifest.get("created"),
                   "inputs": {k: list(v.shape) for k, v in golden.inputs.items()}},
        "candidate": dict(candidate or {}),
        "precision": tol.precision,
        "outputs": results,
    }
    unchecked = sorted(set(outs) - {g[0] for g in pairs.values()})
    if unchecked:
        result["unchecked_outputs"] = unchecked
    labels, (first, ref) = golden.labels, next(iter(golden.outputs.items()))
    if labels is not None and ref.ndim == 2 and labels.ndim == 1 and first in pairs:
        ds = golden.manifest.get("dataset") or {}
        ref_acc, cand_acc = accuracy(ref, labels), accuracy(pairs[first][1], labels)
        result["accuracy"] = {"dataset": ds.get("name"), "split": ds.get("split"),
                              "samples": int(len(labels)), "reference": ref_acc, "candidate": cand_acc,
                              "delta": cand_acc - ref_acc}
    result["failures"] = failures
    result["passed"] = not failures
    return result


def _pair_outputs(golden: Mapping[str, np.ndarray], outs: Mapping[str, np.ndarray]
                  ) -> dict[str, tuple[str, np.ndarray]]:
    """golden output name -> (candidate output name, its values): by name, or by position when both sides
    have one output (an export that renamed it judges the same tensor)."""
    if len(golden) == 1 and len(outs) == 1:
        (name,), (cand_name, values) = golden, next(iter(outs.items()))
        return {name: (cand_name, values)}
    return {name: (name, outs[name]) for name in golden if name in outs}
