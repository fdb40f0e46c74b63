"""Parameters, weight bytes and FLOPs counted from an ONNX graph: the model as deployed, not as trained.

The bundle manifest counts the PyTorch model that was trained. What ships can differ: ``--fold auto`` or
``dense`` re-multiplies a factorised layer into one dense weight (more parameters, more FLOPs), BatchNorm is
folded into the convolution before it, a precision variant stores fp16 or int8 weights. Reports therefore
count what is in the graph.

Conventions (those of :mod:`lrdeploy.flops`, so the two agree on a model exported with ``--fold factored``):

- **Parameters** are the elements of the tensors that hold weights: floating-point initialisers and
  ``Constant`` node values, and integer tensors in a quantised-weight position (``DequantizeLinear``
  input 0, ``MatMulInteger``/``ConvInteger`` operands, ``QLinearConv`` weight and bias, ...). Each tensor is
  counted once however many nodes read it. Not parameters: integer tensors elsewhere (shapes, axes,
  indices), rank-0 float constants (an exporter's scale factor or epsilon), scales and zero points of
  quantisation, and tensors no node reads. Unlike ``count_params`` this also counts the float buffers a
  graph stores (a positional-encoding table, BatchNorm statistics left unfolded).
- **Weight bytes** are the stored size of the parameters plus the quantisation scales and zero points a
  runtime needs to use them (dtype size × elements, so external data need not be read).
- **FLOPs** are 2 × multiply-accumulates of Conv (groups included), ConvTranspose, Gemm, MatMul (batched and
  broadcast, e.g. attention), two-operand Einsum and their integer/fused variants, for one sample: graph
  inputs get a concrete batch of 1 (and, for files ``lrdeploy export`` wrote, every other dynamic axis at the
  model's nominal size, e.g. 32 tokens), shapes come from ``onnx.shape_inference``. Biases, activations,
  normalisation, pooling, softmax and data movement are not counted (as torch's ``FlopCounterMode`` does
  not); :attr:`GraphStats.not_counted` lists them by op type. A graph with an op whose cost is unknown (an
  RNN, a fused attention kernel, a custom op) or a counted op whose shapes cannot be inferred has
  ``flops = None`` — never a partial total presented as the whole, never a negative number.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

# how the FLOP total is defined, stored next to it in reports
CONVENTION = ("2·MAC of Conv/ConvTranspose/Gemm/MatMul/Einsum (and integer/fused variants) per sample; "
              "bias, activation, normalisation, pooling and data movement not counted")

_FLOAT_TYPES = frozenset({
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16,
    *(getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
                                        "FLOAT4E2M1") if hasattr(TensorProto, n)),
})
_HALF_BYTE_TYPES = frozenset(getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
                             if hasattr(TensorProto, n))

# Quantised ops: input positions holding scales / zero points (quantisation parameters); their other inputs
# are data, so an integer initialiser there is a quantised weight (or an int32 bias).
_QUANT_PARAM_INPUTS: dict[str, frozenset[int]] = {
    "QuantizeLinear": frozenset({1, 2}),
    "DequantizeLinear": frozenset({1, 2}),
    "DynamicQuantizeLinear": frozenset(),
    "MatMulInteger": frozenset({2, 3}),
    "ConvInteger": frozenset({2, 3}),
    "QLinearConv": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearMatMul": frozenset({1, 2, 4, 5, 6, 7}),
    "MatMulIntegerToFloat": frozenset({2, 3, 4, 5}),  # com.microsoft
    "DynamicQuantizeMatMul": frozenset({2, 3}),  # com.microsoft
    "QGemm": frozenset({1, 2, 4, 5, 7, 8}),  # com.microsoft
}
# float inputs that configure an op rather than hold weights
_FLOAT_SETTING_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}), "Upsample": frozenset({1}), "Clip": frozenset({1, 2}), "Pad": frozenset({2}),
}

# Op types whose cost is, by the convention above, not counted: element-wise maths, activations,
# normalisation, pooling, reductions, softmax, quantise/dequantise, casts and data movement.
CHEAP_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh",
    "AveragePool", "BatchNormalization", "BiasAdd", "BiasGelu", "BiasSoftmax", "BitShift", "BitwiseAnd",
    "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu",
    "CenterCropPad", "Clip", "Compress", "Concat", "ConcatFromSequence", "Constant", "ConstantOfShape",
    "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout",
    "DynamicQuantizeLinear", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "FastGelu", "Flatten",
    "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "GlobalAveragePool", "GlobalLpPool",
    "GlobalMaxPool", "Greater", "GreaterOrEqual", "GroupNormalization", "HammingWindow", "HannWindow",
    "HardSigmoid", "HardSwish", "Hardmax", "Identity", "InstanceNormalization", "IsInf", "IsNaN", "LRN",
    "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "LpNormalization",
    "LpPool", "Max", "MaxPool", "MaxRoiPool", "MaxUnpool", "Mean", "MeanVarianceNormalization", "Min",
    "Mish", "Mod", "Mul", "Neg", "NonZero", "Not", "OneHot", "Or", "PRelu", "Pad", "Pow",
    "QuantizeLinear", "QuickGelu", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "Round", "ScatterElements",
    "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "SimplifiedLayerNormalization", "Sin",
    "Sinh", "Size", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "Slice", "Softmax",
    "Softplus", "Softsign", "SpaceToDepth", "Split", "SplitToSequence", "Sqrt", "Squeeze", "Sub", "Sum",
    "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unique", "Unsqueeze",
    "Upsample", "Where", "Xor",
})


@dataclass
class TensorStat:
    """One stored tensor (initialiser or ``Constant`` value) and what it counts as."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    elements: int
    bytes: int
    kind: str  # "weight" | "quantization" | "constant" | "unused"


