"""Offline graph optimisation presets for an exported ONNX file, each step checked and verified.

``optimize_onnx(src, dst, preset)`` runs a short pipeline on a graph written by :func:`export_onnx` and
writes the result atomically:

- ``none``  — the graph as exported (checked, copied);
- ``basic`` — onnxslim (where installed), then ONNX Runtime at ``ORT_ENABLE_BASIC``: constant folding,
  redundant-node elimination and fusions that stay inside the standard ONNX domain, so the file still runs
  in any runtime (TensorRT, OpenVINO, ...);
- ``all``   — onnxslim (where installed), then ORT at ``ORT_ENABLE_EXTENDED``: adds ``com.microsoft`` fused
  ops (FusedConv, FusedGemm, Gelu, LayerNorm/attention fusions), so the file is ORT-only.

Why "all" stops at EXTENDED offline: ``ORT_ENABLE_ALL`` adds the layout transformer, which rewrites Conv
graphs into NCHWc blocked layouts sized for the vector width of the CPU doing the optimisation (AVX2 blocks
of 8, AVX-512 of 16). ORT warns that such a saved model "should only be used in the same environment the
model was optimized in"; an artefact we ship must not be tied to the build machine. ORT still applies its
layout pass when the EXTENDED file is loaded, on the machine that serves it, so nothing is lost.

onnxslim is an optional dependency: it is imported lazily and, if missing, its step is recorded as skipped
with the reason (``pip install onnxslim``). On graphs from the dynamo exporter it usually changes nothing
(baseline.md §5 (f)); it matters for legacy-exporter graphs full of Shape/Gather/Concat chains.

After every step the new graph is checked (``onnx.checker``; full shape-inference check while the graph
uses only standard ONNX domains, the structural check once contrib ops appear, because ONNX has no schemas
for them) and run in ONNX Runtime against the graph before it on the same random inputs: every output must
agree to rel-L2 < 1e-5 (fp32 rounding only). A step that fails either is rejected with a UserError naming
the step; nothing is written.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lrdeploy import atomic
from lrdeploy.errors import UserError

PRESETS = ("none", "basic", "all")
STEP_PARITY_RTOL = 1e-5  # rel-L2 between a step's output and its input graph (fp32 reordering only)
STANDARD_DOMAINS = ("", "ai.onnx")
_ORT_LEVELS = {"basic": "ORT_ENABLE_BASIC", "all": "ORT_ENABLE_EXTENDED"}


@dataclass
class StepResult:
    """One optimisation step: what it did to the graph and how well the result matched its input."""

    name: str
    applied: bool
    skipped_reason: str | None = None
    nodes_before: int = 0
    nodes_after: int = 0
    op_delta: dict[str, int] = field(default_factory=dict)  # op type -> count after − count before (≠ 0 only)
    parity_rel_l2: float | None = None  # worst over outputs
    checker: str | None = None  # "full", "structural" (contrib ops present), None when skipped
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OptimizeResult:
    src: Path
    dst: Path
    preset: str
    nodes_before: int
    nodes_after: int
    steps: list[StepResult]
    op_histogram: dict[str, int]  # of the written graph
    portable: bool  # only standard ONNX domains: runs outside ONNX Runtime

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["src"], d["dst"] = str(self.src), str(self.dst)
        return d


# --- helpers shared with precision.py ---


def op_histogram(proto: onnx.ModelProto) -> dict[str, int]:
    """Op counts of the main graph, keyed ``op`` for standard ops and ``domain:op`` for the others."""
    return dict(Counter(n.op_type if n.domain in STANDARD_DOMAINS else f"{n.domain}:{n.op_type}"
                        for n in proto.graph.node))


def histogram_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    keys = sorted(set(before) | set(after))
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if after.get(k, 0) != before.get(k, 0)}


def uses_only_standard_domains(proto: onnx.ModelProto) -> bool:
    return all(n.domain in STANDARD_DOMAINS for n in proto.graph.node)


def check_graph(proto: onnx.ModelProto, what: str) -> str:
    """Run onnx.checker; return which check ran. Contrib-op graphs get the structural check only."""
    full = uses_only_standard_domains(proto)
    try:
        onnx.checker.check_model(proto, full_check=full)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what}: the graph fails the ONNX checker ({first})",
                        "this is a bug in the conversion step; run without it and report the model") from exc
    return "full" if full else "structural"


_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
}


def random_feeds(proto: onnx.ModelProto, *, batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input: standard normal floats, small non-negative ints (valid token ids
    for any vocabulary), symbolic dims set to ``batch`` on axis 0 and 7 elsewhere (odd sizes expose
    dimensions that are accidentally tied together)."""
    rng = np.random.default_rng(seed)
    init_names = {i.name for i in proto.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for inp in proto.graph.input:
        if inp.name in init_names:
            continue
        tt = inp.type.tensor_type
        dtype = _NP_TYPES.get(tt.elem_type)
        if dtype is None:
            raise UserError(f"input {inp.name!r} has an unsupported element type {tt.elem_type}",
                            "pass explicit inputs")
        shape = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else 7)
                 for i, d in enumerate(tt.shape.dim)]
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[inp.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def run_graph(
    data: bytes, feeds: Mapping[str, np.ndarray], *, level: str = "ORT_DISABLE_ALL"
) -> list[np.ndarray]:
    """All outputs of ``data`` in a one-thread CPU session (``ORT_DISABLE_ALL``: the graph as written)."""
    from lrdeploy.exporters.onnx import ort_session

    try:
        session = ort_session(data, level)
    except Exception as exc:
        raise UserError(f"ONNX Runtime cannot load the graph ({str(exc).strip().splitlines()[0][:300]})",
                        "re-export it") from exc
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def worst_rel_l2(ref: list[np.ndarray], cand: list[np.ndarray]) -> float:
    from lrdeploy.exporters.onnx import rel_l2

    if len(ref) != len(cand):
        return float("inf")
    return max((rel_l2(c, r) for r, c in zip(ref, cand, strict=True)), default=0.0)


def load_model(src: str | os.PathLike) -> onnx.ModelProto:
    path = Path(src)
    if not path.is_file():
        raise UserError(f"ONNX file {path} does not exist", "pass the path written by lrdeploy export")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise UserError(f"{path} is not a valid ONNX model (truncated or corrupt)", "re-export it") from exc


def copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto, extra: Mapping[str, str] | None = None) -> None:
    """Keep the lrdeploy manifest/export stamps (tools that rewrite graphs tend to drop them)."""
    props = {p.key: p.value for p in dst.metadata_props}
    props.update({p.key: p.value for p in src.metadata_props})
    props.update(extra or {})
    del dst.metadata_props[:]
    onnx.helper.set_model_props(dst, props)


