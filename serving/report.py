"""Compare reports: a Rich table and Markdown for people, atomically written JSON for programs, and the plot
(:mod:`lrdeploy.serving.plot`); several runs merged into one summary (``lrdeploy report``).

JSON schema of the compare report (``schema: "lrdeploy.compare/1"``). The CLI builds this dict; every
top-level part except ``schema`` is optional, and the renderer shows what is there. Unknown extra keys are
allowed and kept (readers must ignore what they do not know). Non-finite floats are written as ``null``.
Keys marked (+) were added after the first release of /1; they are additions only (no key changed meaning
or shape), so the schema name stays ``lrdeploy.compare/1``.

    {
      "schema": "lrdeploy.compare/1",
      "created": "2026-11-25T10:00:00+00:00",          # UTC ISO time, optional
      "command": "lrdeploy compare ...",                # how it was produced, optional
      "lrdeploy_version": "0.1.0",
      "run": {...} | null,                              # (+) lrdeploy.run_record: the resolved command line
                                                        #     (null from Python); `lrdeploy rerun` repeats it
      "reference": {                                    # model summary (all keys optional)
        "name": "dense",                                # (+) file stem / bundle directory name
        "label": "dense", "source": "runs/dense.onnx", "kind": "onnx" | "bundle", "runtime": "ort-cpu",
        "params": 61706, "flops": 845000,               # of the ONNX graph as deployed; per sample, 2·MAC
        "onnx_bytes": 247000, "weights_bytes": ..., "method": "dense", "model": "lenet5",
        "trained": {"params", "flops"},                 # (+) the manifest's count of the trained model
        "graph": {"macs", "input_shapes", "convention", "flops_by_op_type", "not_counted", "unknown_ops",
                  "missing"},                       # (+) how the graph was counted (exporters.graph_stats)
        "onnx_checker": "failed (...); run by ORT anyway"   # (+) only when the ONNX checker objected
      },
      "candidate": { ...same keys as reference... },
      "parity": {                                       # serving.parity.output_parity(ref_out, cand_out)
        "shape": [N, C], "elements": int,              # (+) elements
        "max_abs", "mean_abs", "median_abs" (+), "p99_abs": float,
        "max_rel", "mean_rel", "median_rel", "p99_rel": float,   # (+) elementwise, near-zero safe
        "rel_floor": float, "reference_rms": float,     # (+) the floor of the relative error
        "max_row_rel", "mean_row_rel", "median_row_rel", "p99_row_rel": float,   # (+) per sample
        "rel_l2": float, "cosine": float,
        "top1_agreement": float | null, "top5_agreement": float | null,   # (+) top5
        "nonfinite": {"reference": int, "candidate": int},
        "output": "output",                             # (+) output name
        # set when a precision preset judged it (compare --precision):
        "precision": "fp16", "tolerance": {...serving.parity.Tolerance...} (+), "failures": [str, ...],
        "passed": bool (+)
      },
      "task": {                                         # (+) the task's metrics on real data, any task
        "task": "translation", "dataset": "multi30k", "split": "test", "samples": 1000,
        "languages": "de-en",                           # (+) what the task says about its data
        "metrics": [{"key": "bleu", "label": "BLEU", "higher_is_better": true, "points": 1.0,
                     "percent": false}, ...],           # (+) how to show them (lrdeploy.tasks.Metric)
        "headline": {"key", "label", "reference", "candidate", "delta"},   # (+) what budgets judge first
        "reference": {"loss", "perplexity", "token_accuracy", "bleu"}, "candidate": {...}, "delta": {...}
      },
      "accuracy": {                                     # the task metric called accuracy, where there is
        "dataset": "mnist", "split": "test", "samples": 10000,   # one (classifiers): an alias of task
        "reference": 0.991, "candidate": 0.987, "delta": -0.004   # fractions in [0, 1]; kept for readers
      },                                                # of reports made before the task section
      "latency": {                                      # keyed by batch size (string in JSON)
        "1":  {"reference": LatencyStats, "candidate": LatencyStats, "speedup": 1.93,
               "round_ratios": [1.95, 1.91, 1.93], "ratio_spread": 1.02},   # spread = max/min ratio
        "32": {...}
      },
      # LatencyStats = {"batch_size", "runs", "total_s", "median_ms", "p90_ms", "p99_ms", "mean_ms",
      #                 "min_ms", "max_ms", "std_ms", "throughput" (samples/s)}
      # speedup = median over rounds of (reference block median / candidate block median)
      "profile": {runtime: {op type: ms}},             # (+) optional, per-operator totals (profile_totals)
      "environment": {                                  # serving.bench.capture_environment(...)
        "cpu_model", "logical_cpus", "available_cpus", "physical_cores", "cpu_flags", "machine",
        "platform", "python", "versions": {pkg: version}, "thread_env", "loadavg", "loadavg_end",
        "runtimes": {name: Runtime.describe()}, "threads": {name: int}
      },
      "budget": {                                       # the user's acceptance limits and the verdict
        "checks": [{"name": "accuracy drop", "limit": 0.01, "value": 0.004, "passed": true}, ...],
        "failures": [str, ...],                         # alternatively (or also): what missed, in words
        ...limits as given...,
        "passed": bool
      },
      "golden": {"path", "samples", "precision"},       # (+) when --save-golden wrote a golden set
      "notes": [str, ...],                              # (+) what was not measured, and why
      "verdict": {"passed": bool, "failures": [str]}    # (+) budget misses + parity misses, prefixed
    }

``latency_section(bench)`` builds the ``latency`` part from a ``serving.bench.BenchResult``; use
``bench.environment`` for ``environment``. For robustness the renderer also accepts a whole
``BenchResult.to_dict()`` under ``latency`` and converts it.

Files: ``write_reports(report, DIR)`` writes ``report.json``, ``report.md`` (:func:`render_markdown`, the
same rows as the table) and ``plot.png``. ``merge_reports`` turns several reports into one summary
(``lrdeploy.summary/1``, documented there); ``write_summary`` writes ``summary.json``, ``report.md``,
``plot.png``. A golden check result (``lrdeploy.check/1``) is rendered by :func:`render_check_table`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from lrdeploy import atomic
from lrdeploy.tables import fit

SCHEMA = "lrdeploy.compare/1"
# Rounds whose speed-ups differ by more than this factor are flagged: baseline.md saw 1-2 % typical and
# 10-29 % worst-case rep-to-rep spread on a quiet shared 2-vCPU host.
UNSTABLE_SPREAD = 1.25
_NA = "—"


# ------------------------------------------------------------------------------------------------- JSON
def jsonable(obj: Any) -> Any:
    """Plain JSON types from dataclasses (``to_dict``), numpy values, paths; non-finite floats -> None."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def command_line(argv: Sequence[str] | None = None) -> str:
    """How this process was invoked, as a user would type it (``lrdeploy compare …``, not the path of
    ``__main__.py`` that ``python -m lrdeploy`` puts in ``argv[0]``)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    head = Path(argv[0]).name
    prog = "lrdeploy" if head in ("lrdeploy", "__main__.py", "-m") else argv[0]
    return " ".join([prog, *(shlex.quote(a) for a in argv[1:])])


def write_json(path: str | Path, report: Any) -> Path:
    """Write ``report`` as indented JSON, atomically (a crash leaves the old file or the new one)."""
    path = Path(path)
    text = json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n"
    atomic.write_text(path, text)
    return path


def latency_section(bench: Any, reference: str | None = None, candidate: str | None = None) -> dict[str, Any]:
    """The ``latency`` part of a compare report from a ``BenchResult`` (or its ``to_dict()``).

    Defaults: the bench's reference runtime vs the first other runtime.
    """
    data = bench.to_dict() if hasattr(bench, "to_dict") else dict(bench)
    reference = reference or data["reference"]
    if candidate is None:
        others = [n for n in data["runtimes"] if n != reference]
        candidate = others[0] if others else reference
    out: dict[str, Any] = {}
    for batch, res in data["batches"].items():
        # per round: (bench_ref / cand) / (bench_ref / ref) = ref / cand, still paired within the round
        pairs = zip(res["round_ratios"][candidate], res["round_ratios"][reference], strict=True)
        ratios = [c / r for c, r in pairs]
        out[str(batch)] = {
            "reference": res["stats"][reference],
            "candidate": res["stats"][candidate],
            "speedup": float(statistics.median(ratios)),
            "round_ratios": ratios,
            "ratio_spread": max(ratios) / min(ratios) if ratios and min(ratios) > 0 else None,
        }
    return out


# ----------------------------------------------------------------------------------------------- format
def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def _si(v: Any, unit: str = "") -> str:
    x = _num(v)
    if x is None:
        return _NA
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".strip()


def _count(v: Any, unit: str = "") -> str:
    """A count (FLOPs): a negative one is a counting bug upstream, never a number to show."""
    x = _num(v)
    return _NA if x is None or x < 0 else _si(x, unit)


def _bytes(v: Any) -> str:
    x = _num(v)
    if x is None:
        return _NA
    for factor, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= factor:
            return f"{x / factor:.1f} {unit}"
    return f"{x:.0f} B"


def _ms(v: Any) -> str:
    x = _num(v)
    return _NA if x is None else (f"{x:.3f} ms" if x < 100 else f"{x:.1f} ms")


def _rate(v: Any) -> str:
    x = _num(v)
    return _NA if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.3g}")


def _pct(v: Any) -> str:
    x = _num(v)
    return _NA if x is None else f"{100 * x:.2f} %"


def _sci(v: Any) -> str:
    x = _num(v)
    return _NA if x is None else f"{x:.2e}"


def _ratio_change(ref: Any, cand: Any, lower_is_better: bool = True) -> Text:
    """``cand/ref`` as "0.31×", green when it moved the good way."""
    r, c = _num(ref), _num(cand)
    if r is None or c is None or r <= 0 or c < 0:  # counts, sizes and times: a negative one means nothing
        return Text(_NA)
    ratio = c / r
    good = ratio < 1 if lower_is_better else ratio > 1
    style = "green" if good else ("red" if ratio != 1 else "")
    return Text(f"{ratio:.2f}×", style=style)


def _speedup_text(v: Any) -> Text:
    x = _num(v)
    if x is None:
        return Text(_NA)
    if x >= 1:
        return Text(f"{x:.2f}× faster", style="bold green" if x > 1.02 else "")
    return Text(f"{1 / x:.2f}× slower" if x > 0 else "slower", style="bold red")


def _verdict(passed: Any) -> Text:
    if passed is None:
        return Text(_NA)
    return Text("PASS", style="bold green") if passed else Text("FAIL", style="bold red")


def _scalar(v: Any) -> str:
    if v is None:
        return _NA
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _d(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = report.get(key)
    return v if isinstance(v, Mapping) else {}


# ----------------------------------------------------------------------------------------------- tables
# summary keys the table knows how to format; other scalar keys are shown as they are
_SUMMARY_ROWS: tuple[tuple[str, str, Any, bool | None], ...] = (
    ("name", "name", _scalar, None),
    ("label", "label", _scalar, None),
    ("model", "model", _scalar, None),
    ("kind", "artefact", _scalar, None),
    ("runtime", "runtime", _scalar, None),
    ("method", "method", _scalar, None),
    ("params", "parameters", lambda v: _scalar(v) if _num(v) is not None else _NA, True),
    ("flops", "FLOPs / sample", lambda v: _count(v, "FLOP"), True),
    ("size_bytes", "file size", _bytes, True),
    ("onnx_bytes", "ONNX size", _bytes, True),
    ("weights_bytes", "weights size", _bytes, True),
)
_SKIP_SUMMARY = {"path", "source"}  # long paths would widen the table; they are in the JSON


def _title_name(summary: Mapping[str, Any], default: str) -> str:
    for key in ("name", "model", "label"):
        if summary.get(key):
            return str(summary[key])
    source = summary.get("source") or summary.get("path")
    return Path(str(source)).stem if source else default


class _Rows:
    """Rows grouped in named sections; the Rich table and the Markdown report are both drawn from it, so
    the two always show the same numbers. Has the two ``Table`` methods the row builders call."""

    def __init__(self) -> None:
        self.sections: list[tuple[str, list[tuple[Any, ...]]]] = []

    def begin(self, name: str) -> None:
        self.sections.append((name, []))

    def add_row(self, *cells: Any) -> None:
        if not self.sections:
            self.begin("")
        self.sections[-1][1].append(cells)

    def add_section(self) -> None:  # sections are opened by ``begin``
        pass


def _compare_rows(report: Mapping[str, Any]) -> tuple[str, str | None, _Rows]:
    """Title, environment caption and the rows of a compare report (missing parts are skipped)."""
    ref, cand = _d(report, "reference"), _d(report, "candidate")
    title = "lrdeploy compare"
    if ref or cand:
        title += f": {_title_name(ref, 'reference')} vs {_title_name(cand, 'candidate')}"
    latency = _d(report, "latency")
    environment = _d(report, "environment")
    if "batches" in latency and "runtimes" in latency:  # a whole BenchResult.to_dict() was passed
        environment = environment or _d(latency, "environment")
        latency = latency_section(latency)
    environment = environment or _d(_d(report, "benchmark"), "environment")
    rows = _Rows()
    for name, build in (
        ("Models", lambda: _summary_rows(rows, ref, cand)),
        ("Task metrics", lambda: _quality_rows(rows, report)),
        ("Latency", lambda: _latency_rows(rows, latency)),
        ("Parity", lambda: _parity_rows(rows, _d(report, "parity"))),
        ("Budget", lambda: _budget_rows(rows, _d(report, "budget"))),
    ):
        rows.begin(name)
        build()
    return title, _environment_caption(environment), rows


def render_compare_table(report: Mapping[str, Any]) -> Table:
    """One table: model summary, accuracy, latency per batch, parity, budget. Missing parts are skipped. Every
    column wraps (long names fold), so it fits any console down to 80 columns with nothing elided."""
    title, caption, rows = _compare_rows(report)
    table = Table(title=title, caption=caption, show_lines=False)
    table.add_column("", style="bold", overflow="fold")
    for col in ("reference", "candidate", "change"):
        table.add_column(col, justify="right", overflow="fold")
    for _, section in rows.sections:
        if not section:
            continue
        for cells in section:
            table.add_row(*cells)
        table.add_section()
    return table


# figures counted from the deployed graph that a summary may also carry as trained (``trained``: the
# bundle manifest's count of the PyTorch model); the trained one is shown only where it differs
_TRAINED_KEYS = ("params", "flops", "weights_bytes")
TRAINED_LABEL = "trained structure"
_COUNTED_NOTE = ("Parameters, FLOPs (2·MAC of Conv/Gemm/MatMul per sample) and weight size are counted "
                 f"from the deployed ONNX graph; \"{TRAINED_LABEL}\" is the bundle manifest's count of the "
                 "PyTorch model, shown only where it differs (e.g. a factorised layer folded back to dense).")


def _trained_differs(summary: Mapping[str, Any], key: str) -> bool:
    trained = _num(_d(summary, "trained").get(key))
    return trained is not None and trained != _num(summary.get(key))


def _trained_cell(summary: Mapping[str, Any], key: str, fmt: Any) -> str:
    if _trained_differs(summary, key):
        return fmt(_d(summary, "trained")[key])
    return "same" if _num(_d(summary, "trained").get(key)) is not None else _NA


def _trained_row(table: _Rows, key: str, label: str, fmt: Any, ref: Mapping[str, Any],
                 cand: Mapping[str, Any]) -> None:
    """``parameters (trained structure)`` under the deployed row, only when a side's manifest figure differs
    from its graph's (e.g. ``--fold auto`` re-multiplied a factorised layer); "same" on the other side."""
    if not (_trained_differs(ref, key) or _trained_differs(cand, key)):
        return
    change = _ratio_change(_d(ref, "trained").get(key), _d(cand, "trained").get(key))
    table.add_row(f"{label} ({TRAINED_LABEL})", _trained_cell(ref, key, fmt), _trained_cell(cand, key, fmt),
                  change)


