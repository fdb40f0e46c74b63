"""Reduced-precision variants of an exported fp32 ONNX graph (fp16, bf16, int8), each judged against fp32.

``convert_precision(src, dst, "fp16" | "bf16" | "int8", ...)`` reads the portable ``.onnx`` written by export
(not the ``.ort.onnx``: its contrib ops cannot be quantised), writes the variant atomically and compares it
with the fp32 graph under the tolerance preset of its precision (``lrdeploy.parity_stats.TOLERANCES``), plus
the accuracy delta on real data when labels are given.

fp16: weights and arithmetic in fp16 with the graph's inputs and outputs kept fp32 (``keep_io_types``: the
caller feeds the same arrays), and numerically fragile ops kept in fp32 behind Cast nodes: normalisations
and softmax (sums of squares and exponentials overflow fp16's 65504 or lose the small terms), reductions,
Exp/Log/Pow/Erf/Sqrt/Reciprocal (range and cancellation). On CPU this gives no speed-up (baseline.md §5:
ORT's CPU kernels up-cast fp16); it is for GPU runtimes and for halving the file.

bf16 (``exporters/bf16.py``): the same plan in bfloat16 (same fp32 block list, fp32 inputs/outputs), for
strongly typed TensorRT (≥ 11), which takes its precision from the graph. ONNX Runtime 1.32's CPU provider
has no bf16 kernel for Gemm, MatMul, Conv, pooling, Add, Mul, Relu or Softmax (only Cast and data movement),
so when ORT cannot load the graph the variant is judged with ``onnx.reference`` (bf16 arithmetic emulated in
numpy) on as many examples as fit a time budget (:data:`REFERENCE_BUDGET_S`); when not even
:data:`REFERENCE_MIN_EXAMPLES` fit, parity is recorded as "not run: <reason>" and ``passed`` is None: never a
pass that was not measured.

int8, three methods (baseline.md §5), picked by ``model_kind``:

- ``dynamic`` (Linear-heavy models: MLP, Transformer): weights quantised to int8 offline, activations per
  call (``quantize_dynamic``, MatMul only). ORT's quantiser skips Gemm nodes, and every ``nn.Linear`` exports
  as Gemm, so Gemm nodes with a constant B are first rewritten into MatMul (+ Add of the bias); otherwise
  nothing would be quantised and the "int8" model would be fp32.
- ``static`` QDQ (conv nets): activation ranges from calibration data (real training inputs, e.g. 256
  examples), QuantizeLinear/DequantizeLinear pairs that ORT fuses into QLinearConv/QLinearMatMul at load.
  Dynamic quantisation of convs (ConvInteger) is 6-9× *slower* than fp32 on CPU, so it is never used for them.

- ``trt``: static QDQ for TensorRT (10 and 11 build int8 only from explicit Q/DQ): symmetric int8 activations
  and symmetric per-channel int8 weights (every zero point 0), bias left in float (TensorRT dequantises only
  int8), checked with :func:`lrdeploy.exporters.lint.trt_qdq_findings`. ORT runs it too, so its accuracy is
  judged on the CPU (int8 preset) before any GPU build.

``model_kind="auto"`` picks ``static`` when the graph has Conv nodes, else ``dynamic``; the result records it.

Per-channel weights are quantised to 7 bits (``reduce_range``) for ONNX Runtime's CPU kernels (not for
``trt``): without AVX-VNNI, x86 multiplies uint8 activations by int8 weights with ``vpmaddubsw``, whose int16
pair sums saturate once a per-channel-scaled weight column reaches ±127 next to large activations. Measured
(ORT 1.32, AVX2 EPYC, 128 Multi30k sentences): a factorised all-MiniLM-L6-v2 fell to cosine 0.37 with 8-bit
per-channel weights (one MatMulInteger off by up to 15 % of its range) and stays at 0.986 with 7 bits; the
dense encoder gives 0.993 either way, and the LeNet/MLP variants here pass their preset again. ORT documents
this remedy for non-VNNI machines; a file quantised this way is also safe on whatever CPU it is deployed to.

Speed: a variant can pass parity and still be slower than fp32 on the CPU it was made on (static QDQ int8
of LeNet-5 measured 2.2-2.4× slower than fp32 at batch 1 with ORT 1.32 on this project's 2-core build
machine; issue 9 saw 2.4-3.8×). So every variant ORT can run is also timed against its fp32 graph in the
same run, interleaved A/B at batch 1 for about :data:`SPEED_BUDGET_S` (:func:`time_vs_fp32`), and
``speed_vs_fp32`` (fp32 latency / variant latency: below 1 is slower) is recorded. It informs; it never
fails a variant.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lrdeploy import atomic
from lrdeploy.errors import UserError
from lrdeploy.exporters.bf16 import Bf16Conversion, convert_to_bf16
from lrdeploy.exporters.lint import trt_qdq_findings
from lrdeploy.exporters.optimize import (
    check_graph,
    copy_metadata,
    load_model,
    op_histogram,
    random_feeds,
)
from lrdeploy.parity_stats import Tolerance, describe_nonfinite, judge, nonfinite_counts, output_parity
from lrdeploy.parity_stats import accuracy as top1_accuracy

PRECISIONS = ("fp16", "bf16", "int8")
MODEL_KINDS = ("auto", "dynamic", "static", "trt")
INT8_METHODS = {"dynamic": "int8-dynamic", "static": "int8-static-qdq", "trt": "int8-trt-qdq"}
# Kept in fp32 by the fp16 conversion (on top of onnxruntime's own DEFAULT_OP_BLOCK_LIST).
FP16_BLOCK_LIST = (
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "GroupNormalization",
    "InstanceNormalization", "Softmax", "LogSoftmax", "Pow", "Exp", "Log", "Erf", "Sqrt", "Reciprocal",
    "ReduceMean", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    "ReduceProd", "CumSum",
)
DEFAULT_MAX_ACCURACY_DROP = 0.01  # absolute top-1 drop (1 point) allowed when labels are given
# onnx.reference judges a bf16 graph ORT cannot run: as many examples as fit the budget, at most MAX; fewer
# than MIN (or a graph over MAX_PARAMS weights) and parity is "not run" rather than judged on too little.
REFERENCE_BUDGET_S = 30.0
REFERENCE_MAX_EXAMPLES = 256
REFERENCE_MIN_EXAMPLES = 16
REFERENCE_MAX_PARAMS = 64_000_000
JUDGED_BY_ORT = "onnxruntime-cpu"
# A/B timing of a variant against fp32 (batch 1): about this many seconds, at least SPEED_MIN_ROUNDS rounds
# (each round one block of each model, order alternating) unless that would take 3× the budget.
SPEED_BUDGET_S = 1.0
SPEED_MIN_ROUNDS = 5
SPEED_BLOCK_S = 0.02  # calls per block are sized to about this long, so timer resolution does not matter
SPEED_SAME = 1.25  # within this factor either way: "as fast as fp32" (A-vs-A runs here read up to 1.14)
META_PRECISION = "lrdeploy.precision"


@dataclass
class PrecisionResult:
    src: Path
    dst: Path
    precision: str
    method: str  # "fp16", "bf16", "int8-dynamic", "int8-static-qdq", "int8-trt-qdq"
    model_kind: str  # what "auto" resolved to ("dynamic"/"static"/"trt"); "n/a" for fp16 and bf16
    op_histogram: dict[str, int]
    parity: dict[str, Any]  # parity_stats.judge output for the first output (+ "outputs" when several)
    accuracy: dict[str, Any] | None  # fp32/variant accuracy and delta when labels were given
    passed: bool | None  # None: parity could not be measured (``judged_by`` says why); never a silent pass
    failures: list[str]
    gemm_rewritten: int = 0
    fp32_ops: list[str] = field(default_factory=list)  # fp16/bf16: op types left in fp32
    calibration_samples: int = 0
    compared_on: str = ""  # which data the parity was measured on
    judged_by: str = JUDGED_BY_ORT  # "onnxruntime-cpu", "onnx.reference (...)" or "not run: <reason>"
    compared_examples: int = 0
    notes: list[str] = field(default_factory=list)
    size_bytes: dict[str, int] = field(default_factory=dict)
    speed_vs_fp32: float | None = None  # fp32 latency / variant latency at batch 1 here (< 1: slower)
    timing: dict[str, Any] = field(default_factory=dict)  # how speed_vs_fp32 was measured, or why not

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


def _float16_tools() -> Any:
    try:
        from onnxruntime.transformers import float16
    except ImportError as exc:  # pragma: no cover - ships with onnxruntime
        raise UserError("fp16/bf16 conversion needs onnxruntime's transformers tools",
                        "pip install onnxruntime (>= 1.16)") from exc
    return float16


def low_precision_block_list() -> list[str]:
    """Op types kept in fp32 by the fp16 and bf16 conversions: ORT's default list plus FP16_BLOCK_LIST."""
    return sorted(set(_float16_tools().DEFAULT_OP_BLOCK_LIST) | set(FP16_BLOCK_LIST))