# --- the steps ---


def _ort_step(data: bytes, level: str) -> bytes:
    from lrdeploy.exporters.onnx import ort_session

    with tempfile.TemporaryDirectory(prefix="lrdeploy-opt-") as tmp:
        out = os.path.join(tmp, "model.onnx")
        ort_session(data, level, optimized_model_filepath=out)
        return Path(out).read_bytes()


def _slim_step(data: bytes) -> bytes | str:
    """onnxslim's output, or the reason it was skipped."""
    try:
        import onnxslim  # optional dependency
    except ImportError:
        return "onnxslim is not installed (pip install onnxslim)"
    slimmed = onnxslim.slim(onnx.load_from_string(data))
    if slimmed is None:
        return "onnxslim returned no model"
    return slimmed.SerializeToString()


def _verify_step(name: str, before: bytes, after: bytes, feeds: Mapping[str, np.ndarray],
                 ref_out: list[np.ndarray]) -> tuple[StepResult, list[np.ndarray]]:
    p_before, p_after = onnx.load_from_string(before), onnx.load_from_string(after)
    checker = check_graph(p_after, f"optimisation step {name}")
    out = run_graph(after, feeds)
    err = worst_rel_l2(ref_out, out)
    if not err < STEP_PARITY_RTOL:  # NaN fails too
        raise UserError(f"optimisation step {name} changed the outputs: rel-L2 {err:.2e} "
                        f"≥ {STEP_PARITY_RTOL:.0e}",
                        "use a lower --optimize preset and report the model")
    h_before, h_after = op_histogram(p_before), op_histogram(p_after)
    return StepResult(name=name, applied=True, nodes_before=len(p_before.graph.node),
                      nodes_after=len(p_after.graph.node), op_delta=histogram_delta(h_before, h_after),
                      parity_rel_l2=err, checker=checker), out


def optimize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    preset: str = "none",
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    use_onnxslim: bool = True,
) -> OptimizeResult:
    """Optimise ``src`` with ``preset`` (none/basic/all, see the module docstring) and write ``dst``.

    ``feeds`` are the verification inputs (default: :func:`random_feeds`, batch 3). ``src`` should be the
    portable ``.onnx`` from export, not an ``.ort.onnx`` (already optimised, contrib ops).
    """
    if preset not in PRESETS:
        raise UserError(f"unknown optimisation preset {preset!r}", f"choose one of: {', '.join(PRESETS)}")
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        raise UserError(f"{dst} is a directory", "pass the path of the .onnx file to write")
    proto = load_model(src)
    check_graph(proto, f"input {src}")
    data = proto.SerializeToString()
    feeds = dict(feeds) if feeds is not None else random_feeds(proto)
    ref_out = run_graph(data, feeds)
    n_before = len(proto.graph.node)

    steps: list[StepResult] = []
    if preset != "none":
        if use_onnxslim:
            start = time.perf_counter()
            slimmed = _slim_step(data)
            if isinstance(slimmed, str):
                steps.append(StepResult("onnxslim", applied=False, skipped_reason=slimmed,
                                        nodes_before=n_before, nodes_after=n_before))
            else:
                step, ref_out = _verify_step("onnxslim", data, slimmed, feeds, ref_out)
                step.seconds = time.perf_counter() - start
                steps.append(step)
                data = slimmed
        level = _ORT_LEVELS[preset]
        start = time.perf_counter()
        out = _ort_step(data, level)
        name = f"ort-{level.removeprefix('ORT_ENABLE_').lower()}"
        step, ref_out = _verify_step(name, data, out, feeds, ref_out)
        step.seconds = time.perf_counter() - start
        steps.append(step)
        data = out

    final = onnx.load_from_string(data)
    copy_metadata(proto, final, {"lrdeploy.optimize": preset})
    atomic.write_bytes(dst, final.SerializeToString())
    return OptimizeResult(src=src, dst=dst, preset=preset, nodes_before=n_before,
                          nodes_after=len(final.graph.node), steps=steps, op_histogram=op_histogram(final),
                          portable=uses_only_standard_domains(final))
