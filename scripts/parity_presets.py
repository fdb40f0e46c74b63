"""Measure what correct precision conversions do to the parity statistics (the evidence behind TOLERANCES).

For each dataset: train LeNet-5 briefly, export it to ONNX, compare variants with the fp32 ONNX model in ORT:
- fp32 variants: ORT without graph optimisation; eager PyTorch;
- fp16: ``convert_float_to_float16(keep_io_types=True)`` in ORT (fp16 weights, the CPU EP computes in fp32);
  fp16 arithmetic: the PyTorch model in float16 on the CPU;
- bf16: the PyTorch model in bfloat16 (weights and arithmetic);
- int8: dynamic (MatMul/Gemm) and static QDQ (Conv too, calibrated on 512 training images);
- faults: one conv1 filter sign-flipped, fc3 scaled by 1.05, one fc2 row zeroed — each in the fp16 model.

Writes a JSON file and prints a Markdown table (docs/parity.md holds a copy). Run:
``.venv/bin/python scripts/parity_presets.py --out runs/parity-presets.json`` (about a minute per dataset).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from lrdeploy.bundle import load_bundle
from lrdeploy.data import load_dataset
from lrdeploy.exporters.onnx import export_onnx
from lrdeploy.serving.parity import TOLERANCES, check_tolerance, output_parity, run_batched
from lrdeploy.serving.runtimes import first_output
from lrdeploy.serving.runtimes.ort_cpu import OrtCpuRuntime
from lrdeploy.workflows import TrainRequest, train_bundle

KEYS = ("rel_l2", "cosine", "max_row_rel", "p99_row_rel", "max_rel", "p99_rel", "median_rel", "max_abs",
        "top1_agreement", "top5_agreement")


def fp16_model(src: Path, dst: Path, fault: str | None = None) -> Path:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    if fault:
        corrupt(model, fault)
    onnx.save(convert_float_to_float16(model, keep_io_types=True), str(dst))
    return dst


def corrupt(model: onnx.ModelProto, fault: str) -> None:
    """Damage one weight in place: the kind of bug a broken conversion or a bad checkpoint merge makes."""
    inits = {t.name: t for t in model.graph.initializer}
    layer = {"flip-conv1-filter": "conv1", "scale-fc3": "fc3", "zero-fc2-row": "fc2"}[fault]
    name = next(n for n, t in inits.items() if layer in n and len(t.dims) >= 2)
    w = numpy_helper.to_array(inits[name]).copy()
    if fault == "flip-conv1-filter":
        w[0] = -w[0]
    elif fault == "scale-fc3":
        w = w * 1.05
    else:
        w[0] = 0.0
    inits[name].CopyFrom(numpy_helper.from_array(w.astype(np.float32), name))


def no_opt_runtime(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    class _Rt:
        name = "ort-noopt"

        def run(self, x):
            return sess.run(None, {sess.get_inputs()[0].name: x})[0]

    return _Rt()


def torch_runtime(model: torch.nn.Module, dtype: torch.dtype):
    m = model.to(dtype).eval()

    class _Rt:
        name = f"torch-{dtype}"

        def run(self, x):
            with torch.inference_mode():
                return m(torch.from_numpy(x).to(dtype)).float().numpy()

    return _Rt()


def int8_static(src: Path, dst: Path, calib: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i:i + 64]} for i in range(0, len(calib), 64)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return dst


def int8_dynamic(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return dst


def measure(dataset: str, data_dir: Path | None, tmp: Path, n_test: int) -> dict:
    bundle_dir = tmp / f"lenet-{dataset}"
    train_bundle(TrainRequest(model_name="lenet5", dataset=dataset, data_dir=data_dir, epochs=2,
                              limit_train=10000, limit_test=1000, out=bundle_dir, progress=False))
    fp32 = tmp / f"{dataset}.onnx"
    export_onnx(load_bundle(bundle_dir), fp32, optimize=False)
    x = load_dataset(dataset, "test", data_dir=data_dir, limit=n_test).x.numpy()
    calib = load_dataset(dataset, "train", data_dir=data_dir, limit=512).x.numpy()
    ref = first_output(run_batched(OrtCpuRuntime(fp32, threads=1), {"input": x}, 256))
    model = load_bundle(bundle_dir).model

    variants = {
        "fp32 ORT no graph optimisation": no_opt_runtime(fp32),
        "fp32 eager PyTorch": torch_runtime(load_bundle(bundle_dir).model, torch.float32),
        "fp16 weights (ORT CPU)": OrtCpuRuntime(fp16_model(fp32, tmp / "fp16.onnx"), threads=1),
        "fp16 arithmetic (PyTorch CPU)": torch_runtime(load_bundle(bundle_dir).model, torch.float16),
        "bf16 arithmetic (PyTorch CPU)": torch_runtime(model, torch.bfloat16),
        "int8 dynamic (MatMul/Gemm)": OrtCpuRuntime(int8_dynamic(fp32, tmp / "dyn.onnx"), threads=1),
        "int8 static QDQ": OrtCpuRuntime(int8_static(fp32, tmp / "qdq.onnx", calib), threads=1),
    }
    for fault in ("flip-conv1-filter", "scale-fc3", "zero-fc2-row"):
        path = fp16_model(fp32, tmp / f"fp16-{fault}.onnx", fault)
        variants[f"fp16 + fault: {fault}"] = OrtCpuRuntime(path, threads=1)
    rows = {}
    for name, rt in variants.items():
        out = first_output(run_batched(rt, {"input": x}, 256))
        p = output_parity(ref, out)
        rows[name] = {k: p[k] for k in KEYS}
        rows[name]["passes"] = [prec for prec in TOLERANCES if not check_tolerance(p, prec)]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--datasets", default="mnist,fashion-mnist")
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("runs/parity-presets.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ds in args.datasets.split(","):
            results[ds] = measure(ds, args.data_dir, Path(tmp), args.n_test)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| data | variant | rel-L2 | cosine | worst-sample rel | p99 elem. rel | max abs | top-1 | top-5 "
          "| passes presets |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ds, rows in results.items():
        for name, r in rows.items():
            passes = ", ".join(r["passes"]) or "none"
            print(f"| {ds} | {name} | {r['rel_l2']:.1e} | {r['cosine']:.7f} | {r['max_row_rel']:.1e} | "
                  f"{r['p99_rel']:.1e} | {r['max_abs']:.1e} | {r['top1_agreement']:.4f} | "
                  f"{r['top5_agreement']:.4f} | {passes} |")

if __name__ == "__main__":
    main()