def _summary_rows(table: _Rows, ref: Mapping[str, Any], cand: Mapping[str, Any]) -> None:
    if not ref and not cand:
        return
    known = set()
    for key, label, fmt, lower_is_better in _SUMMARY_ROWS:
        known.add(key)
        if key not in ref and key not in cand:
            continue
        change = Text("") if lower_is_better is None else _ratio_change(ref.get(key), cand.get(key),
                                                                        lower_is_better)
        table.add_row(label, fmt(ref.get(key)), fmt(cand.get(key)), change)
        if key in _TRAINED_KEYS:
            _trained_row(table, key, label, fmt, ref, cand)
    extra = [k for k in dict.fromkeys([*ref, *cand]) if k not in known and k not in _SKIP_SUMMARY]
    for key in extra:
        a, b = ref.get(key), cand.get(key)
        if isinstance(a, (Mapping, list)) or isinstance(b, (Mapping, list)):
            continue
        table.add_row(str(key), _scalar(a), _scalar(b), "")
    table.add_section()


def _accuracy_rows(table: _Rows, acc: Mapping[str, Any]) -> None:
    if not acc:
        return
    label = "accuracy"
    where = " ".join(str(acc[k]) for k in ("dataset", "split") if acc.get(k))
    if where:
        n = acc.get("samples", acc.get("examples"))
        label += f" ({where}" + (f", n={n:,})" if isinstance(n, int) else ")")
    r, c = _num(acc.get("reference")), _num(acc.get("candidate"))
    delta = _num(acc.get("delta"))
    if delta is None and r is not None and c is not None:
        delta = c - r
    change = Text(_NA) if delta is None else Text(f"{100 * delta:+.2f} pp",
                                                  style="red" if delta < 0 else "green" if delta > 0 else "")
    table.add_row(label, _pct(r), _pct(c), change)
    table.add_section()


