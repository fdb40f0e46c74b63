"""Small real ONNX models for the parity tests: a briefly trained LeNet-5 in fp32, its fp16 conversion, and
fp16 conversions with one deliberately corrupted weight (what a broken converter or a bad merge produces)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def train_lenet_onnx(root: Path, data_dir: Path, *, limit_train: int = 2000) -> Path:
    """LeNet-5 trained for one epoch on the first ``limit_train`` MNIST images, exported to fp32 ONNX."""
    from lrdeploy.bundle import load_bundle
    from lrdeploy.exporters.onnx import export_onnx
    from lrdeploy.workflows import TrainRequest, train_bundle

    bundle = root / "lenet"
    train_bundle(TrainRequest(model_name="lenet5", dataset="mnist", data_dir=data_dir, epochs=1,
                              batch_size=32, limit_train=limit_train, limit_test=200, out=bundle,
                              progress=False))
    path = root / "fp32.onnx"
    export_onnx(load_bundle(bundle), path, optimize=False)
    return path


def _cast_weights_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fallback fp16 conversion: every float initialiser stored as fp16 behind a Cast back to float."""
    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(init).astype(np.float16)
        name = init.name
        init.CopyFrom(numpy_helper.from_array(w, f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return model


def to_fp16(src: Path, dst: Path, *, fault: str | None = None) -> Path:
    """``src`` converted to fp16 weights (fp32 inputs/outputs), optionally with one weight corrupted first.

    Uses ONNX Runtime's converter (``convert_float_to_float16(keep_io_types=True)``) when it is importable.
    ``fault``: "flip-filter" (conv1's first filter sign-flipped) or "scale" (the last layer's weights × 1.05).
    """
    model = onnx.load(str(src))
    if fault is not None:
        corrupt(model, fault)
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:  # pragma: no cover - depends on the onnxruntime build
        converted = _cast_weights_to_fp16(model)
    else:
        converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(dst))
    return dst


def corrupt(model: onnx.ModelProto, fault: str) -> None:
    inits = [t for t in model.graph.initializer if len(t.dims) >= 2 and t.data_type == TensorProto.FLOAT]
    if fault == "flip-filter":
        target = next(t for t in inits if len(t.dims) == 4)  # the first convolution
        w = numpy_helper.to_array(target).copy()
        w[0] = -w[0]
    elif fault == "scale":
        target = inits[-1]  # the classifier
        w = numpy_helper.to_array(target) * np.float32(1.05)
    else:
        raise ValueError(fault)
    target.CopyFrom(numpy_helper.from_array(w.astype(np.float32), target.name))
