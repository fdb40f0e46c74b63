"""Precision variants (fp16, int8 dynamic, int8 static QDQ) in real ONNX Runtime sessions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.exporters.onnx import export_onnx
from lrdeploy.exporters.precision import convert_precision, evaluate_variant, rewrite_gemm_to_matmul

pytest.importorskip("onnxruntime")


class _NormSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(self.norm(torch.relu(self.fc1(x)))), dim=-1)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _export(model: nn.Module, path, shape) -> str:
    torch.manual_seed(0)
    export_onnx(model.eval(), path, input_shape=shape, optimize=False)
    return str(path)


def _input_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value consumed by a node, by value name."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    return types


def test_fp16_keeps_fragile_ops_fp32(tmp_path):
    torch.manual_seed(0)
    src = _export(_NormSoftmax(), tmp_path / "m.onnx", (16,))
    x = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    res = convert_precision(src, tmp_path / "m16.onnx", "fp16", test_inputs=x)
    assert res.passed, res.failures
    assert {"LayerNormalization", "Softmax"} <= set(res.fp32_ops)
    proto = onnx.load(str(res.dst))
    onnx.checker.check_model(proto, full_check=True)  # topologically sorted after the converter's Casts
    types = _input_types(proto)
    fragile = [n for n in proto.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(fragile) == 2
    for node in fragile:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.op_type
    gemm_or_mm = [n for n in proto.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert gemm_or_mm and all(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in gemm_or_mm)
    # keep_io_types: the caller still feeds and receives fp32
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert res.parity["rel_l2"] < 5e-3 and res.parity["precision"] == "fp16"
    assert res.size_bytes["fp16"] < res.size_bytes["fp32"]


def test_int8_dynamic_rewrites_gemm_and_quantises_every_matmul(tmp_path):
    src = _export(_mlp(), tmp_path / "mlp.onnx", (32,))
    n_linear = sum(n.op_type in ("Gemm", "MatMul") for n in onnx.load(src).graph.node)
    assert n_linear == 3
    x = np.random.default_rng(2).standard_normal((128, 32)).astype(np.float32)
    res = convert_precision(src, tmp_path / "mlp8.onnx", "int8", test_inputs=x)
    assert res.method == "int8-dynamic" and res.model_kind == "dynamic"
    assert res.gemm_rewritten == 3
    hist = res.op_histogram
    assert hist.get("Gemm", 0) == 0 and hist.get("MatMul", 0) == 0  # nothing left in fp32
    assert hist.get("MatMulInteger", 0) + hist.get("com.microsoft:DynamicQuantizeMatMul", 0) == 3
    assert res.passed, res.failures
    assert 0 < res.parity["rel_l2"] < 1e-1


def test_gemm_rewrite_is_exact(tmp_path):
    src = _export(_mlp(), tmp_path / "mlp.onnx", (32,))
    proto = onnx.load(src)
    assert rewrite_gemm_to_matmul(proto) == 3
    onnx.checker.check_model(proto, full_check=True)
    from lrdeploy.exporters.optimize import random_feeds, run_graph, worst_rel_l2

    feeds = random_feeds(proto)
    assert worst_rel_l2(run_graph(onnx.load(src).SerializeToString(), feeds),
                        run_graph(proto.SerializeToString(), feeds)) < 1e-6


def test_unknown_precision_and_missing_calibration(tmp_path):
    src = _export(_mlp(), tmp_path / "mlp.onnx", (32,))
    with pytest.raises(UserError, match="unknown precision"):
        convert_precision(src, tmp_path / "x.onnx", "int4")
    with pytest.raises(UserError, match="calibration"):
        convert_precision(src, tmp_path / "x.onnx", "int8", model_kind="static")
    assert not (tmp_path / "x.onnx").exists()


def _train_lenet(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    from lrdeploy.models import create_model

    torch.manual_seed(0)
    model = create_model("lenet5")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(2):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return model.eval()


def test_int8_static_qdq_lenet_on_mnist(tmp_path, data_dir):
    from lrdeploy.data import load_dataset

    train = load_dataset("mnist", "train", data_dir=data_dir, limit=2000)
    test = load_dataset("mnist", "test", data_dir=data_dir, limit=500)
    model = _train_lenet(train.x, train.y)
    src = _export(model, tmp_path / "lenet.onnx", (1, 28, 28))
    calib = train.x[:64].numpy()
    res = convert_precision(src, tmp_path / "lenet8.onnx", "int8", calibration=calib,
                            test_inputs=test.x.numpy(), labels=test.y.numpy(), max_accuracy_drop=0.03)
    assert res.model_kind == "static" and res.method == "int8-static-qdq"
    assert res.calibration_samples == 64
    assert res.op_histogram.get("QuantizeLinear", 0) > 0 and res.op_histogram.get("DequantizeLinear", 0) > 0
    assert res.accuracy is not None and res.accuracy["fp32"] > 0.8  # the model did learn something
    assert abs(res.accuracy["delta"]) <= 0.03
    assert res.passed, res.failures
    # ORT fuses the QDQ pairs around Conv into QLinearConv when it loads the graph
    from lrdeploy.exporters.onnx import ort_session

    fused = tmp_path / "fused.onnx"
    ort_session(str(res.dst), "ORT_ENABLE_EXTENDED", optimized_model_filepath=str(fused))
    assert any(n.op_type == "QLinearConv" for n in onnx.load(str(fused)).graph.node)
    again = evaluate_variant(src, res.dst, test.x.numpy(), test.y.numpy(), "int8", max_accuracy_drop=0.03)
    assert again["passed"] and again["accuracy"]["delta"] == pytest.approx(res.accuracy["delta"])


def test_strict_raises_and_writes_nothing(tmp_path):
    src = _export(_mlp(), tmp_path / "mlp.onnx", (32,))
    x = np.random.default_rng(3).standard_normal((32, 32)).astype(np.float32)
    y = np.zeros(32, dtype=np.int64)
    with pytest.raises(UserError, match="misses its tolerance"):
        convert_precision(src, tmp_path / "x.onnx", "int8", test_inputs=x, labels=y, max_accuracy_drop=-1.0,
                          strict=True)
    assert not (tmp_path / "x.onnx").exists()