def _batch_key(k: Any) -> tuple[int, str]:
    try:
        return (int(k), str(k))
    except (TypeError, ValueError):
        return (1 << 62, str(k))


def _latency_rows(table: _Rows, latency: Mapping[str, Any]) -> None:
    if not latency:
        return
    for batch in sorted(latency, key=_batch_key):
        entry = latency[batch] if isinstance(latency[batch], Mapping) else {}
        r, c = _d(entry, "reference"), _d(entry, "candidate")
        table.add_row(f"latency b{batch} median", _ms(r.get("median_ms")), _ms(c.get("median_ms")),
                      _speedup_text(entry.get("speedup")))
        ratios = [x for x in (entry.get("round_ratios") or []) if _num(x) is not None]
        if len(ratios) > 1:
            unstable = min(ratios) <= 0 or max(ratios) / min(ratios) > UNSTABLE_SPREAD
            table.add_row(f"speed-up b{batch} per round", "", " / ".join(f"{x:.2f}" for x in ratios),
                          Text("rounds disagree", style="bold yellow") if unstable else Text("consistent"))
        if "p90_ms" in r or "p90_ms" in c:
            table.add_row(f"latency b{batch} p90", _ms(r.get("p90_ms")), _ms(c.get("p90_ms")),
                          _ratio_change(r.get("p90_ms"), c.get("p90_ms")))
        if "p99_ms" in r or "p99_ms" in c:
            table.add_row(f"latency b{batch} p99", _ms(r.get("p99_ms")), _ms(c.get("p99_ms")),
                          _ratio_change(r.get("p99_ms"), c.get("p99_ms")))
        if "throughput" in r or "throughput" in c:
            table.add_row(f"throughput b{batch} (samples/s)", _rate(r.get("throughput")),
                          _rate(c.get("throughput")),
                          _ratio_change(r.get("throughput"), c.get("throughput"), lower_is_better=False))
    table.add_section()


# (statistic, label, formatter, tolerance field, direction); the elementwise gate depends on error_stat
_PARITY_ROWS: tuple[tuple[str, str, Any, str | None, str], ...] = (
    ("max_abs", "parity max |Δ|", _sci, "max_abs", "upper"),
    ("mean_abs", "parity mean |Δ|", _sci, None, ""),
    ("median_abs", "parity median |Δ|", _sci, None, ""),
    ("p99_abs", "parity p99 |Δ|", _sci, None, ""),
    ("rel_l2", "parity rel L2", _sci, "rel_l2", "upper"),
    ("max_row_rel", "parity worst-sample rel. error", _sci, "row_rel", "upper"),
    ("median_rel", "parity median elementwise rel.", _sci, None, ""),
    ("p99_rel", "parity p99 elementwise rel.", _sci, None, ""),
    ("max_rel", "parity max elementwise rel.", _sci, None, ""),
    ("cosine", "parity cosine", lambda v: _scalar(_num(v)) if _num(v) is None or _num(v) < 1 - 1e-4
     else f"{_num(v):.8f}", "cosine", "lower"),
    ("top1_agreement", "top-1 agreement", _pct, "top1_agreement", "lower"),
    ("top5_agreement", "top-5 agreement", _pct, "top5_agreement", "lower"),
)


