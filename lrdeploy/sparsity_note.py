"""What weight sparsity buys where — said in numbers wherever a sparse model is exported or compared.

Masked layers fold into dense weights with zeros (:mod:`lrdeploy.layers.masked`): ONNX Runtime densifies
sparse initialisers at load and has no sparse Conv kernel, torch's CSR matmul runs at 0.1–0.8× dense speed on
this CPU, and DeepSparse (the paper's CPU runtime) is end-of-life. So on the CPU a sparse model executes every
multiply of its dense shape — a Sparse Wide model, wider than the original, is *slower*. 2:4 patterns run
faster only on NVIDIA Ampere+ GPUs (TensorRT ``--sparse-weights``, ``to_sparse_semi_structured``). What a CPU
user would do instead: dense int8 (``export --precision int8``).
"""

from __future__ import annotations

from typing import Any


def sparse_layers(manifest: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The manifest's layers with a mask that drops weights (density < 1)."""
    structure = (manifest or {}).get("structure") or {}
    return {name: entry for name, entry in structure.items()
            if isinstance(entry, dict) and isinstance(entry.get("density"), (int, float))
            and entry["density"] < 1.0}


def sparsity_note(manifest: dict[str, Any] | None, executed_flops: int | None = None,
                  dense_flops: int | None = None, speedups: dict[str, float] | None = None) -> str | None:
    """One paragraph for a sparse artefact (None for a dense one): how sparse it is, what actually runs."""
    layers = sparse_layers(manifest)
    if not layers:
        return None
    densities = [float(e["density"]) for e in layers.values()]
    nm = sorted({str(e.get("pattern")) for e in layers.values() if ":" in str(e.get("pattern", ""))})
    log = ((manifest or {}).get("method") or {}).get("log") or {}
    parts = [f"{len(layers)} sparse layers (mean density {sum(densities) / len(densities):.2f}"
             + (f", pattern {'/'.join(nm)}" if nm else ", unstructured") + ") are deployed as dense weights "
             "with zeros: ONNX Runtime densifies sparse initialisers and has no sparse Conv kernel, so every "
             "zero is multiplied"]
    if executed_flops and isinstance(log.get("sparse_flops"), int):
        parts.append(f"the graph executes {executed_flops:,} FLOPs per sample where the sparse model needs "
                     f"{log['sparse_flops']:,}")
    if executed_flops and dense_flops:
        parts.append(f"{executed_flops / dense_flops:.2f}× the dense original's {dense_flops:,}")
    if speedups:
        shown = ", ".join(f"b{b} {s:.2f}×" for b, s in speedups.items())
        parts.append(f"measured speed vs the dense original: {shown}")
    tail = ("2:4 weights run faster only on NVIDIA Ampere+ GPUs (TensorRT --sparse-weights)" if nm else
            "unstructured sparsity pays only on a sparse runtime (DeepSparse, end-of-life; CSR kernels ran "
            "at 0.1–0.8× dense here)")
    cpu = "on the CPU, dense int8 (export --precision int8) is the faster path"
    return "; ".join(parts) + f". {tail}; {cpu}."