@dataclass
class NodeCost:
    """The cost of one node. ``status``: "counted", "not counted" (cheap by convention), "unknown op" or
    "shape unknown" (a counted op whose shapes could not be inferred); ``macs``/``flops`` are None unless
    counted."""

    name: str
    op_type: str
    status: str
    macs: int | None = None
    scope: str | None = None  # the PyTorch module path, where the exporter recorded it

    @property
    def flops(self) -> int | None:
        return None if self.macs is None else 2 * self.macs


@dataclass
class GraphStats:
    """What an ONNX graph holds and computes per sample (see the module docstring for the conventions)."""

    params: int
    weights_bytes: int
    macs: int | None
    input_shapes: dict[str, list[int]]
    nodes: list[NodeCost] = field(default_factory=list)
    tensors: list[TensorStat] = field(default_factory=list)
    not_counted: dict[str, int] = field(default_factory=dict)  # op type -> nodes (cheap by convention)
    unknown_ops: dict[str, int] = field(default_factory=dict)  # op type -> nodes whose cost is unknown
    missing: list[str] = field(default_factory=list)  # why ``flops`` is None, one line per reason

    @property
    def flops(self) -> int | None:
        return None if self.macs is None else 2 * self.macs

    def by_op_type(self) -> dict[str, int]:
        """FLOPs per counted op type."""
        out: Counter[str] = Counter()
        for node in self.nodes:
            if node.flops is not None:
                out[node.op_type] += node.flops
        return dict(out)

    def summary(self) -> dict[str, Any]:
        """The JSON-friendly part reports keep (no per-node or per-tensor rows)."""
        return {
            "params": self.params, "weights_bytes": self.weights_bytes, "flops": self.flops,
            "macs": self.macs, "input_shapes": self.input_shapes, "convention": CONVENTION,
            "flops_by_op_type": self.by_op_type(), "not_counted": dict(self.not_counted),
            "unknown_ops": dict(self.unknown_ops), "missing": list(self.missing),
        }


# --------------------------------------------------------------------------------------------- tensors
def _dtype_name(data_type: int) -> str:
    try:
        return TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return str(data_type)


def _nbytes(data_type: int, elements: int) -> int:
    if data_type in _HALF_BYTE_TYPES:
        return (elements + 1) // 2
    try:
        return int(onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize) * elements
    except (KeyError, TypeError, ValueError):  # strings and other oddities: no fixed size
        return 0


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor a ``Constant`` node holds (``value``, or a float/int list), as a TensorProto."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return onnx.helper.make_tensor("", TensorProto.FLOAT, [], [attr.f])
        if attr.name == "value_floats":
            return onnx.helper.make_tensor("", TensorProto.FLOAT, [len(attr.floats)], list(attr.floats))
        if attr.name == "value_int":
            return onnx.helper.make_tensor("", TensorProto.INT64, [], [attr.i])
        if attr.name == "value_ints":
            return onnx.helper.make_tensor("", TensorProto.INT64, [len(attr.ints)], list(attr.ints))
        if attr.name == "sparse_value":
            return attr.sparse_tensor.values
    return None


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def _all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    graphs = [graph]
    for node in graph.node:
        for sub in _subgraphs(node):
            graphs.extend(_all_graphs(sub))
    return graphs