def _limit_text(value: Any, limit: Any, direction: str) -> Text:
    lim, v = _num(limit), _num(value)
    if lim is None or not direction:
        return Text("")
    ok = v is not None and (v <= lim if direction == "upper" else v >= lim)
    sign = "≤" if direction == "upper" else "≥"
    return Text(f"{sign} {lim:g} {'ok' if ok else 'MISS'}", style="green" if ok else "bold red")


def _parity_rows(table: _Rows, parity: Mapping[str, Any]) -> None:
    if not parity:
        return
    tol = _d(parity, "tolerance")
    gated = {}
    for key, _label, _fmt, field, direction in _PARITY_ROWS:
        if field:
            gated[key] = (tol.get(field), direction)
    stat = tol.get("error_stat")
    if stat and tol.get("rel_err") is not None:
        gated[f"{stat}_rel"] = (tol.get("rel_err"), "upper")
    for key, label, fmt, _field, _direction in _PARITY_ROWS:
        if key in parity:
            limit, direction = gated.get(key, (None, ""))
            table.add_row(label, _NA, fmt(parity[key]), _limit_text(parity[key], limit, direction))
    nonfinite = _d(parity, "nonfinite")
    if nonfinite.get("candidate") or nonfinite.get("reference"):
        table.add_row("non-finite outputs", _scalar(nonfinite.get("reference")),
                      Text(_scalar(nonfinite.get("candidate")), style="bold red"), "")
    failures = parity.get("failures")
    if isinstance(failures, list):
        precision = f" ({parity['precision']})" if parity.get("precision") else ""
        table.add_row(f"parity{precision}", "", "; ".join(map(str, failures)) or "within tolerance",
                      _verdict(not failures))
    elif parity.get("precision") is None and "rel_l2" in parity:
        table.add_row("parity", "", "not judged (no --precision preset)", Text(_NA))
    table.add_section()


def _quality_rows(table: _Rows, report: Mapping[str, Any]) -> None:
    """The task's metrics (the ``task`` section); reports made before it hold ``accuracy`` only."""
    task = _d(report, "task")
    if task:
        _task_rows(table, task)
    else:
        _accuracy_rows(table, _d(report, "accuracy"))


