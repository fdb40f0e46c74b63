"""Training throughput of docs/benchmarks.md: one process vs ``torchrun --nproc-per-node 2``, and what a
checkpoint per epoch costs. Runs are ordinary ``lrdeploy train`` commands, interleaved (A B, B A, …) so drift
on a shared machine hits both sides; images/s and checkpoint seconds are read from each bundle's manifest.

    python scripts/bench_train.py OUT_DIR [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = {
    "lenet5-mnist": ["--model", "lenet5", "--data", "mnist", "--limit-train", "12000", "--epochs", "2"],
    "resnet18w16-fmnist": ["--model", "resnet18", "--model-arg", "width=16", "--data", "fashion-mnist",
                           "--limit-train", "2048", "--epochs", "1"],
}
COMMON = ["--limit-test", "500", "--batch-size", "128"]
VARIANTS = {
    "1 process": ([sys.executable, "-m", "lrdeploy", "train"], ["--checkpoint-every", "0"]),
    "torchrun x2": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     "-m", "lrdeploy", "train"], ["--checkpoint-every", "0"]),
    "1 process + checkpoint/epoch": ([sys.executable, "-m", "lrdeploy", "train"],
                                     ["--checkpoint-every", "1"]),
}


def run(out: Path, workload: str, variant: str, i: int) -> dict:
    launcher, extra = VARIANTS[variant]
    bundle = out / f"{workload}-{variant.replace(' ', '_').replace('/', '_')}-{i}"
    shutil.rmtree(bundle, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run([*launcher, *WORKLOADS[workload], *COMMON, *extra, "--out", str(bundle)],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        (out / "failed.log").write_text(proc.stdout + proc.stderr)
        raise SystemExit(f"{workload} {variant} failed (whole output in {out / 'failed.log'}):\n"
                         f"{proc.stderr[-3000:]}")
    metrics = json.loads((bundle / "manifest.json").read_text())["metrics"]
    return {"wall_s": wall, "images_per_s": metrics["train_samples_per_s"],
            "train_s": sum(h["seconds"] for h in metrics["history"]),
            "checkpoint_s": metrics.get("train_checkpoint_seconds", 0.0),
            "processes": metrics["train_processes"], "test_accuracy": metrics.get("test_accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[dict]]] = {}
    for workload in WORKLOADS:
        results[workload] = {v: [] for v in VARIANTS}
        for i in range(args.rounds):
            order = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                r = run(args.out, workload, variant, i)
                results[workload][variant].append(r)
                print(f"{workload:20s} {variant:30s} {r['images_per_s']:8.0f} img/s  "
                      f"wall {r['wall_s']:6.1f}s  ckpt {r['checkpoint_s']:.2f}s", flush=True)
    print()
    header = ("workload", "variant", "img/s", "vs 1 proc", "ckpt s/epoch", "acc")
    print("{:20s} {:30s} {:>8s} {:>9s} {:>12s} {:>6s}".format(*header))
    summary = {}
    for workload, variants in results.items():
        base = statistics.median(r["images_per_s"] for r in variants["1 process"])
        epochs = int(WORKLOADS[workload][WORKLOADS[workload].index("--epochs") + 1])
        for variant, rs in variants.items():
            rate = statistics.median(r["images_per_s"] for r in rs)
            ckpt = statistics.median(r["checkpoint_s"] for r in rs) / epochs
            acc = statistics.median(r["test_accuracy"] for r in rs)
            summary[f"{workload} / {variant}"] = {"images_per_s": rate, "ratio_vs_1_process": rate / base,
                                                  "checkpoint_s_per_epoch": ckpt, "test_accuracy": acc,
                                                  "runs": rs}
            print(f"{workload:20s} {variant:30s} {rate:8.0f} {rate / base:8.2f}x {ckpt:12.3f} {acc:6.3f}")
    (args.out / "bench_train.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
