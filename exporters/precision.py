"""Reduced-precision variants of an exported fp32 ONNX graph (fp16, int8), each judged against the fp32 graph.

``convert_precision(src, dst, "fp16" | "int8", ...)`` reads the portable ``.onnx`` written by export (not the
``.ort.onnx``: its contrib ops cannot be quantised), writes the variant atomically and compares it with the
fp32 graph under the tolerance preset of its precision (``serving.parity.TOLERANCES``), plus the accuracy
delta on real data when labels are given.

fp16: weights and arithmetic in fp16 with the graph's inputs and outputs kept fp32 (``keep_io_types``: the
caller feeds the same arrays), and numerically fragile ops kept in fp32 behind Cast nodes: normalisations
and softmax (sums of squares and exponentials overflow fp16's 65504 or lose the small terms), reductions,
Exp/Log/Pow/Erf/Sqrt/Reciprocal (range and cancellation). On CPU this gives no speed-up (baseline.md §5:
ORT's CPU kernels up-cast fp16); it is for GPU runtimes and for halving the file.

int8, two methods (baseline.md §5), picked by ``model_kind``:

- ``dynamic`` (Linear-heavy models: MLP, Transformer): weights quantised to int8 offline, activations per
  call (``quantize_dynamic``, MatMul only). ORT's quantiser skips Gemm nodes, and every ``nn.Linear`` exports
  as Gemm, so Gemm nodes with a constant B are first rewritten into MatMul (+ Add of the bias); otherwise
  nothing would be quantised and the "int8" model would be fp32.
- ``static`` QDQ (conv nets): activation ranges from calibration data (real training inputs, e.g. 256
  examples), QuantizeLinear/DequantizeLinear pairs that ORT fuses into QLinearConv/QLinearMatMul at load.
  Dynamic quantisation of convs (ConvInteger) is 6-9× *slower* than fp32 on CPU, so it is never used for them.

``model_kind="auto"`` picks ``static`` when the graph has Conv nodes, else ``dynamic``; the result records it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lrdeploy import atomic
from lrdeploy.errors import UserError
from lrdeploy.exporters.optimize import (
    check_graph,
    copy_metadata,
    load_model,
    op_histogram,
    random_feeds,
)

PRECISIONS = ("fp16", "int8")
MODEL_KINDS = ("auto", "dynamic", "static")
# Kept in fp32 by the fp16 conversion (on top of onnxruntime's own DEFAULT_OP_BLOCK_LIST).
FP16_BLOCK_LIST = (
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "GroupNormalization",
    "InstanceNormalization", "Softmax", "LogSoftmax", "Pow", "Exp", "Log", "Erf", "Sqrt", "Reciprocal",
    "ReduceMean", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    "ReduceProd", "CumSum",
)
DEFAULT_MAX_ACCURACY_DROP = 0.01  # absolute top-1 drop (1 point) allowed when labels are given
META_PRECISION = "lrdeploy.precision"


@dataclass
class PrecisionResult:
    src: Path
    dst: Path
    precision: str
    method: str  # "fp16", "int8-dynamic", "int8-static-qdq"
    model_kind: str  # what "auto" resolved to ("dynamic"/"static"); "n/a" for fp16
    op_histogram: dict[str, int]
    parity: dict[str, Any]  # serving.parity.judge output for the first output (+ "outputs" when several)
    accuracy: dict[str, Any] | None  # fp32/variant accuracy and delta when labels were given
    passed: bool
    failures: list[str]
    gemm_rewritten: int = 0
    fp32_ops: list[str] = field(default_factory=list)  # fp16: op types left in fp32
    calibration_samples: int = 0
    compared_on: str = ""  # which data the parity was measured on
    notes: list[str] = field(default_factory=list)
    size_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["src"], d["dst"] = str(self.src), str(self.dst)
        return d


# --- graph surgery ---


def topological_sort(graph: onnx.GraphProto) -> bool:
    """Reorder the main graph's nodes so every input is produced before use (Kahn, stable). True if changed.

    onnxruntime's fp16 converter appends the Cast nodes it inserts at the end of the node list, which ORT
    accepts but ``onnx.checker`` rejects ("nodes are not topologically sorted").
    """
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    available |= {i.name for i in graph.sparse_initializer}
    producers = {o for n in nodes for o in n.output}

    def needs(node: onnx.NodeProto) -> set[str]:
        names = set(node.input)
        for attr in node.attribute:  # outer-scope names used inside subgraphs (If/Loop/Scan bodies)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for sn in sub.node:
                    names |= set(sn.input)
        return {n for n in names if n in producers}

    pending = [(n, needs(n)) for n in nodes]
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        progressed = False
        for node, req in pending:
            if req <= available:
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append((node, req))
        if not progressed:
            raise UserError("the converted graph has a cycle or a dangling input", "report the model")
        pending = rest
    changed = [id(n) for n in ordered] != [id(n) for n in nodes]
    if changed:
        copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
        del graph.node[:]
        graph.node.extend(copies)
    return changed


def rewrite_gemm_to_matmul(proto: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(A, B, C)`` with a constant B (and transA = 0) into ``MatMul(A, alpha·B') [+ beta·C]``.

    Exact up to rounding of alpha/beta (1 in exported graphs). Returns how many nodes were rewritten.
    """
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    taken |= {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    count = 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        b_name = node.input[1] if node.op_type == "Gemm" and len(node.input) > 1 else ""
        c_name = node.input[2] if len(node.input) > 2 else ""
        beta = float(attrs.get("beta", 1.0))
        if (node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or b_name not in inits
                or int(attrs.get("transA", 0)) or (c_name and c_name not in inits and beta != 1.0)):
            new_nodes.append(node)
            continue
        b = numpy_helper.to_array(inits[b_name])
        if int(attrs.get("transB", 0)):
            b = b.T
        alpha = float(attrs.get("alpha", 1.0))
        if alpha != 1.0:
            b = b * np.asarray(alpha, dtype=b.dtype)
        base = node.name or node.output[0]
        w_name = fresh(f"{base}_MatMul_B")
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(b), w_name))
        y = node.output[0]
        mm_out = fresh(f"{base}_MatMul_out") if c_name else y
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out],
                                          name=fresh(f"{base}_MatMul")))
        if c_name:
            if c_name in inits and beta != 1.0:
                c = numpy_helper.to_array(inits[c_name]) * np.asarray(beta, dtype=b.dtype)
                c_name = fresh(f"{base}_Add_C")
                new_inits.append(numpy_helper.from_array(c, c_name))
            new_nodes.append(helper.make_node("Add", [mm_out, c_name], [y], name=fresh(f"{base}_Add")))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
        graph.initializer.extend(new_inits)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return count


