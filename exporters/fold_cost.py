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

import contextlib
import io
import json
import math
import os
import stat
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

from lrdeploy import atomic, terminal
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
# The cache only saves time: whatever state it is in (missing, unreadable, corrupt, unwritable), an export
# goes on, measures what it cannot trust, and says so in ONE stderr line naming the path and the problem.
MAX_CACHE_BYTES = 16 << 20  # ~30k entries; anything bigger is not ours (and not worth reading into memory)
_WARNED: set[str] = set()  # warning lines already printed by this process: one per problem, not per export


class CacheLocationError(OSError):
    """No usable default cache location (no absolute home directory and no absolute XDG_CACHE_HOME)."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lrdeploy``, else ``~/.cache/lrdeploy``.

    A relative XDG_CACHE_HOME is ignored (the XDG spec says so), and an empty or relative HOME is refused
    rather than scattering a ``.cache`` folder into whatever the current directory is.
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "lrdeploy"
    try:
        home = Path.home()
    except (RuntimeError, KeyError, OSError) as e:  # no HOME and no passwd entry
        raise CacheLocationError(f"no home directory ({e})") from e
    if not home.is_absolute():
        raise CacheLocationError(f"HOME={str(home)!r} is not an absolute path and XDG_CACHE_HOME is not set")
    return home / ".cache" / "lrdeploy"


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir/fold-cost.json`` (default :func:`default_cache_dir`); raises CacheLocationError."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_FILE


def open_cache(cache_dir: str | os.PathLike | None = None) -> CostCache:
    """The cost cache in ``cache_dir``; an in-memory one (nothing read, nothing saved) when there is no
    usable location. Never raises for the cache's sake: see :class:`CostCache`."""
    try:
        return CostCache(cache_path(cache_dir))
    except CacheLocationError as e:
        cache = CostCache(None)
        cache.problems.append(f"{e}; running without a cache")
        return cache


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


def valid_ms(value: Any) -> float | None:
    """``value`` as milliseconds if it is a positive finite number (bools and huge ints are not), else None.

    A 0 would divide by zero in the fold decision, a negative, NaN or inf time would decide it wrongly.
    """
    t = _finite(value)
    return t if t is not None and t > 0 else None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        t = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return t if math.isfinite(t) else None


def _scalar(v: Any) -> bool:
    """JSON scalar that writes back as strict JSON (no NaN/Infinity)."""
    return v is None or isinstance(v, (str, bool, int)) or (isinstance(v, float) and math.isfinite(v))


def _rank_key(rank: Any) -> bool:
    """A canonical decimal rank ≥ 1 ("8", not "08", "+8", "٨" or 5000 digits)."""
    return (isinstance(rank, str) and 0 < len(rank) <= 9 and rank.isascii() and rank.isdigit()
            and rank[0] != "0")


def clean_entry(entry: Any) -> dict[str, Any] | None:
    """The entry re-built from its known keys if it fits the schema, else None (the layer is re-measured).

    Schema: ``dense_ms`` a positive finite number; ``factored_ms`` a non-empty {"<rank ≥ 1>": ms} map;
    optional ``measured_at`` (finite unix time ≥ 0) and ``shape`` (flat map, informational). Unknown keys
    are dropped, so nothing unvalidated (or arbitrarily deep) is ever written back.
    """
    if not isinstance(entry, dict):
        return None
    dense = valid_ms(entry.get("dense_ms"))
    factored = entry.get("factored_ms")
    if dense is None or not isinstance(factored, dict) or not factored:
        return None
    times: dict[str, float] = {}
    for rank, value in factored.items():
        ms = valid_ms(value)
        if ms is None or not _rank_key(rank):
            return None
        times[rank] = ms
    out: dict[str, Any] = {"dense_ms": dense, "factored_ms": times}
    if "measured_at" in entry:
        at = _finite(entry["measured_at"])
        if at is None or at < 0:
            return None
        out["measured_at"] = at
    if "shape" in entry:
        shape = entry["shape"]
        if not isinstance(shape, dict) or not all(
            isinstance(k, str) and (_scalar(v) or (isinstance(v, list) and all(map(_scalar, v))))
            for k, v in shape.items()
        ):
            return None
        out["shape"] = {k: list(v) if isinstance(v, list) else v for k, v in shape.items()}
    return out


