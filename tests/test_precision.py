"""Precision variants (fp16, int8 dynamic, int8 static QDQ) in real ONNX Runtime sessions."""

from __future__ import annotations

from pathlib import Path

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
    # measured in the same run, A/B against fp32 at batch 1; recorded, never a failure (slower on CPUs here)
    assert res.speed_vs_fp32 is not None and res.speed_vs_fp32 > 0
    assert res.timing["batch"] == 1 and res.timing["rounds"] >= 1 and res.timing["fp32_ms"] > 0
    assert res.to_dict()["speed_vs_fp32"] == res.speed_vs_fp32


def test_strict_raises_and_writes_nothing(tmp_path):
    src = _export(_mlp(), tmp_path / "mlp.onnx", (32,))
    x = np.random.default_rng(3).standard_normal((32, 32)).astype(np.float32)
    y = np.zeros(32, dtype=np.int64)
    with pytest.raises(UserError, match="misses its tolerance"):
        convert_precision(src, tmp_path / "x.onnx", "int8", test_inputs=x, labels=y, max_accuracy_drop=-1.0,
                          strict=True)
    assert not (tmp_path / "x.onnx").exists()


# --- bf16 ------------------------------------------------------------------------------------------------


class _TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def _ort_can_load(path) -> bool:
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def test_bf16_keeps_fragile_ops_and_io_fp32(tmp_path):
    src = _export(_NormSoftmax(), tmp_path / "m.onnx", (16,))
    x = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    res = convert_precision(src, tmp_path / "m.bf16.onnx", "bf16", test_inputs=x)
    proto = onnx.load(str(res.dst))
    onnx.checker.check_model(proto, full_check=True)
    types = _input_types(proto)
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    for node in proto.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert all(types[i] == f32 for i in node.input if i), node.op_type
        if node.op_type == "Gemm":  # activations, weights and bias all bf16
            assert all(types[i] == bf16 for i in node.input), node.input
    assert {"LayerNormalization", "Softmax"} <= set(res.fp32_ops)
    inits = {i.name: i.data_type for i in proto.graph.initializer}
    assert inits["fc1.weight"] == bf16 and inits["norm.weight"] == f32
    assert proto.graph.input[0].type.tensor_type.elem_type == f32
    assert proto.graph.output[0].type.tensor_type.elem_type == f32
    # judged like fp16, by whichever runtime can run bf16 here; bf16 rounding is visible, and within preset
    expected = "onnxruntime-cpu" if _ort_can_load(res.dst) else "onnx.reference"
    assert res.judged_by.startswith(expected) and res.compared_examples == 64
    assert res.passed is True and res.parity["precision"] == "bf16"
    assert 1e-3 < res.parity["rel_l2"] < 3e-2  # bf16's unit roundoff is 3.9e-3: fp32 arithmetic gives ~1e-7
    assert res.size_bytes["bf16"] < 0.75 * res.size_bytes["fp32"]
    again = evaluate_variant(src, res.dst, x[:32], precision="bf16")
    assert again["passed"] and again["examples"] == 32 and again["judged_by"] == res.judged_by


def test_bf16_conv_net_is_raised_to_opset_22(tmp_path):
    torch.manual_seed(0)
    src = _export(_TinyConv(), tmp_path / "c.onnx", (1, 8, 8))
    x = np.random.default_rng(2).standard_normal((48, 1, 8, 8)).astype(np.float32)
    res = convert_precision(src, tmp_path / "c.bf16.onnx", "bf16", test_inputs=x)
    proto = onnx.load(str(res.dst))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [22]
    assert any("opset raised from" in n for n in res.notes)
    types = _input_types(proto)
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "MaxPool", "Gemm")]
    assert len(convs) == 3 and all(types[n.input[0]] == onnx.TensorProto.BFLOAT16 for n in convs)
    assert res.fp32_ops == [] and res.passed is True, res.failures
    assert 1e-3 < res.parity["rel_l2"] < 3e-2


