"""Runtimes on real tiny ONNX files (built here with onnx.helper and torch.onnx.export), no mocks of ORT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lrdeploy.errors import UserError
from lrdeploy.serving.parity import output_parity
from lrdeploy.serving.runtimes import RUNTIME_KINDS, Runtime, load_runtime
from lrdeploy.serving.runtimes.base import available_cpus, resolve_threads
from lrdeploy.serving.runtimes.ort_cpu import OrtCpuRuntime
from lrdeploy.serving.runtimes.torch_cpu import TorchRuntime

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 6)).astype(np.float32)  # Gemm with transB=1: y = x @ W.T + b
B = RNG.standard_normal(4).astype(np.float32)


def _gemm_model(path: Path, input_name: str = "pixels") -> Path:
    """y = relu(x @ W.T + b) with a dynamic batch, written with onnx.helper (known answer in numpy)."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", [input_name, "W", "B"], ["z"], transB=1),
         helper.make_node("Relu", ["z"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def gemm_onnx(tmp_path_factory) -> Path:
    return _gemm_model(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small nn.Sequential exported by torch (dynamo exporter, dynamic batch)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)).eval()
    path = tmp_path_factory.mktemp("export") / "seq.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(module, (torch.randn(2, 12),), str(path), dynamo=True, opset_version=20,
                      input_names=["features"], output_names=["logits"], dynamic_shapes=({0: batch},),
                      verbose=False)
    return module, path


def _numpy_ref(x: np.ndarray) -> np.ndarray:
    return np.maximum(x.astype(np.float64) @ W.T.astype(np.float64) + B, 0.0)


@pytest.mark.parametrize("batch", [1, 3, 32])
def test_ort_matches_numpy_at_dynamic_batch(gemm_onnx, batch):
    rt = OrtCpuRuntime(gemm_onnx, threads=1)
    x = RNG.standard_normal((batch, 6)).astype(np.float32)
    y = rt.run(x)
    assert y.shape == (batch, 4) and y.dtype == np.float32
    np.testing.assert_allclose(y, _numpy_ref(x), rtol=1e-5, atol=1e-6)


def test_ort_discovers_input_name_and_describes_what_is_in_use(gemm_onnx):
    rt = OrtCpuRuntime(gemm_onnx, threads=2, name="dense")
    assert isinstance(rt, Runtime)
    assert rt.name == "dense"
    assert rt.input_name == "pixels" and rt.output_name == "logits"
    d = rt.describe()
    assert d["backend"] == "onnxruntime" and d["device"] == "cpu"
    assert d["providers"] == rt.session.get_providers() == ["CPUExecutionProvider"]
    assert d["threads"] == 2 and d["inter_op_threads"] == 1
    assert d["version"] == ort.__version__
    assert d["input"]["shape"] == ["batch", 6]


def test_ort_session_options_are_pinned(gemm_onnx):
    rt = OrtCpuRuntime(gemm_onnx, threads=1)
    opts = rt.session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_ort_default_threads_is_available_cpus(gemm_onnx):
    assert OrtCpuRuntime(gemm_onnx).threads == available_cpus() >= 1


def test_ort_converts_float64_input(gemm_onnx):
    rt = OrtCpuRuntime(gemm_onnx, threads=1)
    x = RNG.standard_normal((2, 6))
    np.testing.assert_allclose(rt.run(x), _numpy_ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_truncated_onnx_is_a_user_error(gemm_onnx, tmp_path, keep):
    data = gemm_onnx.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(UserError) as info:
        OrtCpuRuntime(bad)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(bad) in msg and "re-export" in msg


@pytest.mark.parametrize("content", [b"", b"this is not protobuf \x00\xff\x12"])
def test_empty_or_garbage_file_is_a_user_error(tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(UserError, match="not a valid ONNX model"):
        OrtCpuRuntime(bad)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        OrtCpuRuntime(tmp_path / "nope.onnx")


def test_multi_input_model_is_a_user_error(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(UserError, match="2 inputs"):
        OrtCpuRuntime(path)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_thread_counts_are_user_errors(bad):
    with pytest.raises(UserError, match="threads"):
        resolve_threads(bad)


def test_torch_runtime_eval_inference_mode_threads():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    module.train()
    rt = TorchRuntime(module, threads=1)
    assert not module.training  # eval: dropout off, so two calls agree
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    y1, y2 = rt.run(x), rt.run(x)
    np.testing.assert_array_equal(y1, y2)
    with torch.no_grad():
        np.testing.assert_allclose(y1, module(torch.from_numpy(x)).numpy(), rtol=1e-6)
    torch.set_num_threads(2)  # someone else changes the global; the runtime re-pins it
    rt.run(x)
    assert torch.get_num_threads() == 1
    d = rt.describe()
    assert d["backend"] == "torch" and d["device"] == "cpu" and d["threads"] == 1
    assert d["version"] == torch.__version__


def test_torch_runtime_rejects_non_modules_and_missing_cuda():
    with pytest.raises(UserError):
        TorchRuntime(object())
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            TorchRuntime(torch.nn.Identity(), device="cuda")


def test_exported_model_ort_matches_torch(exported):
    module, path = exported
    ort_rt = load_runtime("ort-cpu", path, threads=1)
    torch_rt = load_runtime("torch", module, threads=1)
    assert ort_rt.name == "ort-cpu" and torch_rt.name == "torch-cpu"
    assert ort_rt.input_name == "features"
    x = RNG.standard_normal((7, 12)).astype(np.float32)
    p = output_parity(torch_rt.run(x), ort_rt.run(x))
    assert p["rel_l2"] < 1e-6 and p["top1_agreement"] == 1.0


def test_load_runtime_unknown_kind():
    with pytest.raises(UserError, match="unknown runtime") as info:
        load_runtime("tensorrt-on-a-toaster", "x.onnx")
    assert all(k in str(info.value) for k in RUNTIME_KINDS)


def test_serving_does_not_import_training_code():
    code = (
        "import sys\n"
        "import lrdeploy.serving.bench, lrdeploy.serving.parity, lrdeploy.serving.report\n"
        "import lrdeploy.serving.runtimes.ort_cpu, lrdeploy.serving.runtimes.torch_cpu\n"
        "bad = [m for m in sys.modules if m.split('.')[:2] in (['lrdeploy', 'models'], ['lrdeploy', 'train'],"
        " ['lrdeploy', 'data'], ['lrdeploy', 'bundle'], ['lrdeploy', 'layers'], ['lrdeploy', 'methods'])]\n"
        "assert not bad, bad\n"
        "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules  # backends load lazily\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wrong_input_shape_is_a_user_error(gemm_onnx):
    rt = OrtCpuRuntime(gemm_onnx, threads=1)
    with pytest.raises(UserError, match="rejected input") as info:
        rt.run(np.zeros((2, 1, 6), dtype=np.float32))
    assert "\n" not in str(info.value)
