"""`lrdeploy export` options: fold modes, precision variants, optimisation presets, --trt without TensorRT."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lrdeploy.compress import compress
from lrdeploy.models import create_model

from .test_cli import assert_user_error, invoke, lrdeploy_subprocess


@pytest.fixture(scope="module")
def lowrank_bundle(tmp_path_factory):
    from lrdeploy.bundle import save_bundle

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = create_model("lenet5")
    compress(model, rank_ratio=0.25)
    args = {"num_classes": 10}
    save_bundle(root / "b", model, model_name="lenet5", model_args=args, method={"name": "svd"}, dataset={},
                metrics={})
    return root / "b"


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_fold_modes_give_the_same_function(lowrank_bundle, tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    outs, nodes = {}, {}
    for mode in ("factored", "dense", "auto"):
        path = tmp_path / f"{mode}.onnx"
        r = invoke("export", lowrank_bundle, "--out", path, "--fold", mode, "--fold-batch", "1")
        assert r.exit_code == 0, r.output
        outs[mode] = _run(path, x)
        report = json.loads(path.with_suffix(".fold.json").read_text())
        nodes[mode] = {layer["name"]: layer["decision"] for layer in report["layers"]}
        # predicted vs measured: every factorised layer's kernels were found and timed in the exported graph
        measured = {layer["name"]: layer["measured_ms"] for layer in report["layers"]}
        assert all(ms is not None and ms > 0 for ms in measured.values()), measured
        in_model = report["in_model"]
        assert in_model["batch_size"] == 1 and in_model["runs"] >= 1
        assert report["summary"]["measured_layers_ms"] == pytest.approx(sum(measured.values()))
        assert sum(measured.values()) + in_model["other_ms"] == pytest.approx(in_model["kernel_ms"])
        assert 0 < in_model["attributed_share"] <= 1.0  # (how much is timing-dependent: not asserted)
    assert set(nodes["factored"].values()) == {"factored"} and set(nodes["dense"].values()) == {"dense"}
    for mode in ("dense", "auto"):
        np.testing.assert_allclose(outs[mode], outs["factored"], rtol=1e-4, atol=1e-5)


def test_fp16_variant_and_basic_optimisation(lowrank_bundle, tmp_path):
    out = tmp_path / "m.onnx"
    r = invoke("export", lowrank_bundle, "--out", out, "--precision", "fp16", "--optimize", "basic")
    assert r.exit_code == 0, r.output
    assert out.with_suffix(".fp16.onnx").exists() and (tmp_path / "m.ort.onnx").exists()
    x = np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(_run(out.with_suffix(".fp16.onnx"), x), _run(out, x), rtol=5e-2, atol=5e-2)


def test_bad_export_options(lowrank_bundle, tmp_path):
    for flag, value in (("--fold", "sideways"), ("--optimize", "max"), ("--precision", "fp8")):
        proc = lrdeploy_subprocess("export", lowrank_bundle, "--out", tmp_path / "x.onnx", flag, value)
        assert_user_error(proc, value)
    assert not (tmp_path / "x.onnx").exists()


def test_trt_without_tensorrt_is_one_line(lowrank_bundle, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed here: this test covers machines without it")
    proc = lrdeploy_subprocess("export", lowrank_bundle, "--out", tmp_path / "t.onnx", "--trt")
    assert_user_error(proc, "tensorrt")
    assert not (tmp_path / "t.onnx").exists()


def test_bf16_variant_end_to_end(lowrank_bundle, tmp_path):
    """--precision bf16 writes <stem>.bf16.onnx (bf16 weights, fp32 I/O) and says how it was judged."""
    import onnx

    out = tmp_path / "m.onnx"
    r = invoke("export", lowrank_bundle, "--out", out, "--fold", "factored", "--precision", "bf16")
    assert r.exit_code == 0, r.output
    variant = onnx.load(str(out.with_suffix(".bf16.onnx")))
    assert any(i.data_type == onnx.TensorProto.BFLOAT16 for i in variant.graph.initializer)
    assert variant.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    text = " ".join(r.output.split())  # Rich wraps lines
    assert "bf16 variant" in text and "(bf16): rel-L2" in text and "PASS" in text
    try:  # ORT 1.32's CPU provider has no bf16 Conv/Gemm kernels: the reference evaluator judged it
        ort.InferenceSession(str(out.with_suffix(".bf16.onnx")), providers=["CPUExecutionProvider"])
    except Exception:
        assert "onnx.reference on 16 examples" in text  # no dataset in the bundle: 16 random inputs


def test_trt_int8_builds_from_a_symmetric_qdq_graph(tmp_path, data_dir, monkeypatch):
    """--trt --precision int8: the TensorRT Q/DQ graph is calibrated on the bundle's data, judged on ORT CPU
    and printed, and it is what the (here fake) TensorRT parser receives, strongly typed on TRT 11."""

    from lrdeploy.bundle import save_bundle
    from lrdeploy.exporters.lint import trt_qdq_findings

    from .test_tensorrt import _FakeTensorRT

    torch.manual_seed(0)
    save_bundle(tmp_path / "b", create_model("lenet5"), model_name="lenet5", model_args={"num_classes": 10},
                method={"name": "none"}, dataset={"name": "mnist"}, metrics={})
    fake = _FakeTensorRT("11.0.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "fake GPU")
    out = tmp_path / "m.onnx"
    r = invoke("export", tmp_path / "b", "--out", out, "--fold", "factored", "--precision", "int8", "--trt",
               "--data-dir", data_dir)
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "failed to build an engine from m.int8.trt.onnx" in text  # the fake's build
    assert "(int8-static-qdq)" in text and "(int8-trt-qdq)" in text and text.count("PASS") == 2
    assert not list(tmp_path.glob("m.*")), "a failed build writes nothing of the export family"
    (qdq,) = fake.parsed  # what TensorRT's parser received: the symmetric Q/DQ graph
    assert trt_qdq_findings(qdq) == [] and any(n.op_type == "QuantizeLinear" for n in qdq.graph.node)
    assert fake.network_flags == [1 << 5]
