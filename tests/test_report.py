"""Compare report: table rendering (full and partial reports), atomic JSON, latency section from a bench."""

from __future__ import annotations

import io
import json
import math

import numpy as np
from rich.console import Console
from rich.table import Table

from lrdeploy.serving.bench import benchmark
from lrdeploy.serving.report import (
    SCHEMA,
    jsonable,
    latency_section,
    render_bench_table,
    render_compare_table,
    write_json,
)


def _text(table: Table) -> str:
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None).print(table)
    return buf.getvalue()


def _stats(median: float, batch: int) -> dict:
    return {"batch_size": batch, "runs": 50, "total_s": median * 50 / 1e3, "median_ms": median,
            "p90_ms": median * 1.1, "p99_ms": median * 1.3, "mean_ms": median, "min_ms": median * 0.9,
            "max_ms": median * 2, "std_ms": 0.01, "throughput": batch * 1e3 / median}


FULL = {
    "schema": SCHEMA,
    "reference": {"name": "lenet5-dense", "path": "a.onnx", "runtime": "ort-cpu", "params": 61706,
                  "flops": 845_000, "size_bytes": 247_000, "opset": 20},
    "candidate": {"name": "lenet5-svd", "path": "b.onnx", "runtime": "ort-cpu", "params": 20_000,
                  "flops": 400_000, "size_bytes": 90_000, "opset": 20},
    "parity": {"max_abs": 0.25, "mean_abs": 0.01, "rel_l2": 0.031, "cosine": 0.9995, "top1_agreement": 0.987,
               "nonfinite": {"reference": 0, "candidate": 0}},
    "accuracy": {"dataset": "mnist", "split": "test", "samples": 10000, "reference": 0.9912,
                 "candidate": 0.9871},
    "latency": {"1": {"reference": _stats(0.2, 1), "candidate": _stats(0.1, 1), "speedup": 2.0,
                      "round_ratios": [1.0, 2.0, 9.0]},
                "32": {"reference": _stats(1.5, 32), "candidate": _stats(1.6, 32), "speedup": 0.94}},
    "environment": {"cpu_model": "AMD EPYC", "available_cpus": 2, "threads": {"reference": 2, "candidate": 2},
                    "versions": {"onnxruntime": "1.32.0", "numpy": "2.4.6"}},
    "budget": {"max_accuracy_drop": 0.01, "min_speedup": 1.2,
               "checks": [{"name": "accuracy drop", "limit": 0.01, "value": 0.0041, "passed": True},
                          {"name": "speed-up b32", "limit": 1.2, "value": 0.94, "passed": False}],
               "passed": False},
}


def test_full_report_renders_every_part():
    out = _text(render_compare_table(FULL))
    for needle in ("lenet5-dense vs lenet5-svd", "61,706", "20,000", "0.32×", "99.12 %", "98.71 %",
                   "-0.41 pp",
                   "latency b1 median", "0.200 ms", "2.00× faster", "latency b32 median", "slower",
                   "throughput b32", "3.10e-02", "98.70 %", "budget: accuracy drop", "FAIL", "PASS",
                   "AMD EPYC", "threads 2", "onnxruntime 1.32.0", "opset", "KiB", "1.00 / 2.00 / 9.00",
                   "rounds disagree"):
        assert needle in out, needle
    assert out.index("latency b1") < out.index("latency b32")


def test_minimal_and_partial_reports_render():
    assert "lrdeploy compare" in _text(render_compare_table({"schema": SCHEMA}))
    partial = {
        "schema": SCHEMA,
        "candidate": {"name": "x"},
        "latency": {32: {"candidate": {"median_ms": 3.0}}, 1: {"reference": {"median_ms": None}}},
        "accuracy": {"candidate": 0.5},
        "parity": {"rel_l2": None, "failures": []},
        "budget": {"passed": True, "note": "no limits set"},
        "environment": {},
    }
    out = _text(render_compare_table(partial))
    assert "3.000 ms" in out and "50.00 %" in out and "within tolerance" in out and "PASS" in out
    assert out.index("latency b1") < out.index("latency b32")  # numeric order, int or str keys


def test_nonfinite_and_odd_values_do_not_crash():
    report = {"schema": SCHEMA,
              "parity": {"max_abs": math.nan, "rel_l2": math.inf, "cosine": 0.0, "top1_agreement": None,
                         "nonfinite": {"reference": 0, "candidate": 3}, "failures": ["rel_l2 inf > 1e-05"]},
              "latency": {"1": {"reference": {"median_ms": 0.0}, "candidate": {"median_ms": 1.0},
                                "speedup": 0.0}},
              "reference": {"params": "many", "extra": {"nested": 1}}}
    out = _text(render_compare_table(report))
    assert "non-finite outputs" in out and "FAIL" in out


