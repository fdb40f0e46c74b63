"""`lrdeploy compare`: the dense original against a candidate, both run as deployed (ONNX Runtime, CPU).

Either side may be a bundle (exported on the fly, folded, into a temporary directory) or an .onnx file.
Accuracy and parity are measured on the real test split through the exported graphs, so the numbers are
those of what would ship, not of the PyTorch model.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lrdeploy import __version__
from lrdeploy.errors import UserError

SCHEMA = "lrdeploy.compare/1"


@dataclass
class Artifact:
    """One side of a comparison, resolved to an ONNX file plus what we know about it."""

    label: str
    source: Path
    kind: str  # "bundle" or "onnx"
    onnx_path: Path
    manifest: dict[str, Any] | None
    params: int
    flops: int | None
    onnx_bytes: int
    weights_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        manifest = self.manifest or {}
        return {
            "label": self.label,
            "source": str(self.source),
            "kind": self.kind,
            "model": manifest.get("model", {}).get("name"),
            "method": manifest.get("method", {}).get("name"),
            "params": self.params,
            "flops": self.flops,
            "onnx_bytes": self.onnx_bytes,
            "weights_bytes": self.weights_bytes,
            "structure": manifest.get("structure", {}),
        }


def _onnx_params(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer))


def resolve_artifact(label: str, path: Path, workdir: Path) -> Artifact:
    """Load a bundle (and export it) or check an .onnx file; a bad path is a one-line UserError."""
    from lrdeploy.exporters.onnx import export_onnx, load_onnx_checked, read_onnx_metadata

    path = Path(path)
    if not path.exists():
        raise UserError(f"{label} {path} does not exist", "pass a bundle directory or an .onnx file")
    if path.is_dir():
        from lrdeploy.bundle import load_bundle
        from lrdeploy.flops import count_flops, count_params

        bundle = load_bundle(path)
        onnx_path = workdir / f"{label}.onnx"
        export_onnx(bundle, onnx_path, optimize=False)
        weights = path / "weights.safetensors"
        return Artifact(
            label=label,
            source=path,
            kind="bundle",
            onnx_path=onnx_path,
            manifest=bundle.manifest,
            params=count_params(bundle.model),
            flops=count_flops(bundle.model, bundle.input_shape),
            onnx_bytes=onnx_path.stat().st_size,
            weights_bytes=weights.stat().st_size,
        )
    if path.suffix != ".onnx":
        raise UserError(
            f"{label} {path} is neither a bundle directory nor an .onnx file",
            "pass a bundle from lrdeploy train/compress or a file from lrdeploy export",
        )
    load_onnx_checked(path)
    manifest = read_onnx_metadata(path) or None
    flops = (manifest or {}).get("flops")
    # the manifest counts the model's parameters; ONNX initialisers also hold shape constants
    params = (manifest or {}).get("params") or _onnx_params(path)
    return Artifact(
        label=label,
        source=path,
        kind="onnx",
        onnx_path=path,
        manifest=manifest,
        params=params,
        flops=flops,
        onnx_bytes=path.stat().st_size,
        weights_bytes=(manifest or {}).get("weights_bytes"),
    )


def _dataset_name(explicit: str | None, *artifacts: Artifact) -> str:
    if explicit:
        return explicit
    for art in artifacts:
        name = ((art.manifest or {}).get("dataset") or {}).get("name")
        if name:
            return name
    return "mnist"


def evaluate_budget(
    accuracy: dict[str, Any],
    parity: dict[str, Any],
    max_accuracy_drop: float,
    min_agreement: float | None,
) -> dict[str, Any]:
    """Check the candidate against the user's budgets; a miss is listed by name, with the numbers."""
    drop_points = 100.0 * (accuracy["reference"] - accuracy["candidate"])
    checks = [
        {
            "name": "accuracy drop (points)",
            "limit": max_accuracy_drop,
            "value": drop_points,
            "passed": drop_points <= max_accuracy_drop,
        }
    ]
    if min_agreement is not None:
        agreement = parity["top1_agreement"]
        checks.append(
            {
                "name": "top-1 agreement",
                "limit": min_agreement,
                "value": agreement,
                "passed": agreement is not None and agreement >= min_agreement,
            }
        )
    failures = [
        f"{c['name']} {c['value']:.4g} misses the limit {c['limit']:g}" for c in checks if not c["passed"]
    ]
    return {"checks": checks, "failures": failures, "passed": not failures}


def compare_artifacts(
    dense: Path,
    candidate: Path,
    *,
    dataset: str | None = None,
    data_dir: Path | None = None,
    limit_test: int | None = None,
    batch_sizes: list[int] | tuple[int, ...] = (1, 32),
    threads: int | None = None,
    min_seconds: float = 1.0,
    max_accuracy_drop: float = 1.0,
    min_agreement: float | None = None,
    json_path: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure candidate against dense on accuracy, parity and interleaved latency; return the report dict."""
    from lrdeploy.data import load_dataset
    from lrdeploy.serving.bench import benchmark
    from lrdeploy.serving.parity import accuracy as accuracy_of
    from lrdeploy.serving.parity import output_parity, run_batched
    from lrdeploy.serving.report import latency_section, write_json
    from lrdeploy.serving.runtimes.ort_cpu import OrtCpuRuntime

    if json_path is not None and Path(json_path).is_dir():
        raise UserError(f"--json {json_path} is a directory", "give a file path, e.g. --json report.json")
    with tempfile.TemporaryDirectory(prefix="lrdeploy-compare-") as tmp:
        ref = resolve_artifact("dense", Path(dense), Path(tmp))
        cand = resolve_artifact("candidate", Path(candidate), Path(tmp))
        ds_name = _dataset_name(dataset, ref, cand)
        test_set = load_dataset(ds_name, "test", data_dir=data_dir, limit=limit_test)
        x = test_set.x.numpy()
        labels = test_set.y.numpy()

        runtimes = {
            "dense": OrtCpuRuntime(ref.onnx_path, threads=threads),
            "candidate": OrtCpuRuntime(cand.onnx_path, threads=threads),
        }
        logits = {name: run_batched(rt, x, 256) for name, rt in runtimes.items()}
        acc = {
            "reference": accuracy_of(logits["dense"], labels),
            "candidate": accuracy_of(logits["candidate"], labels),
            "dataset": ds_name,
            "split": "test",
            "samples": int(len(labels)),
            "delta": None,
        }
        acc["delta"] = acc["candidate"] - acc["reference"]
        parity = output_parity(logits["dense"], logits["candidate"])
        bench = benchmark(
            runtimes,
            tuple(x.shape[1:]),
            batch_sizes,
            min_seconds=min_seconds,
            progress=progress,
        )
        runtime_info = {name: rt.describe() for name, rt in runtimes.items()}

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "reference": ref.summary(),
        "candidate": cand.summary(),
        "ratios": {
            "params": ref.params / max(cand.params, 1),
            "flops": (ref.flops / cand.flops) if ref.flops and cand.flops else None,
            "onnx_bytes": ref.onnx_bytes / max(cand.onnx_bytes, 1),
        },
        "accuracy": acc,
        "parity": parity,
        "latency": latency_section(bench, "dense", "candidate"),
        "environment": {**bench.environment, "runtimes": runtime_info},
        "budget": evaluate_budget(acc, parity, max_accuracy_drop, min_agreement),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "lrdeploy_version": __version__,
    }
    if json_path is not None:
        write_json(json_path, report)
    return report
