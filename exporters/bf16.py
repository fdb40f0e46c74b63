"""float32 → bfloat16 graph conversion: bf16 weights and arithmetic, fragile ops and the graph's I/O in fp32.

Why a converter of our own: onnxruntime's ``float16.convert_float_to_float16`` only targets fp16 (its
``use_bfloat16_as_blocked_nodes_dtype`` puts the *blocked* nodes in bf16, the opposite of what we need), and
strongly typed TensorRT (≥ 11) takes the precision from the graph, so a bf16 engine needs a bf16 graph.

How: every float32 tensor gets a "home" type: bf16 when produced by a node that computes in bf16, fp32 when
produced by a blocked node (normalisations, softmax, reductions, exp/log/pow: bf16's 8-bit significand loses
the small terms of their sums), by a graph input, or by an op whose schema admits no bf16. Each node then
reads every float input in the type it needs, through a Cast inserted once per (tensor, type); constant
weights get a converted twin instead of a runtime Cast. Graph inputs and outputs stay fp32 (like fp16's
``keep_io_types``), so callers feed and receive the same arrays. Conv, pooling and InstanceNormalization admit
bf16 only from opset 22, so a graph that has them is first upgraded to opset 22 (TensorRT 11 parses up to 25).
The result passes ``onnx.checker.check_model(full_check=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, defs, helper, numpy_helper

from lrdeploy.errors import UserError

F32, BF16 = TensorProto.FLOAT, TensorProto.BFLOAT16
BF16_OPSET = 22  # Conv, ConvTranspose, MaxPool, AveragePool, InstanceNormalization admit bfloat16 from here
DEFAULT_DOMAINS = ("", "ai.onnx")
# ops whose float output type comes from an attribute, not from an input: left in fp32
_DTYPE_ATTR_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                             "EyeLike", "Bernoulli", "Multinomial"})


@dataclass
class Bf16Conversion:
    model: onnx.ModelProto
    fp32_ops: list[str]  # op types present in the graph and left in fp32 (blocked or no bf16 schema)
    opset_upgraded_from: int | None = None  # original opset when the graph was raised to BF16_OPSET
    casts: int = 0  # Cast nodes inserted
    notes: list[str] = field(default_factory=list)


def _opset(model: onnx.ModelProto) -> int:
    return next((int(i.version) for i in model.opset_import if i.domain in DEFAULT_DOMAINS), 0)


def _schema(node: onnx.NodeProto, opset: int) -> defs.OpSchema | None:
    if node.domain not in DEFAULT_DOMAINS:
        return None
    try:
        return defs.get_schema(node.op_type, opset)
    except defs.SchemaError:
        return None


def _formal(params: list, index: int) -> str:
    """Type string of the formal parameter behind the ``index``-th actual input/output (variadic last)."""
    p = params[min(index, len(params) - 1)]
    return p.type_str


def _admits_bf16(schema: defs.OpSchema, type_str: str) -> bool:
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    return "tensor(bfloat16)" in allowed.get(type_str, [type_str])


def _computes_bf16(node: onnx.NodeProto, opset: int, block: set[str]) -> bool:
    """Whether the node can run in bf16 at ``opset``: not blocked, a default-domain schema admitting bf16."""
    if node.op_type in block or node.op_type in _DTYPE_ATTR_OPS:
        return False
    schema = _schema(node, opset)
    if schema is None:
        return False
    return any(_admits_bf16(schema, p.type_str) for p in (*schema.inputs, *schema.outputs))


def _needs_upgrade(model: onnx.ModelProto, block: set[str]) -> bool:
    opset = _opset(model)
    if opset >= BF16_OPSET:
        return False
    return any(not _computes_bf16(n, opset, block) and _computes_bf16(n, BF16_OPSET, block)
               for n in model.graph.node)


def _upgrade(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, BF16_OPSET)
    except Exception as exc:  # the converter raises RuntimeError / ConvertError with a C++ message
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot upgrade the graph to opset {BF16_OPSET} for bf16 Conv/pooling ({first})",
                        "re-export with --opset 22") from None


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        raise UserError(f"shape inference failed before the bf16 conversion ({str(exc)[:200]})",
                        "convert the plain .onnx written by export") from None
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _wanted(node: onnx.NodeProto, opset: int, block: set[str], types: dict[str, int]
            ) -> tuple[list[int | None], list[int | None]]:
    """The type each float32 input is read in and each float32 output is produced in (None: not float32,
    or a Cast input, which takes any type). Casts produce fp32: an int→float Cast stays exact (bf16 holds
    integers exactly only up to 256), and bf16 readers cast it themselves."""
    if node.op_type == "Cast":
        return [None] * len(node.input), [F32 if types.get(o) == F32 else None for o in node.output]
    low = _computes_bf16(node, opset, block)
    schema = _schema(node, opset) if low else None

    def pick(names: Iterable[str], params: list) -> list[int | None]:
        out: list[int | None] = []
        for k, name in enumerate(names):
            if not name or types.get(name) != F32:
                out.append(None)
            elif schema is None:
                out.append(F32)
            else:
                out.append(BF16 if _admits_bf16(schema, _formal(params, k)) else F32)
        return out

    inputs, outputs = (list(schema.inputs), list(schema.outputs)) if schema else ([], [])
    return pick(node.input, inputs), pick(node.output, outputs)


class _Converter:
    """One pass over the nodes in order; see the module docstring."""

    def __init__(self, model: onnx.ModelProto, block: set[str]) -> None:
        self.model, self.g = model, model.graph
        self.opset = _opset(model)
        self.types = _elem_types(model)
        self.inits = {i.name: i for i in self.g.initializer}
        self.plans = [_wanted(n, self.opset, block, self.types) for n in self.g.node]
        self.taken = set(self.types) | {o for n in self.g.node for o in n.output} | set(self.inits)
        self.casts: dict[tuple[str, int], str] = {}
        self.home: dict[str, int] = {}
        self.rename: dict[str, str] = {}
        self.graph_outputs = {o.name for o in self.g.output}
        self.graph_inputs = {i.name for i in self.g.input}
        self.nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.n_casts = 0

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def _constant_homes(self) -> None:
        """Weights (initialisers, Constant nodes) are bf16 when every reader wants bf16, else fp32, as are
        graph outputs and initialisers listed as graph inputs (old IR: callers may override them in fp32)."""
        wants: dict[str, set[int | None]] = {}
        for node, (ins, _) in zip(self.g.node, self.plans, strict=True):
            for name, want in zip(node.input, ins, strict=True):
                wants.setdefault(name, set()).add(want)
        consts = [n.output[0] for n in self.g.node if n.op_type == "Constant" and n.domain in DEFAULT_DOMAINS
                  and any(a.name == "value" for a in n.attribute)]  # value_float(s) stay fp32
        for name in (*self.inits, *consts):
            if self.types.get(name) == F32:
                fixed = name in self.graph_outputs or name in self.graph_inputs
                all_bf16 = wants.get(name) == {BF16} and not fixed
                self.home[name] = BF16 if all_bf16 else F32

    def read(self, name: str, want: int) -> str:
        """The name of ``name`` in type ``want``: itself, a converted weight twin, or a new Cast's output."""
        if self.home.get(name, F32) == want:
            return name
        key = (name, want)
        if key not in self.casts:
            suffix = "bf16" if want == BF16 else "fp32"
            out = self.fresh(f"{name}__{suffix}")
            if name in self.inits:
                arr = numpy_helper.to_array(self.inits[name]).astype(helper.tensor_dtype_to_np_dtype(want))
                self.new_inits.append(numpy_helper.from_array(arr, out))
            else:
                cast = helper.make_node("Cast", [name], [out], to=want, name=self.fresh(f"{out}_cast"))
                self.nodes.append(cast)
                self.n_casts += 1
            self.casts[key] = out
        return self.casts[key]

    def _retype_attrs(self, node: onnx.NodeProto) -> None:
        """A bf16-producing Constant/ConstantOfShape carries its value in an attribute: convert it."""
        bf16 = helper.tensor_dtype_to_np_dtype(BF16)
        for attr in node.attribute:
            if node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value":
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(bf16)))
        if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, bf16))))

    def _place_outputs(self, node: onnx.NodeProto, outs: list[int | None]) -> list[onnx.NodeProto]:
        """Record each float output's home; a bf16 graph output is renamed and Cast back to fp32 under its
        own name (returned), which later fp32 readers reuse."""
        casts = []
        for k, made in enumerate(outs):
            if made is None:
                continue
            name = node.output[k]
            self.home[name] = made
            if made == BF16 and name in self.graph_outputs:
                inner = self.fresh(f"{name}__bf16")
                self.rename[name], node.output[k], self.home[inner] = inner, inner, BF16
                self.casts[(inner, F32)] = name
                cast_name = self.fresh(f"{name}_cast")
                casts.append(helper.make_node("Cast", [inner], [name], to=F32, name=cast_name))
        return casts

    def convert_node(self, node: onnx.NodeProto, ins: list[int | None], outs: list[int | None]) -> None:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise UserError(f"the bf16 converter does not handle control flow ({node.op_type})",
                            "build this model in fp16 or fp32")
        for k, want in enumerate(ins):
            name = self.rename.get(node.input[k], node.input[k])
            node.input[k] = self.read(name, want) if want else name
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            outs = [self.home.get(node.output[0])]
        casts = self._place_outputs(node, outs)
        if BF16 in outs:
            self._retype_attrs(node)
        self.nodes += [node, *casts]
        self.n_casts += len(casts)

    def _initializers(self) -> list[onnx.TensorProto]:
        """The used initialisers: bf16-homed ones converted, fp32 ones kept, bf16 twins added."""
        bf16 = helper.tensor_dtype_to_np_dtype(BF16)
        used = {i for n in self.nodes for i in n.input} | self.graph_outputs
        out = []
        for init in self.g.initializer:
            if init.name not in used:
                continue
            if self.home.get(init.name) == BF16:
                init = numpy_helper.from_array(numpy_helper.to_array(init).astype(bf16), init.name)
            out.append(init)
        return out + self.new_inits

    def run(self) -> onnx.ModelProto:
        self._constant_homes()
        for node, (ins, outs) in zip(list(self.g.node), self.plans, strict=True):
            self.convert_node(node, ins, outs)
        inits = self._initializers()
        del self.g.node[:], self.g.initializer[:], self.g.value_info[:]
        self.g.node.extend(self.nodes)
        self.g.initializer.extend(inits)
        return onnx.shape_inference.infer_shapes(self.model, strict_mode=True)


def convert_to_bf16(model: onnx.ModelProto, block: Iterable[str]) -> Bf16Conversion:
    """A bf16 copy of ``model`` (module docstring); ``block`` op types stay fp32. Checked with full_check."""
    work = onnx.ModelProto.FromString(model.SerializeToString())
    block_set = set(block)
    upgraded_from = None
    if _needs_upgrade(work, block_set):
        upgraded_from = _opset(work)
        work = _upgrade(work)
    conv = _Converter(work, block_set)
    kept = sorted({n.op_type for n, (ins, outs) in zip(work.graph.node, conv.plans, strict=True)
                   if n.op_type not in ("Constant", "Cast") and F32 in (*ins, *outs)
                   and BF16 not in (*ins, *outs)})
    out = conv.run()
    try:
        onnx.checker.check_model(out, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the bf16 conversion produced an invalid graph ({first})",
                        "report the model") from None
    result = Bf16Conversion(out, kept, upgraded_from, conv.n_casts)
    if upgraded_from:
        result.notes.append(f"opset raised from {upgraded_from} to {BF16_OPSET} (bf16 Conv/pooling)")
    return result
