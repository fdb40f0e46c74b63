"""Measure the two torch ONNX exporters (dynamo vs legacy TorchScript) on LeNet-5, dense and low-rank.

This is the measurement behind ``DEFAULT_EXPORTER`` in ``exporters/onnx.py``; its output is the table in
``docs/exporter-choice.md``. For each model and exporter it records: node count of the exported graph, after
ORT's EXTENDED optimisation (what ``.ort.onnx`` ships) and after ALL (what a serving session runs), export
seconds (median of warm repeats), parity against eager PyTorch, and ORT CPU latency at batch 1 and 32.

Latency is timed in interleaved blocks (dynamo, legacy, legacy, dynamo, ... per round) on one pinned thread,
and the legacy/dynamo ratio is taken per round, then the median over rounds: on a shared 2-core machine the
ratio of neighbouring blocks is far more stable than either absolute number.

    .venv/bin/python scripts/compare_exporters.py [--rounds 6] [--block-seconds 0.4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lrdeploy.compress import compress
from lrdeploy.exporters.fold import fold_model
from lrdeploy.exporters.onnx import EXPORTERS, ort_session, rel_l2, torch_to_onnx
from lrdeploy.models import create_model, get_spec

BATCHES = (1, 32)


def _optimised_nodes(data: bytes, level: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "opt.onnx")
        ort_session(data, level, optimized_model_filepath=out)
        return len(onnx.load(out).graph.node)


def _time_block(sess: ort.InferenceSession, feed: dict[str, np.ndarray], seconds: float) -> float:
    """Median ms per call over a block of at least ``seconds`` and 20 calls (after 5 warm-up calls)."""
    for _ in range(5):
        sess.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 20 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(rounds: int, block_seconds: float, threads: int, opset: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    shape = tuple(get_spec("lenet5").input_shape)
    dense = create_model("lenet5").eval()
    lowrank = create_model("lenet5")
    lowrank.load_state_dict(dense.state_dict())
    compress(lowrank, rank_ratio=0.5)
    lowrank.eval()
    example = torch.randn(2, *shape)
    gen = torch.Generator().manual_seed(1)
    inputs = {b: torch.randn(b, *shape, generator=gen) for b in BATCHES}

    # One throwaway export per exporter so import/first-call costs are not charged to either.
    for name in EXPORTERS:
        torch_to_onnx(fold_model(dense), example, exporter=name, opset=opset)

    rows: list[dict[str, Any]] = []
    for label, model in (("dense", dense), ("lowrank-0.5", lowrank)):
        folded = fold_model(model)
        graphs: dict[str, bytes] = {}
        for name in EXPORTERS:
            secs = []
            for _ in range(repeats):
                proto, s = torch_to_onnx(folded, example, exporter=name, opset=opset)
                secs.append(s)
            data = proto.SerializeToString()
            graphs[name] = data
            sess = ort_session(data, "ORT_ENABLE_ALL", threads=threads)
            parity = 0.0
            for x in inputs.values():
                with torch.inference_mode():
                    ref = model(x).numpy()
                parity = max(parity, rel_l2(sess.run(None, {"input": x.numpy()})[0], ref))
            rows.append({
                "model": label, "exporter": name, "nodes": len(proto.graph.node),
                "nodes_extended": _optimised_nodes(data, "ORT_ENABLE_EXTENDED"),
                "nodes_all": _optimised_nodes(data, "ORT_ENABLE_ALL"),
                "export_s": statistics.median(secs), "parity_rel_l2": parity, "latency_ms": {},
                "legacy_over_dynamo": {},
            })
        sessions = {n: ort_session(d, "ORT_ENABLE_ALL", threads=threads) for n, d in graphs.items()}
        for b, x in inputs.items():
            feed = {"input": x.numpy()}
            blocks: dict[str, list[float]] = {n: [] for n in EXPORTERS}
            ratios = []
            for r in range(rounds):
                order = EXPORTERS if r % 2 == 0 else tuple(reversed(EXPORTERS))
                for n in order:
                    blocks[n].append(_time_block(sessions[n], feed, block_seconds))
                ratios.append(blocks["legacy"][-1] / blocks["dynamo"][-1])
            for row in rows[-len(EXPORTERS):]:
                row["latency_ms"][b] = statistics.median(blocks[row["exporter"]])
                row["legacy_over_dynamo"][b] = {
                    "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                }
    return {
        "rows": rows,
        "settings": {
            "rounds": rounds, "block_seconds": block_seconds, "threads": threads, "opset": opset,
            "export_repeats": repeats, "ort_level_for_latency": "ORT_ENABLE_ALL", "batches": list(BATCHES),
        },
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | exporter | nodes (raw → EXTENDED → ALL) | export s | parity rel-L2 | ORT ms b1 "
        "| ORT ms b32 | legacy/dynamo b1 (min–max) | legacy/dynamo b32 (min–max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ratio = {
            b: "{median:.3f} ({min:.2f}–{max:.2f})".format(**row["legacy_over_dynamo"][b]) for b in BATCHES
        }
        lines.append(
            f"| {row['model']} | {row['exporter']} | {row['nodes']} → {row['nodes_extended']} → "
            f"{row['nodes_all']} | {row['export_s']:.3f} | {row['parity_rel_l2']:.1e} | "
            f"{row['latency_ms'][1]:.4f} | {row['latency_ms'][32]:.3f} | {ratio[1]} | {ratio[32]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per (model, batch)")
    parser.add_argument("--block-seconds", type=float, default=0.4, help="minimum seconds per timed block")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (1: least noise)")
    parser.add_argument("--opset", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="warm exports per exporter, median reported")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    start = time.perf_counter()
    result = measure(args.rounds, args.block_seconds, args.threads, args.opset, args.repeats)
    result["total_seconds"] = time.perf_counter() - start
    print(to_markdown(result))
    env = result["environment"]
    print(f"\n{env['cores']} cores, torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
          f"onnx {env['onnx']}; {result['total_seconds']:.0f} s in total")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