def test_bf16_shared_weights_constants_and_consumed_outputs(tmp_path):
    """Hand-built corner cases: a weight read by a bf16 op and by a blocked op (fp32 weight + bf16 twin), a
    Constant, and a graph output that another node also reads."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from lrdeploy.exporters.precision import to_bf16

    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "w")
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32([1.5] * 8)))
    nodes = [c, helper.make_node("Add", ["x", "w"], ["a"]),  # bf16, reads w
             helper.make_node("LayerNormalization", ["a", "w"], ["ln"]),  # fp32, reads w and output a
             helper.make_node("Mul", ["ln", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 8]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    conv = to_bf16(model)
    out = conv.model
    onnx.checker.check_model(out, full_check=True)
    inits = {i.name: i.data_type for i in out.graph.initializer}
    assert inits["w"] == TensorProto.FLOAT and TensorProto.BFLOAT16 in inits.values() and len(inits) == 2
    assert [o.type.tensor_type.elem_type for o in out.graph.output] == [TensorProto.FLOAT] * 2
    assert [o.name for o in out.graph.output] == ["a", "y"]
    assert conv.fp32_ops == ["LayerNormalization"]
    x = rng.standard_normal((5, 8)).astype(np.float32)
    ref = ReferenceEvaluator(model).run(None, {"x": x})
    got = ReferenceEvaluator(out).run(None, {"x": x})
    for r, g in zip(ref, got, strict=True):
        assert g.dtype == np.float32
        rel = np.linalg.norm(g - r) / np.linalg.norm(r)
        assert 1e-4 < rel < 2e-2, rel


def test_bf16_not_judged_is_never_a_pass(tmp_path, monkeypatch):
    from lrdeploy.exporters import precision

    src = _export(_NormSoftmax(), tmp_path / "m.onnx", (16,))
    x = np.random.default_rng(4).standard_normal((32, 16)).astype(np.float32)
    monkeypatch.setattr(precision, "_run_all", _ort_refuses_bf16(precision._run_all))
    monkeypatch.setattr(precision, "REFERENCE_BUDGET_S", 0.0)  # not even one example fits
    res = convert_precision(src, tmp_path / "m.bf16.onnx", "bf16", test_inputs=x)
    assert res.passed is None and res.failures == [] and res.compared_examples == 0
    assert res.judged_by.startswith("not run: ") and "budget" in res.judged_by
    assert res.parity["status"] == res.judged_by and "rel_l2" not in res.parity
    assert res.dst.exists()
    assert res.speed_vs_fp32 is None and res.timing["status"].startswith("not run: ONNX Runtime CPU cannot")
    with pytest.raises(UserError, match="was not judged"):
        convert_precision(src, tmp_path / "strict.onnx", "bf16", test_inputs=x, strict=True)
    assert not (tmp_path / "strict.onnx").exists()


def _ort_refuses_bf16(run_all):
    """ORT's runner, failing like ORT 1.32's CPU provider on any bf16 graph (whatever this ORT can do)."""

    def run(data: bytes, feeds, batch_size):
        graph = onnx.ModelProto.FromString(data).graph
        if any(i.data_type == onnx.TensorProto.BFLOAT16 for i in graph.initializer):
            raise UserError("ONNX Runtime cannot run the converted graph (NOT_IMPLEMENTED)")
        return run_all(data, feeds, batch_size)

    return run


# --- int8 for TensorRT ------------------------------------------------------------------------------------


def test_int8_trt_qdq_is_symmetric_per_channel_and_judged_on_ort(tmp_path):
    from lrdeploy.exporters.lint import trt_qdq_findings

    torch.manual_seed(0)
    src = _export(_TinyConv(), tmp_path / "c.onnx", (1, 8, 8))
    rng = np.random.default_rng(5)
    calib = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    x = rng.standard_normal((128, 1, 8, 8)).astype(np.float32)
    res = convert_precision(src, tmp_path / "c.int8.trt.onnx", "int8", model_kind="trt", calibration=calib,
                            test_inputs=x)
    assert res.method == "int8-trt-qdq" and res.model_kind == "trt" and res.calibration_samples == 64
    proto = onnx.load(str(res.dst))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any() for n in qdq)
    conv_w = next(n for n in qdq if n.input[0] in inits and inits[n.input[0]].ndim == 4)
    assert inits[conv_w.input[0]].dtype == np.int8 and inits[conv_w.input[1]].shape == (4,)  # per channel
    assert all(inits[n.input[0]].dtype == np.int8 for n in qdq if n.input[0] in inits)  # no int32 bias
    assert trt_qdq_findings(proto) == []
    assert res.judged_by == "onnxruntime-cpu" and res.parity["precision"] == "int8"
    assert res.passed is True and 0 < res.parity["rel_l2"] < 1e-1


def test_token_rows_flatten_sequence_scores_and_drop_padding():
    from lrdeploy.exporters.precision import token_rows

    ref = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    labels = np.array([[1, 2, -1], [3, -1, -1]])
    r, c, y = token_rows(ref, ref + 1, labels)
    assert r.shape == (3, 4) and y.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(r[2], ref[1, 0])
    np.testing.assert_array_equal(c - r, np.ones((3, 4)))
    flat, _, y2 = token_rows(ref[:, 0], ref[:, 0], np.array([[0], [1]]))  # class scores: unchanged
    assert flat.shape == (2, 4) and y2.tolist() == [0, 1]
    with pytest.raises(UserError):
        token_rows(ref, ref, np.zeros((2, 2)))


# --- non-finite outputs and speed against fp32 (issue 9) ---------------------------------------------------


def _with_nan_weight(src: str, dst) -> str:
    """``src`` with one weight of its first initializer set to NaN (export refuses NaN models: by hand)."""
    from onnx import numpy_helper

    proto = onnx.load(src)
    init = proto.graph.initializer[0]
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(dst))
    return str(dst)


def test_nan_in_the_variant_fails_by_name_and_nan_in_fp32_is_refused(tmp_path):
    src = _export(_mlp(), tmp_path / "mlp.onnx", (32,))
    x = np.random.default_rng(5).standard_normal((16, 32)).astype(np.float32)
    broken = _with_nan_weight(src, tmp_path / "broken.onnx")
    verdict = evaluate_variant(src, broken, x, precision="fp16")
    assert verdict["passed"] is False
    assert verdict["failures"][0] == "outputs contain 160 NaN values (fp16)"  # 16 rows × 10 classes
    with pytest.raises(UserError, match="the fp32 graph's outputs contain 160 NaN values"):
        convert_precision(broken, tmp_path / "b16.onnx", "fp16", test_inputs=x)
    assert not (tmp_path / "b16.onnx").exists()


def test_speed_vs_fp32_is_measured_interleaved_and_points_the_right_way(tmp_path):
    from lrdeploy.exporters.precision import describe_speed, time_vs_fp32

    torch.manual_seed(0)
    small = _export(nn.Sequential(nn.Linear(32, 10)), tmp_path / "small.onnx", (32,))
    big = _export(nn.Sequential(nn.Linear(32, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                nn.Linear(1024, 10)), tmp_path / "big.onnx", (32,))
    feeds = {"input": np.random.default_rng(6).standard_normal((4, 32)).astype(np.float32)}
    small_b, big_b = (Path(p).read_bytes() for p in (small, big))
    slower = time_vs_fp32(small_b, big_b, feeds, budget_s=0.3, threads=1)  # the "variant" does 3000× more
    assert slower["speed_vs_fp32"] < 0.5 and slower["variant_ms"] > slower["fp32_ms"]
    assert slower["batch"] == 1 and slower["threads"] == 1 and slower["rounds"] >= 1
    assert "SLOWER than fp32 on this CPU (measured b1)" in describe_speed(slower["speed_vs_fp32"], slower)
    faster = time_vs_fp32(big_b, small_b, feeds, budget_s=0.3, threads=1)
    assert faster["speed_vs_fp32"] > 2 and "faster than fp32" in describe_speed(faster["speed_vs_fp32"])


def test_describe_speed_wording():
    from lrdeploy.exporters.precision import describe_speed

    assert describe_speed(1 / 2.9, {"batch": 1}) == "2.9× SLOWER than fp32 on this CPU (measured b1)"
    assert describe_speed(1.8) == "1.8× faster than fp32 on this CPU (measured b1)"
    assert describe_speed(1.05) == "as fast as fp32 on this CPU (measured b1)"
    assert describe_speed(None) == describe_speed(float("nan")) == ""