def load_entries(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Valid entries of the cache file at ``path`` and what was wrong with it; never raises.

    A missing file is no problem (first run). Everything else that is not a readable version-1 cache of
    valid entries is reported, and only the valid entries are kept.
    """
    entries, problems, _ = _read(Path(path))
    return entries, problems


def _read(path: Path) -> tuple[dict[str, dict[str, Any]], list[str], bool]:
    """:func:`load_entries` plus whether saving to ``path`` is worth trying (not when it cannot even be
    read: another kind of file there, or a broken location such as a file where a folder belongs)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a directory, a FIFO (reading would block), a device
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            return {}, [f"it is {what}, so this run's timings are not saved"], False
        with open(path, "rb") as f:
            raw = f.read(MAX_CACHE_BYTES + 1)
    except FileNotFoundError:
        return {}, [], True
    except OSError as e:
        return {}, [f"cannot read it ({_os_error(e, path)}), so this run's timings are not saved"], False
    if len(raw) > MAX_CACHE_BYTES:
        return {}, [f"larger than {MAX_CACHE_BYTES >> 20} MiB, ignored"], True
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return {}, ["not UTF-8 text, ignored"], True
    except RecursionError:
        return {}, ["JSON nested too deeply, ignored"], True
    except ValueError as e:  # JSONDecodeError; also an integer literal too long to convert
        return {}, [f"not valid JSON ({str(e)[:80]}), ignored"], True
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return {}, ["not a fold-cost cache (no 'entries' map), ignored"], True
    if data.get("version") != CACHE_VERSION:
        return {}, [f"version {repr(data.get('version'))[:20]} is not {CACHE_VERSION}, ignored"], True
    entries: dict[str, dict[str, Any]] = {}
    bad = 0
    for key, entry in data["entries"].items():
        clean = clean_entry(entry) if isinstance(key, str) else None
        if clean is None:
            bad += 1
        else:
            entries[key] = clean
    problems = [f"{bad} invalid entr{'y' if bad == 1 else 'ies'} dropped (re-measured)"] if bad else []
    return entries, problems, True


def _os_error(e: OSError, path: Path) -> str:
    """``strerror`` plus the file it concerns when that is not the cache file itself."""
    what = e.strerror or str(e) or type(e).__name__
    name = e.filename
    return f"{what}: {name}" if name is not None and str(name) != str(path) else what


class CostCache:
    """JSON file of measured milliseconds, written atomically; optional in every respect.

    ``entries[cache_key(shape.key(), ...)] = {"dense_ms": float, "factored_ms": {"<rank>": float, ...},
    "measured_at": unix time, "shape": {...}}``; the factored times hold the layer's own rank and the
    reference rank. Entries are validated on read (:func:`clean_entry`): bad ones are dropped, never used and
    never written back. A cache that cannot be read or saved only costs time: the problems are collected and
    :meth:`save` prints them as one warning line. ``path`` None: in memory only (no usable location).
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []
        self.savable = self.path is not None
        if self.path is not None:
            self.entries, self.problems, self.savable = _read(self.path)
        # A readable file with problems is replaced by a clean copy on save.
        self.dirty = bool(self.problems) and self.savable

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Remember ``entry`` (kept only if valid: a bogus measurement is not worth saving)."""
        clean = clean_entry(entry)
        if clean is not None:
            self.entries[key] = clean
            self.dirty = True

    def save(self) -> None:
        """Write the entries (merged with what another process saved meanwhile; ours win), then print the
        warning line if anything was wrong. Never raises: a cache that cannot be saved is skipped."""
        try:
            if self.dirty and self.savable and self.path is not None:
                try:
                    merged, _, _ = _read(self.path)  # its problems were reported when it was first read
                    merged.update(self.entries)
                    atomic.write_text(self.path, json.dumps({"version": CACHE_VERSION, "entries": merged},
                                                            indent=1, sort_keys=True))
                except Exception as e:  # whatever goes wrong, the export must not fail for its cache
                    reason = _os_error(e, self.path) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
                    self.problems.append(f"cannot save it ({reason}), so this run's timings are not kept")
                    self.savable = False
                else:
                    self.entries = merged
                    self.dirty = False
        finally:
            self.warn()

    def warning(self) -> str | None:
        """The one warning line for this cache's problems (None: no problems)."""
        if not self.problems:
            return None
        where = f" {self.path}" if self.path is not None else ""
        return f"warning: fold-cost cache{where}: {'; '.join(self.problems)}"

    def warn(self) -> None:
        """Print :meth:`warning` on stderr, once per process for the same line."""
        line = self.warning()
        if line is None or line in _WARNED:
            return
        _WARNED.add(line)
        with contextlib.suppress(Exception):  # a closed or missing stderr must not fail the export either
            terminal.note(line)


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
    # Floored at 1 ns: a coarse clock must not yield a 0 that the fold decision would divide by.
    return {n: max(statistics.median(t), 1e-6) for n, t in zip(names, times, strict=True)}
