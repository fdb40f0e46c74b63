"""Compare reports: a Rich table for people, an atomically written JSON file for programs.

JSON schema of the compare report (``schema: "lrdeploy.compare/1"``). The CLI builds this dict; every
top-level part except ``schema`` is optional, and the renderer shows what is there. Unknown extra keys are
allowed and kept (readers must ignore what they do not know). Non-finite floats are written as ``null``.

    {
      "schema": "lrdeploy.compare/1",
      "created": "2026-11-25T10:00:00+00:00",          # UTC ISO time, optional
      "command": "lrdeploy compare ...",                # how it was produced, optional
      "reference": {                                    # model summary (all keys optional)
        "name": "lenet5-dense", "path": "runs/dense/model.onnx", "runtime": "ort-cpu",
        "params": 61706, "flops": 845000,               # FLOPs per sample (2·MAC)
        "size_bytes": 247000, "method": "dense", ...
      },
      "candidate": { ...same keys as reference... },
      "parity": {                                       # serving.parity.output_parity(ref_out, cand_out)
        "shape": [N, C], "max_abs": float, "mean_abs": float, "p99_abs": float,
        "rel_l2": float, "cosine": float, "top1_agreement": float | null,
        "nonfinite": {"reference": int, "candidate": int},
        "samples": N, "precision": "fp32", "failures": [str, ...]   # optional, set by the caller
      },
      "accuracy": {                                     # task metric on real data
        "dataset": "mnist", "split": "test", "samples": 10000,
        "reference": 0.991, "candidate": 0.987, "delta": -0.004   # fractions in [0, 1]
      },
      "latency": {                                      # keyed by batch size (string in JSON)
        "1":  {"reference": LatencyStats, "candidate": LatencyStats, "speedup": 1.93,
               "round_ratios": [1.95, 1.91, 1.93], "ratio_spread": 1.02},   # spread = max/min ratio
        "32": {...}
      },
      # LatencyStats = {"batch_size", "runs", "total_s", "median_ms", "p90_ms", "p99_ms", "mean_ms",
      #                 "min_ms", "max_ms", "std_ms", "throughput" (samples/s)}
      # speedup = median over rounds of (reference block median / candidate block median)
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
      }
    }

``latency_section(bench)`` builds the ``latency`` part from a ``serving.bench.BenchResult``; use
``bench.environment`` for ``environment``. For robustness the renderer also accepts a whole
``BenchResult.to_dict()`` under ``latency`` and converts it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from lrdeploy import atomic

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
    if r is None or c is None or r == 0:
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
    ("flops", "FLOPs / sample", lambda v: _si(v, "FLOP"), True),
    ("size_bytes", "file size", _bytes, True),
    ("onnx_bytes", "ONNX size", _bytes, True),
    ("weights_bytes", "weights size", _bytes, True),
)
_SKIP_SUMMARY = {"path", "source"}  # long paths would widen the table; they are in the JSON


def _title_name(summary: Mapping[str, Any], default: str) -> str:
    for key in ("name", "model", "label"):
        if summary.get(key):
            return str(summary[key])
    return default


def render_compare_table(report: Mapping[str, Any]) -> Table:
    """One table: model summary, accuracy, latency per batch, parity, budget. Missing parts are skipped."""
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
    table = Table(title=title, caption=_environment_caption(environment), show_lines=False)
    table.add_column("", style="bold")
    table.add_column("reference", justify="right")
    table.add_column("candidate", justify="right")
    table.add_column("change", justify="right")

    _summary_rows(table, ref, cand)
    _accuracy_rows(table, _d(report, "accuracy"))
    _latency_rows(table, latency)
    _parity_rows(table, _d(report, "parity"))
    _budget_rows(table, _d(report, "budget"))
    return table


def _summary_rows(table: Table, ref: Mapping[str, Any], cand: Mapping[str, Any]) -> None:
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
    extra = [k for k in dict.fromkeys([*ref, *cand]) if k not in known and k not in _SKIP_SUMMARY]
    for key in extra:
        a, b = ref.get(key), cand.get(key)
        if isinstance(a, (Mapping, list)) or isinstance(b, (Mapping, list)):
            continue
        table.add_row(str(key), _scalar(a), _scalar(b), "")
    table.add_section()


def _accuracy_rows(table: Table, acc: Mapping[str, Any]) -> None:
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


def _latency_rows(table: Table, latency: Mapping[str, Any]) -> None:
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


def _parity_rows(table: Table, parity: Mapping[str, Any]) -> None:
    if not parity:
        return
    rows = (("max_abs", "parity max |Δ|", _sci), ("mean_abs", "parity mean |Δ|", _sci),
            ("rel_l2", "parity rel L2", _sci), ("cosine", "parity cosine", lambda v: _scalar(_num(v))),
            ("top1_agreement", "top-1 agreement", _pct))
    for key, label, fmt in rows:
        if key in parity:
            table.add_row(label, _NA, fmt(parity[key]), "")
    nonfinite = _d(parity, "nonfinite").get("candidate")
    if nonfinite:
        table.add_row("non-finite outputs", _scalar(_d(parity, "nonfinite").get("reference")),
                      Text(_scalar(nonfinite), style="bold red"), "")
    failures = parity.get("failures")
    if isinstance(failures, list):
        precision = f" ({parity['precision']})" if parity.get("precision") else ""
        table.add_row(f"parity{precision}", "", "; ".join(map(str, failures)) or "within tolerance",
                      _verdict(not failures))
    table.add_section()


def _budget_rows(table: Table, budget: Mapping[str, Any]) -> None:
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


def render_bench_table(bench: Any) -> Table:
    """All runtimes × batch sizes of a ``BenchResult`` (or its dict), speed-ups vs the reference."""
    data = bench.to_dict() if hasattr(bench, "to_dict") else dict(bench)
    reference = data.get("reference", "")
    table = Table(title=f"lrdeploy bench (reference: {reference})",
                  caption=_environment_caption(_d(data, "environment")))
    for col in ("batch", "runtime", "median", "p90", "p99", "samples/s", "runs", "speed-up", "round spread"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    batches = _d(data, "batches")
    for batch in sorted(batches, key=_batch_key):
        res = batches[batch]
        for name, stats in _d(res, "stats").items():
            speedup = _d(res, "speedup").get(name)
            spread = _num(_d(res, "ratio_spread").get(name))
            spread_text = Text(_NA) if name == reference or spread is None else Text(
                f"{spread:.2f}×", style="bold yellow" if spread > UNSTABLE_SPREAD else "")
            table.add_row(str(batch), name, _ms(stats.get("median_ms")), _ms(stats.get("p90_ms")),
                          _ms(stats.get("p99_ms")), _rate(stats.get("throughput")),
                          _scalar(stats.get("runs")),
                          Text("reference") if name == reference else _speedup_text(speedup), spread_text)
        table.add_section()
    return table
