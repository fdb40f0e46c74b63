"""Dense vs Cuttlefish vs Maestro on Fashion-MNIST with a narrow ResNet-18: accuracy, size, FLOPs, latency.

Reproduces the issue-3 table in docs/benchmarks.md. Each method trains the same model from the same seed on
the same data; the three exported ONNX files are then timed interleaved in one ONNX Runtime run (so the
ratios hold on a shared machine). Usage:

    .venv/bin/python scripts/bench_methods.py --data-dir ../shared/data --out runs/bench-methods \
        --width 16 --limit-train 10000 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from lrdeploy.bundle import load_bundle, read_manifest
from lrdeploy.data import load_dataset
from lrdeploy.exporters.graph_stats import graph_stats
from lrdeploy.exporters.onnx import export_onnx
from lrdeploy.serving.bench import benchmark
from lrdeploy.serving.parity import accuracy, run_batched
from lrdeploy.serving.report import write_json
from lrdeploy.serving.runtimes import first_output
from lrdeploy.serving.runtimes.ort_cpu import OrtCpuRuntime
from lrdeploy.workflows import TrainRequest, train_bundle

METHODS: dict[str, dict] = {
    "dense": {},
    # the methods' own defaults: Cuttlefish's window scaled to the run and K timed in ONNX Runtime, Maestro's
    # λ derived from the run's steps and learning rates (issue 13); --opt METHOD:key=value overrides
    "cuttlefish": {},
    "maestro": {},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=int, default=16, help="model width (0: the model takes none, e.g. lenet5)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--methods", default="dense,cuttlefish,maestro")
    p.add_argument("--out", type=Path, default=Path("runs/bench-methods"))
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per latency block")
    p.add_argument("--opt", action="append", default=[], help="METHOD:key=value, e.g. maestro:pull=0.2")
    p.add_argument("--method-lr", action="append", default=[],
                   help="METHOD=LR: that method's peak learning rate (e.g. maestro=0.05: its balanced "
                   "factors take about twice the effective step of a dense weight; LeNet-5 diverges at 0.1)")
    args = p.parse_args()
    method_lr = {m: float(v) for m, _, v in (item.partition("=") for item in args.method_lr)}
    for item in args.opt:
        method, _, setting = item.partition(":")
        key, _, value = setting.partition("=")
        METHODS.setdefault(method, {})[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    args.out.mkdir(parents=True, exist_ok=True)

    rows: dict[str, dict] = {}
    for method in args.methods.split(","):
        bundle_dir = args.out / method
        load_before = os.getloadavg()
        started = time.perf_counter()
        metrics = train_bundle(
            TrainRequest(
                model_name=args.model, dataset=args.data, data_dir=args.data_dir, method=method,
                method_settings=dict(METHODS[method]),
                model_args={"width": args.width} if args.width else {}, epochs=args.epochs,
                batch_size=args.batch_size, lr=method_lr.get(method, args.lr), limit_train=args.limit_train,
                out=bundle_dir,
            )
        )
        wall = time.perf_counter() - started
        manifest = read_manifest(bundle_dir)
        onnx_path = args.out / f"{method}.onnx"
        export_onnx(load_bundle(bundle_dir), onnx_path, optimize=False)
        deployed = graph_stats(onnx_path)  # counted from the graph as deployed, not from the bundle
        rows[method] = {
            "lr": method_lr.get(method, args.lr),
            "test_accuracy_torch": metrics["test_accuracy"],
            "params": deployed.params,
            "flops": deployed.flops,
            "params_trained": manifest["params"],
            "train_seconds": metrics["train_seconds"],
            "wall_seconds_incl_eval": wall,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "ranks": {k: f"{v['rank']}/{v['full_rank']}" for k, v in manifest["structure"].items()},
            "method_log": {k: v for k, v in manifest["method"].items() if k != "log"}
            | {key: manifest["method"].get("log", {}).get(key)
               for key in ("switch_epoch", "forced", "forced_note", "k", "lambda_gl", "lambda_rule",
                           "epochs")},
            "stable_rank_history": {n: e.get("stable_rank_history") for n, e in
                                    manifest["method"].get("log", {}).get("layers", {}).items()},
            "onnx": str(onnx_path),
        }
        print(json.dumps({method: rows[method]}, indent=1, default=str), flush=True)

    test = load_dataset(args.data, "test", data_dir=args.data_dir)
    runtimes = {m: OrtCpuRuntime(rows[m]["onnx"]) for m in rows}
    for m, rt in runtimes.items():
        logits = first_output(run_batched(rt, {"input": test.x.numpy()}, 256))
        rows[m]["test_accuracy_ort"] = accuracy(logits, test.y.numpy())
    bench = benchmark(runtimes, tuple(test.x.shape[1:]), (1, 32), min_seconds=args.seconds)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "bench": bench.to_dict()}
    write_json(args.out / "results.json", result)
    ref = next(iter(rows))
    print("\n| method | test acc (ORT) | params | ×fewer | FLOPs/sample | ×fewer | b1 median ms "
          "| b1 speedup | b32 median ms | b32 speedup | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        cells = []
        for b in (1, 32):
            st = bench.stats(m, b)
            cells += [f"{st.median_ms:.3f}", f"{bench.speedup(m, b):.2f}×" if m != ref else "—"]
        fewer = rows[ref]["params"] / r["params"]
        print(f"| {m} | {r['test_accuracy_ort']:.2%} | {r['params']:,} | {fewer:.2f}× "
              f"| {r['flops'] / 1e6:.1f} M | {rows[ref]['flops'] / r['flops']:.2f}× | {' | '.join(cells)} "
              f"| {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