# --- conversions ---


def _to_fp16(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError as exc:  # pragma: no cover - ships with onnxruntime
        raise UserError("fp16 conversion needs onnxruntime's transformers tools",
                        "pip install onnxruntime (>= 1.16)") from exc
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_BLOCK_LIST))
    out = convert_float_to_float16(proto, keep_io_types=True, op_block_list=block)
    topological_sort(out.graph)
    # The converter leaves value_info entries whose element types contradict the Casts it inserted around
    # blocked ops (onnx.checker: "Inferred elem type differs"); they are only hints, so drop them.
    del out.graph.value_info[:]
    present = {n.op_type for n in proto.graph.node}
    return out, sorted(present & set(block))


class _ArrayReader:
    """CalibrationDataReader over one numpy array (single-input models), in batches."""

    def __init__(self, name: str, data: np.ndarray, batch_size: int) -> None:
        self._batches = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
        self._name = name
        self._it = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self._name: batch}

    def rewind(self) -> None:
        self._it = iter(self._batches)


def _input_names(proto: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits]


def _to_int8(proto: onnx.ModelProto, kind: str, calibration: np.ndarray | None, *, per_channel: bool,
             batch_size: int) -> tuple[onnx.ModelProto, int]:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    work = onnx.ModelProto.FromString(proto.SerializeToString())
    rewritten = rewrite_gemm_to_matmul(work) if kind == "dynamic" else 0
    with tempfile.TemporaryDirectory(prefix="lrdeploy-q-") as tmp:
        fin, fout = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(work, fin)
        if kind == "dynamic":
            quantize_dynamic(fin, fout, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             per_channel=per_channel)
        else:
            names = _input_names(work)
            if calibration is None:
                raise UserError("static int8 quantisation needs calibration data",
                                "pass real training inputs, e.g. 256 examples (--calibration-samples)")
            if len(names) != 1:
                raise UserError(f"static int8 calibration supports single-input models; this one has "
                                f"{len(names)} ({', '.join(names)})", "use model_kind='dynamic'")
            data = np.ascontiguousarray(np.asarray(calibration, dtype=np.float32))
            reader = _ArrayReader(names[0], data, batch_size)
            quantize_static(fin, fout, reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        out = onnx.load(fout)
    return out, rewritten


# --- verification ---


def _as_feeds(proto: onnx.ModelProto, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = _input_names(proto)
    if isinstance(x, Mapping):
        return {k: np.asarray(v) for k, v in x.items()}
    if len(names) != 1:
        raise UserError(f"the model has {len(names)} inputs ({', '.join(names)})", "pass a dict of arrays")
    return {names[0]: np.asarray(x, dtype=np.float32)}


def _run_all(data: bytes, feeds: Mapping[str, np.ndarray], batch_size: int) -> list[np.ndarray]:
    from lrdeploy.exporters.onnx import ort_session

    try:
        session = ort_session(data)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ONNX Runtime cannot load the converted graph ({first})",
                        "report the model") from exc
    n = len(next(iter(feeds.values())))
    chunks = [session.run(None, {k: v[i:i + batch_size] for k, v in feeds.items()})
              for i in range(0, n, batch_size)]
    return [np.concatenate([c[j] for c in chunks], axis=0) for j in range(len(chunks[0]))]


def _compare(ref_data: bytes, cand_data: bytes, feeds: Mapping[str, np.ndarray], precision: str,
             labels: np.ndarray | None, max_accuracy_drop: float | None,
             batch_size: int) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    # exporters do not depend on serving at import time (DESIGN.md); the comparison statistics live there
    from lrdeploy.serving.parity import accuracy as top1_accuracy
    from lrdeploy.serving.parity import judge, output_parity

    ref = _run_all(ref_data, feeds, batch_size)
    cand = _run_all(cand_data, feeds, batch_size)
    verdicts = [judge(output_parity(r, c), precision) for r, c in zip(ref, cand, strict=True)]
    failures = [f for i, v in enumerate(verdicts) for f in
                (v["failures"] if len(verdicts) == 1 else [f"output {i}: {f}" for f in v["failures"]])]
    parity = dict(verdicts[0])
    if len(verdicts) > 1:
        parity["outputs"] = verdicts
    acc = None
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        a_ref, a_cand = top1_accuracy(ref[0], y), top1_accuracy(cand[0], y)
        acc = {"fp32": a_ref, precision: a_cand, "delta": a_cand - a_ref, "samples": int(y.shape[0]),
               "max_drop": max_accuracy_drop}
        if max_accuracy_drop is not None and not a_ref - a_cand <= max_accuracy_drop:
            failures.append(f"accuracy drop {100 * (a_ref - a_cand):.2f} points > "
                            f"{100 * max_accuracy_drop:.2f} ({precision})")
    return parity, acc, failures


def evaluate_variant(
    fp32_path: str | os.PathLike,
    variant_path: str | os.PathLike,
    x: np.ndarray | Mapping[str, np.ndarray],
    y: np.ndarray | None = None,
    precision: str = "fp16",
    *,
    max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Judge a variant against its fp32 graph on ``x`` (and top-1 accuracy on labels ``y`` when given).

    Returns ``{"parity": judge(...), "accuracy": {...} | None, "failures": [...], "passed": bool}``.
    """
    ref = load_model(fp32_path)
    cand = load_model(variant_path)
    parity, acc, failures = _compare(ref.SerializeToString(), cand.SerializeToString(), _as_feeds(ref, x),
                                     precision, y, max_accuracy_drop, batch_size)
    return {"parity": parity, "accuracy": acc, "failures": failures, "passed": not failures}


def resolve_model_kind(proto: onnx.ModelProto, model_kind: str = "auto") -> str:
    if model_kind not in MODEL_KINDS:
        raise UserError(f"unknown model kind {model_kind!r}", f"choose one of: {', '.join(MODEL_KINDS)}")
    if model_kind != "auto":
        return model_kind
    return "static" if any(n.op_type == "Conv" for n in proto.graph.node) else "dynamic"


def convert_precision(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    precision: str = "fp16",
    *,
    calibration: np.ndarray | None = None,
    model_kind: str = "auto",
    test_inputs: np.ndarray | Mapping[str, np.ndarray] | None = None,
    labels: np.ndarray | Sequence[int] | None = None,
    max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP,
    strict: bool = False,
    per_channel: bool = True,
    batch_size: int = 64,
) -> PrecisionResult:
    """Write the ``precision`` variant of the fp32 graph ``src`` to ``dst`` and judge it (module docstring).

    ``calibration``: real training inputs (N × sample shape), required for static int8; also the comparison
    data when ``test_inputs`` is not given (optimistic for static int8: the ranges were fitted on it).
    ``test_inputs`` / ``labels``: held-out data for parity and, with labels, the accuracy delta. Without any
    data the comparison runs on random inputs. A miss (tolerance preset of ``precision``, or an accuracy
    drop above ``max_accuracy_drop``) is reported in ``failures``; ``strict=True`` raises a UserError
    instead, and nothing is written.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}", f"choose one of: {', '.join(PRECISIONS)}")
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        raise UserError(f"{dst} is a directory", "pass the path of the .onnx file to write")
    if src.resolve() == dst.resolve():
        raise UserError("the variant would overwrite its fp32 source", "write it to another path")
    proto = load_model(src)
    if any(n.domain not in ("", "ai.onnx") for n in proto.graph.node):
        raise UserError(f"{src} uses ONNX Runtime contrib ops (an optimised .ort.onnx?)",
                        "convert the portable .onnx from export, then optimise the variant")
    if calibration is not None:
        calibration = np.asarray(calibration)
        if calibration.ndim == 0 or calibration.shape[0] == 0:
            raise UserError("calibration data is empty", "pass real training inputs, e.g. 256 examples")
    notes: list[str] = []
    rewritten, fp32_ops = 0, []
    if precision == "fp16":
        kind, method = "n/a", "fp16"
        out, fp32_ops = _to_fp16(proto)
        notes.append("fp16 on CPU is not faster (ORT up-casts); intended for GPU runtimes and smaller files")
    else:
        kind = resolve_model_kind(proto, model_kind)
        method = "int8-dynamic" if kind == "dynamic" else "int8-static-qdq"
        out, rewritten = _to_int8(proto, kind, calibration, per_channel=per_channel, batch_size=batch_size)
        if kind == "dynamic" and any(n.op_type == "Conv" for n in proto.graph.node):
            notes.append("Conv nodes left in fp32: dynamic ConvInteger is 6-9x slower on CPU; use static")
    check_graph(out, f"{precision} variant")
    copy_metadata(proto, out, {META_PRECISION: method})

    if test_inputs is not None:
        data, compared_on = test_inputs, "test_inputs"
    elif calibration is not None:
        data, compared_on = calibration, "calibration"
        if labels is not None and len(np.asarray(labels)) != len(calibration):
            raise UserError("labels and calibration data differ in length", "pass test_inputs with labels")
    else:
        data, compared_on = random_feeds(proto, batch=16), "random"
        if labels is not None:
            raise UserError("labels given without inputs", "pass test_inputs together with labels")
    y = None if labels is None else np.asarray(labels)
    out_data = out.SerializeToString()
    parity, acc, failures = _compare(proto.SerializeToString(), out_data, _as_feeds(proto, data), precision,
                                     y, max_accuracy_drop, batch_size)
    if strict and failures:
        raise UserError(f"{method} variant misses its tolerance: {'; '.join(failures)}",
                        "calibrate on more or more representative data, or keep fp32")
    atomic.write_bytes(dst, out_data)
    return PrecisionResult(
        src=src, dst=dst, precision=precision, method=method, model_kind=kind, op_histogram=op_histogram(out),
        parity=parity, accuracy=acc, passed=not failures, failures=failures, gemm_rewritten=rewritten,
        fp32_ops=fp32_ops,
        calibration_samples=0 if calibration is None or kind != "static" else len(calibration),
        compared_on=compared_on, notes=notes,
        size_bytes={"fp32": proto.ByteSize(), precision: len(out_data)},
    )