def metric_descriptors(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """How to show a task section's metrics: its own ``metrics`` descriptors, else (reports made before
    them) the translation metrics they held."""
    described = [m for m in task.get("metrics") or [] if isinstance(m, Mapping) and m.get("key")]
    if described:
        return [dict(m) for m in described]
    return [{"key": k, "label": label, "higher_is_better": higher, "percent": k == "token_accuracy",
             "points": 100.0 if k == "token_accuracy" else 1.0} for k, label, _fmt, higher in _TASK_ROWS]


def metric_text(value: Any, metric: Mapping[str, Any]) -> str:
    v = _num(value)
    if v is None:
        return _NA
    return _pct(v) if metric.get("percent") else (f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}")


# task metrics of reports made before the task section carried its descriptors (translation)
_TASK_ROWS: tuple[tuple[str, str, Any, bool], ...] = (
    ("bleu", "BLEU", lambda v: _NA if _num(v) is None else f"{_num(v):.2f}", True),
    ("perplexity", "perplexity", lambda v: _NA if _num(v) is None else f"{_num(v):.3f}", False),
    ("token_accuracy", "token accuracy", _pct, True),
    ("loss", "loss (nats/token)", lambda v: _NA if _num(v) is None else f"{_num(v):.4f}", False),
)


def _task_rows(table: _Rows, task: Mapping[str, Any]) -> None:
    """The ``task`` section: every metric the task describes, reference and candidate, the change in its
    points (percentage points for fractions), coloured by which way is better; then any other numbers."""
    ref, cand = _d(task, "reference"), _d(task, "candidate")
    where = " ".join(str(task[k]) for k in ("dataset", "split") if task.get(k))
    n = task.get("samples")
    suffix = f" ({where}" + (f", n={n:,})" if isinstance(n, int) else ")") if where else ""
    metrics = metric_descriptors(task)
    described = {m["key"] for m in metrics}
    extra = [{"key": k, "label": k.replace("_", " "), "higher_is_better": None, "points": 1.0,
              "percent": False} for k in dict.fromkeys([*ref, *cand]) if k not in described
             and (_num(ref.get(k)) is not None or _num(cand.get(k)) is not None)]
    for metric in [*metrics, *extra]:
        key = metric["key"]
        if key not in ref and key not in cand:
            continue
        r, c = _num(ref.get(key)), _num(cand.get(key))
        change = Text(_NA)
        if r is not None and c is not None:
            d = (c - r) * float(metric.get("points") or 1.0)
            higher = metric.get("higher_is_better")
            good = None if higher is None else (d > 0 if higher else d < 0)
            unit = " pp" if metric.get("percent") else ""
            style = "" if d == 0 or good is None else ("green" if good else "red")
            change = Text(f"{d:+.2f}{unit}" if metric.get("percent") else f"{d:+.3g}", style=style)
        table.add_row(f"{metric.get('label', key)}{suffix}", metric_text(ref.get(key), metric),
                      metric_text(cand.get(key), metric), change)
    table.add_section()


def _budget_rows(table: _Rows, budget: Mapping[str, Any]) -> None:
    if not budget:
        return
    checks, failures = budget.get("checks"), budget.get("failures")
    if isinstance(checks, list):
        for check in checks:
            if not isinstance(check, Mapping):
                continue
            table.add_row(f"budget: {check.get('name', '?')}", f"limit {_scalar(check.get('limit'))}",
                          _scalar(check.get("value")), _verdict(check.get("passed")))
    else:
        for key, value in budget.items():
            if key != "passed" and not isinstance(value, (Mapping, list)):
                table.add_row(f"budget: {key}", _scalar(value), "", "")
    if isinstance(failures, list):
        for failure in failures:
            table.add_row("budget missed", "", str(failure), _verdict(False))
    if "passed" in budget:
        table.add_row("budget", "", "", _verdict(budget.get("passed")))


def _environment_caption(env: Mapping[str, Any]) -> str | None:
    if not env:
        return None
    parts = []
    if env.get("cpu_model"):
        parts.append(str(env["cpu_model"]))
    if env.get("available_cpus"):
        parts.append(f"{env['available_cpus']} CPUs")
    threads = env.get("threads")
    if isinstance(threads, Mapping) and threads:
        values = set(threads.values())
        parts.append(f"threads {values.pop()}" if len(values) == 1 else
                     "threads " + ", ".join(f"{k}={v}" for k, v in threads.items()))
    versions = env.get("versions")
    if isinstance(versions, Mapping):
        parts.extend(f"{k} {v}" for k, v in versions.items() if k in ("onnxruntime", "torch", "lrdeploy"))
    return " · ".join(parts) or None


def _ms_value(v: Any) -> str:
    """A time in ms without the unit (the column header carries it)."""
    return _ms(v).removesuffix(" ms")


# (header, justify) of the bench table; numbers never wrap, the model name folds. At 80 columns the first
# seven fit for names up to 14 characters; round spread and runs then go to a second table (see ``fit``).
_BENCH_COLUMNS = (("batch", "right"), ("model", "left"), ("median ms", "right"), ("p90 ms", "right"),
                  ("p99 ms", "right"), ("samples/s", "right"), ("speed-up", "right"),
                  ("round spread", "right"), ("runs", "right"))


def render_bench_table(bench: Any) -> RenderableType:
    """All runtimes × batch sizes of a ``BenchResult`` (or its dict), speed-ups vs the reference; a console
    too narrow for every column gets them in two tables, each led by batch and model."""
    data = bench.to_dict() if hasattr(bench, "to_dict") else dict(bench)
    reference = data.get("reference", "")
    table = Table(title=f"lrdeploy bench (reference: {reference})",
                  caption=_environment_caption(_d(data, "environment")))
    for header, justify in _BENCH_COLUMNS:
        model = header == "model"
        table.add_column(header, justify=justify, overflow="fold" if model else "ellipsis", no_wrap=not model)
    batches = _d(data, "batches")
    for batch in sorted(batches, key=_batch_key):
        res = batches[batch]
        for name, stats in _d(res, "stats").items():
            speedup = _d(res, "speedup").get(name)
            spread = _num(_d(res, "ratio_spread").get(name))
            spread_text = Text(_NA) if name == reference or spread is None else Text(
                f"{spread:.2f}×", style="bold yellow" if spread > UNSTABLE_SPREAD else "")
            table.add_row(str(batch), name, _ms_value(stats.get("median_ms")), _ms_value(stats.get("p90_ms")),
                          _ms_value(stats.get("p99_ms")), _rate(stats.get("throughput")),
                          Text("reference") if name == reference else _speedup_text(speedup), spread_text,
                          _scalar(stats.get("runs")))
        table.add_section()
    return fit(table, keys=2)


# --------------------------------------------------------------------------------------------- markdown
def _plain(cell: Any) -> str:
    text = cell.plain if isinstance(cell, Text) else str(cell)
    return text.replace("|", "\\|").replace("\n", " ")


def _produced_line(report: Mapping[str, Any]) -> str:
    parts = []
    if report.get("command"):
        parts.append(f"`{report['command']}`")
    if report.get("created"):
        parts.append(f"at {report['created']}")
    version = report.get("lrdeploy_version")
    if version:
        parts.append(f"(lrdeploy {version}, schema {report.get('schema', SCHEMA)})")
    return ("Produced by " + " ".join(parts) + ".") if parts else ""


def render_markdown(report: Mapping[str, Any], plot: str | None = None) -> str:
    """The compare report as Markdown: the same rows as :func:`render_compare_table`, a section per part,
    then the verdicts in words and, with ``plot``, the picture (a path relative to the Markdown file)."""
    title, caption, rows = _compare_rows(report)
    lines = [f"# {title}", ""]
    produced = _produced_line(report)
    if produced:
        lines += [produced, ""]
    if caption:
        lines += [f"Environment: {caption}.", ""]
    for name, section in rows.sections:
        if not section:
            continue
        lines += [f"## {name}", "", "| | reference | candidate | change |", "|---|---:|---:|---:|"]
        lines += ["| " + " | ".join(_plain(c) for c in cells) + " |" for cells in section]
        lines.append("")
        if name == "Models" and any(_d(_d(report, role), "graph") for role in ("reference", "candidate")):
            lines += [_COUNTED_NOTE, ""]
    lines += _profile_markdown(report)
    notes = report.get("notes")
    if isinstance(notes, list) and notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    verdicts = _verdict_lines(report)
    if verdicts:
        lines += ["## Verdict", "", *verdicts, ""]
    if plot:
        lines += ["## Plot", "", f"![latency vs accuracy]({plot})", ""]
    return "\n".join(lines)


def _profile_markdown(report: Mapping[str, Any], top: int = 5) -> list[str]:
    profile, batch = _report_profile(report)
    if not profile:
        return []
    names = {"dense": _title_name(_d(report, "reference"), "reference"),
             "candidate": _title_name(_d(report, "candidate"), "candidate")}
    lines = [f"## Where the time goes (ONNX Runtime profiler{f', batch {batch}' if batch else ''})", "",
             "| model | kernel time per call | largest operator types (ms per call, share) |",
             "|---|---:|---|"]
    for runtime, ops in profile.items():
        total = sum(ops.values())
        ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
        parts = ", ".join(f"{op} {ms:.3g} ({ms / total:.0%})" for op, ms in ranked) if total > 0 else _NA
        lines.append(f"| {_plain(names.get(runtime, runtime))} | {_ms(total)} | {_plain(parts)} |")
    return [*lines, ""]


def _verdict_lines(report: Mapping[str, Any]) -> list[str]:
    out = []
    parity = _d(report, "parity")
    if isinstance(parity.get("failures"), list):
        fails = parity["failures"]
        out.append(f"- **parity ({parity.get('precision', '?')} preset)**: "
                   + ("PASS, every statistic within its limit" if not fails else "FAIL: " + "; ".join(fails)))
    budget = _d(report, "budget")
    if "passed" in budget:
        fails = budget.get("failures") or []
        out.append("- **budget**: " + ("PASS" if budget.get("passed") else "FAIL")
                   + (": " + "; ".join(map(str, fails)) if fails else ""))
    golden = _d(report, "golden")
    if golden.get("path"):
        out.append(f"- golden outputs of the reference saved to `{golden['path']}` "
                   f"({golden.get('samples')} samples, {golden.get('precision')} preset)")
    return out


# ------------------------------------------------------------------------------- several runs, one view
SUMMARY_SCHEMA = "lrdeploy.summary/1"
REPORT_FILE, MARKDOWN_FILE, PLOT_FILE = "report.json", "report.md", "plot.png"


def load_report(path: str | Path) -> dict[str, Any]:
    """A compare report from a run directory (its ``report.json``) or a JSON file; bad input: UserError."""
    from lrdeploy.errors import UserError

    path = Path(path)
    file = path / REPORT_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path} holds no {REPORT_FILE}" if path.is_dir() else f"{path} does not exist",
                        "pass run directories written by `lrdeploy compare --out DIR` (or report.json files)")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{file} is not readable JSON ({exc})") from None
    if not isinstance(report, dict) or not str(report.get("schema", "")).startswith("lrdeploy.compare/"):
        raise UserError(f"{file} is not an lrdeploy compare report (schema {report.get('schema')!r})"
                        if isinstance(report, dict) else f"{file} is not an lrdeploy compare report")
    return report


