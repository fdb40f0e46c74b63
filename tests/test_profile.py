"""Per-layer breakdown: the trace parser on a synthetic ORT trace (exact), a real profiler run (structure)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrdeploy.errors import UserError
from lrdeploy.serving.profile import parse_ort_profile, profile_onnx, top_ops


def _node(name: str, op: str, ts: float, dur: float, peak: int | None = None) -> dict:
    args = {"op_name": op, "provider": "CPUExecutionProvider"}
    if peak is not None:
        args["mem_in_use_peak"] = str(peak)
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "ph": "X", "args": args}


def _run(ts: float, dur: float) -> dict:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur, "ph": "X", "args": {}}


def _trace() -> list[dict]:
    """Three runs of fc1 (MatMul) → act (Relu) → fc2 (MatMul); run 0 is a slow warm-up."""
    events = [{"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 500, "args": {}}]
    starts = [1000, 2000, 3000]
    for k, t in enumerate(starts):
        scale = 10 if k == 0 else 1
        events += [
            _node("fc1", "MatMul", t + 1, 30 * scale, peak=4096),
            _node("act", "Relu", t + 40, 5 * scale),
            # ORT also writes fence events; only *_kernel_time counts
            {"cat": "Node", "name": "fc2_fence_before", "ts": t + 50, "dur": 1,
             "args": {"op_name": "MatMul"}},
            _node("fc2", "MatMul", t + 60, 15 * scale, peak=8192 if k == 2 else 1024),
            {"cat": "Session", "name": "SequentialExecutor::Execute", "ts": t, "dur": 90 * scale, "args": {}},
        ]
        events.append(_run(t - 1, 100 * scale if k == 0 else 100))
    return events


def test_parse_aggregates_per_node_and_op_type_after_warm_up():
    prof = parse_ort_profile(_trace(), skip_runs=1)
    assert prof["runs"] == 2 and prof["skipped_runs"] == 1
    assert prof["kernel_total_us"] == pytest.approx(2 * (30 + 5 + 15))
    assert prof["run_us"] == {"median": 100.0, "mean": 100.0, "total": 200.0}
    assert prof["kernel_share_of_run"] == pytest.approx(100 / 200)
    ops = {r["op_type"]: r for r in prof["by_op_type"]}
    assert ops["MatMul"]["total_us"] == 90 and ops["MatMul"]["calls"] == 4 and ops["MatMul"]["nodes"] == 2
    assert ops["MatMul"]["share"] == pytest.approx(0.9) and ops["MatMul"]["mean_us"] == pytest.approx(22.5)
    assert ops["Relu"]["share"] == pytest.approx(0.1)
    assert [r["node"] for r in prof["by_node"]] == ["fc1", "fc2", "act"]  # largest first
    fc1 = prof["by_node"][0]
    assert (fc1["op_type"], fc1["total_us"], fc1["calls"], fc1["mean_us"]) == ("MatMul", 60, 2, 30)
    assert fc1["median_us"] == 30
    # the warm-up run (10× slower) is outside the median too; with it, the median moves to the middle call
    assert parse_ort_profile(_trace(), skip_runs=0)["by_node"][0]["median_us"] == 30
    assert fc1["provider"] == "CPUExecutionProvider" and fc1["share"] == pytest.approx(0.6)
    assert prof["arena_peak_bytes"] == 8192
    assert top_ops(prof, 1) == [("MatMul", pytest.approx(0.9))]


def test_parse_without_skipping_and_without_run_events():
    all_runs = parse_ort_profile(_trace())
    assert all_runs["runs"] == 3 and all_runs["kernel_total_us"] == pytest.approx(50 * 10 + 50 * 2)
    nodes_only = [e for e in _trace() if e["cat"] == "Node"]
    bare = parse_ort_profile({"traceEvents": nodes_only}, skip_runs=1)  # wrapped form; nothing to skip by
    assert bare["runs"] is None and bare["run_us"] is None and bare["kernel_share_of_run"] is None
    assert bare["kernel_total_us"] == all_runs["kernel_total_us"]
    empty = parse_ort_profile([])
    assert empty["by_op_type"] == [] and empty["kernel_total_us"] == 0
    with pytest.raises(ValueError):
        parse_ort_profile("not a trace")


@pytest.fixture
def tiny_mlp(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["a"], name="act"),
         helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2")],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_profile_a_real_session(tiny_mlp):
    prof = profile_onnx(tiny_mlp, (8,), 4, threads=1, runs=6, warmup_runs=2)
    assert prof["available"] and prof["backend"] == "onnxruntime"
    assert prof["providers"] == ["CPUExecutionProvider"] and prof["threads"] == 1
    assert prof["runs"] == 6 and prof["skipped_runs"] == 2 and prof["batch_size"] == 4
    ops = {r["op_type"] for r in prof["by_op_type"]}
    assert ops and ops <= {"MatMul", "Relu", "FusedMatMul", "Gemm", "FusedGemm"}  # ORT may fuse
    assert sum(r["share"] for r in prof["by_op_type"]) == pytest.approx(1.0)
    assert all(r["calls"] == 6 for r in prof["by_node"])  # one call per node per timed run
    assert "note" not in prof


def test_profile_errors(tiny_mlp, tmp_path):
    with pytest.raises(UserError):
        profile_onnx(tiny_mlp, (8,), 1, runs=0)
    with pytest.raises(UserError):
        profile_onnx(tmp_path / "missing.onnx", (8,), 1)