def _to_fp16(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    block = low_precision_block_list()
    out = _float16_tools().convert_float_to_float16(proto, keep_io_types=True, op_block_list=block)
    topological_sort(out.graph)
    # The converter leaves value_info entries whose element types contradict the Casts it inserted around
    # blocked ops (onnx.checker: "Inferred elem type differs"); they are only hints, so drop them.
    del out.graph.value_info[:]
    present = {n.op_type for n in proto.graph.node}
    return out, sorted(present & set(block))


def to_bf16(proto: onnx.ModelProto) -> Bf16Conversion:
    """The bf16 graph of ``proto`` (exporters/bf16.py) with the fp16 conversion's fp32 block list."""
    return convert_to_bf16(proto, low_precision_block_list())


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


# TensorRT's int8 (peers.md §0): zero points 0 everywhere, so activations and weights are symmetric; the bias
# stays float because TensorRT's DequantizeLinear takes int8 (ORT's default quantises it to int32). Q/DQ only
# on the inputs of weighted ops, not on their outputs (TensorRT's Q/DQ placement advice, also ORT's note in
# qdq_quantizer.py): normalisations, softmax and the logits stay float, TensorRT fuses the rest.
TRT_QDQ_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
TRT_QDQ_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                   "OpTypesToExcludeOutputQuantization": TRT_QDQ_OPS}


