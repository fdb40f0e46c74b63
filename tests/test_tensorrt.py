"""TensorRT build: everything up to the builder runs without TensorRT; the real build is marked ``trt``."""

from __future__ import annotations

import builtins
import importlib.util
import json
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.exporters import tensorrt as trt_mod
from lrdeploy.exporters.onnx import export_onnx
from lrdeploy.exporters.tensorrt import (
    FP16_BLOCK_OPS,
    build_engine,
    derive_profile,
    prepare_fp16_graph,
    sparse_layers_from_inspector,
)


class _Block(nn.Module):
    """Linear + LayerNorm + Softmax + pow/mean: the fragile ops must stay fp32 in the fp16 graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.fc(x)))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return torch.softmax(self.out(h), dim=-1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = _Block().eval()
    path = tmp_path_factory.mktemp("trt") / "block.onnx"
    res = export_onnx(model, path, input_shape=(16,))
    return model, res.path, res.optimized_path


def _model(dims, name="input"):
    x = helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)
    return helper.make_model(helper.make_graph([helper.make_node("Relu", [name], ["output"])], "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 17)])


# ------------------------------------------------------------------------------------------------ profile
def test_profile_batch_range(exported):
    _, path, _ = exported
    prof = derive_profile(onnx.load(str(path)), 1, 8, 64)
    assert prof == {"input": ((1, 16), (8, 16), (64, 16))}
    # defaults: max 32, opt = max
    assert derive_profile(path) == {"input": ((1, 16), (32, 16), (32, 16))}
    assert derive_profile(path, 4) == {"input": ((4, 16), (32, 16), (32, 16))}


def test_profile_rejects_bad_ranges_and_other_dynamic_dims():
    with pytest.raises(UserError, match="min .* <= opt"):
        derive_profile(_model(["batch", 3]), 8, 4, 16)
    seq = _model(["batch", "seq", 64])
    with pytest.raises(UserError, match="dynamic axis 1 \\(seq\\)") as info:
        derive_profile(seq, 1, 4, 8)
    assert "shapes=" in str(info.value) and "\n" not in str(info.value)
    prof = derive_profile(seq, shapes={"input": [(1, 8, 64), (4, 128, 64), (8, 512, 64)]})
    assert prof["input"] == ((1, 8, 64), (4, 128, 64), (8, 512, 64))
    assert derive_profile(seq, shapes={"input": (2, 10, 64)})["input"] == ((2, 10, 64),) * 3
    with pytest.raises(UserError, match="fixed at 64"):
        derive_profile(seq, shapes={"input": (2, 10, 32)})
    with pytest.raises(UserError, match="unknown input"):
        derive_profile(seq, shapes={"nope": (1, 2, 64)})
    with pytest.raises(UserError, match="rank"):
        derive_profile(seq, shapes={"input": (1, 2)})


def test_profile_static_graph():
    assert derive_profile(_model([1, 3, 8, 8])) == {"input": ((1, 3, 8, 8),) * 3}


# ------------------------------------------------------------------------------------------------ fp16
def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


@pytest.mark.parametrize("converter", ["ort", "builtin"])
def test_fp16_graph_keeps_fragile_ops_fp32(exported, tmp_path, converter):
    model, path, _ = exported
    out = prepare_fp16_graph(path, tmp_path / "block.fp16.onnx", converter=converter)
    fp16 = onnx.load(str(out))
    types = _float_types(fp16)
    # io stays fp32
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    fragile = [n for n in fp16.graph.node if n.op_type in FP16_BLOCK_OPS]
    assert {n.op_type for n in fragile} >= {"LayerNormalization", "Softmax", "Pow", "ReduceMean"}
    for n in fragile:
        for t in (*n.input, *n.output):
            if t and types.get(t) in (TensorProto.FLOAT, TensorProto.FLOAT16):
                assert types[t] == TensorProto.FLOAT, (n.op_type, t)
    gemms = [n for n in fp16.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert gemms and all(types[n.input[1]] == TensorProto.FLOAT16 for n in gemms)
    # ORT CPU runs it, loosely equal to fp32
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=5e-3, rtol=5e-2)


# ------------------------------------------------------------------------------------------------ build
def test_lint_refuses_ort_graph_before_tensorrt(exported, tmp_path):
    _, _, optimised = exported
    with pytest.raises(UserError, match="lint failed.*com.microsoft") as info:
        build_engine(optimised, tmp_path / "m.plan")
    assert "plain .onnx" in str(info.value) and "\n" not in str(info.value)


def test_int8_needs_qdq(exported, tmp_path):
    _, path, _ = exported
    with pytest.raises(UserError, match="Q/DQ"):
        build_engine(path, tmp_path / "m.plan", precision="int8")
    with pytest.raises(UserError, match="unknown precision"):
        build_engine(path, tmp_path / "m.plan", precision="fp8")


def test_build_without_tensorrt_is_one_line(exported, tmp_path, monkeypatch):
    _, path, _ = exported
    real_import = builtins.__import__

    def no_trt(name, *args, **kwargs):
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ModuleNotFoundError("No module named 'tensorrt'", name="tensorrt")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_trt)
    with pytest.raises(UserError) as info:
        build_engine(path, tmp_path / "m.plan", precision="fp16")
    msg = str(info.value)
    assert msg.startswith("TensorRT is not installed (")
    assert "--trt needs the tensorrt package from NVIDIA's index and a CUDA GPU" in msg and "\n" not in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not (tmp_path / "m.plan").exists() and not (tmp_path / "m.plan.json").exists()


def test_placeholder_tensorrt_and_no_gpu(exported, tmp_path, monkeypatch):
    _, path, _ = exported
    fake = type(sys)("tensorrt")
    fake.__version__ = "10.0.0b6"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(UserError, match="placeholder"):
        build_engine(path, tmp_path / "m.plan")
    fake.Builder = object
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU"):
        build_engine(path, tmp_path / "m.plan")


class _FakeTensorRT:
    """Just enough of TensorRT's Python API for ``build_engine`` to reach the builder: it records the graph
    handed to the ONNX parser, the network flags and the builder flags, then fails the build (None)."""

    def __init__(self, version: str) -> None:
        self.__version__ = version
        self.parsed: list[onnx.ModelProto] = []
        self.network_flags: list[int] = []
        self.builder_flags: list[str] = []
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)
        self.BuilderFlag = SimpleNamespace(FP16="FP16", BF16="BF16", INT8="INT8", SPARSE_WEIGHTS="SPARSE")
        self.ProfilingVerbosity = SimpleNamespace(DETAILED="DETAILED")

    def Builder(self, logger: Any) -> Any:  # noqa: N802 - TensorRT's name
        config = SimpleNamespace(set_flag=self.builder_flags.append, add_optimization_profile=lambda p: None)
        return SimpleNamespace(
            create_network=lambda flags: self.network_flags.append(flags) or SimpleNamespace(),
            create_builder_config=lambda: config,
            create_optimization_profile=lambda: SimpleNamespace(set_shape=lambda *a: None),
            build_serialized_network=lambda network, cfg: None)

    def OnnxParser(self, network: Any, logger: Any) -> Any:  # noqa: N802
        def parse(path: str) -> bool:
            self.parsed.append(onnx.load(path))
            return True

        return SimpleNamespace(parse_from_file=parse, num_errors=0)


@pytest.fixture
def fake_trt(monkeypatch):
    def install(version: str) -> _FakeTensorRT:
        fake = _FakeTensorRT(version)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "fake GPU")
        return fake

    return install


def _build_until_the_builder(path, tmp_path, **kwargs) -> None:
    with pytest.raises(UserError, match="failed to build an engine"):
        build_engine(path, tmp_path / "m.plan", max_batch=4, **kwargs)
    assert not (tmp_path / "m.plan").exists()


def test_bf16_on_trt11_builds_a_bf16_graph_strongly_typed(exported, tmp_path, fake_trt):
    _, path, _ = exported
    trt = fake_trt("11.0.0")
    _build_until_the_builder(path, tmp_path, precision="bf16")
    assert trt.network_flags == [1 << 5] and trt.builder_flags == []  # the graph carries the precision
    (graph,) = trt.parsed
    types = _float_types(graph)
    assert graph.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    gemms = [n for n in graph.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert gemms and all(types[n.input[1]] == TensorProto.BFLOAT16 for n in gemms)
    norms = [n for n in graph.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert norms and all(types[n.input[0]] == TensorProto.FLOAT for n in norms)
    # TensorRT 10 keeps the fp32 graph and the builder flag
    trt10 = fake_trt("10.9.0")
    _build_until_the_builder(path, tmp_path, precision="bf16")
    assert trt10.network_flags == [0] and trt10.builder_flags == ["BF16"]
    assert not any(i.data_type == TensorProto.BFLOAT16 for i in trt10.parsed[0].graph.initializer)


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    """Logits far apart (last layer scaled up): int8 noise must not flip an untrained model's arg-max."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[2].weight.mul_(8.0)
    return export_onnx(model, tmp_path_factory.mktemp("mlp") / "mlp.onnx", input_shape=(16,)).path


