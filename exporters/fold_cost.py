"""Measured cost of a factorised layer's two inference forms (factor pair U·V vs one dense W) on the target.

Why measure: ONNX Runtime never re-associates a factor pair (baseline.md §0, finding 3), so whether U·V or
the re-multiplied W is faster must be decided offline, per layer, at the deployment batch size. The FLOP
break-even rank mn/(m+n) is a good first guess for large Linear layers (baseline.md §4: crossover at
r/min ≈ 0.8), but small convolutions, cache effects and per-node overhead move it, so each distinct layer
shape is exported on its own as a tiny ONNX graph and timed in ONNX Runtime, both forms interleaved (A B A B),
median of the timed blocks. Results are cached on disk, keyed by the shape, backend, batch, threads, ORT
version and CPU model, so repeated exports of the same architecture measure nothing.

Besides the layer's own rank, the factored form is also timed at a reference rank (near the FLOP
break-even); factored time is close to linear in rank, so the two points give the measured break-even rank
by linear interpolation.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lrdeploy import atomic
from lrdeploy.errors import UserError
from lrdeploy.host import cpu_info, session_options
from lrdeploy.layers.lowrank import LowRankConv2d, LowRankLayer, LowRankLinear

BACKENDS = ("ort-cpu",)
CACHE_FILE = "fold-cost.json"
CACHE_VERSION = 1


@dataclass(frozen=True)
class LayerShape:
    """Everything the cost of one factorised layer depends on (weights' values do not matter)."""

    kind: str  # "linear" | "conv"
    in_features: int
    out_features: int
    rank: int
    full_rank: int
    bias: bool
    sample_shape: tuple[int, ...]  # input shape without the batch dimension
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] | str = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    padding_mode: str = "zeros"

    @property
    def k2(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def flop_break_even(self) -> float:
        """Rank where both forms have equal FLOPs and weights: out·in·k² / (in·k² + out)."""
        n = self.in_features * self.k2
        return self.out_features * n / (n + self.out_features)

    @property
    def saves_params(self) -> bool:
        """False when rank·(in·k² + out) ≥ out·in·k²: the pair is no smaller than W (methods.md §1.12c)."""
        n = self.in_features * self.k2
        return self.rank * (n + self.out_features) < self.out_features * n

    @property
    def tokens(self) -> int:
        """Input vectors per sample for a Linear (1 for (N, in); T for (N, T, in))."""
        return math.prod(self.sample_shape[:-1]) if self.kind == "linear" else 1

    def key(self, rank: int | None = None) -> str:
        """Stable text key of this shape (at ``rank``, default its own)."""
        r = self.rank if rank is None else rank
        sample = "x".join(map(str, self.sample_shape))
        if self.kind == "linear":
            return f"linear:in{self.in_features}:out{self.out_features}:r{r}:b{int(self.bias)}:x{sample}"
        return (f"conv:in{self.in_features}:out{self.out_features}:r{r}:b{int(self.bias)}"
                f":k{self.kernel[0]}x{self.kernel[1]}:s{_txt(self.stride)}:p{_txt(self.padding)}"
                f":d{_txt(self.dilation)}:{self.padding_mode}:x{sample}")

    def describe(self) -> str:
        """Short human form for reports: ``Linear 400→120`` or ``Conv 6→16 k5x5 s1 @14x14``."""
        if self.kind == "linear":
            t = f" ×{self.tokens} tok" if self.tokens != 1 else ""
            return f"Linear {self.in_features}→{self.out_features}{t}"
        hw = f" @{'x'.join(map(str, self.sample_shape[1:]))}" if self.sample_shape else ""
        stride = self.stride[0] if len(set(self.stride)) == 1 else _txt(self.stride)
        return f"Conv {self.in_features}→{self.out_features} k{self.kernel[0]}x{self.kernel[1]} s{stride}{hw}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _txt(v: Any) -> str:
    return v if isinstance(v, str) else ",".join(map(str, v))


def layer_shape(module: LowRankLayer, input_shape: tuple[int, ...] | None) -> LayerShape:
    """The :class:`LayerShape` of a factorised layer fed ``input_shape`` (with batch dim; None: unknown)."""
    sample = tuple(int(d) for d in input_shape[1:]) if input_shape is not None else ()
    rank = max(int(module.rank), 1)  # a Maestro layer at rank 0 folds to a zero rank-1 pair
    bias = getattr(module.second, "bias", None) is not None or hasattr(module, "bn")
    if isinstance(module, LowRankLinear):
        return LayerShape("linear", module.in_features, module.out_features, rank, module.full_rank, bias,
                          sample or (module.in_features,))
    if isinstance(module, LowRankConv2d):
        return LayerShape("conv", module.in_channels, module.out_channels, rank, module.full_rank, bias,
                          sample, tuple(module.kernel_size), tuple(module.stride), _pad(module.padding),
                          tuple(module.dilation), module.padding_mode)
    raise TypeError(f"no cost model for {type(module).__name__}")


def _pad(p: Any) -> tuple[int, ...] | str:
    return p if isinstance(p, str) else tuple(int(x) for x in p)


def reference_rank(shape: LayerShape) -> int | None:
    """Second rank timed for the factored form, for the break-even interpolation (None: none usable)."""
    ref = max(1, min(shape.full_rank, round(shape.flop_break_even)))
    if ref == shape.rank:
        ref = max(1, shape.rank // 2)
    return None if ref == shape.rank else ref


def interpolate_break_even(rank: int, ref_rank: int, t_rank: float, t_ref: float, t_dense: float,
                           full_rank: int) -> float | None:
    """Rank where the straight line through (rank, t_rank), (ref_rank, t_ref) meets t_dense, in [1, full]."""
    if ref_rank == rank:
        return None
    slope = (t_ref - t_rank) / (ref_rank - rank)
    if slope <= 0:
        return None  # noise swamped the rank dependence: no usable estimate
    r = rank + (t_dense - t_rank) / slope
    return float(min(max(r, 1.0), float(full_rank)))


# ----------------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lrdeploy"


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_FILE


@lru_cache(maxsize=1)
def cpu_model() -> str:
    return str(cpu_info()["model"])


def ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def context_key(backend: str, batch_size: int, threads: int) -> str:
    """The part of a cache key that is not the layer shape."""
    return f"{backend}|batch{batch_size}|threads{threads}|ort{ort_version()}|{cpu_model()}"


def cache_key(shape_key: str, backend: str, batch_size: int, threads: int) -> str:
    return f"{context_key(backend, batch_size, threads)}|{shape_key}"


class CostCache:
    """JSON file of measured milliseconds, written atomically.

    ``entries[cache_key(shape.key(), ...)] = {"dense_ms": float, "factored_ms": {"<rank>": float, ...},
    "measured_at": unix time}``; the factored times hold the layer's own rank and the reference rank.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        ok = isinstance(data, dict) and data.get("version") == CACHE_VERSION
        if ok and isinstance(data.get("entries"), dict):
            self.entries = data["entries"]

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self.entries.get(key)
        return entry if isinstance(entry, dict) else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = entry
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        # Merge with what another process may have written meanwhile; ours wins on conflicts.
        merged = CostCache(self.path).entries
        merged.update(self.entries)
        atomic.write_text(self.path, json.dumps({"version": CACHE_VERSION, "entries": merged}, indent=1,
                                                sort_keys=True))
        self.entries = merged
        self.dirty = False


# ----------------------------------------------------------------------------------------- measurement
@dataclass
class MeasureConfig:
    """Micro-benchmark effort per layer shape; tests shrink it, real exports keep the defaults."""

    warmup: int = 3
    min_rounds: int = 7
    budget_s: float = 0.3  # per shape, all alternatives together, after warm-up
    max_rounds: int = 200


def build_module(shape: LayerShape, form: str, rank: int | None = None) -> nn.Module:
    """Plain torch module of ``shape`` in ``form`` ("factored" | "dense") at ``rank``, random weights."""
    r = shape.rank if rank is None else rank
    if shape.kind == "linear":
        layer: LowRankLayer = LowRankLinear(shape.in_features, shape.out_features, r, bias=shape.bias)
    else:
        layer = LowRankConv2d(shape.in_features, shape.out_features, shape.kernel, r, stride=shape.stride,
                              padding=shape.padding, dilation=shape.dilation, bias=shape.bias,
                              padding_mode=shape.padding_mode)
    return layer.fold(form).eval()


def _onnx_bytes(module: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # TorchScript exporter: ~30 ms per tiny graph against seconds for dynamo; same ops for Gemm/Conv.
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"])
    return buf.getvalue()


def _session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(model, sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])


def measure(shape: LayerShape, batch_size: int, threads: int, ranks: tuple[int, ...],
            config: MeasureConfig | None = None, backend: str = "ort-cpu") -> dict[str, float]:
    """Median milliseconds per run of the dense form and of the factored form at each of ``ranks``.

    Returns {"dense": ms, "factored@<r>": ms, ...}. The alternatives are run in rotating order within each
    round (A B C, B C A, ...) so drifting clocks or a noisy neighbour hit all of them alike.
    """
    if backend not in BACKENDS:
        raise UserError(f"no fold cost model for backend {backend!r}",
                        hint=f"use one of {', '.join(BACKENDS)}")
    if not shape.sample_shape:
        raise ValueError("the layer's input size is unknown; pass an example input")
    cfg = config or MeasureConfig()
    torch.manual_seed(0)
    x = torch.randn(batch_size, *shape.sample_shape)
    feed = {"x": x.numpy().astype(np.float32)}
    names = ["dense", *(f"factored@{r}" for r in ranks)]
    modules = [build_module(shape, "dense"), *(build_module(shape, "factored", r) for r in ranks)]
    sessions = [_session(_onnx_bytes(m, x), threads) for m in modules]
    for s in sessions:
        for _ in range(cfg.warmup):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    deadline = time.perf_counter() + cfg.budget_s
    rounds = 0
    while rounds < cfg.min_rounds or (time.perf_counter() < deadline and rounds < cfg.max_rounds):
        order = [(rounds + i) % len(sessions) for i in range(len(sessions))]
        for i in order:
            t0 = time.perf_counter()
            sessions[i].run(None, feed)
            times[i].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {n: statistics.median(t) for n, t in zip(names, times, strict=True)}
