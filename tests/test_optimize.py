"""Offline optimisation presets: every step checked and verified against the graph before it."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.exporters.onnx import export_onnx, read_onnx_metadata
from lrdeploy.exporters.optimize import PRESETS, optimize_onnx, random_feeds, run_graph, worst_rel_l2

pytest.importorskip("onnxruntime")


def _lenet_onnx(tmp_path) -> str:
    from lrdeploy.models import create_model

    torch.manual_seed(0)
    path = tmp_path / "lenet.onnx"
    export_onnx(create_model("lenet5").eval(), path, input_shape=(1, 28, 28), exporter="legacy",
                optimize=False, metadata={"model": "lenet5"})
    return str(path)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_keep_parity_and_report_nodes(tmp_path, preset):
    src = _lenet_onnx(tmp_path)
    dst = tmp_path / f"lenet.{preset}.onnx"
    res = optimize_onnx(src, dst, preset)
    assert dst.is_file() and res.preset == preset
    assert res.nodes_before == len(onnx.load(src).graph.node)
    assert res.nodes_after == len(onnx.load(str(dst)).graph.node)
    assert read_onnx_metadata(dst) == {"model": "lenet5"}  # the manifest survives the rewrite
    feeds = random_feeds(onnx.load(src), batch=5, seed=7)
    assert worst_rel_l2(run_graph(onnx.load(src).SerializeToString(), feeds),
                        run_graph(dst.read_bytes(), feeds)) < 1e-5
    if preset == "none":
        assert res.steps == [] and res.nodes_after == res.nodes_before
        return
    names = [s.name for s in res.steps]
    assert names[-1] == ("ort-basic" if preset == "basic" else "ort-extended")
    assert "onnxslim" in names  # applied, or skipped with a reason when not installed
    for step in res.steps:
        if step.applied:
            assert step.parity_rel_l2 is not None and step.parity_rel_l2 < 1e-5
            assert step.checker in ("full", "structural")
        else:
            assert step.skipped_reason
    assert res.nodes_after <= res.nodes_before
    if preset == "basic":
        assert res.portable  # standard ONNX ops only
    else:  # extended fuses Conv+Relu into com.microsoft:FusedConv (ORT-only)
        assert res.op_histogram.get("com.microsoft:FusedConv", 0) == 2 and not res.portable
        assert res.steps[-1].op_delta.get("Relu", 0) < 0


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="unknown optimisation preset"):
        optimize_onnx(tmp_path / "a.onnx", tmp_path / "b.onnx", "max")
    with pytest.raises(UserError, match="does not exist"):
        optimize_onnx(tmp_path / "a.onnx", tmp_path / "b.onnx", "basic")


def test_a_step_that_changes_outputs_is_rejected(tmp_path, monkeypatch):
    import lrdeploy.exporters.optimize as opt

    src = _lenet_onnx(tmp_path)

    def broken(data: bytes, level: str) -> bytes:
        proto = onnx.load_from_string(data)
        init = proto.graph.initializer[0]
        arr = onnx.numpy_helper.to_array(init) * 1.01
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        return proto.SerializeToString()

    monkeypatch.setattr(opt, "_ort_step", broken)
    dst = tmp_path / "out.onnx"
    with pytest.raises(UserError, match="changed the outputs"):
        optimize_onnx(src, dst, "basic")
    assert not dst.exists()


def test_mlp_extended_step_counts(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    src = tmp_path / "mlp.onnx"
    export_onnx(model, src, input_shape=(16,), optimize=False)
    res = optimize_onnx(src, tmp_path / "mlp.all.onnx", "all")
    ort = res.steps[-1]
    assert ort.applied and ort.nodes_before >= ort.nodes_after
    assert sum(res.op_histogram.values()) == res.nodes_after