def _tensor_kind(tensor: TensorProto, uses: list[tuple[str, int]], is_output: bool) -> str:
    if not uses and not is_output:
        return "unused"
    if uses and all(i in _QUANT_PARAM_INPUTS.get(op, ()) for op, i in uses):
        return "quantization"  # scales and zero points
    if tensor.data_type in _FLOAT_TYPES:
        if len(tensor.dims) == 0:
            return "constant"  # an exporter's scalar: a scale factor, an epsilon, a fill value
        if uses and all(i in _FLOAT_SETTING_INPUTS.get(op, ()) for op, i in uses):
            return "constant"  # Resize scales, Clip bounds, Pad value
        return "weight"
    # integer tensors are weights only as the data operand of a quantised op (else shapes, axes, indices)
    if any(op in _QUANT_PARAM_INPUTS and i not in _QUANT_PARAM_INPUTS[op] for op, i in uses):
        return "weight"
    return "constant"


def tensor_stats(model: onnx.ModelProto) -> list[TensorStat]:
    """Every stored tensor of ``model`` (subgraphs included), each named once, with what it counts as."""
    stored: dict[str, TensorProto] = {}
    uses: dict[str, list[tuple[str, int]]] = {}
    outputs: set[str] = set()
    for graph in _all_graphs(model.graph):
        for t in graph.initializer:
            stored.setdefault(t.name, t)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                t = _constant_tensor(node)
                if t is not None:
                    stored.setdefault(node.output[0], t)
            for i, name in enumerate(node.input):
                if name:
                    uses.setdefault(name, []).append((node.op_type, i))
            for sub in _subgraphs(node):  # a subgraph may read an outer tensor by name
                for inner in _all_graphs(sub):
                    for n in inner.node:
                        for name in n.input:
                            if name:
                                uses.setdefault(name, []).append((n.op_type, -1))
        outputs.update(o.name for o in graph.output)
    out = []
    for name, t in stored.items():
        elements = math.prod(int(d) for d in t.dims)
        out.append(TensorStat(name=name, dtype=_dtype_name(t.data_type), shape=tuple(int(d) for d in t.dims),
                              elements=elements, bytes=_nbytes(t.data_type, elements),
                              kind=_tensor_kind(t, uses.get(name, []), name in outputs)))
    return out


