"""GPU runtimes on a real CUDA device: torch eager vs CUDA-graph replay, ORT CUDA I/O binding, TensorRT.

Deselected by default (pyproject's addopts exclude ``gpu``/``trt``); selected with ``-m gpu`` or ``-m trt`` on
a machine without a GPU (or without onnxruntime-gpu / TensorRT) every test skips with the reason. Parity
only, no timing assertions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lrdeploy.serving.runtimes import DeviceOutput, load_runtime, run_single
from lrdeploy.serving.runtimes.torch_runtime import TorchRuntime

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine"),
]

RNG = np.random.default_rng(0)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)).eval()


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpu") / "seq.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(_model(), (torch.randn(2, 12),), str(path), dynamo=True, opset_version=20,
                      input_names=["features"], output_names=["logits"], dynamic_shapes=({0: batch},),
                      verbose=False)
    return path


def _close(a, b, rtol=1e-4, atol=1e-5) -> None:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_torch_cuda_eager_matches_cpu_and_describes_the_gpu():
    cpu = load_runtime("torch-cpu", _model(), threads=1)
    gpu = load_runtime("torch-cuda", _model(), threads=1)
    x = RNG.standard_normal((8, 12)).astype(np.float32)
    y = gpu.run({"input": x})["output"]
    assert isinstance(y, DeviceOutput)  # output left on the device: the D2H copy is not timed
    _close(y, run_single(cpu, x))
    d = gpu.describe()
    assert d["device"].startswith("cuda:") and d["mode"] == "eager" and d["device_name"]
    assert d["cuda"] == torch.version.cuda and "driver" in d and d["gpu"]["capability"]


@pytest.mark.parametrize("include_transfer", [False, True])
def test_cuda_graph_replay_matches_eager(include_transfer):
    eager = TorchRuntime(_model(), device="cuda", threads=1)
    graph = TorchRuntime(_model(), device="cuda", threads=1, mode="cuda-graph",
                         include_transfer=include_transfer)
    for batch in (1, 5, 5, 1):  # a new shape captures a new graph; a known one replays
        x = RNG.standard_normal((batch, 12)).astype(np.float32)
        y = run_single(graph, x)
        assert isinstance(y, np.ndarray) == include_transfer
        _close(y, run_single(eager, x))
    assert sorted(graph.describe()["graphs"]) == [[[1, 12]], [[5, 12]]]


def test_cuda_graph_static_output_refuses_stale_reads_and_copies_unstaged_arrays():
    rt = TorchRuntime(_model(), device="cuda", threads=1, mode="cuda-graph")
    ref = TorchRuntime(_model(), device="cpu", threads=1)
    x1 = RNG.standard_normal((4, 12)).astype(np.float32)
    x2 = RNG.standard_normal((4, 12)).astype(np.float32)
    rt.stage({"input": x1})  # captures the graph for (4, 12) with x1 in its static input
    assert rt.describe()["graphs"] == [[[4, 12]]]
    y1 = run_single(rt, x1)
    _close(y1, run_single(ref, x1))
    y1_again = run_single(rt, x1)
    y2 = run_single(rt, x2)  # same shape, unstaged array: copied into the static input before replay
    with pytest.raises(RuntimeError, match="overwritten"):
        np.asarray(y1_again)
    _close(y2, run_single(ref, x2))
    _close(run_single(rt, x1), run_single(ref, x1))  # x2 displaced the staged x1, so x1 is copied again


def test_torch_cuda_memory_counts_the_allocator_peak():
    rt = load_runtime("torch-cuda", _model(), threads=1)
    x = {"input": RNG.standard_normal((16, 12)).astype(np.float32)}
    rt.run(x)
    m = rt.memory(x, runs=2)
    assert m["cuda_device"] == rt.cuda_device_index
    assert m["cuda_peak_allocated_bytes"] >= m["cuda_allocated_before_bytes"] >= 0


@pytest.mark.parametrize("include_transfer", [False, True])
def test_ort_cuda_io_binding_matches_ort_cpu(onnx_path, include_transfer):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    cpu = load_runtime("ort-cpu", onnx_path, threads=1)
    gpu = load_runtime("ort-cuda", onnx_path, threads=1, include_transfer=include_transfer)
    assert gpu.describe()["providers"][0] == "CUDAExecutionProvider"
    for batch in (1, 7):
        x = RNG.standard_normal((batch, 12)).astype(np.float32)
        y = gpu.run({"features": x})["logits"]
        assert isinstance(y, np.ndarray) == include_transfer
        _close(y, run_single(cpu, x))


@pytest.mark.trt
def test_trt_engine_matches_ort_cpu(onnx_path, tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    if not hasattr(trt, "Builder"):
        pytest.skip("the installed tensorrt package is a placeholder")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("features", (1, 12), (8, 12), (32, 12))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    engine = tmp_path / "seq.plan"
    engine.write_bytes(bytes(plan))
    sidecar = {"precision": "fp32", "tensorrt_version": trt.__version__}
    (tmp_path / "seq.plan.json").write_text(json.dumps(sidecar))

    cpu = load_runtime("ort-cpu", onnx_path, threads=1)
    rt = load_runtime("trt", engine)
    for batch in (1, 8, 3):
        x = RNG.standard_normal((batch, 12)).astype(np.float32)
        _close(run_single(rt, x), run_single(cpu, x), rtol=1e-3, atol=1e-4)  # TF32 tactics may be chosen
    d = rt.describe()
    assert d["sidecar"]["precision"] == "fp32" and d["tensors"]["features"]["mode"] == "input"
    from lrdeploy.errors import UserError

    with pytest.raises(UserError, match="rejected input"):
        run_single(rt, np.zeros((64, 12), dtype=np.float32))  # outside the profile


def test_two_input_model_on_torch_cuda_and_ort_cuda_matches_the_cpu(tmp_path):
    """Named inputs on the device runtimes: token ids + mask, staged by name; two named outputs."""
    from .test_runtimes import _two_feeds, _TwoInputs

    torch.manual_seed(0)
    module = _TwoInputs().eval()
    cpu = load_runtime("torch-cpu", module, threads=1)
    feeds = _two_feeds(3, 7)
    want = cpu.run(feeds)
    for mode in ("eager", "cuda-graph"):
        gpu = load_runtime("torch-cuda", module, threads=1, mode=mode)
        gpu.stage(feeds)
        got = gpu.run(feeds)
        assert list(got) == ["pooled", "scores"]
        for name in want:
            _close(got[name], want[name])
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    path = tmp_path / "two.onnx"
    torch.onnx.export(module, module.example_inputs(2), str(path), dynamo=False, opset_version=17,
                      input_names=list(module.input_names), output_names=list(module.output_names),
                      dynamic_axes=module.dynamic_axes())
    rt = load_runtime("ort-cuda", path, threads=1)
    rt.stage(feeds)
    got = rt.run(feeds)
    for name in want:
        _close(got[name], want[name])
