"""ONNX export: ORT matches PyTorch (random and real MNIST inputs), dynamic batch, metadata, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lrdeploy.bundle import load_bundle, save_bundle
from lrdeploy.compress import compress
from lrdeploy.errors import UserError
from lrdeploy.exporters import onnx as onnx_mod
from lrdeploy.exporters.layer_times import SCOPE_KEY
from lrdeploy.exporters.onnx import (
    META_MANIFEST,
    META_VERSION,
    export_onnx,
    load_onnx_checked,
    onnx_metadata_props,
    optimized_path_for,
    read_export_info,
    read_onnx_metadata,
    rel_l2,
)
from lrdeploy.models import create_model

TOL = 1e-5
BATCHES = (1, 64)


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("lenet5")
    if kind == "lowrank":
        compress(model, rank_ratio=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict]:
    """Each kind saved as a bundle, loaded back, exported once (the CLI path), shared by the tests."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for kind in ("dense", "lowrank"):
        save_bundle(root / kind, _model(kind), model_name="lenet5", model_args={}, method={"name": kind},
                    dataset={"name": "mnist"}, metrics={"test_accuracy": 0.1})
        bundle = load_bundle(root / kind)
        result = export_onnx(bundle, root / f"{kind}.onnx")
        out[kind] = {"bundle": bundle, "result": result}
    return out


@pytest.fixture(scope="module")
def mnist(data_dir) -> torch.Tensor:
    from lrdeploy.data import load_dataset

    return load_dataset("mnist", "test", data_dir=data_dir, limit=max(BATCHES)).x


def _ort(path: Path):
    return onnx_mod.ort_session(path)


def _check(session, model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        ref = model(x).numpy()
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert out.shape == ref.shape == (x.shape[0], 10)
    err = rel_l2(out, ref)
    assert err < TOL, err
    return err


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
@pytest.mark.parametrize("which", ["plain", "ort"])
def test_ort_matches_torch_on_random_and_mnist(exported, mnist, kind, which):
    result = exported[kind]["result"]
    model = exported[kind]["bundle"].model
    path = result.path if which == "plain" else result.optimized_path
    session = _ort(path)  # one session serves both batch sizes: the batch dimension is dynamic
    gen = torch.Generator().manual_seed(123)
    for batch in BATCHES:
        _check(session, model, torch.randn(batch, 1, 28, 28, generator=gen))
        _check(session, model, mnist[:batch].contiguous())
    # The models agree on what they predict for real digits, not just to within a norm.
    with torch.inference_mode():
        ref = model(mnist).argmax(1).numpy()
    pred = session.run(None, {"input": mnist.numpy()})[0].argmax(1)
    assert np.array_equal(pred, ref)


def test_export_result_and_graph(exported):
    for kind in ("dense", "lowrank"):
        r = exported[kind]["result"]
        assert r.exporter == onnx_mod.DEFAULT_EXPORTER and r.opset == 20
        assert r.parity_rel_l2 < TOL and r.seconds > 0
        assert r.optimized_path == optimized_path_for(r.path) == r.path.with_name(f"{kind}.ort.onnx")
        assert r.optimized_path.is_file()
        load_onnx_checked(r.optimized_path)  # contrib ops are fine for the checker
        proto = load_onnx_checked(r.path)
        assert len(proto.graph.node) == r.nodes
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, "plain graph must be standard ONNX"
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
        assert max(opset.version for opset in proto.opset_import if opset.domain in ("", "ai.onnx")) == 20
        assert json.loads(json.dumps(r.to_dict()))["path"] == str(r.path)
    # Folding kept the factor pairs: two more Conv/Gemm per factorised layer (conv2, fc1, fc2).
    assert exported["lowrank"]["result"].nodes == exported["dense"]["result"].nodes + 3


def test_metadata_carries_the_manifest(exported):
    for kind in ("dense", "lowrank"):
        r, bundle = exported[kind]["result"], exported[kind]["bundle"]
        for path in (r.path, r.optimized_path):
            assert read_onnx_metadata(path) == bundle.manifest
            props = onnx_metadata_props(path)
            assert props[META_VERSION] == "0.1.0"
            assert json.loads(props[META_MANIFEST])["weights_sha256"] == bundle.manifest["weights_sha256"]
            info = read_export_info(path)
            assert info["exporter"] == r.exporter and info["input_shape"] == [1, 28, 28]
            assert info["dynamic_batch"] is True
        # No per-node debug metadata (stack traces with this machine's paths) in the shipped graph: only
        # each node's module path, which the fold report uses to time layers inside the model.
        nodes = onnx.load(str(r.path)).graph.node
        assert {p.key for n in nodes for p in n.metadata_props} == {SCOPE_KEY}
        scopes = {p.value for n in nodes for p in n.metadata_props}
        assert {"conv1", "fc3"} <= scopes and not any("/" in s for s in scopes)
    assert set(read_onnx_metadata(exported["lowrank"]["result"].path)["structure"]) == {"conv2", "fc1", "fc2"}


def test_legacy_exporter_and_module_source(tmp_path):
    model = _model("lowrank").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 28, 28), exporter="legacy", optimize=False,
                    metadata={"origin": "test"})
    assert r.exporter == "legacy" and r.optimized_path is None and r.parity_rel_l2 < TOL
    assert model.training  # the caller's model is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert read_onnx_metadata(r.path) == {"origin": "test"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    session = _ort(r.path)
    for batch in BATCHES:
        _check(session, model.eval(), torch.randn(batch, 1, 28, 28))