_UNIT_KEYS = (("total_ms", 1.0), ("time_ms", 1.0), ("ms", 1.0), ("mean_ms", 1.0), ("median_ms", 1.0),
              ("dur_ms", 1.0), ("total_us", 1e-3), ("time_us", 1e-3), ("us", 1e-3), ("dur_us", 1e-3),
              ("dur", 1e-3), ("total_s", 1e3), ("seconds", 1e3))
_OP_KEYS = ("op_type", "op", "type", "kind", "name")
_OPS_CONTAINERS = ("by_op_type", "op_types", "ops", "per_op", "totals", "operators")


def _op_ms(value: Any) -> float | None:
    if _num(value) is not None:
        return float(value)
    if isinstance(value, Mapping):
        for key, scale in _UNIT_KEYS:
            if _num(value.get(key)) is not None:
                return float(value[key]) * scale
    return None


def _ops_table(obj: Any) -> dict[str, float]:
    """operator → ms from the shapes a profiler may write (mapping, nested mapping, or list of records).

    A mapping that also says how many ``runs`` its totals cover (``serving.profile.profile_onnx``) is
    divided by them: the chart shows time per call.
    """
    if isinstance(obj, Mapping):
        for key in _OPS_CONTAINERS:
            if key in obj:
                table = _ops_table(obj[key])
                runs = obj.get("runs")
                if isinstance(runs, int) and not isinstance(runs, bool) and runs > 0:
                    table = {op: ms / runs for op, ms in table.items()}
                return table
        return {str(k): ms for k, v in obj.items() if (ms := _op_ms(v)) is not None}
    if isinstance(obj, list):
        out: dict[str, float] = {}
        for rec in obj:
            if not isinstance(rec, Mapping):
                continue
            op = next((str(rec[k]) for k in _OP_KEYS if rec.get(k)), None)
            ms = _op_ms(rec)
            if op is not None and ms is not None:
                out[op] = out.get(op, 0.0) + ms
        return out
    return {}


def _per_batch(value: Any) -> dict[str, Any] | None:
    """``{"1": profile, "32": profile}`` (``lrdeploy bench --profile``) → that dict; else None."""
    if not isinstance(value, Mapping) or not value:
        return None
    if all(str(k).isdigit() and isinstance(v, Mapping) for k, v in value.items()):
        return {str(k): v for k, v in value.items()}
    return None


def profile_totals(profile: Any, batch: Any = None) -> dict[str, dict[str, float]]:
    """Normalise a per-operator profile to ``{runtime or model: {operator type: ms per call}}``.

    Accepts what ``lrdeploy bench --profile`` / ``compare --profile`` write (``{name: {batch: profile_onnx
    dict}}``, ``{name: {"available": false, ...}}`` skipped), ``{name: {op: ms}}``, ``{name: {"by_op_type" |
    "ops" | …: …}}``, ``{name: [{"op_type", "total_ms" | "total_us" | "dur" …}, …]}``, optionally wrapped
    in ``{"runtimes": …}``. ``batch`` picks a batch size where there are several (default: the smallest).
    Anything unrecognised gives ``{}``: a profile is an optional extra, never a reason to fail a report.
    """
    return _profile_and_batch(profile, batch)[0]


def _profile_and_batch(profile: Any, batch: Any = None) -> tuple[dict[str, dict[str, float]], str | None]:
    if not isinstance(profile, Mapping):
        return {}, None
    if isinstance(profile.get("runtimes"), Mapping):
        profile = profile["runtimes"]
    out, used = {}, None
    for name, value in profile.items():
        if isinstance(value, Mapping) and value.get("available") is False:
            continue
        batches = _per_batch(value)
        if batches is not None:
            key = str(batch) if batch is not None and str(batch) in batches else min(batches, key=int)
            value, used = batches[key], key
        ops = _ops_table(value)
        if ops:
            out[str(name)] = ops
    if used is None and isinstance(profile.get("batch_size"), int):
        used = str(profile["batch_size"])
    return out, used


def _report_profile(report: Mapping[str, Any]) -> tuple[dict[str, dict[str, float]], Any]:
    for holder in (report, _d(report, "latency"), _d(report, "benchmark")):
        prof = holder.get("profile") if isinstance(holder, Mapping) else None
        if prof:
            return _profile_and_batch(prof)
    return {}, None


def _model_name(summary: Mapping[str, Any], fallback: str) -> str:
    for key in ("name", "label"):
        if summary.get(key) and summary.get(key) not in ("dense", "candidate", "reference"):
            return str(summary[key])
    source = summary.get("source") or summary.get("path")
    if source:
        return Path(str(source)).stem or Path(str(source)).name
    return str(summary.get("label") or fallback)


def merge_reports(reports: Sequence[Mapping[str, Any]],
                  sources: Sequence[str] | None = None) -> dict[str, Any]:
    """One summary of several compare runs: each model once (the same file in two runs is one model).

    Schema ``lrdeploy.summary/1``::

        {"schema", "runs": [{"source", "created", "command", "reference", "candidate"}],
         "dataset": "mnist test, n=10,000",
         "models": [{"name", "role": "reference"|"candidate", "source", "model", "method", "kind", "params",
                     "flops", "onnx_bytes", "weights_bytes" (+), "trained": {"params", "flops"} | null (+),
                     "accuracy", "task": {metric: value}, "metrics": [descriptor] (+),
                     "headline": {"key", "label", "value"} (+), "vs": reference name,
                     "latency": {batch: {"median_ms", "p90_ms", "p99_ms", "throughput"}},
                     "speedup": {batch: float}, "parity": {"precision", "passed", "rel_l2", "top1_agreement",
                     "failures"}, "budget_passed", "runs": [run indices]}],
         "profile": {model name: {operator: ms}}, "profile_batch", "caption"}

    A model measured in several runs gets the median of its per-run latencies and speed-ups (its own run's
    paired ratio against that run's reference); a reference is listed with speed-up 1.
    """
    runs: list[dict[str, Any]] = []
    by_key: dict[str, dict[str, Any]] = {}
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    speedups: dict[str, dict[str, list[float]]] = {}
    profile: dict[str, dict[str, float]] = {}
    profile_batch = None
    caption = None
    datasets = []
    for index, report in enumerate(reports):
        source = sources[index] if sources else None
        names = {}
        for role in ("reference", "candidate"):
            summary = _d(report, role)
            if not summary:
                continue
            key = str(summary.get("source") or summary.get("path") or _model_name(summary, role))
            entry = by_key.get(key)
            if entry is None:
                entry = _new_model_entry(summary, role)
                by_key[key] = entry
                samples[key], speedups[key] = {}, {}
            elif role == "reference":
                entry["role"] = "reference"
            entry["runs"].append(index)
            names[role] = key
            _fill_quality(entry, report, role)
            for batch, lat in _d(report, "latency").items():
                if not isinstance(lat, Mapping):
                    continue
                stats = _d(lat, role)
                per_batch = samples[key].setdefault(str(batch), {})
                for stat in ("median_ms", "p90_ms", "p99_ms", "throughput"):
                    if _num(stats.get(stat)) is not None:
                        per_batch.setdefault(stat, []).append(float(stats[stat]))
                ratio = 1.0 if role == "reference" else _num(lat.get("speedup"))
                if ratio is not None:
                    speedups[key].setdefault(str(batch), []).append(ratio)
        if "candidate" in names and "reference" in names:
            by_key[names["candidate"]]["vs_key"] = names["reference"]
        prof, batch = _report_profile(report)
        for runtime, ops in prof.items():
            role = "reference" if runtime in ("dense", "reference") else (
                "candidate" if runtime in ("candidate",) else None)
            key = names.get(role) if role else None
            profile[by_key[key]["name"] if key else runtime] = ops
        profile_batch = profile_batch or batch
        caption = caption or _environment_caption(_d(report, "environment"))
        acc = _d(report, "task") or _d(report, "accuracy")
        if acc.get("dataset"):
            n = acc.get("samples")
            datasets.append(" ".join(str(acc[k]) for k in ("dataset", "split") if acc.get(k))
                            + (f", n={n:,}" if isinstance(n, int) else ""))
        runs.append({"source": source, "created": report.get("created"), "command": report.get("command"),
                     "reference": _model_name(_d(report, "reference"), "reference"),
                     "candidate": _model_name(_d(report, "candidate"), "candidate")})

    _unique_names(list(by_key.values()))
    models = []
    for key, entry in by_key.items():
        entry["latency"] = {b: {s: float(statistics.median(v)) for s, v in st.items()}
                            for b, st in sorted(samples[key].items(), key=lambda kv: _batch_key(kv[0]))}
        entry["speedup"] = {b: float(statistics.median(v)) for b, v in speedups[key].items()}
        vs = entry.pop("vs_key", None)
        entry["vs"] = by_key[vs]["name"] if vs else None
        models.append(entry)
    models.sort(key=lambda m: (m["role"] != "reference", m["runs"][0]))
    dataset = ", ".join(dict.fromkeys(datasets)) if datasets else None
    return {"schema": SUMMARY_SCHEMA, "runs": runs, "dataset": dataset, "models": models,
            "profile": profile, "profile_batch": profile_batch, "caption": caption}


