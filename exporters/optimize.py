"""Offline graph optimisation presets for an exported ONNX file, each step checked and verified.

``optimize_onnx(src, dst, preset)`` runs a short pipeline on a graph written by :func:`export_onnx` and
writes the result atomically:

- ``none``  — the graph as exported (checked, copied);
- ``basic`` — onnxslim (kept where it helps), then ONNX Runtime at ``ORT_ENABLE_BASIC``: constant folding,
  redundant-node elimination and fusions that stay inside the standard ONNX domain, so the file still runs
  in any runtime (TensorRT, OpenVINO, ...);
- ``all``   — onnxslim (kept where it helps), then ORT at ``ORT_ENABLE_EXTENDED``: adds ``com.microsoft``
  fused ops (FusedConv, FusedGemm, Gelu, LayerNorm/attention fusions), so the file is ORT-only.

Why "all" stops at EXTENDED offline: ``ORT_ENABLE_ALL`` adds the layout transformer, which rewrites Conv
graphs into NCHWc blocked layouts sized for the vector width of the CPU doing the optimisation (AVX2 blocks
of 8, AVX-512 of 16). ORT warns that such a saved model "should only be used in the same environment the
model was optimized in"; an artefact we ship must not be tied to the build machine. ORT still applies its
layout pass when the EXTENDED file is loaded, on the machine that serves it, so nothing is lost.

The onnxslim step is kept only where it helps: when its graph has the same nodes and initializers as the
one before, or fails any check below, the graph before it is kept and the step record says why
(``outcome`` "unchanged" / "rejected"). It must also leave every graph input/output dimension as it was (a
simplifier that bakes the batch size in is a bug), keep the graph in the standard ONNX domain (TensorRT
parses it) and keep ``metadata_props`` (the lrdeploy manifest). onnxslim is a dependency of lrdeploy; a
user environment without it gets ``outcome`` "unavailable" with the fix, never a silent skip. On graphs
from the dynamo exporter it changes nothing once biases are non-zero (docs/optimize.md); it matters for
legacy-exporter graphs (Identity, Shape/Gather/Concat chains) and removes ``x + 0`` bias Adds of freshly
initialised models.

After every step the new graph is checked (``onnx.checker``; full shape-inference check while the graph
uses only standard ONNX domains, the structural check once contrib ops appear, because ONNX has no schemas
for them) and run in ONNX Runtime against the graph before it on the same random inputs, at two batch
sizes and two sizes of the other symbolic dims: every output must agree to rel-L2 < 1e-5 (fp32 rounding
only). An ORT step that fails is rejected with a UserError naming the step; nothing is written. The step
records are also stored in the written file (metadata ``lrdeploy.optimize_steps``, JSON).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
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


OUTCOMES = ("applied", "unchanged", "rejected", "unavailable", "disabled")


@dataclass
class StepResult:
    """One optimisation step: what its graph changed and whether that graph was kept.

    ``nodes_after``/``op_delta`` describe the graph the step produced, kept or not (so a rejected step still
    shows what it would have changed). ``reason`` is set whenever ``applied`` is False.
    """

    name: str
    applied: bool  # the step's graph was kept
    outcome: str = "applied"  # one of OUTCOMES
    reason: str | None = None
    nodes_before: int = 0
    nodes_after: int = 0
    op_delta: dict[str, int] = field(default_factory=dict)  # op type -> count after − count before (≠ 0 only)
    initializers_delta: int = 0  # initializer elements after − before (constant folding can grow them)
    parity_rel_l2: float | None = None  # worst over outputs and verification inputs
    checker: str | None = None  # "full", "structural" (contrib ops present), None when not verified
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


def io_signature(proto: onnx.ModelProto) -> dict[str, tuple[int, tuple[int | str, ...]]]:
    """Element type and declared dims (size, symbol name, or "?") of every graph input and output."""
    init_names = {i.name for i in proto.graph.initializer}
    sig = {}
    for kind, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for v in values:
            if v.name in init_names:
                continue
            tt = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            sig[f"{kind} {v.name}"] = (tt.elem_type, tuple(dims))
    return sig


def initializer_elements(proto: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in proto.graph.initializer)


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


def random_feeds(
    proto: onnx.ModelProto, *, batch: int = 3, seed: int = 0, length: int = 7
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input: standard normal floats, small non-negative ints (valid token ids
    for any vocabulary), symbolic dims set to ``batch`` on axis 0 and ``length`` elsewhere (distinct sizes
    expose dimensions that are accidentally tied together)."""
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
        shape = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else length)
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
    return run_graph_many(data, [feeds], level=level)[0]