def _quantize_static(fin: str, fout: str, names: list[str], calibration: np.ndarray | None, kind: str, *,
                     per_channel: bool, batch_size: int) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibration is None:
        raise UserError("static int8 quantisation needs calibration data",
                        "pass real training inputs, e.g. 256 examples (--calibration-samples)")
    if len(names) != 1:
        raise UserError(f"static int8 calibration supports single-input models; this one has "
                        f"{len(names)} ({', '.join(names)})", "use model_kind='dynamic'")
    data = np.ascontiguousarray(np.asarray(calibration, dtype=np.float32))
    trt = kind == "trt"
    quantize_static(fin, fout, _ArrayReader(names[0], data, batch_size), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    reduce_range=per_channel and not trt,
                    op_types_to_quantize=list(TRT_QDQ_OPS) if trt else None,
                    extra_options=dict(TRT_QDQ_OPTIONS) if trt else None)


def _to_int8(proto: onnx.ModelProto, kind: str, calibration: np.ndarray | None, *, per_channel: bool,
             batch_size: int) -> tuple[onnx.ModelProto, int]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    work = onnx.ModelProto.FromString(proto.SerializeToString())
    rewritten = rewrite_gemm_to_matmul(work) if kind == "dynamic" else 0
    with tempfile.TemporaryDirectory(prefix="lrdeploy-q-") as tmp:
        fin, fout = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(work, fin)
        if kind == "dynamic":
            quantize_dynamic(fin, fout, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             per_channel=per_channel, reduce_range=per_channel)
        else:
            _quantize_static(fin, fout, _input_names(work), calibration, kind, per_channel=per_channel,
                             batch_size=batch_size)
        out = onnx.load(fout)
    if kind == "trt":
        problems = trt_qdq_findings(out)
        if problems:  # a change in ORT's quantiser, not a user mistake: say so instead of building garbage
            raise UserError(f"the TensorRT Q/DQ graph is not TensorRT-compatible ({len(problems)} node(s)): "
                            f"{problems[0].message}", "report it with your onnxruntime version")
    return out, rewritten


# --- verification ---


