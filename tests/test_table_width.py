"""Every table lrdeploy prints fits an 80-column terminal: no line wider than 80, no cell elided ("…"), no
table cropped at the right edge. Each table is built from the report its command makes (or the same
structure) and rendered at 80 columns; `lrdeploy bench` is also run as a command with COLUMNS=80."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import pytest
from rich.cells import cell_len
from rich.console import Console

from .test_bench_cmd import mlp_onnx

WIDTH = 80
_LEFT, _RIGHT = "┏┃┡│├└┗", "┓┃┩│┤┘┛"


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    """The torch work here is tiny; on a shared 2-core box two OpenMP threads only spin."""
    import torch

    torch.set_num_threads(1)


def assert_fits(text: str, width: int = WIDTH, tables_only: bool = False) -> None:
    """No "…", no line over ``width`` cells (with ``tables_only``, no table line: a command's other output,
    e.g. a one-line result meant for scripts, may be longer), every table row with its right border."""
    assert "…" not in text, text
    for line in text.splitlines():
        table = line[:1] in _LEFT
        if table or not tables_only:
            assert cell_len(line) <= width, f"{cell_len(line)} > {width}: {line}\n{text}"
        if table:
            assert line.rstrip()[-1:] in _RIGHT, f"cropped: {line}\n{text}"


def rendered(renderable: object, width: int = WIDTH) -> str:
    """``renderable`` on a ``width``-column console, not cropped (an overflow shows as a long line)."""
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable, crop=False)
    return console.export_text()


# ---------------------------------------------------------------------------------------- the real command
def test_bench_command_fits_80_columns(tmp_path):
    """Three models, batch sizes 1, 8 and 32, with the profile: every table `lrdeploy bench` prints."""
    models = [mlp_onnx(tmp_path / "dense.onnx", 32, 2), mlp_onnx(tmp_path / "lowrank.onnx", 32, 2, rank=4),
              mlp_onnx(tmp_path / "lowrank_r8.onnx", 32, 2, rank=8)]
    env = {**os.environ, "COLUMNS": str(WIDTH)}
    env.pop("LINES", None)
    fast = ["--threads", "1", "--seconds", "0", "--min-runs", "3", "--warmup", "0", "--rounds", "3",
            "--time-limit", "0.2", "--profile", "--profile-runs", "3"]
    proc = subprocess.run(
        [sys.executable, "-m", "lrdeploy", "bench", *map(str, models), "--batch", "1,8,32", *fast],
        capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "lrdeploy bench (reference: dense)" in out and "lowrank_r8" in out and "where the time goes" in out
    assert_fits(out, tables_only=True)


# ------------------------------------------------------------------------------------------- bench report
def _bench_result(names: list[str], batches: tuple[int, ...], windows: int = 3) -> dict:
    """A real ``benchmark`` on runtimes that advance a fake clock (test_report's): 0.4 ms a sample, /2, /3."""
    from lrdeploy.serving.bench import benchmark

    from .test_report import _Clock, _Timed

    clock = _Clock()
    runtimes = {name: _Timed(name, clock, 0.4e-3 / (i + 1)) for i, name in enumerate(names)}
    res = benchmark(runtimes, (3,), batch_sizes=batches, warmup_s=0, min_runs=3, min_seconds=0, rounds=3,
                    progress=False, clock=clock, block_warmup_runs=0, stability_tol=0.02,
                    stability_windows=windows, time_limit_s=1.0, max_rounds=6)
    return res.to_dict()


def _profile(batches: tuple[int, ...]) -> dict:
    """``profile_models``'s shape: per batch the run time, the kernel share and the op types by cost."""
    ops = [("FusedConv", 0.412), ("QLinearMatMul", 0.207), ("BatchNormalization", 0.151),
           ("GlobalAveragePool", 0.098), ("MatMul", 0.061)]
    return {str(b): {"run_us": {"median": 812.0 * b}, "kernel_share_of_run": 0.93,
                     "by_op_type": [{"op_type": op, "share": s, "total_us": s * 1e3} for op, s in ops]}
            for b in batches}


def test_bench_report_with_long_names_four_batches_and_five_windows_fits():
    from lrdeploy.bench_cmd import print_report
    from lrdeploy.serving.report import render_bench_table

    names = ["resnet18-w16-dense", "resnet18-w16-cuttlefish", "resnet18-w16-svd-r0.25"]
    batches = (1, 8, 32, 128)
    report = _bench_result(names, batches, windows=5)
    report["profile"] = {name: _profile(batches) for name in names}
    out, err = (Console(width=WIDTH, record=True, file=io.StringIO()) for _ in range(2))
    print_report(report, out, err)
    text = out.export_text()
    assert_fits(text)
    for needle in ("samples/s", "speed-up", "round", "spread", "runs", "settled", "last 5", "rounds", "p99 ×",
                   "peak RSS", "top 5 op types", "BatchNormalization 15.1 %", "resnet18-w16-svd-r0.25"):
        assert needle in text, needle
    wide = rendered(render_bench_table(report), width=160)  # wide enough: one table, headers on one line
    assert_fits(wide, 160)
    assert "continued" not in wide and "round spread" in wide and "median ms" in wide


# ------------------------------------------------------------------------------------ compare, report, check
def test_compare_table_fits_with_long_model_names():
    from lrdeploy.serving.report import render_compare_table

    from .test_report import _judged_report

    report = copy.deepcopy(_judged_report())  # every section, a failed fp16 parity with its failure list
    report["reference"]["name"] = "resnet18-w16-dense-baseline"
    report["candidate"]["name"] = "resnet18-w16-cuttlefish-folded"
    out = rendered(render_compare_table(report))
    assert_fits(out)
    assert "2.00× faster" in out and "≤ 0.005 MISS" in out


def test_summary_table_of_three_runs_at_four_batch_sizes_fits():
    """`lrdeploy report` over three runs measured at batch 1, 8, 32 and 128: 15 columns when wide."""
    from lrdeploy.serving.report import merge_reports, render_summary_table

    from .test_report import _run, _stats

    runs = []
    for name, speedup, acc in (("resnet18-w16-svd", 2.1, 0.9312), ("resnet18-w16-cuttlefish", 1.7, 0.9405),
                               ("resnet18-w16-asvd", 1.9, 0.9377)):
        run = _run(name, speedup, acc, 0.1)
        for b in (8, 128):
            ref, cand = _stats(0.2 * b, b), _stats(0.2 * b / speedup, b)
            run["latency"][str(b)] = {"reference": ref, "candidate": cand, "speedup": speedup}
        runs.append(run)
    summary = merge_reports(runs)
    out = rendered(render_summary_table(summary))
    assert_fits(out)
    for needle in ("resnet18-w16-cuttlefish", "b128", "2.10× faster", "94.05 %", "budget", "parity"):
        assert needle in out, needle
    wide = rendered(render_summary_table(summary), width=220)
    assert "continued" not in wide and "b128" in wide


def test_check_table_fits(tmp_path):
    """`lrdeploy check` failing on a seq2seq encoder: its output name (Hugging Face's) is in every failure."""
    from lrdeploy.serving.golden import check_golden, load_golden, save_golden
    from lrdeploy.serving.report import render_check_table

    from .test_golden import _arrays, _Linear

    x, w, y, _ = _arrays()
    name = "encoder_last_hidden_state"
    golden = load_golden(save_golden(tmp_path / "golden-t5-small-encoder", x, {name: y}, precision="fp32",
                                     dataset={"name": "multi30k-en", "split": "test"}))
    result = check_golden(golden, _Linear(w, noise=1e-3, output=name),
                          candidate={"name": "t5-small-encoder-asvd-r0.5", "path": "model.onnx"})
    assert not result["passed"]
    out = rendered(render_check_table(result))
    assert_fits(out)
    assert "FAIL" in out and "rel L2" in out and "encoder_last_hidden_sta" in out


# ------------------------------------------------------------------------------------------------ loadtest
def test_loadtest_table_fits():
    from dataclasses import asdict

    from lrdeploy.serve_cmd import render_loadtest_table
    from lrdeploy.serving.loadtest import Level

    levels = [Level(1, 2000, 1800, 200, 0, 4.1, 439.0, 2.18, 2.9, 4.71, {"200": 1800, "400": 200}),
              Level(32, 2000, 1799, 200, 1, 1.2, 1499.2, 19.87, 31.02, 58.33),
              Level(256, 1411, 1270, 141, 0, 60.0, 21.2, 1042.51, 2210.8, 9876.54)]
    result = {"url": "http://127.0.0.1:8000", "model": "resnet18-w16-cuttlefish", "requests_per_level": 2000,
              "max_seconds": 60.0, "malformed_share": 0.1, "batch": 8, "binary": True,
              "levels": [asdict(lv) for lv in levels], "errors": 1}
    out = rendered(render_loadtest_table(result))
    assert_fits(out)
    for needle in ("clients", "4xx", "1411*", "stopped at the 60 s time limit", "9876.54", "1499.2"):
        assert needle in out, needle


# ------------------------------------------------------------------------------- models, compress, prune
def test_models_table_fits_with_a_long_family(monkeypatch):
    """The registry plus a family added the documented way (docs/extending.md): a long name, three inputs."""
    from torch import nn

    from lrdeploy.cli import models_table
    from lrdeploy.models import registry
    from lrdeploy.models.registry import InputSpec

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    inputs = tuple(InputSpec(name, (128,), "int64", ("seq",)) for name in
                   ("input_ids", "attention_mask", "token_type_ids"))
    registry.register_model("multilingual_minilm_l12_h384_uncased", input_shape=(128,), num_classes=0,
                            description="MiniLM-L12 sentence encoder, 384-d mean-pooled embeddings",
                            inputs=inputs, task="embedding")(lambda: nn.Identity())
    out = rendered(models_table())
    assert_fits(out)
    assert "multilingual_minilm" in out and "attention_mask (int64)" in out  # one input is never split


def test_activation_aware_compression_table_fits():
    """`lrdeploy compress --activation-aware` on ResNet-18 (width 4, two stages: fast): seven columns."""
    import torch

    from lrdeploy.compress import compress
    from lrdeploy.models import create_model
    from lrdeploy.workflows import _compression_table

    torch.manual_seed(0)
    model = create_model("resnet18", width=4).eval()
    dense = sum(p.numel() for p in model.parameters())
    report = compress(model, rank_ratio=0.25, activation_aware=True, calibration=torch.randn(16, 3, 32, 32),
                      include=["layer2.*", "layer4.*"])
    after = sum(p.numel() for p in model.parameters())
    out = rendered(_compression_table(report, dense, after, "kept dense as the model's stem: conv1"))
    assert_fits(out)
    for needle in ("layer2.0.shortcut.conv", "not matched by include patterns", "→", "reduction", "stem"):
        assert needle in out, needle


def test_nm_pruning_table_fits():
    """`lrdeploy compress --sparsity 2:4` on an encoder: rows as `prune_bundle` builds them, long names."""
    from lrdeploy.pruning import _table

    rows = [{"layer": f"encoder.layer.{i}.{part}", "kind": "linear", "weights": w, "kept": w // 2}
            for i in range(2) for part, w in (("attention.self.query", 147_456), ("attention.output.dense",
                                                                                  147_456),
                                               ("intermediate.dense", 589_824), ("output.dense", 589_824))]
    kept = {"embeddings.word_embeddings": "an embedding table, not a Linear/Conv2d layer",
            "pooler.dense": "the model's classifier (named by the model spec)"}
    out = rendered(_table(rows, kept, 2, 4))
    assert_fits(out)
    assert "589,824" in out and "294,912" in out and "dense: the model's" in out


def test_cuttlefish_ranks_table_fits():
    """The demo's rank table from a Cuttlefish log (the structure `methods/cuttlefish.py` writes)."""
    from lrdeploy.demo import _ranks_table

    layers = {}
    for i, name in enumerate(["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.shortcut.0",
                              "layer3.1.conv2", "layer4.1.conv2", "fc"]):
        full = min(64 * 2 ** (i // 2), 512)
        history = [full - 7 * k * (i + 1) // 2 for k in range(9)]
        decision = ("dense: in block layer1.0, one of the first 2" if i < 2 else
                    f"dense: rank {full} of {full} saves no parameters" if name == "fc" else "factorised")
        layers[name] = {"block": name.rsplit(".", 1)[0], "full_rank": full, "stable_rank_history": history,
                        "rank": history[-1], "decision": decision}
    manifest = {"method": {"name": "cuttlefish", "log": {"switch_epoch": 3, "forced": False, "k": 2,
                                                         "layers": layers}}}
    out = rendered(_ranks_table(manifest))
    assert_fits(out)
    assert "layer2.0.shortcut.0" in out and "saves no" in out and "43 → 36 → 29" in out


def test_tensorrt_lint_table_fits():
    """Findings with long node names (a transformer's), as `lint_for_tensorrt` reports them."""
    from onnx import TensorProto, helper

    from lrdeploy.exporters.lint import lint_for_tensorrt

    a = helper.make_tensor_value_info("input_ids_embeddings", TensorProto.FLOAT, ["batch", 4])
    b = helper.make_tensor_value_info("attention_mask_float", TensorProto.FLOAT, ["N", 4])
    c = helper.make_tensor_value_info("position_embeddings", TensorProto.FLOAT, [3, 4])
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [3, 4])
    nodes = [helper.make_node("Add", [a.name, b.name], ["ab"], name="/encoder/layer.0/attention/self/Add"),
             helper.make_node("Einsum", ["ab", c.name], [out.name], equation="bi,bi->bi",
                              name="/encoder/layer.0/attention/self/Einsum_1")]
    model = helper.make_model(helper.make_graph(nodes, "g", [a, b, c], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    report = lint_for_tensorrt(model)
    assert len(report.findings) >= 4
    text = rendered(report.render())
    assert_fits(text)
    assert "inconsistent-batch-names" in text and "static-batch-output" in text and "fix:" in text


def test_fold_auto_table_fits(tmp_path):
    """`export --fold auto`: decisions from a cost cache (nothing timed here) and in-model times."""
    import torch

    from lrdeploy.exporters import fold_cost
    from lrdeploy.exporters.fold import fold_with_report
    from lrdeploy.exporters.fold_cost import CostCache
    from lrdeploy.exporters.layer_times import LayerTimes

    from .test_fold_auto import _lenet

    model = _lenet()
    shapes = {"conv1": (1, 1, 28, 28), "conv2": (1, 6, 14, 14), "fc1": (1, 400), "fc2": (1, 120),
              "fc3": (1, 84)}
    cache = CostCache(fold_cost.cache_path(tmp_path))
    for name, in_shape in shapes.items():
        shape = fold_cost.layer_shape(model.get_submodule(name), in_shape)
        cache.put(fold_cost.cache_key(shape.key(), "ort-cpu", 1, 1),
                  {"dense_ms": 0.0104 if name == "fc1" else 0.0311, "factored_ms": {str(shape.rank): 0.0207}})
    cache.save()
    x = torch.randn(1, 1, 28, 28)
    _, report = fold_with_report(model, example_input=x, cache_dir=tmp_path, threads=1)
    measured = {"conv1": 0.0123, "conv2": 0.0456, "fc1": 0.0078, "fc2": 0.0021, "fc3": 0.0011}
    times = LayerTimes(measured, 0.0312, 0.1001)
    report.attach_measured(times, {"batch_size": 1, "threads": 1})
    console = Console(width=WIDTH, record=True, file=io.StringIO())
    report.render(console)
    out = console.export_text()
    assert_fits(out)
    for needle in ("Conv 6→16 k5x5 s1", "break-even", "(flops)", "0.0456", "dense", "faster", "69%"):
        assert needle in out, needle