@pytest.mark.parametrize("version", ["10.9.0", "11.0.0"])
def test_int8_with_calibration_builds_a_symmetric_qdq_graph(mlp_path, tmp_path, fake_trt, version):
    from lrdeploy.exporters.lint import trt_qdq_findings

    trt = fake_trt(version)
    calib = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    _build_until_the_builder(mlp_path, tmp_path, precision="int8", calibration=calib)
    (graph,) = trt.parsed
    assert any(n.op_type == "QuantizeLinear" for n in graph.graph.node) and trt_qdq_findings(graph) == []
    if version.startswith("10"):
        assert trt.network_flags == [0] and trt.builder_flags == ["INT8"]
    else:
        assert trt.network_flags == [1 << 5] and trt.builder_flags == []


def test_asymmetric_qdq_graph_is_refused_before_tensorrt(exported, tmp_path):
    from lrdeploy.exporters.precision import convert_precision

    _, path, _ = exported
    calib = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    cpu = convert_precision(path, tmp_path / "cpu.onnx", "int8", model_kind="static", calibration=calib)
    with pytest.raises(UserError, match="lint failed.*trt-qdq"):
        build_engine(cpu.dst, tmp_path / "m.plan", precision="int8")


def test_sparse_layers_from_inspector():
    info = {"Layers": [{"Name": "fc1", "TacticName": "sm80_xmma_gemm_f16f16_sparse_tn"},
                       {"Name": "fc2", "TacticName": "sm80_xmma_gemm_f16f16_tn"},
                       "names-only layer"]}
    assert sparse_layers_from_inspector(json.dumps(info)) == ["fc1"]
    assert sparse_layers_from_inspector({"Layers": ["a", "b"]}) == []


def _trt_skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not importable (it comes only from NVIDIA's package index)"
    try:
        trt_mod.import_tensorrt()
    except UserError as exc:
        return str(exc)
    return None if torch.cuda.is_available() else "TensorRT builds need a CUDA GPU"


_SKIP = _trt_skip_reason()


@pytest.mark.trt
@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_build(exported, tmp_path, precision):
    _, path, _ = exported
    engine = tmp_path / f"block.{precision}.plan"
    cache = tmp_path / "timing.cache"
    res = build_engine(path, engine, min_batch=1, opt_batch=4, max_batch=8, precision=precision,
                       sparse_weights=True, timing_cache=cache)
    assert engine.stat().st_size > 0 and cache.is_file()
    side = json.loads((tmp_path / f"{engine.name}.json").read_text())
    assert side["tensorrt_version"] == res.tensorrt_version and side["precision"] == precision
    assert side["profile"]["input"] == [[1, 16], [4, 16], [8, 16]]
    assert res.sparse_layers or any("no layer chose a sparse tactic" in n for n in res.notes)
    assert trt_mod.trt_major(__import__("tensorrt")) >= 10
