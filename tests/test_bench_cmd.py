"""`lrdeploy bench` end to end on tiny ONNX files (CPU), and the independent check the issue asks for.

The only timing-dependent assertion is ``test_speedup_agrees_with_a_plain_onnxruntime_loop``: the speed-up
`lrdeploy bench` reports for two clearly different models must agree within 10 % with a timing loop written
here, directly on ONNX Runtime. Everything else checks structure, exit codes and messages.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from lrdeploy.cli import app

runner = CliRunner()
FAST = ["--threads", "1", "--seconds", "0", "--min-runs", "3", "--warmup", "0", "--rounds", "3",
        "--time-limit", "0.5"]


def invoke(*args: object):
    return runner.invoke(app, ["bench", *map(str, args)], catch_exceptions=False)


def mlp_onnx(path: Path, width: int, layers: int, rank: int | None = None) -> Path:
    """``layers`` × (Linear width→width [as U·V of rank ``rank``] + bias + ReLU), as a plain ONNX graph."""
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        if rank is None:
            w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"W{i}"))
            nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"], name=f"fc{i}"))
        else:
            u = (rng.standard_normal((width, rank)) / np.sqrt(width)).astype(np.float32)
            v = (rng.standard_normal((rank, width)) / np.sqrt(rank)).astype(np.float32)
            inits += [numpy_helper.from_array(u, f"U{i}"), numpy_helper.from_array(v, f"V{i}")]
            nodes.append(helper.make_node("MatMul", [cur, f"U{i}"], [f"h{i}"], name=f"fc{i}_u"))
            nodes.append(helper.make_node("MatMul", [f"h{i}", f"V{i}"], [f"m{i}"], name=f"fc{i}_v"))
        inits.append(numpy_helper.from_array(np.zeros(width, np.float32), f"B{i}"))
        nodes.append(helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"], name=f"bias{i}"))
        nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"))
        cur = f"r{i}"
    graph = helper.make_graph(
        nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["batch", width])], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    return (mlp_onnx(tmp_path / "dense.onnx", 32, 2), mlp_onnx(tmp_path / "lowrank.onnx", 32, 2, rank=4))


# --------------------------------------------------------------------------------------------- end to end
def test_bench_two_models_writes_json_and_passes_gates(pair, tmp_path):
    out = tmp_path / "bench.json"
    r = invoke(*pair, "--batch", "1,4", *FAST, "--gate", "speedup>=0.01@p90,batch=4",
               "--gate", "latency<=10s@p99", "--json", out)
    assert r.exit_code == 0, r.output
    assert "lrdeploy bench (reference: dense)" in r.stdout and "PASS speedup>=0.01@p90,batch=4" in r.stdout
    report = json.loads(out.read_text())
    assert report["schema"] == "lrdeploy.bench/1" and report["reference"] == "dense"
    assert report["runtimes"] == ["dense", "lowrank"] and report["batch_sizes"] == [1, 4]
    assert report["models"]["dense"]["kind"] == "onnx" and report["models"]["lowrank"]["onnx_bytes"] > 0
    settings = report["settings"]
    assert settings["runtime"] == "ort-cpu" and settings["threads_requested"] == 1
    assert settings["stability"]["tolerance"] == 0.02 and settings["stability"]["time_limit_s"] == 0.5
    assert settings["include_transfer"]["requested"] is False
    for key in ("1", "4"):
        batch = report["batches"][key]
        assert batch["rounds"] >= 3 and batch["stop_reason"] in ("stable", "time_limit")
        assert set(batch["stability"]) == {"dense", "lowrank"}
        assert len(batch["stability"]["dense"]["window_medians_ms"]) == batch["rounds"]
        assert set(batch["speedup_at"]) == {"median", "p90", "p99"}
        assert batch["memory"]["lowrank"]["peak_rss_bytes"] > 0
        for stats in batch["stats"].values():
            assert {"median_ms", "p90_ms", "p99_ms", "throughput"} <= set(stats)
    env = report["environment"]
    assert env["threads"] == {"dense": 1, "lowrank": 1} and "onnxruntime" in env["versions"]
    assert "gpu" in env and env["cpu_model"]
    assert report["gates_passed"] is True and [g["passed"] for g in report["gates"]] == [True, True]
    assert "profile" not in report and "durations_ms" not in report["blocks"][0]


def test_missed_gate_exits_1_after_writing_the_report(pair, tmp_path):
    out = tmp_path / "bench.json"
    r = invoke(*pair, "--batch", "2", *FAST, "--gate", "speedup>=1000", "--gate", "latency<=10s",
               "--json", out)
    assert r.exit_code == 1
    assert "FAIL speedup>=1000: lowrank b2 median speedup" in r.stdout and "(needs >= 1e+03×)" in r.stdout
    assert "PASS latency<=10s" in r.stdout and "gates missed: 1 of 2" in r.stderr
    report = json.loads(out.read_text())
    assert report["gates_passed"] is False and report["gates"][0]["reason"].startswith("FAIL")


@pytest.mark.parametrize("gate, fragment", [
    ("speedup>>2", "comparator"),
    ("speedup>=2@p95", "unknown qualifier"),
    ("speedup>=2@batch=8", "batch 8 is not measured"),
    ("speedup>=2@model=other", "no model named 'other'"),
])
def test_bad_gates_exit_2_before_timing(pair, tmp_path, gate, fragment):
    out = tmp_path / "bench.json"
    r = invoke(*pair, "--batch", "1,32", *FAST, "--gate", gate, "--json", out)
    assert r.exit_code == 2
    assert fragment in r.stderr and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_single_model_profile_and_samples(pair, tmp_path):
    out = tmp_path / "one.json"
    r = invoke(pair[1], "--batch", "2,8", *FAST, "--profile", "--profile-runs", "3", "--samples",
               "--names", "lr", "--gate", "latency<=10s@batch=8", "--json", out)
    assert r.exit_code == 0, r.output
    assert "where the time goes" in r.stdout and "MatMul" in r.stdout
    report = json.loads(out.read_text())
    assert report["runtimes"] == ["lr"] and report["reference"] == "lr"
    prof = report["profile"]["lr"]
    assert set(prof) == {"2", "8"} and prof["8"]["runs"] == 3 and prof["8"]["batch_size"] == 8
    assert prof["2"]["by_op_type"] and prof["2"]["by_node"][0]["calls"] == 3
    assert report["blocks"][0]["durations_ms"]


def test_include_transfer_is_recorded_for_host_runtimes(pair, tmp_path):
    out = tmp_path / "t.json"
    r = invoke(*pair, "--batch", "1", *FAST, "--include-transfer", "--json", out)
    assert r.exit_code == 0, r.output
    transfer = json.loads(out.read_text())["settings"]["include_transfer"]
    assert transfer["requested"] is True
    assert transfer["by_runtime"]["dense"].startswith("n/a")  # ort-cpu has no host-device copies


def test_user_errors(pair, tmp_path):
    dense, lowrank = pair
    cases = [
        ((tmp_path / "missing.onnx",), "does not exist"),
        ((tmp_path,), "manifest"),  # a directory that is not a bundle
        ((dense, lowrank, "--names", "a"), "one non-empty name per model"),
        ((dense, lowrank, "--names", "a,a"), "repeats a name"),
        ((dense, "--batch", "1,x"), "comma-separated list of integers"),
        ((dense, "--batch", "4,4"), "twice"),
        ((dense, "--runtime", "torch-cpu"), "does not run .onnx files"),
        ((dense, "--runtime", "abacus"), "unknown runtime"),
        ((dense, "--json", tmp_path), "is a directory"),
        ((dense, "--tolerance", "0.02", "--rounds", "3", "--max-rounds", "2"), "max_rounds"),
    ]
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases.append(((text,), "neither an .onnx file nor a bundle"))
    for args, fragment in cases:
        r = invoke(*args, *FAST)
        assert r.exit_code == 2, (args, r.output)
        assert fragment in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.output


def test_input_shapes(tmp_path):
    dynamic = mlp_onnx(tmp_path / "dyn.onnx", 8, 1)
    other = mlp_onnx(tmp_path / "wide.onnx", 16, 1)
    r = invoke(dynamic, other, "--batch", "1", *FAST)
    assert r.exit_code == 2 and "take different inputs" in r.stderr
    g = onnx.load(str(dynamic))
    g.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    free = tmp_path / "free.onnx"
    onnx.save(g, free)
    r = invoke(free, "--batch", "1", *FAST)
    assert r.exit_code == 2 and "--input-shape" in r.stderr
    out = tmp_path / "free.json"
    r = invoke(free, "--batch", "1", *FAST, "--input-shape", "8", "--json", out)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["settings"]["input_shape"] == [8]


def test_a_bundle_directory_is_exported_on_the_fly(tmp_path):
    from lrdeploy import workflows

    bundle = tmp_path / "lenet"
    workflows.init_bundle(model_name="lenet5", num_classes=None, checkpoint=None, out=bundle)
    out = tmp_path / "b.json"
    r = invoke(bundle, "--batch", "2", *FAST, "--json", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["models"]["lenet"]["kind"] == "bundle" and report["settings"]["input_shape"] == [1, 28, 28]


# -------------------------------------------------------------------------------------- independent check
# One model alone in a fresh interpreter: one plain ONNX Runtime session, warmed up, then timed; prints
# the median seconds per call. No lrdeploy code. One intra-op thread, as the command below is run: the
# session then has no worker pool at all, so nothing spins between calls.
_ALONE = """
import statistics, sys, time
import numpy as np, onnxruntime as ort
path, batch, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
x = {"x": np.random.default_rng(1).standard_normal((batch, 1024)).astype(np.float32)}
end = time.perf_counter() + 0.2
while time.perf_counter() < end:
    session.run(None, x)
