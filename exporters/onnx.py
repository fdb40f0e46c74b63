"""Export a bundle or nn.Module to ONNX: fold, export, check, verify against PyTorch, stamp, write atomically.

Two files come out:

- ``<stem>.onnx`` — standard ONNX ops only, dynamic batch, portable to any runtime (TensorRT, OpenVINO, ...).
- ``<stem>.ort.onnx`` — ONNX Runtime's offline-optimised graph at ``ORT_ENABLE_EXTENDED`` (fused Conv+ReLU,
  Gemm+ReLU, GELU, ...; ``com.microsoft`` contrib ops, so ORT-only). EXTENDED, not ALL: ALL adds the NCHWc
  layout transformer, whose blocked layouts depend on the CPU's vector width; ORT itself warns that such a
  saved model "should only be used in the same environment the model was optimized in". EXTENDED fusions
  are CPU-independent, so the file can be built once and shipped; ORT still applies its layout pass at load.

Both graphs are run in ONNX Runtime against the PyTorch model before anything is written (rel-L2 < 1e-5 in
fp32); a mismatch fails the export. Nothing is written until everything passed, and each file is written to
a temporary sibling and renamed, so a failure never leaves half a file.

Exporter choice (``exporter="auto"``) is measured in ``docs/exporter-choice.md``
(``scripts/compare_exporters.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import nn

from lrdeploy import __version__, atomic
from lrdeploy.errors import UserError
from lrdeploy.exporters.layer_times import SCOPE_KEY, scope_from_torch_metadata

if TYPE_CHECKING:
    import onnxruntime

    from lrdeploy.bundle import Bundle

EXPORTERS = ("dynamo", "legacy")
DEFAULT_EXPORTER = "dynamo"  # see docs/exporter-choice.md for the measurement behind this choice
PARITY_RTOL = 1e-5  # relative L2, fp32
INPUT_NAME = "input"
OUTPUT_NAME = "output"
META_MANIFEST = "lrdeploy.manifest"
META_VERSION = "lrdeploy.version"
META_EXPORT = "lrdeploy.export"
META_MANIFEST_SHA256 = "lrdeploy.manifest_sha256"  # sha256 of the META_MANIFEST text: an edit is detected
META_EXPORT_SHA256 = "lrdeploy.export_sha256"  # the same for META_EXPORT
OPTIMIZED_SUFFIX = ".ort.onnx"
_MAX_BATCH = 1 << 20
_INVALID = "{path} is not a valid ONNX model (truncated or corrupt)"


@dataclass
class ExportResult:
    """What was written and how well it matched PyTorch."""

    path: Path
    optimized_path: Path | None
    exporter: str
    opset: int
    nodes: int
    seconds: float  # wall time of the torch exporter alone
    parity_rel_l2: float  # worst over every checked graph and batch size
    optimized_nodes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["optimized_path"] = str(self.optimized_path) if self.optimized_path else None
        return d


def optimized_path_for(path: str | os.PathLike) -> Path:
    """``model.onnx`` → ``model.ort.onnx`` (the ORT-optimised sibling)."""
    path = Path(path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + OPTIMIZED_SUFFIX)


# --- the two torch exporters ---


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence known-harmless exporter noise (legacy DeprecationWarning, torchvision-op and pytree notes)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch.onnx.*")
        # several inputs sharing the "batch" Dim: the dynamo exporter notes that it renames only once
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # legacy exporter: eager-only checks
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _graph_io(model: nn.Module, n_inputs: int) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """Input names, output names and the legacy exporter's ``dynamic_axes`` (batch and declared lengths).

    A model that declares its inputs (:mod:`lrdeploy.models.inputs`) names them; otherwise the single input
    is ``input`` and the output ``output``, with only the batch dynamic.
    """
    from lrdeploy.models.inputs import declares_inputs, dynamic_axes, input_names, output_names

    if declares_inputs(model):
        names, outs, axes = list(input_names(model)), list(output_names(model)), dynamic_axes(model)
        if len(names) != n_inputs:
            raise UserError(f"the model declares {len(names)} inputs ({', '.join(names)}) but its "
                            f"example_inputs gives {n_inputs}", "fix the model's input_names/example_inputs")
        axes = {k: {0: "batch", **{a: n for a, n in v.items() if a != 0}} for k, v in axes.items()}
        for name in (*names, *outs):
            axes.setdefault(name, {0: "batch"})
        return names, outs, axes
    return [INPUT_NAME], [OUTPUT_NAME], {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}


def _dynamic_shapes(model: nn.Module, names: Sequence[str], axes: Mapping[str, Mapping[int, str]]) -> tuple:
    """The dynamo exporter's ``dynamic_shapes``: one ``torch.export.Dim`` per axis name, shared by every input
    that uses it; lengths capped at the model's ``max_len`` (its position table ends there).

    Tuple form, one entry per input: dict keys would have to be forward()'s argument names (baseline §3 (b)).
    """
    cap = getattr(model, "max_len", None)
    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        if name not in dims:
            top = _MAX_BATCH if name == "batch" or not isinstance(cap, int) else cap
            dims[name] = torch.export.Dim(name, min=1, max=top)
        return dims[name]

    return tuple({axis: dim(n) for axis, n in sorted(axes.get(name, {0: "batch"}).items())} for name in names)


def _export_dynamo(
    model: nn.Module, example: tuple[torch.Tensor, ...], opset: int, dynamic_batch: bool
) -> onnx.ModelProto:
    names, outs, axes = _graph_io(model, len(example))
    dynamic_shapes = _dynamic_shapes(model, names, axes) if dynamic_batch else None
    program = torch.onnx.export(
        model, tuple(example), None, dynamo=True, opset_version=opset, input_names=names,
        output_names=outs, dynamic_shapes=dynamic_shapes, verbose=False,
    )
    return program.model_proto


def _export_legacy(
    model: nn.Module, example: tuple[torch.Tensor, ...], opset: int, dynamic_batch: bool
) -> onnx.ModelProto:
    buf = io.BytesIO()
    names, outs, axes = _graph_io(model, len(example))
    torch.onnx.export(
        model, tuple(example), buf, dynamo=False, opset_version=opset, input_names=names,
        output_names=outs, dynamic_axes=axes if dynamic_batch else None, do_constant_folding=True,
    )
    return onnx.load_from_string(buf.getvalue())


# Oldest opset accepted: per-channel QuantizeLinear/DequantizeLinear (``axis``, used by --precision int8)
# exist from opset 13; the dynamo exporter implements nothing older than 18 (it converts down, and keeps 18
# where that fails, which export records).
MIN_OPSET = 13


def supported_opsets(exporter: str = "auto") -> tuple[int, int]:
    """(lowest, highest) opset the installed exporter and onnx can write.

    dynamo: up to onnx's newest opset (its version converter's limit; beyond it the exporter prints a
    traceback and silently keeps opset 18). legacy (TorchScript): up to torch's ``ONNX_MAX_OPSET``. "auto"
    tries dynamo first, so its range is dynamo's.
    """
    newest = int(onnx.defs.onnx_opset_version())
    if exporter != "legacy":
        return MIN_OPSET, newest
    try:
        from torch.onnx import _constants

        legacy_max = int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):  # a private module: fall back to the documented TorchScript limit
        legacy_max = 20
    return MIN_OPSET, min(newest, legacy_max)


def check_opset(opset: Any, exporter: str = "auto") -> int:
    """``opset`` if the installed exporter can write it, else a UserError naming the supported range."""
    lo, hi = supported_opsets(exporter)
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        which = "the torch exporters" if exporter == "auto" else f"the {exporter} exporter"
        raise UserError(f"--opset {opset!r} is not supported: {which} (torch {torch.__version__}) and onnx "
                        f"{onnx.__version__} write opsets {lo}-{hi}", f"pass --opset between {lo} and {hi}")
    return opset


def written_opset(proto: onnx.ModelProto) -> int | None:
    """The default-domain opset a graph actually imports (what a runtime will see), None if none."""
    versions = [int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    return max(versions) if versions else None


def torch_to_onnx(
    model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], *, exporter: str, opset: int,
    dynamic_batch: bool = True,
) -> tuple[onnx.ModelProto, float]:
    """Run one torch exporter on an inference-ready module; return the raw graph and the export seconds.

    ``example`` is one tensor, or a tuple in ``forward`` order for a model with several inputs.
    """
    fn = {"dynamo": _export_dynamo, "legacy": _export_legacy}[exporter]
    example = example if isinstance(example, tuple) else (example,)
    start = time.perf_counter()
    with _quiet(), torch.no_grad():
        proto = fn(model, example, opset, dynamic_batch)
    return proto, time.perf_counter() - start


# --- ONNX Runtime helpers ---


def ort_session(model: bytes | str | os.PathLike, level: str = "ORT_ENABLE_ALL", *, threads: int = 1,
                optimized_model_filepath: str | None = None) -> onnxruntime.InferenceSession:
    """CPU session (used for verification; serving has its own tuned runtime)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: the save-optimised-model notice is expected
    if optimized_model_filepath:
        opts.optimized_model_filepath = optimized_model_filepath
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def rel_l2(candidate: np.ndarray, reference: np.ndarray) -> float:
    """‖c − r‖ / ‖r‖ in float64, safe for an all-zero reference; ``inf`` when either side holds a NaN/Inf.

    Never NaN: a NaN compares false with everything, so ``max(worst, nan)`` keeps ``worst`` (a broken output
    would vanish from the worst case) and ``nan < tol`` depends on how the caller wrote the test. ``inf`` is
    the worst value under every ordering; callers that must name the NaN/Inf counts check them themselves.
    """
    c, r = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    if c.shape != r.shape or not (np.isfinite(c).all() and np.isfinite(r).all()):
        return math.inf
    denom = float(np.linalg.norm(r))
    num = float(np.linalg.norm(c - r))
    return num / denom if denom > 0 else num