def _as_feeds(proto: onnx.ModelProto, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = _input_names(proto)
    if isinstance(x, Mapping):
        return {k: np.asarray(v) for k, v in x.items()}
    if len(names) != 1:
        raise UserError(f"the model has {len(names)} inputs ({', '.join(names)})", "pass a dict of arrays")
    return {names[0]: np.asarray(x, dtype=np.float32)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _run_all(data: bytes, feeds: Mapping[str, np.ndarray], batch_size: int) -> list[np.ndarray]:
    from lrdeploy.exporters.onnx import ort_session

    try:
        session = ort_session(data)
        n = len(next(iter(feeds.values())))
        chunks = [session.run(None, {k: v[i:i + batch_size] for k, v in feeds.items()})
                  for i in range(0, n, batch_size)]
    except Exception as exc:
        raise UserError(f"ONNX Runtime cannot run the converted graph ({_first_line(exc)})",
                        "report the model") from exc
    return [np.concatenate([c[j] for c in chunks], axis=0) for j in range(len(chunks[0]))]


def _run_reference(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], batch_size: int
                   ) -> tuple[list[np.ndarray] | None, str]:
    """Outputs of ``onnx.reference`` on the first examples that fit :data:`REFERENCE_BUDGET_S`, or None and
    the reason it was not run."""
    from onnx.reference import ReferenceEvaluator

    params = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    if params > REFERENCE_MAX_PARAMS:
        return None, f"{params / 1e6:.0f}M weights: too large for onnx.reference (> {REFERENCE_MAX_PARAMS:,})"
    total = len(next(iter(feeds.values())))
    try:
        session = ReferenceEvaluator(model)
        t0 = time.perf_counter()
        chunks = [session.run(None, {k: v[:1] for k, v in feeds.items()})]
        per_example = time.perf_counter() - t0
        n = min(total, REFERENCE_MAX_EXAMPLES, int(REFERENCE_BUDGET_S / max(per_example, 1e-9)))
        if n < min(total, REFERENCE_MIN_EXAMPLES):
            return None, (f"onnx.reference takes {per_example:.1f} s per example: {REFERENCE_MIN_EXAMPLES} "
                          f"examples exceed the {REFERENCE_BUDGET_S:.0f} s budget")
        chunks += [session.run(None, {k: v[i:min(i + batch_size, n)] for k, v in feeds.items()})
                   for i in range(1, n, batch_size)]
    except Exception as exc:
        return None, f"onnx.reference cannot run the graph ({_first_line(exc)})"
    return [np.concatenate([np.asarray(c[j]) for c in chunks], axis=0) for j in range(len(chunks[0]))], ""


def _variant_outputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], precision: str,
                     batch_size: int) -> tuple[list[np.ndarray] | None, str]:
    """The variant's outputs and who computed them: ORT, else (bf16 only) onnx.reference, else None and
    "not run: <reason>"."""
    try:
        return _run_all(model.SerializeToString(), feeds, batch_size), JUDGED_BY_ORT
    except UserError as exc:
        if precision != "bf16":
            raise
        ort_reason = _first_line(exc.__cause__ or exc)
    outs, why_not = _run_reference(model, feeds, batch_size)
    if outs is None:
        return None, f"not run: ONNX Runtime CPU cannot run bf16 ({ort_reason}); {why_not}"
    return outs, f"onnx.reference (bf16 emulated in numpy; ONNX Runtime CPU: {ort_reason})"


@dataclass
class _Verdict:
    parity: dict[str, Any]
    accuracy: dict[str, Any] | None
    failures: list[str]
    passed: bool | None
    judged_by: str
    examples: int


