"""CI gates on a benchmark: ``--gate "speedup>=1.5@p90,batch=32"`` and friends.

A gate is one line a CI job can read: what was required, what was measured, pass or fail. Grammar
(whitespace ignored, case-insensitive keywords)::

    gate       := metric comparator value [unit] qualifier*
    metric     := "speedup" | "latency" | "throughput"
    comparator := ">=" | "<=" | ">" | "<"
    unit       := speedup: "x" | "×"            (optional)
                  latency: "ms" (default) | "us" | "µs" | "s"
                  throughput: "/s" | "sps"       (optional; samples per second)
    qualifier  := ("@" | ",") ( stat | "batch=" N | "model=" NAME | "stat=" stat )
    stat       := "median" | "p50" | "p90" | "p99"

Examples: ``speedup>=1.5``, ``speedup>=1.5@p90,batch=32``, ``latency<=5ms@p99,batch=1,model=lowrank``,
``throughput>2000@batch=128``.

Semantics (what each gate reads from a ``BenchResult.to_dict()``):
- ``speedup`` at a statistic = the paired speed-up: per round, reference block statistic / candidate block
  statistic, median over rounds (``batches[b].speedup_at[stat][model]``). Default statistic: median.
- ``latency`` = the model's pooled latency statistic at that batch size, in ms. Default: median.
- ``throughput`` without a statistic = the measured samples/s (total samples / total timed seconds); with one
  = batch / that latency statistic (``throughput>=900@p90``: the rate 90 % of calls sustain).
- No ``batch=``: every measured batch size must pass. No ``model=``: every candidate (every model but the
  reference) must pass; with a single model, that model (a speed-up gate then needs ``model=`` or a second
  model and is rejected).

A gate that cannot be parsed, or names a batch size or model that is not measured, is the user's error
(``UserError``, exit 2) and is reported before any timing starts. A gate that is evaluated and missed makes
``lrdeploy bench`` exit 1, with one line per gate saying which model and batch missed and by how much.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lrdeploy.errors import UserError

METRICS = ("speedup", "latency", "throughput")
STATS = ("median", "p90", "p99")
_STAT_ALIASES = {"median": "median", "p50": "median", "p90": "p90", "p99": "p99"}
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}
_UNITS: dict[str, dict[str, float]] = {  # metric -> unit -> factor to the canonical unit
    "speedup": {"": 1.0, "x": 1.0, "×": 1.0},
    "latency": {"": 1.0, "ms": 1.0, "us": 1e-3, "µs": 1e-3, "μs": 1e-3, "s": 1e3},
    "throughput": {"": 1.0, "/s": 1.0, "sps": 1.0},
}
_HEAD = re.compile(
    r"^(?P<metric>[a-z]+)\s*(?P<op>>=|<=|>|<)\s*"
    r"(?P<value>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*(?P<unit>[a-zµμ×/]*)\s*(?P<rest>.*)$",
    re.IGNORECASE,
)
# no square brackets: the CLI prints messages through Rich, which would take "[@...]" for markup
_GRAMMAR = ('METRIC OP VALUE, then @median|p90|p99, batch=N, model=NAME as needed, '
            'e.g. "speedup>=1.5@p90,batch=32"')


@dataclass(frozen=True)
class Gate:
    """One parsed gate. ``value`` is in the canonical unit: ratio, ms, or samples/s."""

    text: str
    metric: str
    op: str
    value: float
    stat: str | None = None  # None: the metric's default (median; throughput: measured rate)
    batch: int | None = None
    model: str | None = None

    def describe(self) -> str:
        """Canonical spelling, e.g. ``speedup>=1.5@p90,batch=32``."""
        unit = {"speedup": "x", "latency": "ms", "throughput": "/s"}[self.metric]
        parts = [f"{self.metric}{self.op}{self.value:g}{unit}"]
        quals = [q for q in (self.stat, f"batch={self.batch}" if self.batch is not None else None,
                             f"model={self.model}" if self.model is not None else None) if q]
        return parts[0] + ("@" + ",".join(quals) if quals else "")

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "metric": self.metric, "op": self.op, "value": self.value,
                "stat": self.stat, "batch": self.batch, "model": self.model}


@dataclass
class GateCheck:
    """The gate applied to one (model, batch): the measured value and whether it satisfies the gate."""

    model: str
    batch: int
    value: float | None
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "batch": self.batch, "value": self.value, "passed": self.passed}


@dataclass
class GateResult:
    gate: Gate
    passed: bool
    checks: list[GateCheck] = field(default_factory=list)
    reason: str = ""  # one line: PASS/FAIL, the gate, and the deciding numbers

    def to_dict(self) -> dict[str, Any]:
        return {"gate": self.gate.to_dict(), "passed": self.passed, "reason": self.reason,
                "checks": [c.to_dict() for c in self.checks]}


# ------------------------------------------------------------------------------------------------- parse
def _bad(text: str, why: str) -> UserError:
    return UserError(f"--gate {text!r}: {why}", hint=f"write {_GRAMMAR}")


def parse_gate(text: str) -> Gate:
    """Parse one gate expression; anything malformed is a ``UserError`` naming the problem."""
    if not isinstance(text, str) or not text.strip():
        raise _bad(str(text), "empty gate")
    match = _HEAD.match(text.strip())
    if match is None:
        raise _bad(text, "expected a metric, a comparator (>=, <=, >, <) and a number")
    metric = match["metric"].lower()
    if metric not in METRICS:
        raise _bad(text, f"unknown metric {match['metric']!r} (use {', '.join(METRICS)})")
    unit = match["unit"].lower()
    if unit not in _UNITS[metric]:
        allowed = ", ".join(repr(u) for u in _UNITS[metric] if u)
        raise _bad(text, f"unit {match['unit']!r} does not fit {metric} (use {allowed} or none)")
    value = float(match["value"]) * _UNITS[metric][unit]
    if not math.isfinite(value):
        raise _bad(text, "the value must be finite")
    if metric != "speedup" and value < 0:
        raise _bad(text, f"a {metric} limit cannot be negative")
    stat = batch = model = None
    rest = match["rest"].strip()
    if rest and rest[0] not in "@,":
        raise _bad(text, f"unexpected {rest!r} after the value (qualifiers start with @ or ,)")
    for raw in re.split(r"[@,]", rest)[1:] if rest else []:
        item = raw.strip()
        key, sep, val = (s.strip() for s in item.partition("="))
        key = key.lower()
        if not item:
            raise _bad(text, "empty qualifier")
        if (not sep and key in _STAT_ALIASES) or key == "stat":
            name = _STAT_ALIASES.get((val if key == "stat" else key).lower())
            if name is None:
                raise _bad(text, f"unknown statistic {val!r} (use median, p90 or p99)")
            if stat is not None:
                raise _bad(text, "the statistic is given twice")
            stat = name
        elif key in ("batch", "b") and sep:
            if batch is not None:
                raise _bad(text, "batch= is given twice")
            if not val.isdigit() or int(val) < 1:
                raise _bad(text, f"batch={val!r} is not a positive integer")
            batch = int(val)
        elif key == "model" and sep:
            if model is not None:
                raise _bad(text, "model= is given twice")
            if not val:
                raise _bad(text, "model= needs a name")
            model = val
        else:
            raise _bad(text, f"unknown qualifier {item!r} (use median|p90|p99, batch=N, model=NAME)")
    return Gate(text=text.strip(), metric=metric, op=match["op"], value=value, stat=stat, batch=batch,
                model=model)


def parse_gates(texts: Sequence[str] | None) -> list[Gate]:
    return [parse_gate(t) for t in texts or []]


def validate_gates(gates: Sequence[Gate], models: Sequence[str], batch_sizes: Sequence[int]) -> None:
    """Reject gates that could never be evaluated on this run (before spending minutes timing it)."""
    for gate in gates:
        if gate.model is not None and gate.model not in models:
            raise UserError(f"--gate {gate.text!r}: no model named {gate.model!r}",
                            hint=f"models in this run: {', '.join(models)}")
        if gate.batch is not None and gate.batch not in batch_sizes:
            raise UserError(f"--gate {gate.text!r}: batch {gate.batch} is not measured",
                            hint=f"add it to --batch (now {','.join(map(str, batch_sizes))})")
        if gate.metric == "speedup" and gate.model is None and len(models) < 2:
            raise UserError(f"--gate {gate.text!r}: a speed-up needs a reference and a candidate",
                            hint="benchmark two models (the first is the reference)")


# ---------------------------------------------------------------------------------------------- evaluate
def _as_dict(result: Any) -> Mapping[str, Any]:
    return result.to_dict() if hasattr(result, "to_dict") else result


def _measure(gate: Gate, batch_data: Mapping[str, Any], model: str, batch: int) -> float | None:
    stats = (batch_data.get("stats") or {}).get(model) or {}
    if gate.metric == "speedup":
        stat = gate.stat or "median"
        at = (batch_data.get("speedup_at") or {}).get(stat)
        if at is None and stat == "median":
            at = batch_data.get("speedup")
        value = (at or {}).get(model)
    elif gate.metric == "latency":
        value = stats.get(f"{gate.stat or 'median'}_ms")
    elif gate.stat is None:
        value = stats.get("throughput")
    else:
        ms = stats.get(f"{gate.stat}_ms")
        value = batch * 1e3 / ms if isinstance(ms, (int, float)) and ms > 0 else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)  # NaN/Inf kept, so the reason can name it; it never passes (evaluate_gate)


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a (not measured)"
    if not math.isfinite(value):
        return f"{value} (not a valid measurement)"
    if metric == "speedup":
        return f"{value:.3g}×"
    if metric == "latency":
        return f"{value:.4g} ms"
    return f"{value:,.4g}/s"


def evaluate_gate(gate: Gate, result: Any) -> GateResult:
    """Apply one gate to a ``BenchResult`` (or its ``to_dict()``); missing numbers count as a miss."""
    data = _as_dict(result)
    reference = data["reference"]
    models = list(data["runtimes"])
    candidates = [m for m in models if m != reference] or models
    targets = [gate.model] if gate.model is not None else candidates
    batch_keys = {int(b): d for b, d in data["batches"].items()}
    batches = [gate.batch] if gate.batch is not None else sorted(batch_keys)
    validate_gates([gate], models, list(batch_keys))
    checks = []
    for model in targets:
        for batch in batches:
            value = _measure(gate, batch_keys[batch], model, batch)
            # NaN compares false both ways, so "latency > x" style gates would pass it: check it explicitly
            passed = value is not None and math.isfinite(value) and _OPS[gate.op](value, gate.value)
            checks.append(GateCheck(model, batch, value, passed))
    passed = all(c.passed for c in checks)
    stat = gate.stat or ("measured" if gate.metric == "throughput" else "median")
    shown = [c for c in checks if not c.passed] if not passed else checks
    limit = _fmt(gate.metric, gate.value)
    detail = "; ".join(f"{c.model} b{c.batch} {stat} {gate.metric} {_fmt(gate.metric, c.value)}"
                       + ("" if c.passed else f" (needs {gate.op} {limit})") for c in shown)
    reason = f"{'PASS' if passed else 'FAIL'} {gate.text}: {detail}"
    return GateResult(gate, passed, checks, reason)


def evaluate_gates(gates: Sequence[Gate], result: Any) -> list[GateResult]:
    return [evaluate_gate(g, result) for g in gates]


def gates_exit_code(results: Sequence[GateResult]) -> int:
    """0 when every gate passed (or none was given), 1 when any was missed."""
    return 0 if all(r.passed for r in results) else 1