def _new_model_entry(summary: Mapping[str, Any], role: str) -> dict[str, Any]:
    return {
        "name": _model_name(summary, role),
        "role": role,
        "source": summary.get("source") or summary.get("path"),
        "model": summary.get("model"),
        "method": summary.get("method"),
        "kind": summary.get("kind"),
        "params": summary.get("params"),
        "flops": summary.get("flops"),
        "onnx_bytes": summary.get("onnx_bytes", summary.get("size_bytes")),
        "weights_bytes": summary.get("weights_bytes"),
        "trained": dict(_d(summary, "trained")) or None,
        "accuracy": None,
        "task": {},
        "metrics": [],
        "parity": None,
        "budget_passed": None,
        "runs": [],
    }


def _fill_quality(entry: dict[str, Any], report: Mapping[str, Any], role: str) -> None:
    section = _d(report, "task")
    task = _d(section, role)
    if task and not entry["task"]:
        entry["task"] = dict(task)
        entry["metrics"] = metric_descriptors(section) if section.get("metrics") else []
        headline = _d(section, "headline")
        if headline.get("key"):
            entry["headline"] = {"key": headline["key"], "label": headline.get("label"),
                                 "value": _num(task.get(headline["key"]))}
    acc = _num(task.get("accuracy")) if task else None
    acc = acc if acc is not None else _num(_d(report, "accuracy").get(role))
    if acc is not None and entry["accuracy"] is None:
        entry["accuracy"] = acc
    if role == "candidate":
        parity = _d(report, "parity")
        if parity:
            entry["parity"] = {k: parity.get(k) for k in ("precision", "passed", "rel_l2", "max_row_rel",
                                                          "top1_agreement", "failures") if k in parity}
        budget = _d(report, "budget")
        if "passed" in budget:
            entry["budget_passed"] = bool(budget["passed"])


def _unique_names(entries: list[dict[str, Any]]) -> None:
    """Two different files called model.onnx in two run directories: tell them apart by their directory."""
    seen: dict[str, int] = {}
    for e in entries:
        seen[e["name"]] = seen.get(e["name"], 0) + 1
    for e in entries:
        if seen[e["name"]] > 1 and e.get("source"):
            parent = Path(str(e["source"])).parent.name
            e["name"] = f"{e['name']} ({parent})" if parent else e["name"]
    counts: dict[str, int] = {}
    for e in entries:  # still equal (same directory names): number them
        counts[e["name"]] = counts.get(e["name"], 0) + 1
        if counts[e["name"]] > 1:
            e["name"] = f"{e['name']} #{counts[e['name']]}"


def _summary_columns(summary: Mapping[str, Any], tails: bool = True) -> tuple[list[str], list[list[Any]]]:
    models = summary.get("models") or []
    batches = sorted({b for m in models for b in (m.get("latency") or {})}, key=_batch_key)
    has_trained = any(_trained_differs(m, "params") for m in models)
    metrics = _summary_metrics(models)
    header = ["model", "role", "params", *([f"params ({TRAINED_LABEL})"] if has_trained else []),
              *(str(m.get("label") or m["key"]) for m in metrics)]
    for b in batches:
        header += [f"b{b} median", *([f"b{b} p99"] if tails else []), f"b{b} speed-up"]
    header += ["parity", "budget"]
    rows = []
    for m in models:
        row: list[Any] = [str(m.get("name")), str(m.get("role")), _scalar(m.get("params"))]
        if has_trained:
            row.append(_trained_cell(m, "params", _scalar))
        values = {**(m.get("task") or {}), **({"accuracy": m["accuracy"]} if m.get("accuracy") is not None
                                               else {})}
        row += [metric_text(values.get(metric["key"]), metric) for metric in metrics]
        for b in batches:
            lat = (m.get("latency") or {}).get(b) or {}
            row += [_ms(lat.get("median_ms")), *([_ms(lat.get("p99_ms"))] if tails else [])]
            row.append(Text("reference") if m.get("role") == "reference"
                       else _speedup_text((m.get("speedup") or {}).get(b)))
        parity = m.get("parity") or {}
        if "passed" in parity:
            row.append(Text(f"{'PASS' if parity['passed'] else 'FAIL'} ({parity.get('precision')})",
                            style="bold green" if parity["passed"] else "bold red"))
        elif parity:
            row.append(f"rel L2 {_sci(parity.get('rel_l2'))}")
        else:
            row.append(_NA)
        row.append(_verdict(m.get("budget_passed")))
        rows.append(row)
    return header, rows


