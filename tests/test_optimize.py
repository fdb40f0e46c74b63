"""Offline optimisation presets: every step checked and verified against the graph before it."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.exporters.onnx import export_onnx, read_onnx_metadata
from lrdeploy.exporters.optimize import (
    OUTCOMES,
    PRESETS,
    io_signature,
    optimize_onnx,
    random_feeds,
    run_graph,
    worst_rel_l2,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxslim")  # a dependency of lrdeploy; its absence is tested by hiding it

def _lenet_onnx(tmp_path) -> str:
    from lrdeploy.models import create_model

    torch.manual_seed(0)
    path = tmp_path / "lenet.onnx"
    export_onnx(create_model("lenet5").eval(), path, input_shape=(1, 28, 28), exporter="legacy",
                optimize=False, metadata={"model": {"name": "lenet5"}})
    return str(path)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_keep_parity_and_report_nodes(tmp_path, preset):
    src = _lenet_onnx(tmp_path)
    dst = tmp_path / f"lenet.{preset}.onnx"
    res = optimize_onnx(src, dst, preset)
    assert dst.is_file() and res.preset == preset
    assert res.nodes_before == len(onnx.load(src).graph.node)
    assert res.nodes_after == len(onnx.load(str(dst)).graph.node)
    assert read_onnx_metadata(dst) == {"model": {"name": "lenet5"}}  # the manifest survives the rewrite
    feeds = random_feeds(onnx.load(src), batch=5, seed=7)
    assert worst_rel_l2(run_graph(onnx.load(src).SerializeToString(), feeds),
                        run_graph(dst.read_bytes(), feeds)) < 1e-5
    if preset == "none":
        assert res.steps == [] and res.nodes_after == res.nodes_before
        return
    names = [s.name for s in res.steps]
    assert names[-1] == ("ort-basic" if preset == "basic" else "ort-extended")
    slim = res.steps[0]
    assert slim.name == "onnxslim" and slim.outcome in ("applied", "unchanged")  # it ran: installed
    for step in res.steps:
        if step.applied:
            assert step.outcome == "applied" and step.reason is None
            assert step.parity_rel_l2 is not None and step.parity_rel_l2 < 1e-5
            assert step.checker in ("full", "structural")
        else:
            assert step.outcome in OUTCOMES and step.reason
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


# --- the onnxslim step ---


@pytest.fixture(scope="module")
def lenet_dynamo(tmp_path_factory) -> str:
    """The default export path (dynamo, opset 20) of a registry LeNet."""
    from lrdeploy.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lenet") / "lenet.onnx"
    export_onnx(create_model("lenet5").eval(), path, input_shape=(1, 28, 28), exporter="dynamo", opset=20,
                optimize=False, metadata={"model": {"name": "lenet5"}})
    return str(path)


def _steps_in_file(path) -> list[dict]:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props["lrdeploy.optimize_steps"])


def _same_outputs_at_two_batches(src, dst) -> None:
    """The written graph still takes any batch and agrees with the source at each."""
    src_proto = onnx.load(str(src))
    for batch in (1, 4):
        feeds = random_feeds(src_proto, batch=batch, seed=batch)
        ref, out = run_graph(src_proto.SerializeToString(), feeds), run_graph(dst.read_bytes(), feeds)
        assert out[0].shape[0] == batch
        assert worst_rel_l2(ref, out) < 1e-5


@pytest.mark.parametrize("preset", ["basic", "all"])
def test_slim_runs_on_an_exported_lenet(tmp_path, lenet_dynamo, preset):
    dst = tmp_path / "lenet.opt.onnx"
    res = optimize_onnx(lenet_dynamo, dst, preset)
    slim = res.steps[0]
    # the dynamo graph is already minimal: onnxslim ran, found nothing, and the graph before it was kept
    assert (slim.name, slim.outcome, slim.applied) == ("onnxslim", "unchanged", False)
    assert "nothing to simplify" in slim.reason and slim.nodes_after == slim.nodes_before == 12
    assert read_onnx_metadata(dst) == {"model": {"name": "lenet5"}}
    assert io_signature(onnx.load(str(dst))) == io_signature(onnx.load(lenet_dynamo))  # batch still symbolic
    _same_outputs_at_two_batches(lenet_dynamo, dst)
    assert [s["outcome"] for s in _steps_in_file(dst)] == ["unchanged", "applied"]


def _redundant_graph(path) -> None:
    """x[batch, 4] -> Identity -> MatMul W -> Add (b1 + b2, constant-foldable) -> Relu, plus metadata."""
    h, tp = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("W", (4, 3)), ("b1", (3,)), ("b2", (3,)))]
    nodes = [h.make_node("Identity", ["x"], ["x_id"]), h.make_node("MatMul", ["x_id", "W"], ["mm"]),
             h.make_node("Add", ["b1", "b2"], ["b"]), h.make_node("Add", ["mm", "b"], ["pre"]),
             h.make_node("Relu", ["pre"], ["y"])]
    graph = h.make_graph(nodes, "redundant", [h.make_tensor_value_info("x", tp.FLOAT, ["batch", 4])],
                         [h.make_tensor_value_info("y", tp.FLOAT, ["batch", 3])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 20)], ir_version=10)
    h.set_model_props(model, {"lrdeploy.manifest": json.dumps({"model": {"name": "toy"}})})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def test_slim_removes_redundant_nodes_and_records_the_delta(tmp_path):
    src, dst = tmp_path / "toy.onnx", tmp_path / "toy.basic.onnx"
    _redundant_graph(src)
    res = optimize_onnx(src, dst, "basic")
    slim = res.steps[0]
    assert (slim.outcome, slim.applied, slim.reason) == ("applied", True, None)
    assert (slim.nodes_before, slim.nodes_after) == (5, 3)
    assert slim.op_delta == {"Add": -1, "Identity": -1}  # b1 + b2 folded, Identity gone
    assert slim.initializers_delta == -3  # b1, b2 (3 each) -> one folded bias (3)
    assert slim.parity_rel_l2 is not None and slim.parity_rel_l2 < 1e-5 and slim.checker == "full"
    assert res.steps[1].name == "ort-basic" and res.portable
    assert read_onnx_metadata(dst) == {"model": {"name": "toy"}}
    assert io_signature(onnx.load(str(dst)))["input x"] == (onnx.TensorProto.FLOAT, ("batch", 4))
    _same_outputs_at_two_batches(src, dst)
    assert _steps_in_file(dst)[0]["op_delta"] == {"Add": -1, "Identity": -1}


def test_slim_removes_zero_bias_adds_of_a_fresh_dynamo_export(tmp_path):
    """The one change measured on our dynamo graphs (docs/optimize.md): ``x + 0`` from all-zero biases."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    for layer in (model[0], model[2]):
        nn.init.zeros_(layer.bias)
    src = tmp_path / "seq.onnx"
    export_onnx(model, src, input_shape=(5, 8), exporter="dynamo", optimize=False)  # 3-D: MatMul + Add
    res = optimize_onnx(src, tmp_path / "seq.basic.onnx", "basic")
    assert res.steps[0].outcome == "applied" and res.steps[0].op_delta == {"Add": -2}
    _same_outputs_at_two_batches(src, tmp_path / "seq.basic.onnx")