# ---------------------------------------------------------------------------------------------- shapes
def nominal_input_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Concrete shapes for the graph inputs: batch 1, and each other dynamic axis at the model's nominal
    size where ``lrdeploy export`` recorded it (``input_shape`` in the ``lrdeploy.export`` metadata), else 1.

    That is the input :func:`lrdeploy.flops.count_flops` counts with (a translation model: 32 tokens).
    """
    import json

    info: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key == "lrdeploy.export":
            try:
                loaded = json.loads(prop.value)
            except ValueError:
                loaded = {}
            info = loaded if isinstance(loaded, dict) else {}
    nominal = info.get("input_shape") if isinstance(info.get("input_shape"), list) else None
    initializers = {t.name for t in model.graph.initializer}
    shapes: dict[str, list[int]] = {}
    for inp in model.graph.input:
        if inp.name in initializers or not inp.type.HasField("tensor_type"):
            continue
        dims = []
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif axis >= 1 and nominal and axis - 1 < len(nominal) and isinstance(nominal[axis - 1], int) \
                    and nominal[axis - 1] > 0:
                dims.append(int(nominal[axis - 1]))
            else:
                dims.append(1)
        shapes[inp.name] = dims
    return shapes


def _concrete_copy(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy for shape inference: concrete input shapes, fused contrib ops as standard ones, inferred
    shapes dropped (symbolic dims would survive the merge), large float weights emptied (dims suffice)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for t in graph.initializer:
        if t.data_type in _FLOAT_TYPES and len(t.dims) >= 2:
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.ClearField("int32_data")
            t.ClearField("double_data")
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    for inp in graph.input:
        if inp.name in shapes and inp.type.HasField("tensor_type"):
            shape = inp.type.tensor_type.shape
            shape.ClearField("dim")
            for d in shapes[inp.name]:
                shape.dim.add().dim_value = int(d)
    _standard_equivalents(graph)
    del graph.value_info[:]
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    return copy


_ACTIVATION_ATTRS = frozenset({"activation", "activation_params", "activation_alpha", "activation_beta"})
_MATMUL_TRANSPOSES = ("transA", "transB", "transBatchA", "transBatchB")


def _standard_equivalents(graph: onnx.GraphProto) -> None:
    """Replace ONNX Runtime's fused contrib ops (``.ort.onnx`` files) by standard ops with the same output
    shapes, so ONNX shape inference sees through them. Only the shapes are used: costs are still counted on
    the original nodes."""
    nodes = []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        keep = {k: v for k, v in attrs.items() if k not in _ACTIVATION_ATTRS}
        make = onnx.helper.make_node
        if node.domain != "com.microsoft":
            nodes.append(node)
        elif node.op_type in ("FusedConv", "FusedGemm"):
            op = node.op_type.removeprefix("Fused")
            nodes.append(make(op, list(node.input[:3]), [node.output[0]], node.name, **keep))
        elif node.op_type == "FusedMatMul" and not any(attrs.get(k) for k in _MATMUL_TRANSPOSES):
            nodes.append(make("MatMul", list(node.input[:2]), [node.output[0]], node.name))
        elif node.op_type in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
            nodes.append(make("Add", list(node.input[:2]), [node.output[0]], node.name))
            if len(node.output) > 3 and node.output[3]:  # the residual sum, read by the next block
                nodes.append(make("Identity", [node.output[0]], [node.output[3]]))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _shape_map(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    shapes: dict[str, tuple[int | None, ...]] = {}

    def add(vi: onnx.ValueInfoProto) -> None:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            return
        shapes[vi.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)

    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        add(vi)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and (t := _constant_tensor(node)) is not None:
            shapes[node.output[0]] = tuple(int(d) for d in t.dims)
    return shapes


# ----------------------------------------------------------------------------------------------- costs
def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _known(shape: tuple[int | None, ...] | None) -> tuple[int, ...] | None:
    if shape is None or any(d is None or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]


def _conv_macs(node, get) -> int | None:  # noqa: ANN001 - internal
    w_index = 3 if node.op_type == "QLinearConv" else 1
    w, y = get(node, w_index, False), get(node, 0, True)
    if w is None or y is None or len(w) < 2:
        return None
    return math.prod(y) * math.prod(w[1:])  # each output element: Cin/groups × kernel MACs


def _conv_transpose_macs(node, get) -> int | None:  # noqa: ANN001
    x, w = get(node, 0, False), get(node, 1, False)
    if x is None or w is None or len(w) < 2:
        return None
    return math.prod(x) * math.prod(w[1:])  # each input element scatters into Cout/groups × kernel


def _gemm_macs(node, get) -> int | None:  # noqa: ANN001
    a_index = 0
    a, y = get(node, a_index, False), get(node, 0, True)
    if a is None or y is None or len(a) != 2:
        return None
    k = a[0] if _attr(node, "transA", 0) else a[1]
    return math.prod(y) * k


def _matmul_macs(node, get) -> int | None:  # noqa: ANN001
    a_index = 0
    a, y = get(node, a_index, False), get(node, 0, True)
    if a is None or y is None or len(a) == 0:
        return None
    trans_a = node.op_type == "FusedMatMul" and _attr(node, "transA", 0) and len(a) >= 2
    k = a[-2] if trans_a else a[-1]
    return math.prod(y) * k  # every output element (batch and broadcast included) is one K-long dot


def _einsum_macs(node, get) -> int | None:  # noqa: ANN001
    equation = _attr(node, "equation", b"")
    equation = equation.decode() if isinstance(equation, bytes) else str(equation)
    lhs = equation.replace(" ", "").split("->")[0]
    operands = lhs.split(",")
    if len(operands) != 2 or "..." in lhs or len(node.input) != 2:
        return None
    sizes: dict[str, int] = {}
    for i, letters in enumerate(operands):
        shape = get(node, i, False)
        if shape is None or len(shape) != len(letters):
            return None
        for letter, d in zip(letters, shape, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), d)
    return math.prod(sizes.values())  # one MAC per point of the joint index space


_COUNTED = {
    "Conv": _conv_macs, "ConvInteger": _conv_macs, "QLinearConv": _conv_macs, "FusedConv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs, "FusedGemm": _gemm_macs, "QGemm": _gemm_macs,
    "MatMul": _matmul_macs, "MatMulInteger": _matmul_macs, "QLinearMatMul": _matmul_macs,
    "FusedMatMul": _matmul_macs, "MatMulIntegerToFloat": _matmul_macs, "DynamicQuantizeMatMul": _matmul_macs,
    "Einsum": _einsum_macs,
}
COUNTED_OPS = frozenset(_COUNTED)


def _node_scope(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "lrdeploy.scope":
            return prop.value
    return None


def _node_costs(model: onnx.ModelProto, shapes_in: Mapping[str, Sequence[int]],
                missing: list[str]) -> list[NodeCost]:
    if model.functions:  # calls of local functions (a dynamo export without inlining): count their bodies
        try:
            from onnx import inliner

            model = inliner.inline_local_functions(model)
        except Exception:  # noqa: BLE001 - an old onnx or an odd function: the calls stay unknown ops
            pass
    inferred = _concrete_copy(model, shapes_in)
    try:
        inferred = onnx.shape_inference.infer_shapes(inferred, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - a graph onnx cannot infer: the counted ops stay underived
        missing.append(f"ONNX shape inference failed ({str(exc).strip().splitlines()[0][:120]})")
    shapes = _shape_map(inferred)

    def get(node: onnx.NodeProto, index: int, output: bool) -> tuple[int, ...] | None:
        names = node.output if output else node.input
        if index >= len(names) or not names[index]:
            return None
        return _known(shapes.get(names[index]))

    costs = []
    for node in model.graph.node:
        name = node.name or (node.output[0] if node.output else node.op_type)
        scope = _node_scope(node)
        fn = _COUNTED.get(node.op_type)
        if fn is not None:
            macs = fn(node, get)
            if macs is None or macs < 0:
                costs.append(NodeCost(name, node.op_type, "shape unknown", None, scope))
            else:
                costs.append(NodeCost(name, node.op_type, "counted", int(macs), scope))
        elif node.op_type in CHEAP_OPS and not _subgraphs(node):
            costs.append(NodeCost(name, node.op_type, "not counted", None, scope))
        else:
            costs.append(NodeCost(name, node.op_type, "unknown op", None, scope))
    return costs


# ------------------------------------------------------------------------------------------------- API
def graph_stats(model: onnx.ModelProto | str | os.PathLike,
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> GraphStats:
    """Count parameters, weight bytes and FLOPs of an ONNX model (a ModelProto or a path; external weight
    data is never read). ``input_shapes`` overrides the concrete shapes of graph inputs (default:
    :func:`nominal_input_shapes`, batch 1)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(Path(model)), load_external_data=False)
    shapes = {k: [int(d) for d in v] for k, v in nominal_input_shapes(model).items()}
    for name, dims in (input_shapes or {}).items():
        shapes[name] = [int(d) for d in dims]
    tensors = tensor_stats(model)
    params = sum(t.elements for t in tensors if t.kind == "weight")
    weight_bytes = sum(t.bytes for t in tensors if t.kind in ("weight", "quantization"))
    missing: list[str] = []
    nodes = _node_costs(model, shapes, missing)
    not_counted = Counter(n.op_type for n in nodes if n.status == "not counted")
    unknown = Counter(n.op_type for n in nodes if n.status == "unknown op")
    underived = [n for n in nodes if n.status == "shape unknown"]
    if unknown:
        missing.append("no cost model for op type(s) " + ", ".join(sorted(unknown)))
    if underived:
        missing.append(f"shapes not inferred for {len(underived)} node(s), e.g. {underived[0].name} "
                       f"({underived[0].op_type})")
    macs = None if missing else sum(n.macs or 0 for n in nodes)
    return GraphStats(params=params, weights_bytes=weight_bytes, macs=macs, input_shapes=shapes, nodes=nodes,
                      tensors=tensors, not_counted=dict(sorted(not_counted.items())),
                      unknown_ops=dict(sorted(unknown.items())), missing=missing)
