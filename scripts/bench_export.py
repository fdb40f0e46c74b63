"""Issue-5 measurements: fold modes, precision variants and export time, on ONNX Runtime CPU.

Part A (fold): ResNet-18 (CIFAR form, width 64) and the Transformer (d 256, 3+3 layers, 32-token source and
target) at several SVD rank ratios; per batch size, the dense original, all-factored, all-dense-folded and
auto-folded (decided at that batch size) graphs are timed interleaved in one run. Weights are random: timings
do not depend on them. Part B (precision): the trained Fashion-MNIST ResNet-18 bundles of
scripts/bench_methods.py, fp32 vs int8 (static QDQ) vs fp16, latency and test accuracy. Part C: export time
with a cold fold-cost cache for every registry model, dense and low-rank.

    .venv/bin/python scripts/bench_export.py --data-dir ../shared/data --methods-dir runs/bench-methods \
        --out runs/bench-export
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lrdeploy.bundle import Bundle, load_bundle
from lrdeploy.compress import compress
from lrdeploy.data import load_dataset
from lrdeploy.exporters.fold import fold_with_report
from lrdeploy.exporters.onnx import export_onnx
from lrdeploy.exporters.precision import convert_precision
from lrdeploy.flops import count_flops
from lrdeploy.models import create_model
from lrdeploy.serving.bench import benchmark
from lrdeploy.serving.parity import accuracy, output_parity, run_batched
from lrdeploy.serving.report import write_json
from lrdeploy.serving.runtimes import first_output
from lrdeploy.serving.runtimes.ort_cpu import OrtCpuRuntime

MODES = ("factored", "dense", "auto")


def _export(model: torch.nn.Module, path: Path, input_shape: tuple[int, ...]) -> Path:
    export_onnx(
        Bundle(path.parent, {"model": {"input_shape": list(input_shape)}}, model), path, optimize=False
    )
    return path


def _example(model: torch.nn.Module, shape: tuple[int, ...]):
    make = getattr(model, "example_inputs", None)
    return tuple(make(1, 32, 32)) if callable(make) else torch.randn((1, *shape))


def _int8(src: Path, calibration: np.ndarray | None) -> Path:
    """What `lrdeploy export --precision int8` writes: static QDQ for conv nets, dynamic for the rest."""
    dst = src.with_suffix(".int8.onnx")
    convert_precision(src, dst, "int8", calibration=calibration)
    return dst


def part_fold(out: Path, ratios: list[float], batches: list[int], seconds: float,
              data_dir: Path | None = None) -> dict:
    """Fold modes plus the int8 alternatives (dense int8, auto-folded int8), all against dense fp32."""
    results: dict = {}
    cifar = load_dataset("cifar10", "train", data_dir=data_dir, limit=256).x.numpy()  # real calibration
    setups = {
        "resnet18": (lambda: create_model("resnet18"), (3, 32, 32)),
        "transformer": (lambda: create_model("transformer", src_vocab=8000, tgt_vocab=6000), (32,)),
    }
    for name, (make, shape) in setups.items():
        torch.manual_seed(0)
        dense = make().eval()
        dense_path = _export(dense, out / f"{name}-dense.onnx", shape)
        calibration = cifar if name == "resnet18" else None
        dense_int8 = _int8(dense_path, calibration)
        dense_flops = count_flops(dense, shape)
        for ratio in ratios:
            low = make().eval()
            low.load_state_dict(dense.state_dict())
            compress(low, rank_ratio=ratio)
            low_flops = count_flops(low, shape)
            key = f"{name}@{ratio}"
            results[key] = {"flop_ratio": dense_flops / low_flops, "batches": {}}
            for b in batches:
                paths = {"dense-original": dense_path}
                decisions = {}
                for mode in MODES:
                    folded, report = fold_with_report(
                        low, mode, example_input=_example(low, shape), batch_size=b
                    )
                    path = out / f"{key}-{mode}-b{b}.onnx"
                    paths[mode] = _export(folded.eval(), path, shape)
                    decisions[mode] = report.to_dict().get("summary")
                paths["dense-int8"] = dense_int8
                paths["auto-int8"] = _int8(paths["auto"], calibration)
                runtimes = {k: OrtCpuRuntime(p) for k, p in paths.items()}
                if getattr(dense, "example_inputs", None):  # token ids: the model's own valid inputs
                    tensors = dense.example_inputs(b, 32, 32)
                    example = dict(zip(dense.input_names, (t.numpy() for t in tensors), strict=True))
                    feeds = lambda batch, example=example: example  # noqa: E731 - one batch size per run
                else:
                    feeds = shape
                bench = benchmark(
                    runtimes,
                    feeds,
                    [b],
                    min_seconds=seconds,
                    progress=False,
                )
                row = {
                    m: {"median_ms": bench.stats(m, b).median_ms, "speedup": bench.speedup(m, b)}
                    for m in paths
                }
                best_fixed = max(row["factored"]["speedup"], row["dense"]["speedup"])
                row["auto_vs_best_fixed"] = row["auto"]["speedup"] / best_fixed
                row["efficiency"] = row["auto"]["speedup"] / results[key]["flop_ratio"]
                row["auto_decisions"] = decisions["auto"]
                results[key]["batches"][b] = row
                print(
                    key,
                    b,
                    json.dumps(
                        {
                            m: round(v["speedup"], 3)
                            for m, v in row.items()
                            if isinstance(v, dict) and "speedup" in v
                        }
                    ),
                    "auto/best",
                    round(row["auto_vs_best_fixed"], 3),
                    "eff",
                    round(row["efficiency"], 3),
                    flush=True,
                )
    return results


def part_precision(methods_dir: Path, data_dir: Path | None, out: Path, seconds: float) -> dict:
    test = load_dataset("fashion-mnist", "test", data_dir=data_dir)
    calib = load_dataset("fashion-mnist", "train", data_dir=data_dir, limit=256).x.numpy()
    x, y = test.x.numpy(), test.y.numpy()
    results: dict = {}
    paths: dict[str, Path] = {}
    for method in ("dense", "cuttlefish", "maestro"):
        bundle_dir = methods_dir / method
        if not bundle_dir.exists():
            continue
        fp32 = out / f"fm-{method}.onnx"
        export_onnx(load_bundle(bundle_dir), fp32, optimize=False)
        paths[f"{method}-fp32"] = fp32
        for prec in ("int8", "fp16"):
            dst = out / f"fm-{method}.{prec}.onnx"
            res = convert_precision(
                fp32,
                dst,
                prec,
                calibration=calib if prec == "int8" else None,
                test_inputs=x[:1000],
                labels=y[:1000],
            )
            paths[f"{method}-{prec}"] = dst
            results[f"{method}-{prec}"] = {
                "method": res.method,
                "passed": res.passed,
                "failures": res.failures,
            }
    runtimes = {k: OrtCpuRuntime(p) for k, p in paths.items()}
    ref_logits = first_output(run_batched(runtimes["dense-fp32"], {"input": x}, 256))
    for k, rt in runtimes.items():
        logits = first_output(run_batched(rt, {"input": x}, 256))
        fp32_logits = first_output(run_batched(runtimes[k.rsplit("-", 1)[0] + "-fp32"], {"input": x}, 256))
        results.setdefault(k, {})
        results[k]["accuracy"] = accuracy(logits, y)
        results[k]["rel_l2_vs_own_fp32"] = output_parity(fp32_logits, logits)["rel_l2"]
        results[k]["top1_vs_dense_fp32"] = output_parity(ref_logits, logits)["top1_agreement"]
    bench = benchmark(runtimes, (1, 28, 28), [1, 32], min_seconds=seconds, progress=False)
    for k in runtimes:
        for b in (1, 32):
            results[k][f"b{b}_median_ms"] = bench.stats(k, b).median_ms
            results[k][f"b{b}_speedup_vs_dense_fp32"] = bench.speedup(k, b)
        print(
            k,
            json.dumps({kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in results[k].items()}),
            flush=True,
        )
    return results


def part_translation(dense: Path, lowrank: Path, data_dir: Path | None, out: Path, seconds: float) -> dict:
    """Transformer on Multi30k (real data): dense and low-rank, each fp32 / fp16 / int8, against dense fp32.

    Each graph is exported as `lrdeploy export --fold auto --precision P` does, then compared with the dense
    fp32 graph the way `lrdeploy compare` does (perplexity, token accuracy, BLEU on the whole test split;
    latency of the two graphs interleaved in one run, per pair).
    """
    from lrdeploy.comparison import compare_artifacts
    from lrdeploy.workflows import export_bundle, export_precision_variant

    paths: dict[str, Path] = {}
    results: dict = {}
    for label, bundle in (("dense", dense), ("lowrank", lowrank)):
        fp32 = out / f"mt-{label}.onnx"
        export_bundle(bundle, fp32, fold="auto", fold_batch=1, optimize=False)
        paths[f"{label}-fp32"] = fp32
        for prec in ("fp16", "int8"):
            res = export_precision_variant(bundle, fp32, prec, data_dir=data_dir)
            paths[f"{label}-{prec}"] = fp32.with_suffix(f".{prec}.onnx")
            results[f"{label}-{prec}"] = {"method": res.method, "passed": res.passed,
                                          "failures": res.failures}
    for key, path in paths.items():
        if key == "dense-fp32":
            continue
        rep = compare_artifacts(paths["dense-fp32"], path, data_dir=data_dir, min_seconds=seconds,
                                max_bleu_drop=100.0, max_perplexity_increase=100.0, progress=False)
        task, lat = rep["task"], rep["latency"]
        results.setdefault("dense-fp32", {k: task["reference"][k] for k in ("perplexity", "token_accuracy",
                                                                             "bleu")})
        results.setdefault(key, {}).update({k: task["candidate"][k] for k in ("perplexity", "token_accuracy",
                                                                             "bleu")})
        results[key]["top1_agreement_vs_dense_fp32"] = rep["parity"].get("top1_agreement")
        results[key]["params"] = rep.get("candidate", {}).get("params")
        for b, row in lat.items():
            if isinstance(row, dict) and "speedup" in row:
                results[key][f"b{b}_speedup_vs_dense_fp32"] = row["speedup"]
        print(key, json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                               for k, v in results[key].items()}), flush=True)
    return results


def part_fold_report(out: Path, batches: list[int]) -> dict:
    """Predicted (micro-benchmark per layer shape) vs measured (profiled inside the exported model) layer
    times, from the fold report `lrdeploy export --fold auto --fold-batch B` writes (cold cache)."""
    from lrdeploy.bundle import save_bundle
    from lrdeploy.workflows import export_bundle

    results: dict = {}
    cases = {"resnet18": ({}, (3, 32, 32)), "transformer": ({"src_vocab": 8000, "tgt_vocab": 6000}, (32,))}
    for name, (args, shape) in cases.items():
        torch.manual_seed(0)
        model = create_model(name, **args)
        compress(model, rank_ratio=0.25)
        bdir = out / f"foldreport-{name}"
        if not bdir.exists():
            save_bundle(bdir, model, model_name=name, model_args=args, method={"name": "svd"}, dataset={},
                        metrics={}, input_shape=shape)
        for b in batches:
            with tempfile.TemporaryDirectory() as cache:
                os.environ["XDG_CACHE_HOME"] = cache
                _, report = export_bundle(bdir, out / f"foldreport-{name}-b{b}.onnx", fold="auto",
                                          fold_batch=b, optimize=False)
            rep = report.to_dict()
            ratios = [lf.measured_ms / lf.predicted_ms for lf in report.layers
                      if lf.measured_ms and lf.predicted_ms]
            im = rep["in_model"]
            row = {**rep["summary"], "other_ms": im["other_ms"], "kernel_ms": im["kernel_ms"],
                   "run_ms_median": im["run_ms_median"], "attributed_share": im["attributed_share"],
                   "layer_ratio_median": float(np.median(ratios)) if ratios else None,
                   "layer_ratio_p10": float(np.percentile(ratios, 10)) if ratios else None,
                   "layer_ratio_p90": float(np.percentile(ratios, 90)) if ratios else None}
            results[f"{name}@0.25-b{b}"] = row
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            print(name, b, json.dumps(shown), flush=True)
    return results


def _timed_cli_export(bundle: Path, out: Path) -> float:
    """Wall time of the real command (`lrdeploy export`, process start included) with a cold cache."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        cli = [str(Path(sys.executable).with_name("lrdeploy")), "export", str(bundle), "--out", str(out),
               "--fold", "auto"]
        t0 = time.perf_counter()
        subprocess.run(cli, env=env, check=True, capture_output=True)
        return time.perf_counter() - t0


