"""TensorRT lint on real exported graphs: plain torch export, ORT-optimised copy, hand-built baked batch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from torch import nn

from lrdeploy.exporters.lint import lint_for_tensorrt, trt_qdq_findings
from lrdeploy.exporters.onnx import export_onnx

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy:DeprecationWarning")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.fc(torch.relu(self.conv(x)).flatten(1)))


class _Einsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,ij->bj", x, self.w)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lint") / "net.onnx"
    res = export_onnx(_Net().eval(), path, input_shape=(3, 8, 8))
    return res.path, res.optimized_path


def _legacy(model: nn.Module, shape, path, dynamic=True):
    torch.onnx.export(model.eval(), (torch.randn(*shape),), str(path), input_names=["input"],
                      output_names=["output"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None)
    return path


def test_plain_export_is_clean(exported):
    plain, _ = exported
    report = lint_for_tensorrt(plain)
    assert report.errors == [], report.to_dict()
    assert report.opset and report.opset >= 17 and report.ir_version >= 7
    d = report.to_dict()
    assert d["ok"] and d["path"] == str(plain)
    json.dumps(d)


def test_ort_optimised_graph_is_refused(exported):
    _, optimised = exported
    report = lint_for_tensorrt(optimised)
    assert not report.ok
    codes = {f.code for f in report.errors}
    assert "unsupported-domain" in codes
    err = next(f for f in report.errors if f.code == "unsupported-domain")
    assert "com.microsoft" in err.message
    assert ".ort.onnx" in err.fix and "plain .onnx" in err.fix
    assert "com.microsoft" in report.summary()


def test_baked_batch_reshape(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 2])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 8])
    shape = numpy_helper.from_array(np.array([2, 8], dtype=np.int64), "shape")
    node = helper.make_node("Reshape", ["input", "shape"], ["output"], name="flatten_baked")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], [shape]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    report = lint_for_tensorrt(model)
    baked = [f for f in report.errors if f.code == "baked-batch-reshape"]
    assert len(baked) == 1 and baked[0].node == "flatten_baked" and "[2, 8]" in baked[0].message
    # a 0 or -1 first dimension keeps the batch dynamic
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([-1, 8], dtype=np.int64), "shape"))
    assert lint_for_tensorrt(model).ok


def test_traced_static_batch_output(tmp_path):
    class Baked(nn.Module):
        def forward(self, x):
            return x.reshape(2, -1)  # traced with the batch constant

    path = _legacy(Baked(), (2, 3, 4), tmp_path / "baked.onnx")
    report = lint_for_tensorrt(path)
    codes = {f.code for f in report.errors}
    assert codes & {"baked-batch-reshape", "static-batch-output"}, report.to_dict()


def test_einsum_warning(tmp_path):
    path = _legacy(_Einsum(), (2, 6), tmp_path / "einsum.onnx")
    report = lint_for_tensorrt(path)
    assert [f.code for f in report.warnings] == ["einsum"] and report.ok
    assert "bi,ij->bj" in report.warnings[0].message


def test_dynamic_shape_consistency():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [3, 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, 4])
    nodes = [helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "c"], ["out"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [a, b, c], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    report = lint_for_tensorrt(model)
    codes = set(report.codes())
    expected = {"inconsistent-batch-names", "mixed-batch-inputs", "static-batch-output", "static-batch-input"}
    assert expected <= codes


def test_static_export_only_warns(tmp_path):
    path = _legacy(_Einsum(), (1, 6), tmp_path / "static.onnx", dynamic=False)
    report = lint_for_tensorrt(path)
    assert report.ok and "static-batch-input" in report.codes()


def test_rich_table_and_bad_files(exported, tmp_path):
    _, optimised = exported
    console = Console(record=True, width=200)
    console.print(lint_for_tensorrt(optimised).render())
    text = console.export_text()
    assert "unsupported-domain" in text and "opset" in text
    from lrdeploy.errors import UserError

    with pytest.raises(UserError, match="not found"):
        lint_for_tensorrt(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="not a valid ONNX"):
        lint_for_tensorrt(tmp_path / "bad.onnx")


def test_trt_qdq_accepts_symmetric_int8_and_rejects_ort_default(exported, tmp_path):
    from lrdeploy.exporters.precision import convert_precision

    plain, _ = exported
    calib = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    trt = convert_precision(plain, tmp_path / "trt.onnx", "int8", model_kind="trt", calibration=calib)
    ort_default = convert_precision(plain, tmp_path / "static.onnx", "int8", model_kind="static",
                                    calibration=calib)
    assert trt_qdq_findings(trt.dst) == [] and lint_for_tensorrt(trt.dst).ok
    findings = trt_qdq_findings(ort_default.dst)
    messages = " ".join(f.message for f in findings)
    assert "(asymmetric)" in messages and "uint8, not int8" in messages  # activations
    assert "int32, not int8" in messages  # ORT quantises the bias to int32 behind a DequantizeLinear
    report = lint_for_tensorrt(ort_default.dst)
    assert not report.ok and "trt-qdq" in report.codes() and "model_kind='trt'" in report.errors[0].fix


def _qdq_model(zero_point: np.ndarray | None, scale: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    inits = [numpy_helper.from_array(scale, "s")]
    q_in = ["x", "s"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(zero_point, "zp"))
        q_in.append("zp")
    nodes = [helper.make_node("QuantizeLinear", q_in, ["q"], axis=1),
             helper.make_node("DequantizeLinear", ["q", *q_in[1:]], ["y"], axis=1)]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_trt_qdq_findings_on_hand_built_graphs():
    one = np.array(0.1, dtype=np.float32)
    assert trt_qdq_findings(_qdq_model(np.array(0, dtype=np.int8), one)) == []
    no_zp = trt_qdq_findings(_qdq_model(None, one))  # ONNX's default zero point is uint8
    assert len(no_zp) == 2 and all("uint8, not int8" in f.message for f in no_zp)
    shifted = trt_qdq_findings(_qdq_model(np.array(3, dtype=np.int8), one))
    assert len(shifted) == 2 and all("[3] is not 0" in f.message for f in shifted)
    per_channel = trt_qdq_findings(_qdq_model(np.zeros(4, np.int8), np.full(4, 0.1, np.float32)))
    assert [f.message.split(":")[0] for f in per_channel] == ["QuantizeLinear"]
    assert "per-channel scales on an activation" in per_channel[0].message
