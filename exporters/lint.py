"""Graph checks before a TensorRT build: find what will fail (or silently go static) before ``trtexec`` does.

Why these checks:
- A Reshape whose constant shape starts with a concrete batch (``[2, -1]`` from tracing at batch 2) makes a
  "dynamic batch" graph fail, or produce garbage, at every other batch size: the input says ``batch`` but the
  graph says 2. TensorRT's parser accepts it; the engine then rejects the optimisation profile.
- TensorRT's ONNX parser knows only the default ONNX domain (plus its own plugins). ORT's offline optimiser
  writes ``com.microsoft`` contrib ops (FusedConv, FusedGemm, Gelu, ...), so ``<stem>.ort.onnx`` is ORT-only;
  the plain ``<stem>.onnx`` is the one to build from.
- Einsum parses, but TensorRT supports only some equations and is often slow: a warning, not an error.
- A dynamic-batch engine needs every input's first axis symbolic (one optimisation profile sets them all), and
  outputs whose batch axis is concrete betray a batch baked somewhere inside the graph.
- Opset and IR version are reported because TensorRT's parser has a supported range per release.
- Q/DQ graphs (explicit quantisation, the only int8 TensorRT 10 and 11 build from): TensorRT takes symmetric
  int8 only, i.e. every QuantizeLinear/DequantizeLinear zero point a constant int8 0, constant scales, and
  per-channel scales on weights only. ONNX Runtime's default static QDQ (asymmetric uint8 activations, int32
  bias through DequantizeLinear) runs on ORT but fails the TensorRT build: :func:`trt_qdq_findings`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lrdeploy.errors import UserError

DEFAULT_DOMAINS = ("", "ai.onnx")
OPTIMIZED_SUFFIX = ".ort.onnx"


@dataclass
class Finding:
    severity: str  # "error" | "warning"
    code: str
    node: str | None
    message: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LintReport:
    path: str | None
    opset: int | None
    ir_version: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "opset": self.opset, "ir_version": self.ir_version, "ok": self.ok,
                "errors": len(self.errors), "warnings": len(self.warnings),
                "findings": [f.to_dict() for f in self.findings]}

    def summary(self) -> str:
        """One line for a UserError: the first error and how many more."""
        errs = self.errors
        if not errs:
            return f"{self.path or 'graph'}: no TensorRT lint errors"
        first = errs[0]
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        where = f" at {first.node}" if first.node else ""
        return f"{self.path or 'graph'}: {first.code}{where}: {first.message}{more}"

    def render(self) -> Any:
        """A Rich table titled with opset and IR version: per finding its severity over its code, the node,
        and the message over the fix; on a console too narrow for the three, a second table holds the message
        (see :func:`lrdeploy.tables.fit`)."""
        from rich.table import Table
        from rich.text import Text

        from lrdeploy.tables import fit

        title = (f"TensorRT lint: {self.path or 'graph'} (opset {self.opset}, IR {self.ir_version}) — "
                 f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        table = Table(title=title, show_lines=True)
        table.add_column("severity\ncode", no_wrap=True)
        table.add_column("node", overflow="fold")
        table.add_column("message\nfix", overflow="fold")
        for f in self.findings:
            style = "red" if f.severity == "error" else "yellow"
            table.add_row(Text.assemble((f.severity, style), "\n", f.code), f.node or "",
                          Text.assemble(f.message, "\n", ("fix: ", "bold"), f.fix))
        return fit(table, keys=1)


def load_model(model_or_path: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, str | None]:
    """(model, path) — structure only; external data is not needed for the checks here."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, None
    path = Path(model_or_path)
    if not path.is_file():
        raise UserError(f"ONNX file not found: {path}", hint="check the path")
    try:
        return onnx.load(str(path), load_external_data=False), str(path)
    except Exception as exc:  # onnx raises DecodeError and others for truncated files
        raise UserError(f"{path} is not a valid ONNX model ({type(exc).__name__})",
                        hint="re-export it") from None


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str | None] | None:
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs (older exports list initialisers among the inputs too)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.output) == 1:
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    return consts