def _parity(
    session: onnxruntime.InferenceSession,
    model: nn.Module,
    inputs: Sequence[torch.Tensor | tuple[torch.Tensor, ...]],
) -> float:
    """Worst rel-L2 of the session's first output against ``model`` over ``inputs`` (tensors, or tuples of
    tensors in ``forward`` order, fed to the session's inputs by position).

    Non-finite outputs are a named UserError, never a number: NaN/Inf in PyTorch's output means the model
    itself is broken (NaN weights from a diverged run), which no export can fix; NaN/Inf only in ONNX
    Runtime's output is an export bug. Either way nothing may be written.
    """
    worst = 0.0
    names = [i.name for i in session.get_inputs()]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    for x in inputs:
        parts = x if isinstance(x, tuple) else (x,)
        with torch.inference_mode():
            ref = model(*(p.to(device) for p in parts)).detach().float().cpu().numpy()
        out = session.run(None, {n: p.cpu().numpy() for n, p in zip(names, parts, strict=True)})[0]
        _check_finite(ref, out, [tuple(p.shape) for p in parts])
        err = rel_l2(out, ref)
        worst = float(np.maximum(worst, err))  # NaN-propagating, unlike max(): order cannot hide one
    return worst


def _check_finite(ref: np.ndarray, out: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> None:
    """UserError naming the NaN/Inf counts of the PyTorch (``ref``) or ONNX Runtime (``out``) output."""
    from lrdeploy.parity_stats import describe_nonfinite, nonfinite_counts

    on = f"on random inputs of shape {', '.join(str(s) for s in shapes)}"
    nan, inf = nonfinite_counts(ref)
    if nan or inf:
        raise UserError(f"the model's PyTorch outputs contain {describe_nonfinite(nan, inf)} {on}",
                        "its weights are broken (NaN/Inf, e.g. a diverged training run): retrain with a "
                        "lower --lr or check the checkpoint; nothing was written")
    nan, inf = nonfinite_counts(out)
    if nan or inf:
        raise UserError(f"ONNX Runtime outputs contain {describe_nonfinite(nan, inf)} {on} where PyTorch's "
                        f"are finite", "this is a bug in the export path; try exporter='legacy' and please "
                        "report it; nothing was written")


# --- export ---


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else ""


def _resolve_source(
    source: Bundle | nn.Module, input_shape: Sequence[int] | None, metadata: Mapping[str, Any] | None
) -> tuple[nn.Module, tuple[int, ...] | None, dict[str, Any]]:
    from lrdeploy.bundle import Bundle
    from lrdeploy.models.inputs import declares_inputs

    if isinstance(source, Bundle):
        model, manifest = source.model, dict(source.manifest)
        input_shape = input_shape or source.input_shape
    elif isinstance(source, nn.Module):
        model, manifest = source, {}
    else:
        raise TypeError(f"export_onnx needs a Bundle or nn.Module, not {type(source).__name__}")
    if input_shape is None and not declares_inputs(model):
        raise UserError("input_shape is needed to export a bare nn.Module",
                        "pass input_shape=(C, H, W): one sample, without the batch dimension")
    manifest.update(metadata or {})
    return model, tuple(int(d) for d in input_shape) if input_shape is not None else None, manifest


def _examples(
    model: nn.Module, input_shape: tuple[int, ...] | None, dynamic_batch: bool, gen: torch.Generator
) -> tuple[tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
    """The tracing example and the verification inputs, each a tuple in ``forward`` order.

    Tracing uses batch 2 (a size-1 dimension would be specialised by torch.export). Verification uses other
    batch sizes (1, 3) and, for a model with declared length axes, other lengths too, so it proves that the
    exported dimensions really are dynamic. Single-input models get standard-normal data of ``input_shape``;
    a model that declares its inputs makes its own (token ids must be valid ids).
    """
    from lrdeploy.models.inputs import declares_inputs, example_inputs, length_axes

    batch = 2 if dynamic_batch else 1
    batches = (1, 3) if dynamic_batch else (1,)
    if not declares_inputs(model):
        assert input_shape is not None
        example = (torch.randn((batch, *input_shape), generator=gen),)
        return example, [(torch.randn((b, *input_shape), generator=gen),) for b in batches]
    example = example_inputs(model, batch, None, gen)
    axes = length_axes(model) if dynamic_batch else []
    # distinct lengths per axis and per check (a shared length could hide two dimensions tied together)
    variants = ({a: 5 + 12 * i for i, a in enumerate(axes)}, {a: 23 - 19 * i for i, a in enumerate(axes)})
    checks = [example_inputs(model, b, {a: max(2, s) for a, s in v.items()}, gen)
              for b, v in zip(batches, variants, strict=False)]
    return example, checks


def _stamp(proto: onnx.ModelProto, manifest: Mapping[str, Any], export_info: Mapping[str, Any]) -> None:
    """Keep only each node's module path (``lrdeploy.scope``); drop the exporter's per-node debug metadata
    (stack traces with the exporting machine's paths). Add ours to the model: the manifest (validated by the
    schema every reader applies, so nothing is written that could not be read back), the export record, and
    a sha256 of each text so that a hand-edit is refused on read."""
    from lrdeploy.manifest_schema import text_digest, validate_manifest

    manifest_text, export_text = json.dumps(manifest, sort_keys=True), json.dumps(export_info, sort_keys=True)
    validate_manifest(json.loads(manifest_text), f"the ONNX metadata {META_MANIFEST!r} to stamp", onnx=True,
                      hint="pass metadata that lrdeploy can read back (as in a bundle's manifest.json)")
    for node in proto.graph.node:
        scope = scope_from_torch_metadata(node)
        del node.metadata_props[:]
        if scope is not None:
            node.metadata_props.add(key=SCOPE_KEY, value=scope)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({
        META_VERSION: __version__,
        META_MANIFEST: manifest_text,
        META_MANIFEST_SHA256: text_digest(manifest_text),
        META_EXPORT: export_text,
        META_EXPORT_SHA256: text_digest(export_text),
    })
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)


def _ort_optimise(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory(prefix="lrdeploy-ort-") as tmp:
        out = os.path.join(tmp, "model.ort.onnx")
        ort_session(data, "ORT_ENABLE_EXTENDED", optimized_model_filepath=out)
        return Path(out).read_bytes()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary sibling and a rename; created with open() so the user's umask applies."""
    with atomic.temporary_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale_sibling(opt_path: Path) -> None:
    """A ``.ort.onnx`` we wrote earlier would no longer match the new ``.onnx``; anything else is not ours."""
    if not opt_path.is_file():
        return
    try:
        props = onnx_metadata_props(opt_path)
    except UserError:
        return
    if META_MANIFEST in props:
        opt_path.unlink()


def export_onnx(
    source: Bundle | nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int] | None = None,
    opset: int = 20,
    dynamic_batch: bool = True,
    exporter: str = "auto",
    optimize: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Fold, export, check and verify ``source``; write ``path`` (and ``<stem>.ort.onnx`` if ``optimize``).

    ``input_shape`` is one sample without the batch dimension (default: the bundle's); a model that declares
    several inputs (``input_names``/``dynamic_axes()``/``example_inputs()``, see
    :mod:`lrdeploy.models.inputs`, e.g. the translation Transformer's int64 ``src``/``tgt_in``) is exported
    with those names, every declared axis dynamic, and verified on its own example inputs. ``metadata`` is
    merged into the manifest stored under ``lrdeploy.manifest`` (for a bare module it is the whole manifest).
    ``exporter``: "dynamo", "legacy" (TorchScript, deprecated by PyTorch), or "auto" (the measured default,
    falling back to the other exporter only if it fails).
    """
    from lrdeploy.exporters.fold import fold_model

    if exporter not in ("auto", *EXPORTERS):
        raise UserError(f"unknown exporter {exporter!r}", f"use auto, {', '.join(EXPORTERS)}")
    check_opset(opset, exporter)
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory", "pass the path of the .onnx file to write")
    model, input_shape, manifest = _resolve_source(source, input_shape, metadata)
    opt_path = optimized_path_for(path) if optimize else None

    was_training = model.training
    model.eval()
    try:
        folded = fold_model(model, mode="factored").cpu().float()  # exported graphs are fp32, CPU-traced
        gen = torch.Generator().manual_seed(0)
        example, inputs = _examples(folded, input_shape, dynamic_batch, gen)
        try:
            with torch.inference_mode():
                folded(*example)
        except Exception as exc:
            shapes = ", ".join(str(tuple(t.shape)) for t in example)
            raise UserError(f"the model does not accept inputs of shape {shapes} ({exc})",
                            "pass the right input_shape (one sample, without the batch dimension)") from exc

        order = [exporter] if exporter != "auto" else [DEFAULT_EXPORTER, *(e for e in EXPORTERS
                                                                           if e != DEFAULT_EXPORTER)]
        failures = []
        for name in order:
            try:
                proto, seconds = torch_to_onnx(folded, example, exporter=name, opset=opset,
                                               dynamic_batch=dynamic_batch)
                # A graph the checker rejects is a failed export too (dynamo names an nn.Embedding's output
                # "embedding", so a model output of that name is defined twice): try the next exporter.
                onnx.checker.check_model(proto, full_check=True)
                break
            except Exception as exc:  # exporter failures come in many types; report them as one line
                failures.append(f"{name}: {type(exc).__name__}: {_first_line(exc)}")
        else:
            raise UserError(f"torch.onnx export failed ({'; '.join(failures)})",
                            "try --opset 18 or the other exporter; unsupported ops must be rewritten")
        used = name
        written = written_opset(proto) or opset  # dynamo keeps 18 where it cannot convert down: record truth
        in_names, out_names, axes = _graph_io(folded, len(example))
        export_info: dict[str, Any] = {
            "exporter": used, "opset": written,
            "input_shape": list(input_shape) if input_shape is not None else None,
            "dynamic_batch": dynamic_batch, "fold": "factored", "input_name": in_names[0],
            "output_name": out_names[0], "torch_version": torch.__version__,
        }
        if len(in_names) > 1 or example[0].dtype != torch.float32:
            export_info["inputs"] = [
                {"name": n, "dtype": str(t.dtype).removeprefix("torch."),
                 "dynamic_axes": {str(a): d for a, d in axes.get(n, {}).items()} if dynamic_batch else {}}
                for n, t in zip(in_names, example, strict=True)
            ]
            export_info["output_names"] = out_names
        if failures:  # "auto" fell back: say why, in the file itself
            export_info["fallback_from"] = failures
        if written != opset:
            export_info["opset_requested"] = opset
        _stamp(proto, manifest, export_info)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as exc:
            raise UserError(f"the exported graph fails the ONNX checker ({exc})",
                            "try another --opset or exporter") from exc
        data = proto.SerializeToString()

        # Verify on fresh inputs, at a batch other than the traced one (proves the batch really is dynamic).
        parity = _parity(ort_session(data), model, inputs)
        opt_data, opt_nodes = None, None
        if optimize:
            opt_data = _ort_optimise(data)
            opt_nodes = len(onnx.load_from_string(opt_data).graph.node)
            parity = float(np.maximum(parity, _parity(ort_session(opt_data), model, inputs)))
    finally:
        model.train(was_training)
    if not parity < PARITY_RTOL:  # also catches NaN
        raise UserError(
            f"ONNX Runtime output differs from PyTorch: rel-L2 {parity:.2e} ≥ {PARITY_RTOL:.0e}",
            "this is a bug in the export path; try exporter='legacy' and please report it",
        )

    _write_atomic(path, data)
    if opt_data is not None and opt_path is not None:
        _write_atomic(opt_path, opt_data)
    else:
        _remove_stale_sibling(optimized_path_for(path))
    return ExportResult(
        path=path, optimized_path=opt_path, exporter=used, opset=written, nodes=len(proto.graph.node),
        seconds=seconds, parity_rel_l2=parity, optimized_nodes=opt_nodes,
    )


# --- reading exported files ---


def load_onnx_checked(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX file; a missing, truncated or corrupt file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file {path} does not exist", "pass the path written by lrdeploy export")
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return onnx.load(str(path))
    except Exception as exc:  # DecodeError, ValidationError, InferenceError, ...
        raise UserError(_INVALID.format(path=path), "re-export it") from exc


def onnx_metadata_props(path: str | os.PathLike) -> dict[str, str]:
    """All model-level metadata_props of an ONNX file, as strings (weights are not read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file {path} does not exist", "pass the path written by lrdeploy export")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(_INVALID.format(path=path), "re-export it") from exc
    return {p.key: p.value for p in proto.metadata_props}


def _read_stamp(path: str | os.PathLike, key: str, digest_key: str) -> tuple[dict[str, Any] | None, bool]:
    """One JSON stamp of ours from metadata_props, parsed (depth/size-safe) into a JSON object, and whether
    its text fails its stamped digest; None when the file carries neither (a user's own ONNX file)."""
    from lrdeploy.manifest_schema import ONNX_HINT, parse_json, text_digest

    props = onnx_metadata_props(path)
    raw, digest = props.get(key), props.get(digest_key)
    source = f"{path}: metadata {key!r}"
    if raw is None:
        if digest is None:
            return None, False
        raise UserError(f"{source} was removed: the file was tampered or hand-edited (its {digest_key!r} "
                        "remains)", "re-export the model with lrdeploy export")
    value = parse_json(raw, source, ONNX_HINT)
    if not isinstance(value, dict):
        raise UserError(f"{source} is not a JSON object", ONNX_HINT)
    return value, digest is not None and digest != text_digest(raw)


def _tampered(path: str | os.PathLike, key: str, digest_key: str) -> UserError:
    return UserError(f"{path}: metadata {key!r} was tampered or hand-edited: its checksum ({digest_key!r}) "
                     "does not match its text", "re-export the model with lrdeploy export")


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The bundle manifest stamped into an ONNX file by ``export_onnx`` ({} for a file we did not write).

    Validated by the bundle's schema (:mod:`lrdeploy.manifest_schema`) and checked against its stamped
    sha256 when there is one (files exported before the digest existed are only validated).
    """
    from lrdeploy.manifest_schema import validate_manifest

    manifest, tampered = _read_stamp(path, META_MANIFEST, META_MANIFEST_SHA256)
    if manifest is None:
        return {}
    # the schema first: it names the broken value when an edit broke one; the digest catches the rest
    validate_manifest(manifest, f"{path}: metadata {META_MANIFEST!r}", onnx=True)
    if tampered:
        raise _tampered(path, META_MANIFEST, META_MANIFEST_SHA256)
    return manifest


def read_export_info(path: str | os.PathLike) -> dict[str, Any]:
    """How the file was exported (exporter, opset, input_shape, dynamic_batch, ...); {} if not ours."""
    from lrdeploy.manifest_schema import EXPORT_INFO_SPEC, ONNX_HINT, validate

    info, tampered = _read_stamp(path, META_EXPORT, META_EXPORT_SHA256)
    if info is None:
        return {}
    validate(info, EXPORT_INFO_SPEC, f"{path}: metadata {META_EXPORT!r}", ONNX_HINT)
    if tampered:
        raise _tampered(path, META_EXPORT, META_EXPORT_SHA256)
    return info