times = []
end = time.perf_counter() + seconds
while time.perf_counter() < end or len(times) < 10:
    t0 = time.perf_counter()
    session.run(None, x)
    times.append(time.perf_counter() - t0)
print(statistics.median(times))
"""


def _alone_s(model: Path, batch: int, seconds: float = 0.4) -> float:
    out = subprocess.run([sys.executable, "-c", _ALONE, str(model), str(batch), str(seconds)],
                         capture_output=True, text=True, timeout=120, check=True)
    return float(out.stdout)


def _separate_process_ratios(dense: Path, lowrank: Path, batch: int, pairs: int) -> list[float]:
    """Per pair: dense median / low-rank median, each model timed alone in its own process (D L, L D, …)."""
    ratios = []
    for k in range(pairs):
        order = (dense, lowrank) if k % 2 == 0 else (lowrank, dense)
        t = {m: _alone_s(m, batch) for m in order}
        ratios.append(t[dense] / t[lowrank])
    return ratios


@pytest.mark.slow  # a timed assertion, 25-50 s: run with `pytest -m slow`; kept out of CI (benchmarks.md)
def test_speedup_agrees_with_a_plain_onnxruntime_loop(tmp_path):
    """The issue's independent check: `lrdeploy bench` vs each model timed alone in its own process.

    Linear 1024→1024 ×4 against rank-64 factors (8× fewer FLOPs): about 10× at batch 64. Three reference
    pairs run before the command and three after, so drift of the machine hits both sides; the reference is
    the median of the six pair ratios. Batch 64, not 8: at batch 8 the dense model streams 16 MB of weights
    per call and its time follows the neighbours' use of the shared L3 (reference pairs 8-25 on this host,
    command / reference 0.82-1.19); at batch 64 both models are compute-bound and command / reference stayed
    within 0.91-1.04 (docs/benchmarks.md, "The independent bench check"), so 20 % has twice that margin and
    still rejects every real error (models swapped: 0.1; one model timed twice: 1; set-up counted: far
    below 10). One retry: the test fails only if two independent attempts both miss.
    """
    dense = mlp_onnx(tmp_path / "dense.onnx", 1024, 4)
    lowrank = mlp_onnx(tmp_path / "lowrank.onnx", 1024, 4, rank=64)
    batch, attempts = 64, []
    for attempt in range(2):
        out = tmp_path / f"check{attempt}.json"  # a new file: bench refuses to replace one without --force
        ratios = _separate_process_ratios(dense, lowrank, batch, pairs=3)
        r = invoke(dense, lowrank, "--batch", batch, "--threads", "1", "--seconds", "0.25", "--warmup", "0.1",
                   "--rounds", "5", "--time-limit", "3", "--json", out)
        assert r.exit_code == 0, r.output
        reported = json.loads(out.read_text())["batches"][str(batch)]["speedup"]["lowrank"]
        ratios += _separate_process_ratios(dense, lowrank, batch, pairs=3)
        reference = statistics.median(ratios)
        attempts.append({"reported": round(reported, 2), "reference": round(reference, 2),
                         "pairs": [round(x, 2) for x in ratios]})
        if reported == pytest.approx(reference, rel=0.20):
            assert reference > 3 and reported > 3  # and the two models really differ
            return
    pytest.fail(f"lrdeploy bench disagrees with the separate-process reference by more than 20 %: {attempts}")