def test_write_json_atomic_roundtrip(tmp_path):
    path = tmp_path / "sub" / "report.json"
    report = dict(FULL, parity=dict(FULL["parity"], rel_l2=math.inf, shape=(2, 3)),
                  extra={"arr": np.array([1.5, 2.5]), "n": np.int64(3), "f": np.float32(0.5), "p": tmp_path})
    assert write_json(path, report) == path
    loaded = json.loads(path.read_text())
    assert loaded["schema"] == SCHEMA
    assert loaded["parity"]["rel_l2"] is None  # non-finite -> null, still valid JSON
    assert loaded["parity"]["shape"] == [2, 3]
    assert loaded["extra"] == {"arr": [1.5, 2.5], "n": 3, "f": 0.5, "p": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left behind
    write_json(path, {"schema": SCHEMA})  # overwrite in place
    assert json.loads(path.read_text()) == {"schema": SCHEMA}


class _Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


class _Timed:
    def __init__(self, name: str, clock: _Clock, seconds: float) -> None:
        self.name, self.clock, self.seconds = name, clock, seconds

    def run(self, x):
        self.clock.t += self.seconds * len(x)
        return x

    def describe(self) -> dict:
        return {"backend": "fake", "threads": 1}


def test_latency_section_and_bench_table_from_a_bench_result(tmp_path):
    clock = _Clock()
    rts = {"dense": _Timed("dense", clock, 4 / 1024), "svd": _Timed("svd", clock, 1 / 1024),
           "half": _Timed("half", clock, 2 / 1024)}
    res = benchmark(rts, (3,), batch_sizes=(1, 8), warmup_s=0, min_runs=3, min_seconds=0, rounds=2,
                    progress=False, clock=clock, block_warmup_runs=0)
    section = latency_section(res)  # dense vs svd by default
    assert set(section) == {"1", "8"}
    assert section["1"]["speedup"] == 4.0 and section["8"]["round_ratios"] == [4.0, 4.0]
    assert section["8"]["candidate"]["median_ms"] == 8 * 1000 / 1024
    assert latency_section(res.to_dict(), reference="half", candidate="svd")["1"]["speedup"] == 2.0

    report = {"schema": SCHEMA, "latency": section, "environment": res.environment}
    out = _text(render_compare_table(report))
    assert "4.00× faster" in out and "4.00 / 4.00" in out and "consistent" in out
    bench_out = _text(render_bench_table(res))
    assert "reference" in bench_out and "4.00× faster" in bench_out and "2.00× faster" in bench_out
    write_json(tmp_path / "bench.json", res)  # a BenchResult serialises through to_dict()
    assert json.loads((tmp_path / "bench.json").read_text())["reference"] == "dense"
    assert jsonable(res)["batches"]["8"]["speedup"]["svd"] == 4.0


def test_lead_style_report_with_bench_dict_and_failures():
    """Tolerates a whole bench dict under "latency", "examples", "failures" and artefact-summary keys."""
    clock = _Clock()
    rts = {"dense": _Timed("dense", clock, 2 / 1024), "candidate": _Timed("candidate", clock, 1 / 1024)}
    res = benchmark(rts, (3,), batch_sizes=(1,), warmup_s=0, min_runs=3, min_seconds=0, rounds=2,
                    progress=False, clock=clock, block_warmup_runs=0)
    report = {
        "schema": SCHEMA,
        "reference": {"label": "dense", "kind": "bundle", "model": "lenet5", "params": 100,
                      "onnx_bytes": 4096, "source": "/very/long/path", "structure": {}},
        "candidate": {"label": "candidate", "kind": "onnx", "model": "lenet5", "params": 50,
                      "onnx_bytes": 2048},
        "accuracy": {"dataset": "mnist", "examples": 500, "reference": 0.99, "candidate": 0.97},
        "latency": res.to_dict(),
        "budget": {"max_accuracy_drop_points": 1.0, "failures": ["accuracy drop 2.00 points > 1"],
                   "passed": False},
    }
    out = _text(render_compare_table(report))
    for needle in ("lenet5 vs lenet5", "n=500", "4.0 KiB", "2.00× faster", "budget missed", "FAIL", "CPUs"):
        assert needle in out, needle
    assert "/very/long/path" not in out
