"""Does onnxslim change our exported graphs? Node counts before/after it, raw and after ORT basic.

Run: ``python scripts/slim_nodes.py [--out DIR]`` (about a minute on 2 CPU cores). Prints a Markdown table;
docs/optimize.md quotes it. Every graph is a dynamo opset-20 export (the default of ``lrdeploy export``),
plus a legacy opset-17 export of the dense models for contrast. "fresh" keeps the models' initial weights
(zero biases); "trained-like" gives every all-zero parameter small random values, as training would.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

from lrdeploy.compress import compress
from lrdeploy.exporters.onnx import export_onnx
from lrdeploy.exporters.optimize import _ort_step, histogram_delta, op_histogram, optimize_onnx
from lrdeploy.models import create_model

MODELS: dict[str, tuple[str, dict, tuple[int, ...] | None]] = {
    "lenet5": ("lenet5", {}, (1, 28, 28)),
    "resnet18 w16": ("resnet18", {"width": 16}, (3, 32, 32)),
    "transformer tiny": ("transformer", {"src_vocab": 60, "tgt_vocab": 50, "d_model": 32, "nhead": 4,
                                         "num_encoder_layers": 2, "num_decoder_layers": 2,
                                         "dim_feedforward": 64, "dropout": 0.0}, None),
    "transformer default": ("transformer", {"dropout": 0.0}, None),
}


def _build(name: str, args: dict, rank: float | None, weights: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, **args).eval()
    if rank is not None:
        compress(model, rank_ratio=rank)
    if weights == "trained-like":
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0.0, 0.02)
    return model


def _slim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(onnx.ModelProto.FromString(proto.SerializeToString()))


def _delta(a: onnx.ModelProto, b: onnx.ModelProto) -> str:
    d = histogram_delta(op_histogram(a), op_histogram(b))
    return ", ".join(f"{k} {v:+d}" for k, v in d.items()) or "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="keep the exported graphs here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="slim-nodes-"))
    out.mkdir(parents=True, exist_ok=True)
    print("| model | variant | weights | exporter | raw | slim(raw) | slim Δ ops | ORT basic | "
          "slim(ORT basic) | slim Δ ops after ORT | optimize_onnx basic: onnxslim step | final |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    runs = [(label, rank, weights, exporter) for label in MODELS for rank in (None, 0.25)
            for weights in ("fresh", "trained-like") for exporter in ("dynamo", "legacy")
            if exporter == "dynamo" or (rank, weights) == (None, "trained-like")]
    for label, rank, weights, exporter in runs:
        name, margs, shape = MODELS[label]
        variant = "dense" if rank is None else "low-rank 1/4"
        stem = out / f"{label.replace(' ', '-')}.{'dense' if rank is None else 'r0.25'}.{weights}.{exporter}"
        export_onnx(_build(name, margs, rank, weights), f"{stem}.onnx", input_shape=shape, exporter=exporter,
                    optimize=False, opset=20 if exporter == "dynamo" else 17)
        raw = onnx.load(f"{stem}.onnx")
        basic = onnx.load_from_string(_ort_step(raw.SerializeToString(), "ORT_ENABLE_BASIC"))
        s_raw, s_basic = _slim(raw), _slim(basic)
        res = optimize_onnx(f"{stem}.onnx", f"{stem}.basic.onnx", "basic")
        slim = res.steps[0]
        n = [len(m.graph.node) for m in (raw, s_raw, basic, s_basic)]
        print(f"| {label} | {variant} | {weights} | {exporter} | {n[0]} | {n[1]} | {_delta(raw, s_raw)} "
              f"| {n[2]} | {n[3]} | {_delta(basic, s_basic)} "
              f"| {slim.outcome} ({slim.nodes_before}→{slim.nodes_after}) | {res.nodes_after} |", flush=True)

if __name__ == "__main__":
    main()