def _summary_metrics(models: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The metric columns of a summary: every metric the models' tasks describe (first seen first), the
    accuracy column of reports made before descriptors, and BLEU/perplexity of their translations."""
    out: dict[str, dict[str, Any]] = {}
    for m in models:
        for metric in m.get("metrics") or []:
            out.setdefault(metric["key"], dict(metric))
    if any(m.get("accuracy") is not None for m in models) or not out:
        out.setdefault("accuracy", {"key": "accuracy", "label": "accuracy", "percent": True})
    if any(not m.get("metrics") and m.get("task") for m in models):  # translation, before descriptors
        for key, label in (("bleu", "BLEU"), ("perplexity", "perplexity")):
            out.setdefault(key, {"key": key, "label": label, "percent": False})
    return list(out.values())


def render_summary_table(summary: Mapping[str, Any]) -> RenderableType:
    """Every model of every run in one table (see :func:`merge_reports`); p99 columns are in the Markdown. A
    console too narrow for every column gets them in several tables, each led by the model's name."""
    header, rows = _summary_columns(summary, tails=False)
    title = "lrdeploy report"
    if summary.get("dataset"):
        title += f": {summary['dataset']}"
    table = Table(title=title, caption=summary.get("caption"))
    for col in header:  # the name folds; numbers and verdicts never wrap (headers do, where room is short)
        table.add_column(col, overflow="fold" if col == "model" else "ellipsis", no_wrap=col != "model",
                         justify="left" if col in ("model", "role") else "right")
    for row in rows:
        table.add_row(*row)
    return fit(table, keys=1)


def render_summary_markdown(summary: Mapping[str, Any], plot: str | None = None) -> str:
    header, rows = _summary_columns(summary)
    lines = ["# lrdeploy report" + (f": {summary['dataset']}" if summary.get("dataset") else ""), ""]
    runs = summary.get("runs") or []
    if runs:
        lines += [f"{len(runs)} run(s) merged:", ""]
        for i, run in enumerate(runs):
            lines.append(f"{i + 1}. {run.get('reference')} vs {run.get('candidate')}"
                         + (f" — `{run['source']}`" if run.get("source") else "")
                         + (f", {run['created']}" if run.get("created") else ""))
        lines.append("")
    if summary.get("caption"):
        lines += [f"Environment (first run): {summary['caption']}.", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if h in ("model", "role") else "---:" for h in header) + "|")
    lines += ["| " + " | ".join(_plain(c) for c in row) + " |" for row in rows]
    lines += ["", "Speed-up: median over rounds of the paired (reference / candidate) median latency, "
              "against the reference of the candidate's own run; a model measured in several runs shows the "
              "median of its runs.", ""]
    if any(m.get("trained") for m in summary.get("models") or []):  # reports made since sizes are counted
        lines += [_COUNTED_NOTE, ""]
    if plot:
        lines += [f"![latency vs accuracy]({plot})", ""]
    return "\n".join(lines)


def _write_plot(figure_of: Any, data: Mapping[str, Any], path: Path) -> Path | None:
    """Draw and save the plot; a missing matplotlib costs the picture only, not the report."""
    try:
        from .plot import save_figure

        return save_figure(figure_of(data), path)
    except ImportError:  # pragma: no cover - matplotlib is a dependency; be kind if it is absent anyway
        return None


REPORT_FILES = (REPORT_FILE, MARKDOWN_FILE, PLOT_FILE)
SUMMARY_FILES = ("summary.json", MARKDOWN_FILE, PLOT_FILE)


def write_reports(report: Mapping[str, Any], out_dir: str | Path, *, plot: bool = True,
                  force: bool = False) -> dict[str, Path]:
    """``report.json``, ``report.md`` and ``plot.png`` in ``out_dir``, appearing together (staged)."""
    from .plot import plot_report

    def write(stage: Path) -> None:
        write_json(stage / REPORT_FILE, report)
        png = _write_plot(plot_report, report, stage / PLOT_FILE) if plot else None
        atomic.write_text(stage / MARKDOWN_FILE, render_markdown(report, plot=PLOT_FILE if png else None))

    return _write_files(out_dir, "--out", REPORT_FILES, write, force,
                        {"json": REPORT_FILE, "plot": PLOT_FILE, "markdown": MARKDOWN_FILE})


def write_summary(summary: Mapping[str, Any], out_dir: str | Path, *, plot: bool = True,
                  force: bool = False) -> dict[str, Path]:
    """``summary.json``, ``report.md`` and ``plot.png`` of merged runs in ``out_dir``, appearing together."""
    from .plot import plot_summary

    def write(stage: Path) -> None:
        write_json(stage / "summary.json", summary)
        png = _write_plot(plot_summary, summary, stage / PLOT_FILE) if plot else None
        atomic.write_text(stage / MARKDOWN_FILE, render_summary_markdown(summary, PLOT_FILE if png else None))

    return _write_files(out_dir, "--out", SUMMARY_FILES, write, force,
                        {"json": "summary.json", "plot": PLOT_FILE, "markdown": MARKDOWN_FILE})


def _write_files(out_dir: str | Path, flag: str, names: Sequence[str], write: Any, force: bool,
                 keys: Mapping[str, str]) -> dict[str, Path]:
    """Stage a report's files and install them at once; an existing report is replaced only with ``force``."""
    from lrdeploy.outputs import Outputs

    out = Path(out_dir)
    Outputs(force=force).files_in(out, flag, names)
    if out.is_dir():  # stage inside it, so the user's other files there are never touched
        with atomic.Staging(out, replaces=names) as stage:
            write(stage.new)
    else:  # a new directory appears whole
        with atomic.Staging(out.parent) as stage:
            stage.path(out.name).mkdir()
            write(stage.path(out.name))
    return {key: out / name for key, name in keys.items() if (out / name).exists()}


def render_check_table(result: Mapping[str, Any]) -> Table:
    """The result of a golden check (``lrdeploy.check/1``): top-1 accuracy on the golden inputs (where the
    set holds class labels), then per output every parity statistic with its limit and verdict."""
    rows = _Rows()
    rows.begin("Accuracy")
    _accuracy_rows(rows, _d(result, "accuracy"))
    for name, parity in _d(result, "outputs").items():
        rows.begin(f"output {name}")
        _parity_rows(rows, parity if isinstance(parity, Mapping) else {})
    golden = _d(result, "golden")
    cand = _d(result, "candidate")
    title = f"lrdeploy check: {_title_name(cand, 'candidate')} against golden {golden.get('path', '?')}"
    ref = _d(golden, "reference")
    caption = (f"golden outputs of {_title_name(ref, 'the reference')}, saved {golden.get('created', '?')}; "
               f"preset {result.get('precision')}")
    table = Table(title=title, caption=caption)
    columns = (("", "left"), ("golden", "right"), ("candidate", "right"), ("limit / change", "right"))
    for col, justify in columns:  # every column wraps (long names fold): fits 80 columns, nothing elided
        table.add_column(col, justify=justify, style="bold" if not col else None, overflow="fold")
    for _, section in rows.sections:
        for cells in section:
            table.add_row(*cells)
        if section:
            table.add_section()
    verdict = Text("PASS", style="bold green") if result.get("passed") else Text("FAIL", style="bold red")
    failures = "; ".join(map(str, result.get("failures") or []))
    table.add_row("verdict", "", failures or "every statistic within its limit", verdict)
    return table
