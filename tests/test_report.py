"""Compare report: table and Markdown rendering (full and partial reports), atomic JSON, report files, latency
section from a bench, several runs merged (`lrdeploy report`), translation task metrics."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table

from lrdeploy.errors import UserError
from lrdeploy.serving.bench import benchmark
from lrdeploy.serving.report import (
    SCHEMA,
    SUMMARY_SCHEMA,
    command_line,
    jsonable,
    latency_section,
    load_report,
    merge_reports,
    profile_totals,
    render_bench_table,
    render_compare_table,
    render_markdown,
    render_summary_markdown,
    render_summary_table,
    write_json,
    write_reports,
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

    def inputs(self) -> list:
        from lrdeploy.serving.runtimes import IOInfo

        return [IOInfo("x", np.dtype(np.float32), None)]

    def run(self, feeds):
        x = feeds["x"]
        self.clock.t += self.seconds * len(x)
        return {"y": x}

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


# --- Markdown, files on disk, several runs merged ----------------------------------------------------------


def _judged_report() -> dict:
    from lrdeploy.serving.parity import judge

    parity = judge({"max_abs": 0.25, "mean_abs": 0.01, "median_abs": 0.004, "p99_abs": 0.2, "rel_l2": 0.0123,
                    "max_row_rel": 0.05, "p99_rel": 0.3, "median_rel": 0.01, "max_rel": 2.0, "cosine": 0.9995,
                    "top1_agreement": 0.987, "top5_agreement": 0.996,
                    "nonfinite": {"reference": 0, "candidate": 0}}, "fp16")
    return dict(FULL, parity=parity, command="lrdeploy compare a.onnx b.onnx --precision fp16",
                created="2026-11-25T10:00:00+00:00", lrdeploy_version="0.1.0")


def test_markdown_holds_the_key_numbers():
    md = render_markdown(_judged_report(), plot="plot.png")
    assert md.startswith("# lrdeploy compare: lenet5-dense vs lenet5-svd\n")
    for needle in ("`lrdeploy compare a.onnx b.onnx --precision fp16`", "## Models", "## Task metrics",
                   "## Latency", "## Parity", "## Budget", "## Verdict", "61,706", "20,000", "99.12 %",
                   "98.71 %", "-0.41 pp", "0.200 ms", "2.00× faster", "1.06× slower", "1.23e-02",
                   "≤ 0.005 MISS", "5.00e-02", "≤ 0.01 MISS", "98.70 %", "99.60 %", "≥ 0.98 ok",
                   "parity max \\|Δ\\|", "**parity (fp16 preset)**: FAIL: rel_l2 0.0123 > 0.005 (fp16)",
                   "max_row_rel 0.05 > 0.01 (fp16)", "**budget**: FAIL", "![latency vs accuracy](plot.png)",
                   "AMD EPYC"):
        assert needle in md, needle
    # every table row has the same number of cells as its header
    for line in md.splitlines():
        if line.startswith("| ") and "\\|" not in line:
            assert line.count(" | ") == 3, line


def test_write_reports_writes_json_markdown_and_png(tmp_path):
    files = write_reports(_judged_report(), tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"report.json", "report.md", "plot.png"}
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files["plot"].stat().st_size > 10_000
    assert "![latency vs accuracy](plot.png)" in files["markdown"].read_text()
    assert load_report(tmp_path / "run")["parity"]["precision"] == "fp16"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        write_reports(FULL, tmp_path / "file")


def _run(name: str, speedup: float, acc: float, median: float) -> dict:
    report = json.loads(json.dumps(FULL))
    report["reference"] = {"name": "dense", "source": "runs/dense.onnx", "params": 61706}
    report["candidate"] = {"name": name, "source": f"runs/{name}.onnx", "params": 20000}
    report["accuracy"]["candidate"] = acc
    report["latency"]["1"]["speedup"] = speedup
    report["latency"]["1"]["candidate"]["median_ms"] = median
    report["latency"]["1"]["reference"]["median_ms"] = median * speedup
    return report


def test_merge_reports_lists_each_model_once():
    a, b = _run("svd", 2.0, 0.98, 0.1), _run("cuttlefish", 1.5, 0.99, 0.2)
    summary = merge_reports([a, b], ["runs/a", "runs/b"])
    assert summary["schema"] == SUMMARY_SCHEMA
    names = [m["name"] for m in summary["models"]]
    assert names == ["dense", "svd", "cuttlefish"]  # the shared reference once, first
    dense, svd, cut = summary["models"]
    assert dense["role"] == "reference" and dense["runs"] == [0, 1]
    assert dense["latency"]["1"]["median_ms"] == pytest.approx((0.2 + 0.3) / 2)  # median of its two runs
    assert dense["speedup"]["1"] == 1.0
    assert svd["speedup"]["1"] == 2.0 and cut["speedup"]["1"] == 1.5 and cut["vs"] == "dense"
    assert cut["accuracy"] == 0.99 and svd["budget_passed"] is False
    assert summary["dataset"] == "mnist test, n=10,000"
    # same file name in two run directories: told apart by the directory
    c, d = _run("model", 1.1, 0.9, 0.1), _run("model", 1.2, 0.9, 0.1)
    d["candidate"]["source"] = "other/model.onnx"
    names = [m["name"] for m in merge_reports([c, d])["models"]]
    assert names == ["dense", "model (runs)", "model (other)"]


def test_summary_table_and_markdown():
    summary = merge_reports([_run("svd", 2.0, 0.98, 0.1), _run("cuttlefish", 1.5, 0.99, 0.2)])
    out = _text(render_summary_table(summary))
    for needle in ("svd", "cuttlefish", "reference", "2.00× faster", "1.50× faster", "98.00 %", "99.00 %",
                   "b32 median"):
        assert needle in out, needle
    md = render_summary_markdown(summary, plot="plot.png")
    assert "| svd | candidate | 20,000 | 98.00 % | 0.100 ms |" in md
    assert "![latency vs accuracy](plot.png)" in md


def test_report_command_merges_two_runs(tmp_path):
    from typer.testing import CliRunner

    from lrdeploy.cli import app

    for name, speedup in (("svd", 2.0), ("cuttlefish", 1.5)):
        write_reports(_run(name, speedup, 0.98, 0.1), tmp_path / name, plot=False)
    args = ["report", str(tmp_path / "svd"), str(tmp_path / "cuttlefish" / "report.json"),
            "--out", str(tmp_path / "merged")]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "lrdeploy report" in r.output and "svd" in r.output
    merged = tmp_path / "merged"
    assert {p.name for p in merged.iterdir()} == {"summary.json", "report.md", "plot.png"}
    summary = json.loads((merged / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["dense", "svd", "cuttlefish"]
    assert "| cuttlefish | candidate |" in (merged / "report.md").read_text()
    r = CliRunner().invoke(app, ["report", str(tmp_path / "nothing-here")])
    assert r.exit_code == 2


def test_task_section_and_notes_render():
    report = {"schema": SCHEMA,
              "task": {"task": "translation", "dataset": "multi30k", "split": "test", "samples": 1000,
                       "reference": {"bleu": 35.2, "perplexity": 5.1, "token_accuracy": 0.61, "loss": 1.63},
                       "candidate": {"bleu": 34.0, "perplexity": 5.4, "token_accuracy": 0.6, "loss": 1.69}},
              "notes": ["latency not measured"]}
    out = _text(render_compare_table(report))
    for needle in ("BLEU (multi30k test, n=1,000)", "35.20", "34.00", "-1.2", "perplexity", "5.400",
                   "+0.3", "61.00 %"):
        assert needle in out, needle
    assert "- latency not measured" in render_markdown(report)


def test_any_task_renders_from_its_metric_descriptors_and_merges():
    """A task the renderer has never heard of: its section says how to show each metric."""
    section = {"task": "embedding", "dataset": "multi30k-en", "split": "test", "samples": 64,
               "metrics": [{"key": "cosine_mean", "label": "mean cosine", "higher_is_better": True,
                            "points": 100.0, "percent": True},
                           {"key": "retrieval_top10", "label": "top-10 retrieval agreement",
                            "higher_is_better": True, "points": 100.0, "percent": True}],
               "headline": {"key": "cosine_mean", "label": "mean cosine", "reference": 1.0,
                            "candidate": 0.962, "delta": -0.038},
               "reference": {"cosine_mean": 1.0, "retrieval_top10": 1.0, "seconds": 2.5},
               "candidate": {"cosine_mean": 0.962, "retrieval_top10": 0.9, "seconds": 1.25}}
    report = {"schema": SCHEMA, "reference": {"name": "dense", "source": "d.onnx"},
              "candidate": {"name": "asvd", "source": "c.onnx"}, "task": section,
              "latency": {"1": {"reference": _stats(2.0, 1), "candidate": _stats(1.0, 1), "speedup": 2.0}}}
    out = _text(render_compare_table(report))
    for needle in ("mean cosine (multi30k-en test, n=64)", "100.00 %", "96.20 %", "-3.80 pp",
                   "top-10 retrieval agreement", "-10.00 pp", "seconds", "-1.25"):
        assert needle in out, needle
    summary = merge_reports([report])
    asvd = summary["models"][1]
    assert asvd["headline"] == {"key": "cosine_mean", "label": "mean cosine", "value": 0.962}
    assert asvd["accuracy"] is None and summary["dataset"] == "multi30k-en test, n=64"
    md = render_summary_markdown(summary)
    assert "| model | role | params | mean cosine | top-10 retrieval agreement |" in md
    assert "| asvd | candidate | — | 96.20 % | 90.00 % |" in md


def test_profile_is_normalised_from_several_shapes():
    assert profile_totals({"dense": {"Conv": 1.0, "Gemm": 0.5}}) == {"dense": {"Conv": 1.0, "Gemm": 0.5}}
    assert profile_totals({"runtimes": {"dense": {"by_op_type": {"Conv": {"total_us": 1500}}}}}) == \
        {"dense": {"Conv": 1.5}}
    records = [{"op_type": "Conv", "total_ms": 1.0}, {"op_type": "Conv", "total_ms": 0.5},
               {"name": "Relu", "dur": 250}]
    assert profile_totals({"candidate": records}) == {"candidate": {"Conv": 1.5, "Relu": 0.25}}
    assert profile_totals(None) == {} and profile_totals({"x": "junk"}) == {}


def test_command_line_reads_like_what_the_user_typed():
    assert command_line(["/x/lrdeploy/__main__.py", "compare", "a b.onnx"]) == "lrdeploy compare 'a b.onnx'"
    assert command_line(["/usr/bin/lrdeploy", "report", "r"]) == "lrdeploy report r"


# --- translation models: task metrics in the report --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_translation(data_dir):
    """Two tiny (untrained) Transformers on real Multi30k ids: a reference and a copy with its output
    projection scaled by 1.01, plus 24 test pairs cut to 16 tokens (greedy decoding stays cheap)."""
    import copy as _copy

    import torch

    from lrdeploy.data import load_translation
    from lrdeploy.models import create_model

    train = load_translation("multi30k", "train", data_dir=data_dir, limit=200, max_len=16)
    test = load_translation("multi30k", "test", data_dir=data_dir, limit=24, max_len=16,
                            tokenizers=train.tokenizers)
    torch.manual_seed(0)
    args = {"src_vocab": train.src_tokenizer.vocab_size, "tgt_vocab": train.tgt_tokenizer.vocab_size,
            "d_model": 32, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
            "dim_feedforward": 64, "max_len": 16, "dropout": 0.0}
    ref = create_model("transformer", **args).eval()
    cand = _copy.deepcopy(ref)
    with torch.no_grad():
        cand.generator.weight.mul_(1.01)
    return {"train": train, "test": test, "args": args, "ref": ref, "cand": cand}


@pytest.mark.slow  # 35 s; translation compare is covered by tests/test_translation_cli.py
def test_compare_two_translation_bundles(tiny_translation, data_dir, tmp_path, monkeypatch):
    """`compare` on translation bundles: task section, judged token parity, BLEU budget, latency."""
    import lrdeploy.flops
    from lrdeploy.bundle import save_bundle
    from lrdeploy.comparison import compare_artifacts

    # FLOP counting runs a one-input forward; the Transformer takes two (a nominal count is all we need)
    monkeypatch.setattr(lrdeploy.flops, "count_flops", lambda model, shape: 0)
    t = tiny_translation
    dataset = {"name": "multi30k", "task": "translation", "preprocess": t["test"].preprocess,
               "tokenizers": t["train"].tokenizers_dict()}
    for name in ("ref", "cand"):
        save_bundle(tmp_path / name, t[name], model_name="transformer", model_args=t["args"],
                    method={"name": "dense"}, dataset=dataset, metrics={}, input_shape=(16,))
    report = compare_artifacts(tmp_path / "ref", tmp_path / "cand", data_dir=data_dir, limit_test=24,
                               precision="fp16", max_accuracy_drop=100.0, out_dir=tmp_path / "run",
                               progress=False)
    assert report["task"]["samples"] == 24 and set(report["latency"]) == {"1", "32"}
    assert report["parity"]["precision"] == "fp16" and report["parity"]["passed"] is False
    assert report["budget"]["checks"][0]["name"] == "BLEU drop (points)"
    assert report["verdict"]["passed"] is False
    assert any("latency" in n for n in report["notes"])
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Task metrics" in md and "perplexity (multi30k test, n=24)" in md and "BLEU" in md


def test_plot_axis_follows_the_headline_metric_of_any_task():
    from lrdeploy.serving.plot import points_of, score_metric

    section = {"task": "embedding", "dataset": "x", "metrics": [
        {"key": "cosine_mean", "label": "mean cosine", "higher_is_better": True, "points": 100.0,
         "percent": True}], "headline": {"key": "cosine_mean", "label": "mean cosine"},
        "reference": {"cosine_mean": 1.0}, "candidate": {"cosine_mean": 0.95}}
    report = {"schema": SCHEMA, "reference": {"name": "dense", "source": "d.onnx"},
              "candidate": {"name": "lr", "source": "c.onnx"}, "task": section,
              "latency": {"1": {"reference": _stats(2.0, 1), "candidate": _stats(1.0, 1), "speedup": 2.0}}}
    summary = merge_reports([report])
    assert score_metric(summary) == ("cosine_mean", "mean cosine (%)")
    assert [(p.model, p.score) for p in points_of(summary)] == [("d", 100.0), ("lr", 95.0)]  # d.onnx