def token_rows(ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Sequence scores (N × T × V) as one row per token, dropping padding (label < 0); others unchanged.

    Labels of a sequence model are N × T token ids with padding marked -1, so accuracy and parity are both
    over real target tokens, as in teacher-forced evaluation.
    """
    if ref.ndim != 3:
        return ref, cand, None if labels is None else np.asarray(labels).reshape(-1)
    ref, cand = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
    if labels is None:
        return ref, cand, None
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != ref.shape[0]:
        raise UserError(f"{y.shape[0]} token labels for {ref.shape[0]} scored tokens",
                        "pass N × T labels for N × T × V scores")
    keep = y >= 0
    return ref[keep], cand[keep], y[keep]


def _judge_outputs(
    ref: list[np.ndarray], cand: list[np.ndarray], precision: str, labels: np.ndarray | None,
    max_accuracy_drop: float | None, tolerance: Tolerance | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    ref, cand = list(ref), list(cand)
    if labels is not None or ref[0].ndim == 3:  # sequence scores: one row per (non-padding) token
        ref[0], cand[0], labels = token_rows(ref[0], cand[0], labels)
    verdicts = [judge(output_parity(r, c), tolerance or precision) for r, c in zip(ref, cand, strict=True)]
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


def _check_reference_finite(ref_out: Sequence[np.ndarray]) -> None:
    """NaN/Inf in the fp32 graph's own outputs: nothing can be judged against it, so a UserError."""
    for i, out in enumerate(ref_out):
        nan, inf = nonfinite_counts(out)
        if nan or inf:
            which = "" if len(ref_out) == 1 else f" (output {i})"
            raise UserError(f"the fp32 graph's outputs{which} contain {describe_nonfinite(nan, inf)} on the "
                            "comparison data, so it cannot judge a variant",
                            "re-export from a model whose weights are finite")


def _evaluate(ref: onnx.ModelProto, cand: onnx.ModelProto, feeds: Mapping[str, np.ndarray], precision: str,
              labels: np.ndarray | None, max_accuracy_drop: float | None, batch_size: int,
              tolerance: Tolerance | None = None) -> _Verdict:
    """Run both graphs on ``feeds`` (the variant on the examples its runner could afford) and judge."""
    cand_out, judged_by = _variant_outputs(cand, feeds, precision, batch_size)
    if cand_out is None:
        return _Verdict({"precision": precision, "status": judged_by}, None, [], None, judged_by, 0)
    n = len(cand_out[0])
    ref_out = _run_all(ref.SerializeToString(), {k: v[:n] for k, v in feeds.items()}, batch_size)
    _check_reference_finite(ref_out)
    y = None if labels is None else np.asarray(labels)[:n]
    parity, acc, failures = _judge_outputs(ref_out, cand_out, precision, y, max_accuracy_drop, tolerance)
    return _Verdict(parity, acc, failures, not failures, judged_by, n)


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

    Returns ``{"parity": judge(...), "accuracy": {...} | None, "failures": [...], "passed": bool | None,
    "judged_by": str, "examples": int}``; ``passed`` is None when the variant could not be run (bf16 beyond
    onnx.reference's budget).
    """
    ref, cand = load_model(fp32_path), load_model(variant_path)
    v = _evaluate(ref, cand, _as_feeds(ref, x), precision, y, max_accuracy_drop, batch_size)
    return {"parity": v.parity, "accuracy": v.accuracy, "failures": v.failures, "passed": v.passed,
            "judged_by": v.judged_by, "examples": v.examples}


def time_vs_fp32(fp32: bytes, variant: bytes, feeds: Mapping[str, np.ndarray], *,
                 budget_s: float = SPEED_BUDGET_S, threads: int | None = None) -> dict[str, Any]:
    """Interleaved A/B latency of ``variant`` against ``fp32`` at batch 1 in ONNX Runtime CPU.

    Sessions are built as the serving runtimes build them (:func:`lrdeploy.host.session_options`: every
    usable CPU unless ``threads``); the first example of ``feeds`` is the input. Each round times one block
    of calls of each model, the order alternating between rounds, so drift (frequency, a neighbour's load)
    hits both; the per-round ratio's median is the answer. Returns ``{"speed_vs_fp32": fp32_ms /
    variant_ms, "fp32_ms", "variant_ms", "batch": 1, "threads", "rounds", "calls_per_block", "seconds"}``, or
    ``{"speed_vs_fp32": None, "status": "not run: <why>"}``. Takes about ``budget_s`` seconds (at least
    :data:`SPEED_MIN_ROUNDS` rounds unless that takes 3× as long; always one).
    """
    import onnxruntime as ort

    from lrdeploy.host import resolve_threads, session_options

    n_threads = resolve_threads(threads)
    one = {k: np.ascontiguousarray(np.asarray(v)[:1]) for k, v in feeds.items()}
    start = time.perf_counter()
    try:
        sessions = [ort.InferenceSession(data, session_options(n_threads), providers=["CPUExecutionProvider"])
                    for data in (fp32, variant)]
        estimate = 0.0
        for session in sessions:  # warm-up (allocation, kernel choice), then a few calls to size the blocks
            session.run(None, one)
            t0, n = time.perf_counter(), 0
            while n < 3 or (n < 50 and time.perf_counter() - t0 < SPEED_BLOCK_S / 4):
                session.run(None, one)
                n += 1
            estimate = max(estimate, (time.perf_counter() - t0) / n)
        calls = max(1, min(1000, int(SPEED_BLOCK_S / max(estimate, 1e-7))))
        blocks: tuple[list[float], list[float]] = ([], [])
        rounds = 0
        while True:
            elapsed = time.perf_counter() - start
            if rounds and elapsed >= budget_s and (rounds >= SPEED_MIN_ROUNDS or elapsed >= 3 * budget_s):
                break
            order = (0, 1) if rounds % 2 == 0 else (1, 0)
            for which in order:
                session = sessions[which]
                t0 = time.perf_counter()
                for _ in range(calls):
                    session.run(None, one)
                blocks[which].append((time.perf_counter() - t0) / calls)
            rounds += 1
    except Exception as exc:  # a variant ORT cannot run was reported by the parity step already
        return {"speed_vs_fp32": None, "status": f"not run: {_first_line(exc)}"}
    ratio = float(np.median(np.asarray(blocks[1]) / np.asarray(blocks[0])))
    return {"speed_vs_fp32": 1.0 / ratio if ratio > 0 else None, "fp32_ms": 1e3 * float(np.median(blocks[0])),
            "variant_ms": 1e3 * float(np.median(blocks[1])), "batch": 1, "threads": n_threads,
            "rounds": rounds, "calls_per_block": calls, "seconds": time.perf_counter() - start,
            "measured_by": f"{JUDGED_BY_ORT}, interleaved A/B"}


def describe_speed(speed_vs_fp32: float | None, timing: Mapping[str, Any] | None = None) -> str:
    """``"2.9× SLOWER than fp32 on this CPU (measured b1)"``, ``"1.8× faster ..."``, ``"as fast as ..."``, or
    "" when it was not measured; the CLI appends it to the variant's line."""
    if speed_vs_fp32 is None or not speed_vs_fp32 > 0:
        return ""
    batch = (timing or {}).get("batch", 1)
    where = f"on this CPU (measured b{batch})"
    if speed_vs_fp32 < 1 / SPEED_SAME:
        return f"{1 / speed_vs_fp32:.1f}× SLOWER than fp32 {where}"
    if speed_vs_fp32 > SPEED_SAME:
        return f"{speed_vs_fp32:.1f}× faster than fp32 {where}"
    return f"as fast as fp32 {where}"


def resolve_model_kind(proto: onnx.ModelProto, model_kind: str = "auto") -> str:
    if model_kind not in MODEL_KINDS:
        raise UserError(f"unknown model kind {model_kind!r}", f"choose one of: {', '.join(MODEL_KINDS)}")
    if model_kind != "auto":
        return model_kind
    return "static" if any(n.op_type == "Conv" for n in proto.graph.node) else "dynamic"


@dataclass
class _Converted:
    model: onnx.ModelProto
    kind: str
    method: str
    rewritten: int = 0
    fp32_ops: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _convert(proto: onnx.ModelProto, precision: str, model_kind: str, calibration: np.ndarray | None, *,
             per_channel: bool, batch_size: int) -> _Converted:
    if precision == "fp16":
        out, fp32_ops = _to_fp16(proto)
        return _Converted(out, "n/a", "fp16", fp32_ops=fp32_ops, notes=[
            "fp16 on CPU is not faster (ORT up-casts); intended for GPU runtimes and smaller files"])
    if precision == "bf16":
        conv = to_bf16(proto)
        return _Converted(conv.model, "n/a", "bf16", fp32_ops=conv.fp32_ops, notes=[
            *conv.notes, "bf16 is for GPU runtimes (TensorRT >= 11 builds it strongly typed)"])
    kind = resolve_model_kind(proto, model_kind)
    out, rewritten = _to_int8(proto, kind, calibration, per_channel=per_channel, batch_size=batch_size)
    notes = []
    if kind == "dynamic" and any(n.op_type == "Conv" for n in proto.graph.node):
        notes.append("Conv nodes left in fp32: dynamic ConvInteger is 6-9x slower on CPU; use static")
    if kind == "trt":
        notes.append("TensorRT Q/DQ (symmetric int8, per-channel weights): TensorRT 10 builds it with the "
                     "INT8 flag, TensorRT 11 strongly typed")
    return _Converted(out, kind, INT8_METHODS[kind], rewritten, notes=notes)


def _comparison_data(proto: onnx.ModelProto, test_inputs: Any, calibration: np.ndarray | None,
                     labels: Any) -> tuple[Any, str]:
    if test_inputs is not None:
        return test_inputs, "test_inputs"
    if calibration is not None:
        if labels is not None and len(np.asarray(labels)) != len(calibration):
            raise UserError("labels and calibration data differ in length", "pass test_inputs with labels")
        return calibration, "calibration"
    if labels is not None:
        raise UserError("labels given without inputs", "pass test_inputs together with labels")
    return random_feeds(proto, batch=16), "random"


def _load_source(src: Path, dst: Path) -> onnx.ModelProto:
    if dst.is_dir():
        raise UserError(f"{dst} is a directory", "pass the path of the .onnx file to write")
    if src.resolve() == dst.resolve():
        raise UserError("the variant would overwrite its fp32 source", "write it to another path")
    proto = load_model(src)
    if any(n.domain not in ("", "ai.onnx") for n in proto.graph.node):
        raise UserError(f"{src} uses ONNX Runtime contrib ops (an optimised .ort.onnx?)",
                        "convert the portable .onnx from export, then optimise the variant")
    return proto


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
    speed_budget_s: float | None = SPEED_BUDGET_S,
    tolerance: Tolerance | None = None,
) -> PrecisionResult:
    """Write the ``precision`` variant of the fp32 graph ``src`` to ``dst`` and judge it (module docstring).

    ``calibration``: real training inputs (N × sample shape), required for static and trt int8; also the
    comparison data when ``test_inputs`` is not given (optimistic for static int8: the ranges were fitted on
    it). ``test_inputs`` / ``labels``: held-out data for parity and, with labels, the accuracy delta. Without
    any data the comparison runs on random inputs. A miss (tolerance preset of ``precision``, or an accuracy
    drop above ``max_accuracy_drop``) is reported in ``failures``; a variant that could not be run at all
    (bf16 beyond onnx.reference's budget) has ``passed`` None. ``strict=True`` raises a UserError in both
    cases instead, and nothing is written. ``speed_budget_s``: seconds of A/B timing against fp32 at batch 1
    (:func:`time_vs_fp32`; ``speed_vs_fp32`` in the result), None or 0 to skip it. ``tolerance``: limits
    that replace the precision's preset, for outputs the preset does not fit (a task's own, e.g. an
    embedding's, whose arg-max means nothing).
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}", f"choose one of: {', '.join(PRECISIONS)}")
    src, dst = Path(src), Path(dst)
    proto = _load_source(src, dst)
    if calibration is not None:
        calibration = np.asarray(calibration)
        if calibration.ndim == 0 or calibration.shape[0] == 0:
            raise UserError("calibration data is empty", "pass real training inputs, e.g. 256 examples")
    conv = _convert(proto, precision, model_kind, calibration, per_channel=per_channel, batch_size=batch_size)
    out = conv.model
    check_graph(out, f"{precision} variant")
    copy_metadata(proto, out, {META_PRECISION: conv.method})
    data, compared_on = _comparison_data(proto, test_inputs, calibration, labels)
    y = None if labels is None else np.asarray(labels)
    v = _evaluate(proto, out, _as_feeds(proto, data), precision, y, max_accuracy_drop, batch_size, tolerance)
    if strict and not v.passed:
        why = "; ".join(v.failures) if v.failures else v.judged_by
        verdict = "misses its tolerance" if v.failures else "was not judged"
        raise UserError(f"{conv.method} variant {verdict}: {why}",
                        "calibrate on more or more representative data, or keep fp32")
    out_data = out.SerializeToString()
    if not speed_budget_s:
        timing: dict[str, Any] = {"speed_vs_fp32": None, "status": "not run: switched off"}
    elif v.judged_by != JUDGED_BY_ORT:
        timing = {"speed_vs_fp32": None, "status": "not run: ONNX Runtime CPU cannot run this variant"}
    else:
        timing = time_vs_fp32(proto.SerializeToString(), out_data, _as_feeds(proto, data),
                              budget_s=speed_budget_s)
    atomic.write_bytes(dst, out_data)
    calibrated = len(calibration) if calibration is not None and conv.kind in ("static", "trt") else 0
    return PrecisionResult(
        src=src, dst=dst, precision=precision, method=conv.method, model_kind=conv.kind,
        op_histogram=op_histogram(out), parity=v.parity, accuracy=v.accuracy, passed=v.passed,
        failures=v.failures, gemm_rewritten=conv.rewritten, fp32_ops=conv.fp32_ops,
        calibration_samples=calibrated,
        compared_on=compared_on, judged_by=v.judged_by, compared_examples=v.examples, notes=conv.notes,
        size_bytes={"fp32": proto.ByteSize(), precision: len(out_data)},
        speed_vs_fp32=timing.pop("speed_vs_fp32"), timing=timing,
    )
