"""Turn a training-time model into a plain inference model whose exported graph has only standard ops.

Every module that knows how to fold itself (has ``fold(mode)``) is replaced by its plain torch form. This
works on a deep copy so the caller's model (and its optimiser state) is never touched.

Modes: "factored" keeps every factor pair, "dense" re-multiplies every pair into one W, and "auto" decides per
layer by *measured* cost on the target backend at the target batch size (:mod:`lrdeploy.exporters.fold_cost`):
ONNX Runtime never re-associates a factor pair itself, so this offline choice is the only place it happens.
Layers whose factor pair stores no fewer parameters than W are folded dense without measuring. Every mode is
exact up to floating-point rounding; :func:`fold_with_report` also says what was decided and why.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.exporters import fold_cost
from lrdeploy.exporters.fold_cost import LayerShape, MeasureConfig
from lrdeploy.exporters.layer_times import LayerTimes
from lrdeploy.host import resolve_threads
from lrdeploy.layers.lowrank import FOLD_MODES, LowRankLayer

ALL_FOLD_MODES = (*FOLD_MODES, "auto")


def _foldable(module: nn.Module) -> bool:
    return callable(getattr(module, "fold", None))


@dataclass
class LayerFold:
    """What happened to one factorised layer. Times are ONNX Runtime micro-benchmark medians (ms)."""

    name: str
    kind: str
    shape: str  # human form, e.g. "Conv 6→16 k5x5 s1 @14x14"
    input_shape: list[int] | None  # as fed at the target batch size; None when never reached
    rank: int
    full_rank: int
    break_even_rank: float
    break_even_source: str  # "measured" (interpolated from timings) | "flops" (mn/(m+n))
    decision: str  # "factored" | "dense"
    reason: str
    factored_ms: float | None = None  # predicted, from the micro-benchmark of this layer shape
    dense_ms: float | None = None
    measured_ms: float | None = None  # in the exported model: its kernels' profiled time per call
    cached: bool = False
    params_factored: int = 0
    params_dense: int = 0

    @property
    def predicted_ms(self) -> float | None:
        return self.dense_ms if self.decision == "dense" else self.factored_ms


@dataclass
class FoldReport:
    mode: str
    backend: str
    batch_size: int
    threads: int | None
    ort_version: str | None
    cpu_model: str | None
    cache_path: str | None
    layers: list[LayerFold] = field(default_factory=list)
    measured_shapes: int = 0  # layer shapes timed in this call
    cached_shapes: int = 0  # layer shapes answered from the cache
    seconds: float = 0.0
    in_model: dict[str, Any] | None = None  # how measured_ms was measured, and the time outside these layers

    def attach_measured(self, times: LayerTimes, how: Mapping[str, Any]) -> None:
        """Fill each layer's ``measured_ms`` from an in-model profile (:mod:`.layer_times`)."""
        for lf in self.layers:
            lf.measured_ms = times.per_layer_ms.get(lf.name)
        self.in_model = {**how, **times.to_dict()}
        self.in_model.pop("per_layer_ms", None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = {
            "layers": len(self.layers),
            "dense": sum(lf.decision == "dense" for lf in self.layers),
            "factored": sum(lf.decision == "factored" for lf in self.layers),
            "predicted_factored_all_ms": _sum_or_none(lf.factored_ms for lf in self.layers),
            "predicted_dense_all_ms": _sum_or_none(lf.dense_ms for lf in self.layers),
            "predicted_chosen_ms": _sum_or_none(lf.predicted_ms for lf in self.layers),
            "measured_layers_ms": _sum_or_none(lf.measured_ms for lf in self.layers),
        }
        return d

    def rich_table(self) -> Any:
        """Per layer: shape, rank, break-even rank, predicted and measured times, decision and why; on a
        narrow console the later columns go to further tables, each led by the layer's name."""
        from rich.table import Table

        from lrdeploy.tables import fit

        title = f"Folding ({self.mode}, {self.backend}, batch {self.batch_size})"
        table = Table(title=title)
        for col, justify in [("layer", "left"), ("shape", "left"), ("rank", "right"), ("full", "right"),
                             ("break-even", "right"), ("factored ms", "right"), ("dense ms", "right"),
                             ("decision", "left"), ("in model ms", "right"), ("why", "left")]:
            text = col in ("layer", "shape", "why")  # names and text fold or wrap; figures never wrap
            table.add_column(col, justify=justify, no_wrap=not text,  # type: ignore[arg-type]
                             overflow="fold" if text else "ellipsis")
        for lf in self.layers:
            be = f"{lf.break_even_rank:.1f}" + ("" if lf.break_even_source == "measured" else " (flops)")
            table.add_row(lf.name or "<model>", lf.shape, str(lf.rank), str(lf.full_rank), be,
                          _ms(lf.factored_ms), _ms(lf.dense_ms),
                          f"[bold]{lf.decision}[/bold]" if lf.decision == "dense" else lf.decision,
                          _ms(lf.measured_ms), lf.reason)
        if self.in_model:
            m = self.in_model
            share = m.get("attributed_share")
            table.caption = (
                "predicted: ONNX Runtime micro-benchmark of each layer shape alone; in model: profiled "
                f"kernel time per call in the exported graph (batch {m.get('batch_size')}, "
                f"{m.get('threads')} threads). Outside these layers: {m.get('other_ms', 0):.4f} ms"
                + (f"; layers hold {share:.0%} of kernel time" if share is not None else ""))
        return fit(table, keys=1)

    def render(self, console: Any = None) -> None:
        from rich.console import Console

        console = console or Console()
        if not self.layers:
            console.print(f"Folding ({self.mode}): no factorised layers, nothing to fold")
            return
        console.print(self.rich_table())


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _sum_or_none(values: Iterator[float | None]) -> float | None:
    vals = list(values)
    return None if not vals or any(v is None for v in vals) else float(sum(vals))  # type: ignore[arg-type]


def fold_model(model: nn.Module, mode: str = "factored", **kwargs: Any) -> nn.Module:
    """Deep copy of ``model`` in eval mode with every foldable module replaced by ``module.fold(...)``.

    mode: "factored" keeps each factor pair as two plain layers (fewer FLOPs at low rank); "dense"
    multiplies them back into one layer; "auto" picks per layer by measured cost (see :func:`fold_with_report`
    for the keyword arguments). All are exact up to floating-point rounding.
    """
    return fold_with_report(model, mode, **kwargs)[0]


def fold_with_report(
    model: nn.Module,
    mode: str = "auto",
    *,
    example_input: torch.Tensor | tuple[Any, ...] | None = None,
    batch_size: int = 1,
    backend: str = "ort-cpu",
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    margin: float = 0.03,
    measure_config: MeasureConfig | None = None,
) -> tuple[nn.Module, FoldReport]:
    """Fold ``model`` (a deep copy, eval mode) and report per factorised layer what was chosen and why.

    In "auto" mode each layer's input size is captured by running the copy once on ``example_input`` (a
    tensor, or a tuple of positional inputs); the batch dimension is replaced by ``batch_size``. Each
    distinct layer shape is timed once in ONNX Runtime on ``threads`` threads (default: every CPU we may
    use) and cached in ``cache_dir/fold-cost.json`` (default ``~/.cache/lrdeploy``). A layer goes dense only
    when the dense form is faster by more than ``margin`` (ties keep the smaller factor pair). Layers never
    reached by the example input, or with no example input at all, keep the factor pair (FLOP rule).
    """
    if mode not in ALL_FOLD_MODES:
        raise UserError(f"unknown fold mode {mode!r}", hint=f"use one of {', '.join(ALL_FOLD_MODES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"fold batch size must be a positive integer, got {batch_size!r}", hint="pass e.g. 1")
    start = time.perf_counter()
    auto = mode == "auto"
    if auto and backend not in fold_cost.BACKENDS:
        raise UserError(f"no fold cost model for backend {backend!r}",
                        hint=f"use one of {', '.join(fold_cost.BACKENDS)}, or fold factored/dense")
    n_threads = resolve_threads(threads) if auto else None
    folded = copy.deepcopy(model).eval()
    layers = list(_foldables(folded))
    input_shapes: dict[str, tuple[int, ...]] = {}
    if auto and example_input is not None:
        input_shapes = _capture_input_shapes(folded, layers, example_input)

    cache = fold_cost.open_cache(cache_dir) if auto else None  # never raises: a broken cache only warns
    report = FoldReport(mode, backend, batch_size, n_threads, fold_cost.ort_version() if auto else None,
                        fold_cost.cpu_model() if auto else None,
                        str(cache.path) if cache is not None and cache.path is not None else None)
    seen: dict[str, tuple[dict[str, Any], bool]] = {}
    decisions: dict[str, str] = {}
    for name, module in layers:
        if not isinstance(module, LowRankLayer):
            decisions[name] = "factored" if auto else mode
            continue
        in_shape = input_shapes.get(name)
        if in_shape is not None:
            in_shape = (batch_size, *in_shape[1:])
        shape = fold_cost.layer_shape(module, in_shape)
        lf = _decide(name, module, shape, mode, in_shape, cache, seen, report, margin, measure_config)
        decisions[name] = lf.decision
        report.layers.append(lf)
    if cache is not None:
        cache.save()

    if _foldable(folded):
        out = folded.fold(decisions.get("", "factored" if auto else mode)).eval()
    else:
        for name, _ in layers:
            parent, attr = _parent(folded, name)
            setattr(parent, attr, getattr(parent, attr).fold(decisions[name]))
        out = folded.eval()
    report.seconds = time.perf_counter() - start
    return out, report


def _decide(name: str, module: LowRankLayer, shape: LayerShape, mode: str, in_shape: tuple[int, ...] | None,
            cache: fold_cost.CostCache | None, seen: dict[str, tuple[dict[str, Any], bool]],
            report: FoldReport, margin: float, config: MeasureConfig | None) -> LayerFold:
    lf = LayerFold(name=name, kind=shape.kind, shape=shape.describe(),
                   input_shape=list(in_shape) if in_shape is not None else None, rank=shape.rank,
                   full_rank=shape.full_rank, break_even_rank=round(shape.flop_break_even, 1),
                   break_even_source="flops", decision="factored", reason="",
                   params_factored=module.param_count(), params_dense=module.dense_param_count())
    if mode != "auto":
        lf.decision, lf.reason = mode, f"--fold {mode}"
        return lf
    if not shape.saves_params:
        lf.decision, lf.reason = "dense", "factor pair saves no parameters"
        return lf
    if in_shape is None or cache is None or report.threads is None:
        lf.reason = "input size unknown: FLOP rule" if in_shape is None else "not measured: FLOP rule"
        return lf

    ref = fold_cost.reference_rank(shape)
    key = fold_cost.cache_key(shape.key(), report.backend, report.batch_size, report.threads)
    if key not in seen:
        entry = cache.get(key)
        hit = entry is not None and _has(entry, shape.rank)
        if hit:
            report.cached_shapes += 1
        else:
            ranks = (shape.rank,) if ref is None else (shape.rank, ref)
            ms = fold_cost.measure(shape, report.batch_size, report.threads, ranks, config, report.backend)
            entry = {"dense_ms": ms["dense"], "factored_ms": {str(r): ms[f"factored@{r}"] for r in ranks},
                     "measured_at": time.time(), "shape": shape.to_dict()}
            cache.put(key, entry)
            report.measured_shapes += 1
        seen[key] = (entry, hit)  # type: ignore[assignment]
    entry, hit = seen[key]
    factored_ms = float(entry["factored_ms"][str(shape.rank)])
    dense_ms = float(entry["dense_ms"])
    lf.factored_ms, lf.dense_ms, lf.cached = factored_ms, dense_ms, hit
    ref_ms = entry["factored_ms"].get(str(ref)) if ref is not None else None
    if ref is not None and ref_ms is not None:
        be = fold_cost.interpolate_break_even(shape.rank, ref, factored_ms, float(ref_ms), dense_ms,
                                              shape.full_rank)
        if be is not None:
            lf.break_even_rank, lf.break_even_source = round(be, 1), "measured"
    if dense_ms < factored_ms * (1 - margin):
        lf.decision, lf.reason = "dense", f"dense {factored_ms / dense_ms:.2f}× faster"
    else:
        lf.decision, lf.reason = "factored", f"factored {dense_ms / factored_ms:.2f}× faster"
    return lf


def _has(entry: dict[str, Any], rank: int) -> bool:
    f = entry.get("factored_ms")
    return isinstance(entry.get("dense_ms"), (int, float)) and isinstance(f, dict) and str(rank) in f


def _foldables(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Outermost foldable modules with their qualified names (a foldable's own children are its business)."""
    if _foldable(root):
        yield prefix, root
        return
    for name, child in root.named_children():
        yield from _foldables(child, f"{prefix}.{name}" if prefix else name)


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def _capture_input_shapes(model: nn.Module, layers: list[tuple[str, nn.Module]],
                          example_input: torch.Tensor | tuple[Any, ...]) -> dict[str, tuple[int, ...]]:
    """Run ``model`` once on ``example_input``, recording the first input shape each layer sees."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook_for(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(int(d) for d in args[0].shape)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers]
    try:
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, str]:
    """Fold every BatchNorm that directly follows a convolution into that convolution's weights and bias.

    ONNX Runtime and TensorRT fuse Conv+BatchNorm when they load a graph. Folding offline makes the exported
    graph the exact inference form for every runtime, and a factor pair followed by BN becomes plain convs.
    torch.fx finds the Conv→BN pairs, so the model must be traceable. A model that is not traceable (e.g. one
    with data-dependent control flow) is returned unchanged, together with the reason. Works on a deep copy
    in eval mode.
    """
    from torch.fx.experimental.optimization import fuse

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model, "no BatchNorm"
    try:
        fused = fuse(copy.deepcopy(model).eval())
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds of trace errors; all mean "not traceable"
        return model, f"left to the runtime (not fx-traceable: {type(exc).__name__})"
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    return fused, f"folded offline ({left} BatchNorm not after a conv left)" if left else "folded offline"
