"""Sparse-IFT and 2:4 numbers of docs/benchmarks.md: dense vs Sparse Wide / Sparse Parallel (RigL) at s = 0.5
and 0.75, two seeds, equal training steps (iso-FLOP models, so equal training FLOPs); accuracy, parameters,
FLOPs (sparse and as executed), ORT CPU latency vs dense at batch 1 and 32; then 2:4 pruning of the dense
model, before and after a masked fine-tune. Every step is an ordinary lrdeploy command.

    LRDEPLOY_DATA=../shared/data python scripts/bench_sparse.py OUT_DIR [--width 8] [--limit-train 10000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

LRD = [sys.executable, "-m", "lrdeploy"]


def sh(*args: object, ok: tuple[int, ...] = (0,)) -> float:
    start = time.perf_counter()
    proc = subprocess.run([*LRD, *map(str, args)], capture_output=True, text=True)
    if proc.returncode not in ok:
        raise SystemExit(f"failed: {' '.join(map(str, args))}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0,1")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    common = ["--model", "resnet18", "--model-arg", f"width={a.width}", "--data", "fashion-mnist",
              "--epochs", a.epochs, "--limit-train", a.limit_train, "--limit-test", "2000", "--force"]
    runs = {"dense": []}
    for fam in ("wide", "parallel"):
        for s in (0.5, 0.75):
            runs[f"{fam} s={s}"] = ["--method", "sparse-ift", "--method-opt", f"family={fam}",
                                    "--method-opt", f"sparsity={s}", "--method-opt", "dst=rigl"]
    rows: dict[str, dict] = {}
    for name, extra in runs.items():
        tag = name.replace(" ", "_").replace("=", "")
        accs, secs = [], []
        for seed in a.seeds.split(","):
            out = a.out / f"{tag}-seed{seed}"
            secs.append(sh("train", *common, *extra, "--seed", seed, "--out", out))
            accs.append(manifest(out)["metrics"]["test_accuracy"])
            print(f"{name:18s} seed {seed}: accuracy {accs[-1]:.4f}  {secs[-1]:.0f}s", flush=True)
        m = manifest(a.out / f"{tag}-seed{a.seeds.split(',')[0]}")
        log = (m.get("method") or {}).get("log") or {}
        rows[name] = {"accuracy": accs, "seconds": secs, "params_trained": m.get("params"),
                      "sparse_flops": log.get("sparse_flops"), "width": log.get("width"), "bundle": str(out)}
    first = a.seeds.split(",")[0]
    dense = a.out / f"dense-seed{first}"
    for name in rows:
        if name == "dense":
            continue
        tag = name.replace(" ", "_").replace("=", "")
        report = a.out / f"compare-{tag}.json"
        sh("compare", dense, a.out / f"{tag}-seed{first}", "--limit-test", "2000", "--batch", "1,32",
           "--seconds", "1.0", "--json", report, "--force", ok=(0, 1))
        r = json.loads(report.read_text())
        rows[name].update({
            "params_deployed": r["candidate"].get("params"), "flops_executed": r["candidate"].get("flops"),
            "speedup_b1": r["latency"]["1"]["speedup"], "speedup_b32": r["latency"]["32"]["speedup"]})
        rows["dense"].update({"params_deployed": r["reference"].get("params"),
                              "flops_executed": r["reference"].get("flops")})
    sh("compress", dense, "--sparsity", "2:4", "--finetune-epochs", "1", "--limit-train", a.limit_train,
       "--limit-test", "2000", "--out", a.out / "dense-2of4", "--force")
    nm = manifest(a.out / "dense-2of4")["metrics"]
    rows["2:4 of dense"] = {"accuracy_before_finetune": nm["test_accuracy_before_finetune"],
                            "accuracy": [nm["test_accuracy"]]}
    (a.out / "bench_sparse.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'model':18s} {'acc (seeds)':>22s} {'mean':>7s} {'params':>10s} {'sparse FLOPs':>13s} "
          f"{'executed':>12s} {'b1':>6s} {'b32':>6s}")
    for name, r in rows.items():
        accs = r["accuracy"]
        print(f"{name:18s} {' / '.join(f'{x:.4f}' for x in accs):>22s} {statistics.mean(accs):7.4f} "
              f"{r.get('params_deployed') or 0:>10,} {r.get('sparse_flops') or 0:>13,} "
              f"{r.get('flops_executed') or 0:>12,} {r.get('speedup_b1', 1.0):6.2f} "
              f"{r.get('speedup_b32', 1.0):6.2f}")


if __name__ == "__main__":
    main()