def _opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return int(imp.version)
    return None


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _input_dependent(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """Tensors computed from the graph inputs (a Reshape of a constant cannot bake a batch in)."""
    live = set(names)
    for node in graph.node:  # ONNX requires topological order
        if any(i in live for i in node.input) or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            live.update(node.output)
    return live


def _quantised_types(graph: onnx.GraphProto, consts: dict[str, np.ndarray]) -> dict[str, int]:
    """Element type of every integer Q/DQ operand: constants' own, QuantizeLinear outputs' by zero point."""
    types = {name: onnx.helper.np_dtype_to_tensor_dtype(arr.dtype) for name, arr in consts.items()}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            zp = node.input[2] if len(node.input) > 2 else ""
            if zp in consts:
                types[node.output[0]] = types[zp]
            elif not zp:
                types[node.output[0]] = onnx.TensorProto.UINT8  # ONNX's default output type
    return types


def _qdq_problems(node: onnx.NodeProto, consts: dict[str, np.ndarray], types: dict[str, int]) -> list[str]:
    """What makes one QuantizeLinear/DequantizeLinear unusable by TensorRT (empty when it is fine)."""
    problems = []
    scale, zp = node.input[1], (node.input[2] if len(node.input) > 2 else "")
    if scale not in consts:
        problems.append("its scale is computed, not a constant")
    elif consts[scale].size > 1 and node.input[0] not in consts and node.op_type == "QuantizeLinear":
        problems.append("per-channel scales on an activation (TensorRT: per-tensor for activations)")
    if zp and zp not in consts:
        problems.append("its zero point is computed, not a constant")
    elif zp and np.any(consts[zp] != 0):
        problems.append(f"zero point {consts[zp].reshape(-1)[:4].tolist()} is not 0 (asymmetric)")
    q_type = types.get(node.output[0] if node.op_type == "QuantizeLinear" else node.input[0])
    if q_type != onnx.TensorProto.INT8:
        name = onnx.TensorProto.DataType.Name(q_type).lower() if q_type else "unknown"
        problems.append(f"quantised type {name}, not int8")
    return problems


def trt_qdq_findings(model_or_path: onnx.ModelProto | str | os.PathLike) -> list[Finding]:
    """Errors for every QuantizeLinear/DequantizeLinear TensorRT cannot build (module docstring); [] when the
    graph is TensorRT-compatible explicit int8 (or has no Q/DQ at all)."""
    model, _ = load_model(model_or_path)
    consts = _constants(model.graph)
    types = _quantised_types(model.graph, consts)
    fix = ("quantise for TensorRT: symmetric int8 activations, symmetric per-channel weights, float bias "
           "(lrdeploy export --trt --precision int8, or convert_precision(..., 'int8', model_kind='trt'))")
    findings = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in DEFAULT_DOMAINS:
            continue
        problems = _qdq_problems(node, consts, types)
        if problems:
            label = node.name or f"{node.op_type}({node.output[0]})"
            findings.append(Finding("error", "trt-qdq", label, f"{node.op_type}: {'; '.join(problems)}", fix))
    return findings


def lint_for_tensorrt(model_or_path: onnx.ModelProto | str | os.PathLike) -> LintReport:
    """Check an ONNX graph for what TensorRT's parser and dynamic-shape profiles will trip over."""
    model, path = load_model(model_or_path)
    report = LintReport(path=path, opset=_opset(model), ir_version=int(model.ir_version))
    add = report.findings.append
    inputs = graph_inputs(model)
    in_dims = {i.name: _dims(i) for i in inputs}

    # --- dynamic-shape consistency -------------------------------------------------------------------------
    batch_names: set[str] = set()
    dynamic_any = False
    for name, dims in in_dims.items():
        if not dims:
            continue
        first = dims[0]
        if isinstance(first, str) or first is None:
            dynamic_any = True
            if isinstance(first, str):
                batch_names.add(first)
        else:
            add(Finding("warning", "static-batch-input", name,
                        f"input {name!r} has a fixed batch dimension {first}",
                        "export with dynamic_batch=True for an engine that serves several batch sizes"))
        if any(d is None for d in dims):
            add(Finding("warning", "unnamed-dynamic-dim", name,
                        f"input {name!r} has dynamic dimensions without a name: {dims}",
                        "name every dynamic axis so optimisation-profile shapes can be given per axis"))
    if len(batch_names) > 1:
        add(Finding("warning", "inconsistent-batch-names", None,
                    f"inputs name their batch axis differently: {sorted(batch_names)}",
                    "use one symbolic name (e.g. 'batch') on axis 0 of every input so one profile fits all"))
    static_in = [n for n, d in in_dims.items() if d and isinstance(d[0], int)]
    if dynamic_any and static_in:
        add(Finding("error", "mixed-batch-inputs", ", ".join(static_in),
                    f"some inputs have a dynamic batch axis but {static_in} do not",
                    "make axis 0 dynamic on every input (or on none)"))
    if dynamic_any:
        for out in model.graph.output:
            dims = _dims(out)
            if dims and isinstance(dims[0], int):
                add(Finding("error", "static-batch-output", out.name,
                            f"output {out.name!r} has a fixed batch dimension {dims[0]} although the inputs' "
                            "batch is dynamic: a batch size is baked in somewhere in the graph",
                            "re-export with dynamic shapes; look for Reshape/Expand constants holding the "
                            "tracing batch size"))

    # --- per-node checks -----------------------------------------------------------------------------------
    consts = _constants(model.graph)
    live = _input_dependent(model.graph, set(in_dims))
    foreign: dict[str, list[str]] = {}
    for node in _all_nodes(model.graph):
        label = node.name or f"{node.op_type}({', '.join(node.output)})"
        if node.domain not in DEFAULT_DOMAINS:
            foreign.setdefault(f"{node.domain}::{node.op_type}", []).append(label)
            continue
        if node.op_type == "Einsum":
            eq = next((a.s.decode() for a in node.attribute if a.name == "equation"), "?")
            add(Finding("warning", "einsum", label,
                        f"Einsum '{eq}': TensorRT supports only some equations and often runs them slowly",
                        "export the contraction as MatMul/Transpose (e.g. torch.matmul instead of einsum)"))
        if (node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in consts and dynamic_any
                and node.input[0] in live):
            shape = consts[node.input[1]].reshape(-1)
            # 0 means "copy the input's dim" and -1 "infer": both keep the batch dynamic
            if shape.size >= 2 and int(shape[0]) > 0:
                batch = int(shape[0])
                add(Finding("error", "baked-batch-reshape", label,
                            f"Reshape to constant shape {shape.tolist()}: the first dimension {batch} is a "
                            "concrete batch size, while the graph input's batch is symbolic",
                            "use x.flatten(1) / x.reshape(x.shape[0], ...) or a 0/-1 first dim; "
                            "re-export with dynamic shapes"))
    for op, nodes in sorted(foreign.items()):
        domain = op.split("::", 1)[0]
        shown = ", ".join(nodes[:3]) + (f" (+{len(nodes) - 3} more)" if len(nodes) > 3 else "")
        hint = ("this is ONNX Runtime's optimised graph: lint and build the plain .onnx, not "
                f"{OPTIMIZED_SUFFIX}" if domain == "com.microsoft" or (path or "").endswith(OPTIMIZED_SUFFIX)
                else "replace the op with standard ONNX ops or register a TensorRT plugin for it")
        add(Finding("error", "unsupported-domain", shown,
                    f"{len(nodes)} node(s) of {op}: TensorRT's ONNX parser knows only the default domain",
                    hint))
    report.findings.extend(trt_qdq_findings(model))
    if report.opset is None:
        add(Finding("error", "no-default-opset", None, "the graph imports no default-domain opset",
                    "re-export with a standard ONNX opset"))
    elif report.opset < 9:
        add(Finding("warning", "old-opset", None, f"opset {report.opset} is older than TensorRT handles well",
                    "re-export with opset ≥ 17"))
    return report


def nm_weights(model_or_path: onnx.ModelProto | str | os.PathLike, n: int = 2, m: int = 4
               ) -> tuple[list[str], list[str]]:
    """(weights with the N:M pattern, all Conv/Gemm/MatMul weights) of a graph, by initialiser name.

    The pattern is checked along each output's reduction (input) axis, as TensorRT's sparse tactics read it:
    Conv W[out, in, kh, kw] per output channel; Gemm B per row with transB=1, per column otherwise; MatMul's
    constant right operand [K, N] per column. A reduction size that is not a multiple of M never has it.
    """
    model, _ = load_model(model_or_path)
    consts = _constants(model.graph)
    found: dict[str, bool] = {}
    for node in _all_nodes(model.graph):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 \
                or node.input[1] not in consts:
            continue
        w = consts[node.input[1]]
        if w.ndim < 2:
            continue
        trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        rows = w.reshape(w.shape[0], -1) if node.op_type == "Conv" or trans_b else w.reshape(w.shape[0], -1).T
        ok = rows.shape[1] % m == 0 and bool(
            ((rows.reshape(rows.shape[0], -1, m) != 0).sum(-1) <= n).all())
        found[node.input[1]] = ok
    return [k for k, v in found.items() if v], list(found)