def run_graph_many(
    data: bytes, feed_sets: Sequence[Mapping[str, np.ndarray]], *, level: str = "ORT_DISABLE_ALL"
) -> list[list[np.ndarray]]:
    """:func:`run_graph` for several input sets, one session."""
    from lrdeploy.exporters.onnx import ort_session

    try:
        session = ort_session(data, level)
    except Exception as exc:
        raise UserError(f"ONNX Runtime cannot load the graph ({str(exc).strip().splitlines()[0][:300]})",
                        "re-export it") from exc
    names = {i.name for i in session.get_inputs()}
    outs = []
    for feeds in feed_sets:
        used = {k: v for k, v in feeds.items() if k in names}
        try:
            outs.append(session.run(None, used))
        except Exception as exc:  # e.g. a shape baked into the graph that these inputs do not have
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in used.items())
            raise UserError(f"ONNX Runtime cannot run the graph on inputs {shapes} "
                            f"({str(exc).strip().splitlines()[0][:300]})",
                            "check the input shapes; a fixed dimension may have been baked in") from exc
    return outs


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

SLIM_REQUIREMENT = "onnxslim>=0.1.98"  # keep in step with pyproject.toml
FeedChecks = list[tuple[Mapping[str, np.ndarray], list[np.ndarray]]]  # (inputs, outputs of the graph before)


def _ort_step(data: bytes, level: str) -> bytes:
    from lrdeploy.exporters.onnx import ort_session

    with tempfile.TemporaryDirectory(prefix="lrdeploy-opt-") as tmp:
        out = os.path.join(tmp, "model.onnx")
        ort_session(data, level, optimized_model_filepath=out)
        return Path(out).read_bytes()


def _slim_step(data: bytes) -> bytes:
    """onnxslim's graph (all its default passes, no shape overrides), with our metadata_props kept.

    Raises ImportError when onnxslim is missing and UserError when it fails or returns nothing.
    """
    import onnxslim  # lazily: a broken install must not break `import lrdeploy`

    proto = onnx.load_from_string(data)
    try:
        slimmed = onnxslim.slim(onnx.load_from_string(data))  # slim() mutates its input
    except Exception as exc:  # a third-party pass can fail in many ways; report it in the step record
        raise UserError(f"onnxslim failed ({type(exc).__name__}: {_first_line(exc)})") from exc
    finally:
        import onnxruntime

        from lrdeploy import terminal

        onnxruntime.set_default_logger_severity(terminal.ort_severity())  # slim() sets it to ERROR; restore
    if not isinstance(slimmed, onnx.ModelProto):
        raise UserError("onnxslim returned no model")
    copy_metadata(proto, slimmed)
    return slimmed.SerializeToString()


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def _verify_step(name: str, before: bytes, after: bytes, checks: FeedChecks) -> tuple[StepResult, FeedChecks]:
    """Check ``after`` against ``before``; UserError naming the step if it fails. Returns the step record
    and the checks re-based on ``after``'s outputs (each step is compared with the one before it)."""
    p_before, p_after = onnx.load_from_string(before), onnx.load_from_string(after)
    sig_before, sig_after = io_signature(p_before), io_signature(p_after)
    if sig_before != sig_after:
        keys = sorted(k for k in set(sig_before) | set(sig_after) if sig_before.get(k) != sig_after.get(k))
        diff = "; ".join(f"{k}: {sig_before.get(k)} -> {sig_after.get(k)}" for k in keys)
        raise UserError(f"optimisation step {name} changed the graph inputs/outputs (type, dims): "
                        f"{diff[:300]}", "use a lower --optimize preset and report the model")
    checker = check_graph(p_after, f"optimisation step {name}")
    outs = run_graph_many(after, [feeds for feeds, _ in checks])
    errs = [worst_rel_l2(ref, out) for (_, ref), out in zip(checks, outs, strict=True)]
    err = float("nan") if any(np.isnan(e) for e in errs) else max(errs)
    if not err < STEP_PARITY_RTOL:  # NaN fails too
        raise UserError(f"optimisation step {name} changed the outputs: rel-L2 {err:.2e} "
                        f"≥ {STEP_PARITY_RTOL:.0e}",
                        "use a lower --optimize preset and report the model")
    step = StepResult(name=name, applied=True, **_graph_delta(p_before, p_after), parity_rel_l2=err,
                      checker=checker)
    return step, [(feeds, out) for (feeds, _), out in zip(checks, outs, strict=True)]


def _graph_delta(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, Any]:
    return {"nodes_before": len(before.graph.node), "nodes_after": len(after.graph.node),
            "op_delta": histogram_delta(op_histogram(before), op_histogram(after)),
            "initializers_delta": initializer_elements(after) - initializer_elements(before)}


