"""Serving numbers of docs/benchmarks.md (issue 14): dense vs low-rank served by `lrdeploy serve`, dynamic
batching on vs off, throughput and p99 per concurrency; and the server's overhead against calling ONNX Runtime
directly on the same graph.

    python scripts/bench_serve.py OUT_DIR [--requests 1000] [--rounds 2] [--width 1024 --layers 4 --rank 64]

The two models are plain ONNX MLPs (``layers`` × Linear width→width + bias + ReLU; the low-rank one has each
weight as U·V of rank ``rank``), so the difference is the factorisation alone. Each configuration is an
ordinary `lrdeploy serve` process on a free loopback port, loaded by `lrdeploy loadtest`'s engine from this
process (server and client never share a GIL). Configurations are interleaved round by round (A B C D A B C D)
and the median of the rounds is reported: absolute numbers on a shared 2-core box are noisy, the ratios
measured side by side are what to read. Direct ONNX Runtime: one session (same options as the server: all
optimisations, intra-op threads = CPUs), ``run`` called back to back on one batch-1 input.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LRD = [sys.executable, "-m", "lrdeploy"]


def mlp(path: Path, width: int, layers: int, rank: int | None) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        if rank is None:
            inits.append(numpy_helper.from_array(
                (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"W{i}"))
            nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"]))
        else:
            inits += [numpy_helper.from_array((rng.standard_normal((width, rank)) / np.sqrt(width))
                                              .astype(np.float32), f"U{i}"),
                      numpy_helper.from_array((rng.standard_normal((rank, width)) / np.sqrt(rank))
                                              .astype(np.float32), f"V{i}")]
            nodes += [helper.make_node("MatMul", [cur, f"U{i}"], [f"h{i}"]),
                      helper.make_node("MatMul", [f"h{i}", f"V{i}"], [f"m{i}"])]
        inits.append(numpy_helper.from_array(np.zeros(width, np.float32), f"B{i}"))
        nodes += [helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        cur = f"r{i}"
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                               ["batch", width])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["batch", width])],
                              initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def direct_ort(path: Path, width: int, requests: int) -> dict:
    """p50/p99 and calls/s of ``session.run`` on one batch-1 input, back to back, no server."""
    from lrdeploy.host import session_options
    from lrdeploy.serving.runtimes.ort_session import CPU_PROVIDER, make_session

    session = make_session(path, [CPU_PROVIDER], sess_options=session_options(None))
    x = {"x": np.random.default_rng(1).standard_normal((1, width)).astype(np.float32)}
    for _ in range(50):
        session.run(None, x)
    times = []
    start = time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter()
        session.run(None, x)
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    return {"p50_ms": 1000 * float(np.percentile(times, 50)),
            "p99_ms": 1000 * float(np.percentile(times, 99)), "throughput_rps": requests / total}


def serve(model: Path, batching: bool, max_batch: int, delay_ms: float) -> tuple[subprocess.Popen, str]:
    cmd = [*LRD, "serve", str(model), "--port", "0", "--max-batch", str(max_batch), "--max-delay-ms",
           str(delay_ms), "--batching" if batching else "--no-batching"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "250"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
            if line.startswith("serving "):
                return proc, line.split(" on ", 1)[1].split()[0]
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"server did not start: {' '.join(cmd)}\n{proc.stdout.read()}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    if proc.wait(60) != 0:
        raise SystemExit(f"server exited {proc.returncode} on SIGTERM (expected 0)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--requests", type=int, default=1000, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    args = p.parse_args()
    from lrdeploy.serving.loadtest import loadtest

    args.out.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    models = {"dense": mlp(args.out / "dense.onnx", args.width, args.layers, None),
              "lowrank": mlp(args.out / "lowrank.onnx", args.width, args.layers, args.rank)}
    # batching off; on with the --max-delay-ms window; on with no window (only what queued while busy)
    variants = {"off": (False, args.max_delay_ms), f"on-{args.max_delay_ms:g}ms": (True, args.max_delay_ms),
                "on-0ms": (True, 0.0)}
    configs = [(m, v) for m in models for v in variants]
    runs: dict[str, list[list[dict]]] = {f"{m}/{v}": [] for m, v in configs}
    direct: dict[str, list[dict]] = {m: [] for m in models}
    for r in range(args.rounds):
        for name, path in models.items():
            direct[name].append(direct_ort(path, args.width, args.requests))
        for name, variant in configs:
            batching, delay = variants[variant]
            proc, url = serve(models[name], batching, args.max_batch, delay)
            try:
                result = loadtest(url, name, levels, requests=args.requests, max_seconds=60, warmup=100)
            finally:
                stop(proc)
            if result["errors"]:
                raise SystemExit(f"{name}: {result['errors']} errors: {result['levels']}")
            runs[f"{name}/{variant}"].append(result["levels"])
            print(f"round {r + 1}: {name} batching {variant}: "
                  + ", ".join(f"c={lv['concurrency']} {lv['throughput_rps']:.0f}/s p99 {lv['p99_ms']:.2f} ms"
                              for lv in result["levels"]), flush=True)

    def med(values: list[float]) -> float:
        return float(statistics.median(values))

    summary: dict = {"settings": vars(args) | {"out": str(args.out)}, "cpus": len(os.sched_getaffinity(0)),
                     "direct_ort": {m: {k: med([d[k] for d in v]) for k in v[0]} for m, v in direct.items()},
                     "served": {}}
    for key, rounds in runs.items():
        summary["served"][key] = [
            {"concurrency": levels[i], **{k: med([rnd[i][k] for rnd in rounds])
                                         for k in ("throughput_rps", "p50_ms", "p90_ms", "p99_ms")}}
            for i in range(len(levels))]
    (args.out / "bench_serve.json").write_text(json.dumps(summary, indent=2) + "\n")

    print("\n| model | batching | concurrency | req/s | p50 ms | p99 ms |\n|---|---|---:|---:|---:|---:|")
    for key, rows in summary["served"].items():
        model, batching = key.split("/")
        for row in rows:
            print(f"| {model} | {batching} | {row['concurrency']} | {row['throughput_rps']:.0f} | "
                  f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} |")
    print("\n| model | direct ORT p50 ms | served c=1 p50 ms (batching off) | overhead ms | direct calls/s |"
          "\n|---|---:|---:|---:|---:|")
    for model, d in summary["direct_ort"].items():
        served = summary["served"][f"{model}/off"][0]
        overhead = served["p50_ms"] - d["p50_ms"]
        print(f"| {model} | {d['p50_ms']:.3f} | {served['p50_ms']:.3f} | {overhead:.3f} | "
              f"{d['throughput_rps']:.0f} |")
    print(f"\nJSON: {args.out / 'bench_serve.json'}")


if __name__ == "__main__":
    main()
