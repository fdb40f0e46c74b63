"""Build a TensorRT engine from the plain ONNX graph: lint, profile, precision, sparsity, cache, sidecar.

Why it is built this way:
- ``import tensorrt`` happens inside ``build_engine``: CPU installs never need it (it comes only from NVIDIA's
  index, baseline.md §6), and a missing one is a one-line UserError, as is a machine without a CUDA GPU.
- Two precision paths (peers.md §0). TensorRT ≥ 11 removed weak typing: networks are strongly typed and the
  precision is the ONNX graph's own, so fp16 means converting the graph (``prepare_fp16_graph``: weights and
  compute in fp16, overflow-prone ops kept in fp32, fp32 inputs/outputs), never a builder flag; bf16 likewise
  (``prepare_bf16_graph``, exporters/bf16.py). TensorRT 10 still takes ``BuilderFlag.FP16/BF16/INT8`` on an
  fp32 graph. int8 needs explicit Q/DQ nodes on both (TRT 11 removed calibrators; lrdeploy does not calibrate
  inside the builder): a Q/DQ graph TensorRT accepts (symmetric int8, checked by the lint), or calibration
  data from which ``build_engine`` writes one (``precision.convert_precision(..., model_kind="trt")``, judged
  on ORT CPU first). TensorRT 10 builds it with the INT8 flag, TensorRT 11 strongly typed.
- The optimisation profile is derived from the graph's inputs by a pure function (``derive_profile``), so
  its rules are tested without TensorRT: a dynamic batch axis gets the batch range, any other dynamic axis
  needs an explicit shape.
- ``--sparse`` sets ``SPARSE_WEIGHTS``, which only *allows* sparse tactics. After the build the engine
  inspector (profiling verbosity DETAILED) lists the layers whose chosen tactic is sparse, and the result and
  sidecar report them, so "sparsity gave nothing" is visible and explained (weights not 2:4, layer too small,
  dense tactic faster).
- Engine, timing cache and the ``<engine>.json`` sidecar (read by ``serving/runtimes/trt.py``) are written
  atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lrdeploy import __version__, atomic
from lrdeploy.errors import UserError

from .lint import LintReport, graph_inputs, lint_for_tensorrt, load_model, nm_weights

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEFAULT_MAX_BATCH = 32
# Overflow- or precision-fragile ops kept in fp32 in an fp16 graph (like AutoCast's default exclusions).
FP16_BLOCK_OPS = (
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "Softmax", "LogSoftmax", "Pow", "Sqrt", "Reciprocal", "Exp", "Log",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd",
    "CumSum", "Range", "TopK", "NonMaxSuppression", "RoiAlign", "Resize",
)
_NOT_INSTALLED = ("TensorRT is not installed ({why}): --trt needs the tensorrt package from NVIDIA's index "
                  "and a CUDA GPU")

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


@dataclass
class BuildResult:
    engine_path: Path
    sidecar_path: Path
    tensorrt_version: str
    gpu: str | None
    precision: str
    strongly_typed: bool
    profile: dict[str, list[list[int]]]
    sparse_weights: bool
    sparse_layers: list[str]
    layers: int
    build_seconds: float
    onnx_sha256: str
    timing_cache: str | None = None
    lint_warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["engine_path"], d["sidecar_path"] = str(self.engine_path), str(self.sidecar_path)
        return d


# ------------------------------------------------------------------------------------------------ profile
def batch_range(min_batch: int = 1, opt_batch: int | None = None, max_batch: int | None = None
                ) -> tuple[int, int, int]:
    """``(min, opt, max)`` batch of the profile with the defaults filled in (max: 32 or above the others;
    opt: max); a UserError unless ``1 <= min <= opt <= max``. Pure, so the CLI checks it before any work."""
    if max_batch is None:
        max_batch = max(DEFAULT_MAX_BATCH, min_batch, opt_batch or 0)
    if opt_batch is None:
        opt_batch = max_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UserError(f"batch range must satisfy 1 <= min ({min_batch}) <= opt ({opt_batch}) <= max "
                        f"({max_batch})", hint="fix --min-batch/--opt-batch/--max-batch")
    return min_batch, opt_batch, max_batch


def derive_profile(
    onnx_model: onnx.ModelProto | str | os.PathLike,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    *,
    shapes: Mapping[str, Sequence[int] | Sequence[Sequence[int]]] | None = None,
) -> Profile:
    """``{input: (min, opt, max)}`` for one optimisation profile, from the graph inputs.

    Axis 0, when symbolic, is the batch: ``min_batch``..``max_batch`` (default 32), tuned at ``opt_batch``
    (default: ``max_batch``, the throughput case). Any other symbolic axis needs ``shapes={name: shape}`` (one
    static shape) or ``shapes={name: (min, opt, max)}``; the override wins for that input.
    """
    model, _ = load_model(onnx_model)
    shapes = dict(shapes or {})
    min_batch, opt_batch, max_batch = batch_range(min_batch, opt_batch, max_batch)
    inputs = graph_inputs(model)
    names = {i.name for i in inputs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise UserError(f"shapes given for unknown input(s) {unknown}; the inputs are {sorted(names)}",
                        hint="name the graph's inputs")
    profile: Profile = {}
    for inp in inputs:
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        if inp.name in shapes:
            profile[inp.name] = _override(inp.name, shapes[inp.name], dims)
            continue
        lo, opt, hi = [], [], []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                lo.append(d), opt.append(d), hi.append(d)
            elif axis == 0:
                lo.append(min_batch), opt.append(opt_batch), hi.append(max_batch)
            else:
                raise UserError(f"input {inp.name!r} has a dynamic axis {axis} ({d or 'unnamed'}) besides "
                                f"the batch: its shape range cannot be guessed (dims {dims})",
                                hint=f"give explicit shapes, e.g. shapes={{'{inp.name}': (min, opt, max)}}")
        profile[inp.name] = (tuple(lo), tuple(opt), tuple(hi))
    return profile


def _override(name: str, given: Any, dims: list[Any]) -> tuple[Shape, Shape, Shape]:
    arr = [list(s) if isinstance(s, (list, tuple)) else s for s in given]
    nested = bool(arr) and all(isinstance(s, list) for s in arr)
    triple = [tuple(int(v) for v in s) for s in arr] if nested else None
    if triple is None:
        static = tuple(int(v) for v in arr)
        triple = [static, static, static]
    if len(triple) != 3 or len({len(s) for s in triple}) != 1:
        raise UserError(f"shapes[{name!r}] must be one shape or (min, opt, max) shapes of equal rank",
                        hint="e.g. (1, 3, 32, 32) or ((1, 8), (8, 64), (32, 128))")
    lo, opt, hi = triple
    if len(lo) != len(dims):
        raise UserError(f"shapes[{name!r}] has rank {len(lo)} but the input has rank {len(dims)} ({dims})")
    for axis, (a, b, c, d) in enumerate(zip(lo, opt, hi, dims, strict=True)):
        if not 1 <= a <= b <= c:
            raise UserError(f"shapes[{name!r}] axis {axis}: need 1 <= min <= opt <= max, got {a}, {b}, {c}")
        if isinstance(d, int) and d > 0 and not a == b == c == d:
            raise UserError(f"shapes[{name!r}] axis {axis} is fixed at {d} in the graph, got {a}..{c}")
    return lo, opt, hi


# ------------------------------------------------------------------------------------------------ fp16 graph
def prepare_fp16_graph(onnx_path: str | os.PathLike, out_path: str | os.PathLike, *,
                       block_ops: Sequence[str] = FP16_BLOCK_OPS, converter: str = "auto") -> Path:
    """Write an fp16 copy of the graph for strongly typed TensorRT (≥ 11): fp16 weights and compute,
    ``block_ops`` kept in fp32 with Casts around them, fp32 inputs and outputs (keep_io_types).

    ``converter``: "ort" (onnxruntime.transformers.float16), "builtin" (this module's minimal one) or "auto"
    (ort when importable).
    """
    model, _ = load_model(onnx_path)
    if Path(onnx_path).is_file():
        model = onnx.load(str(onnx_path))  # with external data this time: the weights are converted
    use_ort = converter == "ort"
    if converter == "auto":
        try:
            from onnxruntime.transformers import float16 as _f16  # noqa: F401

            use_ort = True
        except Exception:  # a broken or minimal onnxruntime: fall back to the builtin converter
            use_ort = False
    if use_ort:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        out = convert_float_to_float16(model, keep_io_types=True,
                                       op_block_list=sorted(set(block_ops) | set(DEFAULT_OP_BLOCK_LIST)))
        del out.graph.value_info[:]  # it can leave stale fp32 value_info behind: re-infer from scratch
        out = onnx.shape_inference.infer_shapes(out)
    elif converter in ("builtin", "auto"):
        out = _to_fp16(model, set(block_ops))
    else:
        raise UserError(f"unknown fp16 converter {converter!r}", hint="use auto, ort or builtin")
    data = out.SerializeToString()
    if len(data) > 2**31 - 1:
        raise UserError("the fp16 graph exceeds 2 GB", hint="use TensorRT 10 with --fp16, or split the model")
    atomic.write_bytes(out_path, data)
    return Path(out_path)


def _to_fp16(model: onnx.ModelProto, block: set[str]) -> onnx.ModelProto:
    """Minimal float→float16 conversion (default domain, no subgraphs), typed by ONNX shape inference."""
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    for init in g.initializer:
        if init.data_type == f32:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    # graph inputs and outputs stay fp32 (keep_io_types): fp16 twins inside the graph
    twin = {i.name: f"{i.name}__fp16" for i in graph_inputs(model) if types.get(i.name) == f32}
    twin.update({o.name: f"{o.name}__fp16" for o in g.output if types.get(o.name) == f32})
    nodes = [helper.make_node("Cast", [n], [twin[n]], to=f16, name=f"{n}__cast_fp16")
             for n in (i.name for i in graph_inputs(model)) if n in twin]
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise UserError(f"the builtin fp16 converter does not handle subgraphs ({node.op_type})",
                            hint="install onnxruntime (its float16 converter handles them)")
        originals_in = list(node.input)
        originals_out = list(node.output)
        node.input[:] = [twin.get(i, i) for i in node.input]
        node.output[:] = [twin.get(o, o) for o in node.output]
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == f32:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == f32:
                attr.i = f16
        if node.op_type in block and node.domain in ("", "ai.onnx"):
            for k, orig in enumerate(originals_in):
                if orig and types.get(orig) == f32:
                    cast = f"{node.input[k]}__fp32_for_{node.name or len(nodes)}"
                    nodes.append(helper.make_node("Cast", [node.input[k]], [cast], to=f32, name=cast))
                    node.input[k] = cast
            nodes.append(node)
            for k, orig in enumerate(originals_out):
                if types.get(orig) == f32:
                    name = node.output[k]
                    node.output[k] = f"{name}__fp32"
                    nodes.append(helper.make_node("Cast", [node.output[k]], [name], to=f16,
                                                  name=f"{name}__cast_fp16"))
            continue
        nodes.append(node)
    nodes += [helper.make_node("Cast", [twin[o.name]], [o.name], to=f32, name=f"{o.name}__cast_fp32")
              for o in g.output if o.name in twin]
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def _is_bf16_graph(model: onnx.ModelProto) -> bool:
    return any(i.data_type == TensorProto.BFLOAT16 for i in model.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.BFLOAT16 for a in n.attribute)
        for n in model.graph.node)


def prepare_bf16_graph(onnx_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write a bf16 copy of the graph for strongly typed TensorRT (≥ 11): bf16 weights and compute, the fp16
    block list kept in fp32 behind Casts, fp32 inputs and outputs (``precision.to_bf16``)."""
    from .precision import to_bf16

    load_model(onnx_path)  # a missing/corrupt file is a UserError
    out = to_bf16(onnx.load(str(onnx_path))).model  # with external data: the weights are converted
    data = out.SerializeToString()
    if len(data) > 2**31 - 1:
        raise UserError("the bf16 graph exceeds 2 GB", hint="use TensorRT 10 with --precision bf16")
    atomic.write_bytes(out_path, data)
    return Path(out_path)


def prepare_int8_graph(onnx_path: str | os.PathLike, out_path: str | os.PathLike, calibration: np.ndarray, *,
                       test_inputs: np.ndarray | None = None, labels: np.ndarray | None = None) -> Any:
    """Write the TensorRT Q/DQ int8 graph (symmetric int8, per-channel weights) calibrated on ``calibration``
    and judged on ORT CPU with the int8 preset; a miss is a UserError. Returns the PrecisionResult."""
    from .precision import convert_precision

    return convert_precision(onnx_path, out_path, "int8", model_kind="trt", calibration=calibration,
                             test_inputs=test_inputs, labels=labels, strict=True)


# ------------------------------------------------------------------------------------------------ tensorrt
def import_tensorrt() -> Any:
    """``tensorrt`` or a one-line UserError (not installed, libraries missing, PyPI placeholder)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        why = "no module 'tensorrt'" if getattr(exc, "name", None) in (None, "tensorrt") else str(exc)
        raise UserError(_NOT_INSTALLED.format(why=why)) from None
    except OSError as exc:  # its shared libraries (libnvinfer) are missing
        raise UserError(_NOT_INSTALLED.format(why=f"libraries cannot be loaded: {exc}")) from None
    if not hasattr(trt, "Builder"):
        raise UserError(_NOT_INSTALLED.format(
            why=f"'tensorrt' {getattr(trt, '__version__', '?')} is a placeholder without the API"))
    return trt


def trt_major(trt: Any) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 10


def sparse_layers_from_inspector(info: str | Mapping[str, Any]) -> list[str]:
    """Names of layers whose chosen tactic is sparse, from the inspector's JSON (verbosity DETAILED)."""
    data = json.loads(info) if isinstance(info, str) else info
    out = []
    for layer in data.get("Layers", []):
        if not isinstance(layer, Mapping):  # verbosity below DETAILED: names only, no tactics
            continue
        tactic = " ".join(str(layer.get(k, "")) for k in ("TacticName", "Tactic", "Metadata"))
        if "sparse" in tactic.lower():
            out.append(str(layer.get("Name", "?")))
    return out


def _has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path_for(engine_path: str | os.PathLike) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def _parse_source(onnx_path: Path, model: onnx.ModelProto, tmp: Path, precision: str, strongly_typed: bool,
                  calibration: np.ndarray | None, notes: list[str]) -> Path:
    """The graph TensorRT parses: ``onnx_path`` itself, or its int8 Q/DQ, fp16 or bf16 conversion in tmp."""
    if precision == "int8" and not _has_qdq(model) and calibration is not None:
        res = prepare_int8_graph(onnx_path, tmp / f"{onnx_path.stem}.int8.onnx", calibration)
        rel_l2 = res.parity.get("rel_l2", float("nan"))
        notes.append(f"int8 Q/DQ graph calibrated on {res.calibration_samples} examples; ORT CPU parity "
                     f"rel-L2 {rel_l2:.2e} on {res.compared_on} (int8 preset met)")
        return res.dst
    if strongly_typed and precision == "fp16":
        notes.append("fp16 from the ONNX graph (strongly typed): fragile ops kept in fp32")
        return prepare_fp16_graph(onnx_path, tmp / f"{onnx_path.stem}.fp16.onnx")
    if strongly_typed and precision == "bf16" and not _is_bf16_graph(model):
        notes.append("bf16 from the ONNX graph (strongly typed): fragile ops kept in fp32")
        return prepare_bf16_graph(onnx_path, tmp / f"{onnx_path.stem}.bf16.onnx")
    return onnx_path


def lint_or_raise(onnx_path: str | os.PathLike) -> LintReport:
    report = lint_for_tensorrt(onnx_path)
    if report.errors:
        raise UserError(f"TensorRT lint failed: {report.summary()}", hint=report.errors[0].fix)
    return report


def _check_sparse_weights(model: onnx.ModelProto, onnx_path: Path) -> str:
    """``--sparse-weights`` only helps weights with the 2:4 pattern; refuse a build where none has it."""
    sparse, weights = nm_weights(model)
    if not sparse:
        raise UserError(f"--sparse-weights: none of the {len(weights)} weights of {onnx_path.name} has the "
                        "2:4 pattern, so TensorRT would pick no sparse tactic",
                        hint="prune first: lrdeploy compress BUNDLE --sparsity 2:4 --finetune-epochs N")
    return f"{len(sparse)} of {len(weights)} weights have the 2:4 pattern (TensorRT may run them sparse)"


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    precision: str = "fp32",
    sparse_weights: bool = False,
    timing_cache: str | os.PathLike | None = None,
    workspace_gb: float | None = None,
    shapes: Mapping[str, Any] | None = None,
    lint: bool = True,
    calibration: np.ndarray | None = None,
) -> BuildResult:
    """Lint, derive the profile, build with TensorRT (10 or ≥ 11 path), write engine + sidecar atomically.

    int8 builds from a Q/DQ graph: ``onnx_path`` itself when it has Q/DQ nodes (the lint rejects ones TensorRT
    cannot take), else one quantised here from ``calibration`` (real training inputs, e.g. 256 examples).
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    model, _ = load_model(onnx_path)  # a missing/corrupt file fails before TensorRT is even looked for
    report = lint_or_raise(onnx_path) if lint else None
    sparse_note = _check_sparse_weights(model, onnx_path) if sparse_weights else None
    profile = derive_profile(model, min_batch, opt_batch, max_batch, shapes=shapes)
    if precision == "int8" and not _has_qdq(model) and calibration is None:
        raise UserError("int8 needs explicit Q/DQ nodes in the ONNX graph (TensorRT 11 removed calibrators)",
                        hint="pass calibration data (lrdeploy export --trt --precision int8 uses the "
                             "bundle's training data) or convert_precision(..., 'int8', model_kind='trt')")

    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU: --trt builds engines on the GPU that will run them",
                        hint="run the export on a machine with an NVIDIA GPU")
    gpu = torch.cuda.get_device_name(0)
    major = trt_major(trt)
    strongly_typed = major >= 11
    notes: list[str] = [sparse_note] if sparse_note else []
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # no driver / no device
        raise UserError(f"TensorRT cannot create a builder ({str(exc).splitlines()[0] if str(exc) else exc})",
                        hint="check the NVIDIA driver and that a CUDA GPU is visible") from None
    if builder is None:
        raise UserError("TensorRT cannot create a builder (no usable CUDA GPU?)",
                        hint="check the NVIDIA driver and CUDA_VISIBLE_DEVICES")

    with tempfile.TemporaryDirectory(prefix=".lrdeploy-trt-", dir=engine_path.parent
                                     if engine_path.parent.is_dir() else None) as tmp:
        parse_path = _parse_source(onnx_path, model, Path(tmp), precision, strongly_typed, calibration, notes)
        # TensorRT 10: explicit batch is the only mode; >= 11: strongly typed, precision from the graph
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(parse_path)):
            errs = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
            first = errs[0] if errs else "unknown error"
            more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
            raise UserError(f"TensorRT could not parse {onnx_path.name}: {first}{more}",
                            hint="run lrdeploy's TensorRT lint and build from the plain .onnx")
        config = builder.create_builder_config()
        if workspace_gb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        if not strongly_typed:
            flag = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8"}.get(precision)
            if flag:
                config.set_flag(getattr(trt.BuilderFlag, flag))
        if sparse_weights:
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
        cache_path = Path(timing_cache) if timing_cache else None
        if cache_path is not None:
            blob = cache_path.read_bytes() if cache_path.is_file() else b""
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, ignore_mismatch=False)
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
        if serialized is None:
            raise UserError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)",
                            hint="try a smaller --max-batch, more --workspace-gb, or --precision fp32")
        if cache_path is not None:
            atomic.write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))

    engine_bytes = bytes(serialized)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    sparse: list[str] = []
    layers = 0
    if engine is not None:
        info = json.loads(engine.create_engine_inspector().get_engine_information(
            trt.LayerInformationFormat.JSON))
        layers = len(info.get("Layers", []))
        sparse = sparse_layers_from_inspector(info)
    if sparse_weights and not sparse:
        notes.append("SPARSE_WEIGHTS was set but no layer chose a sparse tactic: weights not 2:4 structured, "
                     "layers too small, or the dense tactic was faster on this GPU")
    result = BuildResult(
        engine_path=engine_path, sidecar_path=sidecar_path_for(engine_path),
        tensorrt_version=str(trt.__version__), gpu=gpu, precision=precision, strongly_typed=strongly_typed,
        profile={k: [list(s) for s in v] for k, v in profile.items()}, sparse_weights=sparse_weights,
        sparse_layers=sparse, layers=layers, build_seconds=round(seconds, 3),
        onnx_sha256=sha256_file(onnx_path), timing_cache=str(cache_path) if cache_path else None,
        lint_warnings=[f"{f.code}: {f.message}" for f in (report.warnings if report else [])], notes=notes)
    atomic.write_bytes(engine_path, engine_bytes)
    atomic.write_text(result.sidecar_path, json.dumps(
        {**result.to_dict(), "onnx_path": str(onnx_path), "lrdeploy_version": __version__}, indent=2) + "\n")
    return result