def part_export_time(methods_dir: Path, out: Path) -> dict:
    """Cold fold-cost cache, `lrdeploy export --fold auto` (in-model layer timing and --optimize all)."""
    from lrdeploy.bundle import save_bundle

    results = {}
    cases = {
        "lenet5": ("lenet5", {}, (1, 28, 28)),
        "resnet18": ("resnet18", {}, (3, 32, 32)),
        "vgg19": ("vgg19", {}, (3, 32, 32)),
        "transformer": ("transformer", {"src_vocab": 8000, "tgt_vocab": 6000}, (32,)),
    }
    for label, (name, args, shape) in cases.items():
        for ratio in (None, 0.25):
            torch.manual_seed(0)
            model = create_model(name, **args)
            if ratio:
                compress(model, rank_ratio=ratio)
            bdir = out / f"export-{label}-{ratio or 'dense'}"
            if not bdir.exists():
                save_bundle(bdir, model, model_name=name, model_args=args,
                            method={"name": "svd" if ratio else "dense"}, dataset={}, metrics={},
                            input_shape=shape)
            key = f"{label}-{ratio or 'dense'}"
            results[key] = _timed_cli_export(bdir, out / f"{bdir.name}.onnx")
            print("export", label, ratio, round(results[key], 1), "s", flush=True)
    for method in ("cuttlefish", "maestro"):
        if (methods_dir / method).exists():
            results[f"resnet18w16-{method}"] = _timed_cli_export(methods_dir / method,
                                                                 out / f"export-fm-{method}.onnx")
            print("export", method, round(results[f"resnet18w16-{method}"], 1), "s", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--methods-dir", type=Path, default=Path("runs/bench-methods"))
    p.add_argument("--out", type=Path, default=Path("runs/bench-export"))
    p.add_argument("--ratios", default="0.25,0.5")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--parts", default="fold,precision,export",
                   help="any of fold,fold-report,precision,translation,export")
    p.add_argument("--translation-dense", type=Path, default=Path("runs/bench-precision/tdense"))
    p.add_argument("--translation-lowrank", type=Path, default=Path("runs/bench-precision/tsvd"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    result = {"args": {k: str(v) for k, v in vars(args).items()}}
    if "fold" in parts:
        result["fold"] = part_fold(
            args.out,
            [float(r) for r in args.ratios.split(",")],
            [int(b) for b in args.batches.split(",")],
            args.seconds,
            args.data_dir,
        )
    if "precision" in parts:
        result["precision"] = part_precision(args.methods_dir, args.data_dir, args.out, args.seconds)
    if "fold-report" in parts:
        result["fold_report"] = part_fold_report(args.out, [int(b) for b in args.batches.split(",")])
    if "translation" in parts:
        result["translation"] = part_translation(args.translation_dense, args.translation_lowrank,
                                                 args.data_dir, args.out, args.seconds)
    if "export" in parts:
        result["export_seconds"] = part_export_time(args.methods_dir, args.out)
    write_json(args.out / f"results-{'-'.join(parts)}.json", result)


if __name__ == "__main__":
    main()
