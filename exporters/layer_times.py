"""Attribute in-model kernel time to the model's layers: the *measured* side of the fold report.

The fold decision is predicted from micro-benchmarks of each layer shape on its own. What a layer costs
inside the whole model can differ (caches, fusions, layout changes), so after export the graph is profiled
with ONNX Runtime's profiler (``serving.profile``) and each kernel's time is attributed to a layer here. This
module only reads graphs and profile rows; it runs nothing.

How a profiled kernel is traced back to a layer:

- Every node of an exported graph carries its PyTorch module path as node metadata ``lrdeploy.scope``
  (written by ``exporters.onnx``; nodes without it fall back to the names of their weight initializers, which
  the dynamo exporter takes from ``state_dict``).
- ONNX Runtime renames nodes it rewrites: its CPU layout pass names a node after its output value plus
  ``_nchwc``; an activation fusion prefixes the node name with ``fused ``. A profiled name is looked up as
  a node name, then (those marks removed) as a node name or a value name whose producer is the node.
- A fused activation or residual ``Add`` names the fused kernel after the *last* op of the chain. Walking
  back from a parameter-free element-wise op through its inputs finds the layer whose kernel absorbed it.
  For a fused residual ``Add`` with two layer inputs, the first input found wins: an approximation.
- Kernels that belong to no factorised layer (pools, reshapes, layout reorders, dense layers that were never
  factorised) are summed as ``other``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

SCOPE_KEY = "lrdeploy.scope"
_TORCH_SCOPES = "pkg.torch.onnx.name_scopes"
# ops ORT fuses into the kernel that produces their input (activations, bias/residual adds)
_PASS_THROUGH = frozenset({"Relu", "Add", "Sum", "Clip", "Sigmoid", "LeakyRelu", "HardSigmoid", "HardSwish",
                           "Gelu", "Tanh", "Identity", "Mul", "Div"})
_ORT_RENAMES = (re.compile(r"^fused "), re.compile(r"(_nchwc|_token_\d+)+$"))
_MAX_WALK = 4


def scope_from_torch_metadata(node: onnx.NodeProto) -> str | None:
    """The module path of a dynamo-exported node (``pkg.torch.onnx.name_scopes`` minus the op's own name)."""
    for prop in node.metadata_props:
        if prop.key == _TORCH_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, list) and len(scopes) >= 2:
                return str(scopes[-2])
            return ""
    return None


def _node_scope(node: onnx.NodeProto, initializers: set[str]) -> str | None:
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            return prop.value
    for name in node.input:  # "layer1.0.conv1.0.weight" -> "layer1.0.conv1.0"
        if name in initializers and "." in name:
            return name.rsplit(".", 1)[0]
    return None


def _layer_for_scope(scope: str | None, layers: Sequence[str]) -> str | None:
    """The longest layer name that is ``scope`` or a parent module of it."""
    if scope is None:
        return None
    best = None
    for layer in layers:
        if (scope == layer or layer == "" or scope.startswith(layer + ".")) and (
                best is None or len(layer) > len(best)):
            best = layer
    return best


@dataclass
class LayerTimes:
    """Mean kernel time per model call (ms) for each layer, and what could not be attributed."""

    per_layer_ms: dict[str, float] = field(default_factory=dict)
    other_ms: float = 0.0
    kernel_ms: float = 0.0
    unmatched: list[str] = field(default_factory=list)  # profiled nodes not traced to any graph node

    @property
    def attributed_share(self) -> float | None:
        """Share of kernel time attributed to the listed layers."""
        return sum(self.per_layer_ms.values()) / self.kernel_ms if self.kernel_ms > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"per_layer_ms": self.per_layer_ms, "other_ms": self.other_ms, "kernel_ms": self.kernel_ms,
                "attributed_share": self.attributed_share, "unmatched_nodes": self.unmatched}


class _Graph:
    def __init__(self, proto: onnx.ModelProto, layers: Sequence[str]) -> None:
        graph = proto.graph
        initializers = {i.name for i in graph.initializer}
        self.layers = list(layers)
        self.by_name = {n.name: n for n in graph.node if n.name}
        self.producer = {out: n for n in graph.node for out in n.output}
        self.scope = {id(n): _node_scope(n, initializers) for n in graph.node}

    def origin(self, profiled: str) -> onnx.NodeProto | None:
        bare = profiled
        for pattern in _ORT_RENAMES:
            bare = pattern.sub("", bare)
        for name in dict.fromkeys((profiled, bare)):
            node = self.by_name.get(name) or self.producer.get(name)
            if node is not None:
                return node
        return None

    def layer_of(self, node: onnx.NodeProto, depth: int = 0) -> str | None:
        layer = _layer_for_scope(self.scope[id(node)], self.layers)
        if layer is not None or depth >= _MAX_WALK or node.op_type not in _PASS_THROUGH:
            return layer
        for value in node.input:
            parent = self.producer.get(value)
            found = self.layer_of(parent, depth + 1) if parent is not None else None
            if found is not None:
                return found
        return None


def _per_call_us(row: Mapping[str, Any], runs: int) -> float:
    if row.get("median_us") is not None and row.get("calls"):
        return float(row["median_us"]) * float(row["calls"]) / runs
    return float(row.get("total_us", 0.0)) / runs


def attribute_kernel_time(proto: onnx.ModelProto, by_node: Iterable[Mapping[str, Any]], layers: Sequence[str],
                          runs: int) -> LayerTimes:
    """Sum the profiled kernel time of each layer in ``layers`` (module paths), per model call, in ms.

    ``by_node``: ``serving.profile.parse_ort_profile(...)["by_node"]`` rows (``node``, ``total_us``,
    ``calls``, and ``median_us`` when known) over ``runs`` model calls; ``proto`` is the exported
    (un-optimised) graph the profiled session was made from. A node's time per model call is its median
    kernel time times its calls per run (robust to a busy machine), else its total over ``runs``.
    Every listed layer gets an entry, 0.0 when none of its kernels ran (it was fused away or never reached).
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    graph = _Graph(proto, layers)
    out = LayerTimes(per_layer_ms=dict.fromkeys(layers, 0.0))
    for row in by_node:
        ms = _per_call_us(row, runs) / 1000.0
        out.kernel_ms += ms
        node = graph.origin(str(row.get("node", "")))
        if node is None:
            out.unmatched.append(str(row.get("node", "")))
        layer = graph.layer_of(node) if node is not None else None
        if layer is None:
            out.other_ms += ms
        else:
            out.per_layer_ms[layer] += ms
    return out
