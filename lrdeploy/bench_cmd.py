"""`lrdeploy bench`: time ONNX models (or bundles, exported on the fly) interleaved over a batch sweep.

    lrdeploy bench dense.onnx lowrank.onnx --batch 1,8,32,128 --threads 2 \
        --gate "speedup>=1.5@p90,batch=32" --json bench.json [--profile]

The first model is the reference; every speed-up is paired against it round by round (serving.bench). Blocks
are stability windows: after ``--rounds`` rounds, rounds continue until every model's last ``--windows``
block medians agree within ``--tolerance`` or ``--time-limit`` seconds of timing pass at that batch size; the
table and the JSON say per model and batch whether it settled. ``--gate`` expressions (serving.gates) are
checked on the result: a missed gate exits 1 after the table and JSON are written; a malformed gate exits 2
before anything is timed. ``--profile`` adds ONNX Runtime's per-node/per-op-type breakdown at every batch
size, measured after (never during) the timing.

This module is engine side (it may export bundles with ``lrdeploy.exporters``); ``serving`` stays free of
training code. Heavy imports (onnx, onnxruntime, torch) happen inside the command, not at CLI start-up.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from lrdeploy import run_record, terminal
from lrdeploy.cli_checks import DAY_S, check_finite, check_fits, check_int64
from lrdeploy.cli_choices import ONNX_RUNTIMES
from lrdeploy.errors import UserError
from lrdeploy.tables import Items, fit

SCHEMA = "lrdeploy.bench/1"


def _registered_onnx_runtimes() -> str:
    from lrdeploy.serving.runtimes import describe_kinds

    return describe_kinds("onnx")


_ONNX_RUNTIMES = _registered_onnx_runtimes()  # --runtime help: the registered kinds that run .onnx files

console = terminal.out
err_console = terminal.alert


# ------------------------------------------------------------------------------------------------ parsing
def parse_int_list(text: str, flag: str, example: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of integers",
                        f"e.g. {flag} {example}") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{flag} {text!r} must list positive integers", f"e.g. {flag} {example}")
    return values


def parse_batches(text: str) -> list[int]:
    values = parse_int_list(text, "--batch", "1,8,32,128")
    if len(set(values)) != len(values):
        raise UserError(f"--batch {text!r} lists a batch size twice", "e.g. --batch 1,8,32,128")
    return values


def _labels(models: Sequence[Path], names: str | None) -> list[str]:
    if names is not None:
        labels = [n.strip() for n in names.split(",")]
        if len(labels) != len(models) or not all(labels):
            raise UserError(f"--names {names!r} must give one non-empty name per model ({len(models)})",
                            "e.g. --names dense,lowrank")
        if len(set(labels)) != len(labels):
            raise UserError(f"--names {names!r} repeats a name", "give every model its own name")
        return labels
    labels: list[str] = []
    for path in models:
        base = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
        label, k = base or "model", 2
        while label in labels:  # dense.onnx in two folders: dense, dense-2
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels


# ---------------------------------------------------------------------------------------------- artefacts
def summary(art: Any, runtime: Any) -> dict[str, Any]:
    """What the report says about one model: where it came from and the inputs its graph declares."""
    inputs = [i.describe() for i in runtime.inputs()]
    out = {"source": str(art.source), "kind": art.kind,
           "onnx": str(art.onnx_path) if art.kind == "onnx" else "(exported to a temporary file)",
           "onnx_bytes": art.onnx_bytes, "inputs": inputs}
    if len(inputs) == 1 and inputs[0]["shape"] is not None:
        out["declared_input_shape"] = inputs[0]["shape"][1:]  # one sample, as the graph declares it
    return out


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    """``--dim NAME=SIZE`` (repeatable): sizes of named dynamic dimensions, e.g. ``src_len=16``."""
    sizes: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if not sep or not name.strip() or size < 1:
            raise UserError(f"--dim {item!r} is not NAME=SIZE with a positive size", "e.g. --dim src_len=16")
        sizes[name.strip()] = size
    return sizes


def bench_inputs(labels: Sequence[str], runtimes: Mapping[str, Any], input_shape: str | None,
                 sizes: Mapping[str, int]) -> list[tuple[Any, tuple[int, ...]]]:
    """(input, one sample's shape) of the reference's inputs, which every model must take alike.

    A dynamic non-batch dimension needs a size: ``--dim NAME=SIZE`` for a named one, or ``--input-shape``
    for a one-input graph; nothing is guessed.
    """
    import numpy as np

    override = parse_int_list(input_shape, "--input-shape", "1,28,28") if input_shape is not None else None
    per_model = {}
    for label in labels:
        inputs = runtimes[label].inputs()
        if override is not None and len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise UserError(f"--input-shape gives one sample shape, but {label} takes {len(inputs)} inputs "
                            f"({names})", "size its dynamic dimensions with --dim NAME=SIZE")
        per_model[label] = [(i, tuple(override) if override is not None else _sample(label, i, sizes, inputs))
                            for i in inputs]

    def key(ins: list[tuple[Any, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
        return [(np.dtype(i.dtype).name, dims) for i, dims in ins]

    if any(key(ins) != key(per_model[labels[0]]) for ins in per_model.values()):
        listed = ", ".join(f"{k} {[list(d) for _, d in v] if len(v) > 1 else list(v[0][1])}"
                           for k, v in per_model.items())
        raise UserError(f"the models take different inputs ({listed})",
                        "benchmark models of the same task, or pass --input-shape / --dim")
    return per_model[labels[0]]


def _sample(label: str, info: Any, sizes: Mapping[str, int], inputs: Sequence[Any]) -> tuple[int, ...]:
    """One sample's shape of ``info``: its fixed dimensions, named dynamic ones from ``--dim``."""
    if info.shape is None:
        raise UserError(f"{label} does not declare the shape of input {info.name!r}",
                        "pass the shape of one sample, e.g. --input-shape 3,32,32")
    dims = []
    for axis, d in enumerate(info.shape[1:], start=1):
        if isinstance(d, int) and d > 0:
            dims.append(d)
        elif isinstance(d, str) and d in sizes:
            dims.append(int(sizes[d]))
        else:
            fixes = ([f"--dim {d}=N"] if isinstance(d, str) and d else []) + (
                ["--input-shape (one sample)"] if len(inputs) == 1 else []) or [
                "re-export the graph with named dynamic axes, then --dim NAME=N"]
            raise UserError(f"{label} declares a dynamic dimension {d!r} (axis {axis} of input "
                            f"{info.name!r}) with no size", f"pass its size: {' or '.join(fixes)}")
    return tuple(dims)


def onnx_runtime_kind(kind: str) -> str:
    """The canonical runtime kind, if it runs .onnx files (checked before any bundle is exported)."""
    from lrdeploy.serving.runtimes import canonical_kind, get_runtime_kind, runtime_kinds

    canonical, _ = canonical_kind(kind)
    if get_runtime_kind(canonical).takes != "onnx":
        raise UserError(f"--runtime {kind} does not run .onnx files, and lrdeploy bench times ONNX artefacts",
                        f"use --runtime {' or '.join(runtime_kinds('onnx'))}")
    return canonical


def load_runtimes(models: Sequence[Any], kind: str, threads: int | None,
                  include_transfer: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """One runtime per model, all of ``kind``; also what ``--include-transfer`` meant for each."""
    from lrdeploy.serving.runtimes import load_runtime

    canonical = onnx_runtime_kind(kind)
    runtimes = {m.label: load_runtime(canonical, m.onnx_path, threads=threads, name=m.label,
                                      include_transfer=include_transfer) for m in models}
    by_runtime = {}
    for label, rt in runtimes.items():
        value = rt.describe().get("include_transfer")
        by_runtime[label] = "n/a: host runtime, no copies" if value is None else value
    return runtimes, {"requested": include_transfer, "by_runtime": by_runtime}


# ----------------------------------------------------------------------------------------------- profile
def profile_models(models: Sequence[Any], runtimes: Mapping[str, Any], feeds_for: Any,
                   batch_sizes: Sequence[int], threads: int | None, runs: int) -> dict[str, Any]:
    """ORT per-node/per-op breakdown for each model and batch size, on the timed inputs; other backends say
    they have none."""
    from lrdeploy.serving.profile import profile_onnx

    out: dict[str, Any] = {}
    for m in models:
        info = runtimes[m.label].describe()
        if info.get("backend") != "onnxruntime":
            out[m.label] = {"available": False,
                            "reason": f"no per-layer profiler wired for backend {info.get('backend')!r}"}
            continue
        providers: list[Any] = list(info.get("providers") or ["CPUExecutionProvider"])
        if info.get("provider_options"):  # e.g. the CUDA device id: profile on the device that was timed
            providers[0] = (providers[0], dict(info["provider_options"]))
        out[m.label] = {str(b): profile_onnx(m.onnx_path, (), b, threads=info.get("threads", threads),
                                             runs=runs, providers=providers, feeds=feeds_for(b))
                        for b in batch_sizes}
    return out


# ------------------------------------------------------------------------------------------------ run it
def run_bench(
    models: Sequence[Path],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    runtime: str = "ort-cpu",
    threads: int | None = None,
    seconds: float = 1.0,
    min_runs: int = 20,
    max_seconds: float | None = None,
    warmup: float = 0.5,
    rounds: int = 3,
    tolerance: float = 0.02,
    windows: int = 3,
    time_limit: float = 60.0,
    max_rounds: int | None = None,
    gates: Sequence[str] = (),
    names: str | None = None,
    input_shape: str | None = None,
    dims: Sequence[str] = (),
    include_transfer: bool = False,
    profile: bool = False,
    profile_runs: int = 10,
    samples: bool = False,
    seed: int = 0,
    json_path: Path | None = None,
    progress: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Everything `lrdeploy bench` does except printing: returns the report dict (and writes it if asked)."""
    from lrdeploy import __version__
    from lrdeploy.artifacts import resolve_artifact
    from lrdeploy.serving.bench import benchmark
    from lrdeploy.serving.feeds import synthetic_feeds
    from lrdeploy.serving.gates import evaluate_gates, parse_gates, validate_gates
    from lrdeploy.serving.report import write_json

    if not models:
        raise UserError("no model given", "lrdeploy bench REFERENCE.onnx [CANDIDATE.onnx ...]")
    batch_sizes = list(batch_sizes)
    for flag, value, example in (("--seconds", seconds, "1"), ("--max-seconds", max_seconds, "10"),
                                 ("--warmup", warmup, "0.5"), ("--time-limit", time_limit, "60")):
        check_finite(flag, value, minimum=0.0, maximum=DAY_S, example=example)  # inf: a hang; < 0: a no-op
    if max_seconds is not None and max_seconds < seconds:
        raise UserError(f"--max-seconds {max_seconds:g} is below --seconds {seconds:g}",
                        "raise --max-seconds or lower --seconds")
    labels = _labels([Path(m) for m in models], names)
    parsed = parse_gates(gates)  # malformed gates fail here, before anything is loaded or timed
    validate_gates(parsed, labels, batch_sizes)
    onnx_runtime_kind(runtime)
    sizes = parse_dims(dims)
    for b in batch_sizes:
        check_int64(b, "--batch")
    from lrdeploy.outputs import Outputs

    Outputs(force=force, inputs=models).file(json_path, "--json")

    with tempfile.TemporaryDirectory(prefix="lrdeploy-bench-") as tmp:
        resolved = [resolve_artifact(label, Path(p), Path(tmp), figures=False)
                    for label, p in zip(labels, models, strict=True)]
        runtimes, transfer = load_runtimes(resolved, runtime, threads, include_transfer)
        inputs = bench_inputs(labels, runtimes, input_shape, sizes)
        _check_feeds_fit(inputs, batch_sizes)  # before the largest batch is allocated
        feeds_for = synthetic_feeds([i for i, _ in inputs], seed=seed,
                                    sizes={**sizes, **_shape_sizes(inputs)})
        result = benchmark(
            runtimes, feeds_for, batch_sizes, warmup_s=warmup, min_runs=min_runs, min_seconds=seconds,
            max_seconds=max(max_seconds if max_seconds is not None else 10.0, seconds), rounds=rounds,
            seed=seed, progress=progress, stability_tol=tolerance, stability_windows=windows,
            time_limit_s=time_limit, max_rounds=max_rounds,
        )
        profiles = (profile_models(resolved, runtimes, feeds_for, batch_sizes, threads, profile_runs)
                    if profile else None)
        summaries = {m.label: summary(m, runtimes[m.label]) for m in resolved}

    gate_results = evaluate_gates(parsed, result)
    data = result.to_dict(samples=samples)
    data["settings"].update({"runtime": runtime, "threads_requested": threads,
                             "include_transfer": transfer, "dims": sizes,
                             "feeds": "synthetic, from the graphs' input metadata (serving.feeds)"})
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "lrdeploy_version": __version__,
        "run": run_record.current(),
        "models": summaries,
        **data,
        "gates": [g.to_dict() for g in gate_results],
        "gates_passed": all(g.passed for g in gate_results),
    }
    if profiles is not None:
        report["profile"] = profiles
    if json_path is not None:
        write_json(json_path, report)
    return report


def _shape_sizes(inputs: Sequence[tuple[Any, tuple[int, ...]]]) -> dict[str, int]:
    """The sizes the resolved sample shapes give each named dynamic dimension (so --input-shape and --dim
    feed the synthetic inputs the same way)."""
    out: dict[str, int] = {}
    for info, dims in inputs:
        for d, size in zip((info.shape or ())[1:], dims, strict=False):
            if isinstance(d, str):
                out.setdefault(d, size)
    return out


def _check_feeds_fit(inputs: Sequence[tuple[Any, tuple[int, ...]]], batch_sizes: Sequence[int]) -> None:
    """The largest batch of every input together must fit in available memory (cli_checks.check_fits)."""
    import math

    import numpy as np

    per_sample = sum(np.dtype(i.dtype).itemsize * math.prod(dims) for i, dims in inputs)
    batch = max(batch_sizes)
    shapes = ", ".join(f"{i.name} {'×'.join(map(str, dims)) or 'scalar'}" for i, dims in inputs)
    check_fits(batch * per_sample, "--batch", f"an input batch of {batch} samples of {shapes}",
               "use a smaller --batch")


# ------------------------------------------------------------------------------------------------ render
def _ms(v: Any) -> str:
    return "—" if not isinstance(v, (int, float)) else (f"{v:.3f}" if v < 100 else f"{v:.1f}")


def _mib(v: Any) -> str:
    return "—" if not isinstance(v, (int, float)) else f"{v / 2**20:.0f} MiB"


_STOP = {"stable": "settled", "time_limit": "time limit", "max_rounds": "max rounds", "rounds": "fixed"}


def render_stability_table(report: Mapping[str, Any]) -> RenderableType:
    """Per batch and model: did the windows settle, the last window medians, rounds, tail speed-ups, peak
    memory; on a narrow console the tail speed-ups and memory go to a second table."""
    reference = report.get("reference")
    windows = ((report.get("settings") or {}).get("stability") or {}).get("windows", 3)
    table = Table(title="stability windows, tail speed-ups, memory")
    for col in ("batch", "model", "settled", f"last {windows} windows, ms", "rounds", "p90 / p99 ×",
                "peak RSS"):
        table.add_column(col, justify="left" if col in ("model", "rounds") or "windows" in col else "right",
                         overflow="fold" if col == "model" else "ellipsis", no_wrap=col != "model")
    for key in sorted(report.get("batches", {}), key=int):
        res = report["batches"][key]
        for i, (name, st) in enumerate((res.get("stability") or {}).items()):
            medians = st.get("window_medians_ms") or []
            shown = " ".join(_ms(v) for v in medians[-windows:])
            spread = st.get("spread")
            unsettled = f"no, {100 * spread:.1f} %" if isinstance(spread, (int, float)) else "no"
            settled = Text("yes", style="green") if st.get("stable") else Text(unsettled, style="bold yellow")
            at = res.get("speedup_at") or {}
            sp90, sp99 = (at.get(s, {}).get(name) for s in ("p90", "p99"))
            mem = (res.get("memory") or {}).get(name) or {}
            rounds = f"{res.get('rounds')}, {_STOP.get(res.get('stop_reason'), res.get('stop_reason'))}"
            tails = "—" if name == reference or (sp90 is None and sp99 is None) else " / ".join(
                "—" if sp is None else f"{sp:.2f}" for sp in (sp90, sp99))  # one column: never split apart
            table.add_row(key if i == 0 else "", name, settled, shown, rounds if i == 0 else "", tails,
                          _mib(mem.get("cuda_peak_allocated_bytes") or mem.get("peak_rss_bytes")))
        table.add_section()
    return fit(table, keys=2)


def render_profile_table(profiles: Mapping[str, Any], top: int = 5) -> RenderableType:
    """The most expensive op types per model and batch size (share of kernel time); the op list wraps
    between op types."""
    from lrdeploy.serving.profile import top_ops

    table = Table(title="where the time goes (ONNX Runtime profiler, share of kernel time)")
    for col in ("model", "batch", "run median", "in kernels", f"top {top} op types"):
        text = col in ("model", f"top {top} op types")  # an op type is never split, a long name folds
        table.add_column(col, justify="left" if text else "right", no_wrap=not text,
                         overflow="fold" if col == "model" else "ellipsis")
    for label, per_batch in profiles.items():
        if not per_batch.get("available", True):
            table.add_row(label, "—", "—", "—", str(per_batch.get("reason", "not available")))
            continue
        for key in sorted(per_batch, key=int):
            prof = per_batch[key]
            run = (prof.get("run_us") or {}).get("median")
            share = prof.get("kernel_share_of_run")
            ops = Items([f"{op} {100 * s:.1f} %" for op, s in top_ops(prof, top)])
            table.add_row(label, key, "—" if run is None else f"{run:,.0f} µs",
                          "—" if share is None else f"{100 * share:.0f} %", ops)
        table.add_section()
    return fit(table, keys=2)


def print_report(report: Mapping[str, Any], out: Console, err: Console) -> None:
    from lrdeploy.serving.report import render_bench_table

    out.print(render_bench_table(report))
    out.print(render_stability_table(report))
    if report.get("profile"):
        out.print(render_profile_table(report["profile"]))
    stability = (report.get("settings") or {}).get("stability") or {}
    for key, res in (report.get("batches") or {}).items():
        if res.get("stable") is False:
            why = _STOP.get(res.get("stop_reason"), "?")
            err.print(f"[bold yellow]note:[/] b{key}: window medians did not settle within "
                      f"{100 * stability.get('tolerance', 0):g} % ({why} after {res.get('rounds')} rounds); "
                      "paired speed-ups still hold, absolute times are noisy", highlight=False)
    gates = report.get("gates") or []
    for gate in gates:
        out.print(Text(gate["reason"], style="bold green" if gate["passed"] else "bold red"), soft_wrap=True)
    missed = [g for g in gates if not g["passed"]]
    if missed:
        err.print(f"[bold red]gates missed:[/] {len(missed)} of {len(gates)}", highlight=False)


# -------------------------------------------------------------------------------------------- the command
def bench(
    models: list[Path] = typer.Argument(
        ..., help="ONNX files or bundle directories; the first is the reference.", metavar="MODEL",
        show_default=False,
    ),
    batch: str = typer.Option("1,32", "--batch", help="Batch sizes to sweep, comma-separated."),
    runtime: str = typer.Option("ort-cpu", "--runtime", help=f"Runtime for every model: {_ONNX_RUNTIMES}.",
                                autocompletion=ONNX_RUNTIMES.complete),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="Intra-op threads, pinned and recorded (default: the usable CPUs)."
    ),
    seconds: float = typer.Option(1.0, "--seconds", min=0.0, help="Minimum timed seconds per window."),
    min_runs: int = typer.Option(20, "--min-runs", min=1, help="Minimum timed calls per window."),
    max_seconds: float | None = typer.Option(None, "--max-seconds", help="Cap per window (default 10 s)."),
    warmup: float = typer.Option(0.5, "--warmup", min=0.0, help="Warm-up seconds per model and batch size."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Minimum interleaved rounds per batch size."),
    tolerance: float = typer.Option(
        0.02, "--tolerance", min=0.0, help="Windows have settled when their medians agree within this."
    ),
    windows: int = typer.Option(3, "--windows", min=2, help="How many successive windows must agree."),
    time_limit: float = typer.Option(
        60.0, "--time-limit", min=0.001, help="Stop adding rounds after this many seconds per batch size."
    ),
    max_rounds: int | None = typer.Option(None, "--max-rounds", min=1, help="Stop after this many rounds."),
    gate: list[str] | None = typer.Option(
        None, "--gate", help='CI gate, repeatable: e.g. "speedup>=1.5@p90,batch=32" (missed: exit 1).'
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the full report as JSON here."),
    names: str | None = typer.Option(None, "--names", help="Model names, comma-separated (default: stems)."),
    input_shape: str | None = typer.Option(
        None, "--input-shape", help="One sample's shape, e.g. 1,28,28 (one-input graphs with dynamic dims)."
    ),
    dim: list[str] | None = typer.Option(
        None, "--dim", help="Size of a named dynamic dimension, repeatable: e.g. --dim src_len=16."
    ),
    include_transfer: bool = typer.Option(
        False, "--include-transfer", help="Time host-device copies too, on runtimes that have them."
    ),
    profile: bool = typer.Option(False, "--profile", help="Add a per-node/op-type time breakdown (ORT)."),
    profile_runs: int = typer.Option(10, "--profile-runs", min=1, help="Profiled calls per batch size."),
    samples: bool = typer.Option(False, "--samples", help="Include every timed call's duration in the JSON."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the random input batch (numpy: >= 0)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file."),
) -> None:
    """Time models interleaved over a batch sweep until stable; paired speed-ups vs the first; CI gates."""
    report = run_bench(
        models, batch_sizes=parse_batches(batch), runtime=runtime, threads=threads, seconds=seconds,
        min_runs=min_runs, max_seconds=max_seconds, warmup=warmup, rounds=rounds, tolerance=tolerance,
        windows=windows, time_limit=time_limit, max_rounds=max_rounds, gates=gate or [], names=names,
        input_shape=input_shape, dims=dim or [], include_transfer=include_transfer, profile=profile,
        profile_runs=profile_runs, samples=samples, seed=seed, json_path=json_path,
        progress=terminal.info.is_terminal and not terminal.is_quiet(), force=force,
    )
    print_report(report, console, err_console)
    if json_path is not None and not terminal.json_on_stdout():
        console.print(f"JSON report: [bold]{json_path}[/]")
    from lrdeploy.result_lines import bench_line

    terminal.result(bench_line(report), highlight=False)
    if not report["gates_passed"]:
        raise typer.Exit(code=1)