def _run_slim(data: bytes, checks: FeedChecks) -> tuple[StepResult, bytes, FeedChecks]:
    """The onnxslim step, kept only where it helps: the record, the graph to go on with, and the checks."""
    start = time.perf_counter()
    before = onnx.load_from_string(data)
    no_delta = {"nodes_before": len(before.graph.node), "nodes_after": len(before.graph.node)}

    def keep_before(outcome: str, reason: str, **delta: Any) -> tuple[StepResult, bytes, FeedChecks]:
        step = StepResult("onnxslim", applied=False, outcome=outcome, reason=reason,
                          **(delta or no_delta), seconds=time.perf_counter() - start)
        return step, data, checks

    try:
        slimmed = _slim_step(data)
    except ImportError:
        return keep_before("unavailable", f"onnxslim is not installed, so the graph was not simplified; "
                                          f"pip install '{SLIM_REQUIREMENT}'")
    except UserError as exc:
        return keep_before("rejected", f"{exc.message}; kept the graph before it")
    after = onnx.load_from_string(slimmed)
    delta = _graph_delta(before, after)
    if uses_only_standard_domains(before) and not uses_only_standard_domains(after):
        extra = sorted(k for k in op_histogram(after) if ":" in k)
        return keep_before("rejected", f"onnxslim added non-standard ops {extra}, which TensorRT cannot "
                                       "parse; kept the graph before it", **delta)
    try:
        step, checks_after = _verify_step("onnxslim", data, slimmed, checks)
    except UserError as exc:
        return keep_before("rejected", f"{exc.message}; kept the graph before it", **delta)
    step.seconds = time.perf_counter() - start
    if (not delta["op_delta"] and delta["nodes_after"] == delta["nodes_before"]
            and not delta["initializers_delta"]
            and len(after.graph.initializer) == len(before.graph.initializer)):
        step.applied, step.outcome = False, "unchanged"  # verified, but no reason to swap graphs
        step.reason = ("onnxslim found nothing to simplify (same ops, same initializers); "
                       "kept the graph before it")
        return step, data, checks
    return step, slimmed, checks_after


def optimize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    preset: str = "none",
    *,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    use_onnxslim: bool = True,
) -> OptimizeResult:
    """Optimise ``src`` with ``preset`` (none/basic/all, see the module docstring) and write ``dst``.

    ``feeds`` are the verification inputs, one set or several (default: two :func:`random_feeds` sets, at
    batch 3 and 2, other symbolic dims 7 and 5). ``src`` should be the portable ``.onnx`` from export, not an
    ``.ort.onnx`` (already optimised, contrib ops). ``use_onnxslim=False`` leaves the simplifier out
    (recorded as "disabled").
    """
    if preset not in PRESETS:
        raise UserError(f"unknown optimisation preset {preset!r}", f"choose one of: {', '.join(PRESETS)}")
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        raise UserError(f"{dst} is a directory", "pass the path of the .onnx file to write")
    proto = load_model(src)
    check_graph(proto, f"input {src}")
    data = proto.SerializeToString()
    if feeds is None:
        feed_sets = [random_feeds(proto), random_feeds(proto, batch=2, seed=1, length=5)]
    else:
        feed_sets = [dict(feeds)] if isinstance(feeds, Mapping) else [dict(f) for f in feeds]
    checks: FeedChecks = list(zip(feed_sets, run_graph_many(data, feed_sets), strict=True))
    n_before = len(proto.graph.node)

    steps: list[StepResult] = []
    if preset != "none":
        if use_onnxslim:
            step, data, checks = _run_slim(data, checks)
        else:
            step = StepResult("onnxslim", applied=False, outcome="disabled", reason="use_onnxslim=False",
                              nodes_before=n_before, nodes_after=n_before)
        steps.append(step)
        level = _ORT_LEVELS[preset]
        start = time.perf_counter()
        out = _ort_step(data, level)
        name = f"ort-{level.removeprefix('ORT_ENABLE_').lower()}"
        step, checks = _verify_step(name, data, out, checks)
        step.seconds = time.perf_counter() - start
        steps.append(step)
        data = out

    final = onnx.load_from_string(data)
    record = [{k: v for k, v in st.to_dict().items() if k != "seconds"} for st in steps]
    copy_metadata(proto, final, {"lrdeploy.optimize": preset,
                                 "lrdeploy.optimize_steps": json.dumps(record, sort_keys=True)})
    atomic.write_bytes(dst, final.SerializeToString())
    return OptimizeResult(src=src, dst=dst, preset=preset, nodes_before=n_before,
                          nodes_after=len(final.graph.node), steps=steps, op_histogram=op_histogram(final),
                          portable=uses_only_standard_domains(final))
