"""In-model layer times: profiled ORT kernels traced back to layers (exporters.layer_times)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrdeploy.exporters.layer_times import SCOPE_KEY, attribute_kernel_time, scope_from_torch_metadata


def _node(op: str, inputs: list[str], outputs: list[str], name: str,
          scope: str | None = None) -> onnx.NodeProto:
    node = helper.make_node(op, inputs, outputs, name=name)
    if scope is not None:
        node.metadata_props.add(key=SCOPE_KEY, value=scope)
    return node


def _graph() -> onnx.ModelProto:
    """x → block.conv (a factor pair: .0, .1) → Relu → Add(residual from block.short) → head (no scope)."""
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "block.conv.1.weight")
    nodes = [
        _node("Conv", ["x", "v"], ["c0"], "node_Conv_1", "block.conv.0"),
        _node("Conv", ["c0", "block.conv.1.weight"], ["c1"], "node_Conv_2", None),  # scope from its weight
        _node("Relu", ["c1"], ["relu_1"], "node_relu_1", "block.relu"),
        _node("Conv", ["x", "s"], ["sc"], "node_Conv_3", "block.short"),
        _node("Add", ["relu_1", "sc"], ["add_1"], "node_add_1", "block"),
        _node("GlobalAveragePool", ["add_1"], ["y"], "node_pool", "pool"),
    ]
    inits = [w, numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "v"),
             numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "s")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph)


def test_kernels_are_traced_through_renames_and_fusions():
    rows = [
        {"node": "node_Conv_1", "total_us": 1000.0},   # by node name
        {"node": "relu_1_nchwc", "total_us": 4000.0},  # ORT's layout pass: named after the output value;
        # a fused Conv+Relu whose last op is the Relu, walked back to the conv that absorbed it
        {"node": "sc_nchwc", "total_us": 300.0},       # the shortcut conv, by its output value
        {"node": "fused node_Conv_3", "total_us": 200.0},  # an activation fusion's name for the same node
        {"node": "add_1_nchwc", "total_us": 300.0},    # a fused residual Add: its first input's layer wins
        {"node": "node_pool", "total_us": 200.0},      # not a factorised layer
        {"node": "ReorderOutput_token_7", "total_us": 100.0},  # ORT-inserted, in no graph
    ]
    times = attribute_kernel_time(_graph(), rows, ["block.conv", "block.short", "never.ran"], runs=2)
    assert times.per_layer_ms == pytest.approx({"block.conv": 2.65, "block.short": 0.25, "never.ran": 0.0})
    assert times.other_ms == pytest.approx(0.15)
    assert times.kernel_ms == pytest.approx(3.05)
    assert times.unmatched == ["ReorderOutput_token_7"]
    assert times.attributed_share == pytest.approx(2.9 / 3.05)


def test_median_per_call_is_used_when_the_profile_has_it():
    rows = [{"node": "node_Conv_1", "total_us": 9000.0, "calls": 4, "median_us": 500.0}]  # one 7.5 ms outlier
    assert attribute_kernel_time(_graph(), rows, ["block.conv"], runs=2).per_layer_ms["block.conv"] == 1.0


def test_the_longest_enclosing_layer_wins_and_runs_must_be_positive():
    rows = [{"node": "node_Conv_1", "total_us": 1000.0}]
    times = attribute_kernel_time(_graph(), rows, ["block", "block.conv"], runs=1)
    assert times.per_layer_ms == {"block": 0.0, "block.conv": 1.0}
    with pytest.raises(ValueError):
        attribute_kernel_time(_graph(), rows, ["block"], runs=0)


def test_scope_from_torch_metadata():
    node = helper.make_node("Relu", ["a"], ["b"])
    assert scope_from_torch_metadata(node) is None
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['layer1', 'layer1.0', 'relu_3']")
    assert scope_from_torch_metadata(node) == "layer1.0"