def test_static_batch(tmp_path):
    r = export_onnx(_model("dense"), tmp_path / "s.onnx", input_shape=(1, 28, 28), dynamic_batch=False,
                    optimize=False)
    dims = load_onnx_checked(r.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 1, 28, 28]
    assert read_export_info(r.path)["dynamic_batch"] is False


def test_stale_optimised_sibling_is_removed(tmp_path, exported):
    target = tmp_path / "m.onnx"
    stale = optimized_path_for(target)
    stale.write_bytes(exported["dense"]["result"].optimized_path.read_bytes())  # one of ours, now outdated
    export_onnx(_model("dense"), target, input_shape=(1, 28, 28), exporter="legacy", optimize=False)
    assert not stale.exists()


def test_foreign_onnx_has_no_manifest(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "f.onnx")
    assert read_onnx_metadata(tmp_path / "f.onnx") == {}
    assert read_export_info(tmp_path / "f.onnx") == {}


def test_written_files_respect_the_umask(exported):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    r = exported["dense"]["result"]
    for p in (r.path, r.optimized_path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_truncated_or_missing_onnx_is_refused(tmp_path, exported):
    data = exported["dense"]["result"].path.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a valid ONNX model"):
        load_onnx_checked(bad)
    with pytest.raises(UserError, match="not a valid ONNX model"):
        read_onnx_metadata(bad)
    bad.write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(UserError, match="not a valid ONNX model"):
        load_onnx_checked(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_onnx_checked(tmp_path / "missing.onnx")


def test_bad_arguments_are_user_errors(tmp_path):
    model = _model("dense")
    with pytest.raises(UserError, match="input_shape"):
        export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(UserError, match="unknown exporter"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 28, 28), exporter="tvm")
    with pytest.raises(UserError, match="does not accept inputs"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 32, 32))
    with pytest.raises(UserError, match="is a directory"):
        export_onnx(model, tmp_path, input_shape=(1, 28, 28))
    assert list(tmp_path.iterdir()) == []


def _boom(*args, **kwargs):
    raise RuntimeError("forced failure")


@pytest.mark.parametrize("stage", ["checker", "parity", "optimise", "write"])
def test_failed_export_leaves_no_partial_file(tmp_path, monkeypatch, stage):
    """Whatever step fails, the target keeps its old bytes (or stays absent) and no temp file remains."""
    target = tmp_path / "m.onnx"
    old = b"previous export"
    target.write_bytes(old)
    if stage == "checker":
        monkeypatch.setattr(onnx_mod.onnx.checker, "check_model", _boom)
        expected = UserError
    elif stage == "parity":
        monkeypatch.setattr(onnx_mod, "_parity", lambda *a, **k: 1.0)
        expected = UserError
    elif stage == "optimise":
        monkeypatch.setattr(onnx_mod, "_ort_optimise", _boom)
        expected = RuntimeError
    else:  # the crash happens while the bytes are being written: atomic.write_bytes must clean up
        monkeypatch.setattr(onnx_mod.atomic.os, "fsync", _boom)
        expected = RuntimeError
    with pytest.raises(expected):
        export_onnx(_model("dense"), target, input_shape=(1, 28, 28), exporter="legacy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert target.read_bytes() == old


def test_auto_falls_back_when_the_default_exporter_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_mod, f"_export_{onnx_mod.DEFAULT_EXPORTER}", _boom)
    other = next(e for e in onnx_mod.EXPORTERS if e != onnx_mod.DEFAULT_EXPORTER)
    r = export_onnx(_model("dense"), tmp_path / "m.onnx", input_shape=(1, 28, 28), optimize=False)
    assert r.exporter == other and r.parity_rel_l2 < TOL
    assert "forced failure" in read_export_info(r.path)["fallback_from"][0]
    with pytest.raises(UserError, match="export failed.*forced failure"):
        export_onnx(_model("dense"), tmp_path / "n.onnx", input_shape=(1, 28, 28),
                    exporter=onnx_mod.DEFAULT_EXPORTER)
    assert not (tmp_path / "n.onnx").exists()


class _NamedEmbedding(torch.nn.Module):
    """Token ids → a vector, with its output named ``embedding``: the name dynamo gives nn.Embedding's own
    output, so the dynamo graph defines it twice and fails the ONNX checker."""

    input_names = ("ids",)
    output_names = ("embedding",)

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.fc = torch.nn.Linear(8, 4)

    def example_inputs(self, batch_size: int, *sizes: int) -> tuple[torch.Tensor]:
        return (torch.randint(0, 50, (batch_size, 6)),)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"ids": {0: "batch", 1: "seq"}}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids)).mean(1)


def test_a_graph_failing_the_checker_falls_back_to_the_other_exporter(tmp_path):
    from lrdeploy.exporters.onnx import export_onnx, read_export_info

    with pytest.raises(UserError, match="dynamo"):
        export_onnx(_NamedEmbedding().eval(), tmp_path / "d.onnx", input_shape=(6,), exporter="dynamo",
                    optimize=False, metadata={"model": {"name": "custom"}})
    assert not (tmp_path / "d.onnx").exists()
    result = export_onnx(_NamedEmbedding().eval(), tmp_path / "a.onnx", input_shape=(6,), optimize=False,
                         metadata={"model": {"name": "custom"}})
    assert result.exporter == "legacy" and result.parity_rel_l2 < 1e-5
    info = read_export_info(tmp_path / "a.onnx")
    assert any(f.startswith("dynamo:") for f in info["fallback_from"])