def _patched_slim(monkeypatch, change) -> None:
    import lrdeploy.exporters.optimize as opt

    def fake(data: bytes) -> bytes:
        proto = onnx.load_from_string(data)
        change(proto)
        return proto.SerializeToString()

    monkeypatch.setattr(opt, "_slim_step", fake)


def _scale_first_weight(proto: onnx.ModelProto) -> None:
    init = proto.graph.initializer[0]
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.01, init.name))


def _bake_batch(proto: onnx.ModelProto) -> None:
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3


def _bake_batch_inside(proto: onnx.ModelProto) -> None:
    """Declared dims left symbolic, but a Reshape to a fixed batch of 3 in front of the output."""
    h = onnx.helper
    out = proto.graph.output[0]
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim[1:]]
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([3, *dims], np.int64), "baked"))
    for node in proto.graph.node:
        node.output[:] = [o + "_pre" if o == out.name else o for o in node.output]
    proto.graph.node.append(h.make_node("Reshape", [out.name + "_pre", "baked"], [out.name]))


@pytest.mark.parametrize(("change", "why"), [
    (_scale_first_weight, "changed the outputs"),
    (_bake_batch, "changed the graph inputs/outputs"),
    (_bake_batch_inside, "cannot run the graph"),
])
def test_a_bad_slim_result_is_rejected_and_the_graph_before_kept(tmp_path, monkeypatch, change, why):
    src = _lenet_onnx(tmp_path)
    _patched_slim(monkeypatch, change)
    dst = tmp_path / "out.onnx"
    res = optimize_onnx(src, dst, "basic")  # not an error: the simplifier is optional, ORT's step still runs
    slim = res.steps[0]
    assert (slim.outcome, slim.applied) == ("rejected", False)
    assert why in slim.reason and "kept the graph before it" in slim.reason
    assert res.steps[1].applied
    _same_outputs_at_two_batches(src, dst)


def test_slim_adding_contrib_ops_is_rejected(tmp_path, monkeypatch):
    import lrdeploy.exporters.optimize as opt

    src = _lenet_onnx(tmp_path)
    monkeypatch.setattr(opt, "_slim_step", lambda data: opt._ort_step(data, "ORT_ENABLE_EXTENDED"))
    res = optimize_onnx(src, tmp_path / "out.onnx", "basic")
    assert res.steps[0].outcome == "rejected" and "TensorRT" in res.steps[0].reason
    assert res.steps[0].op_delta.get("com.microsoft:FusedConv") == 2  # what it would have done
    assert res.portable


def test_missing_onnxslim_is_reported_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxslim", None)  # import onnxslim -> ImportError
    src = _lenet_onnx(tmp_path)
    dst = tmp_path / "out.onnx"
    res = optimize_onnx(src, dst, "basic")
    slim = res.steps[0]
    assert (slim.outcome, slim.applied) == ("unavailable", False)
    assert "not installed" in slim.reason and "pip install 'onnxslim>=" in slim.reason
    assert _steps_in_file(dst)[0]["reason"] == slim.reason  # recorded in the artefact too
    off = optimize_onnx(src, dst, "basic", use_onnxslim=False).steps[0]
    assert (off.outcome, off.reason) == ("disabled", "use_onnxslim=False")
