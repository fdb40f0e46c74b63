"""One line per command that says what it found: what ``-q`` leaves (beside errors), and the last line
every run prints. Each reads the command's JSON report, so the line and the JSON never disagree."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _x(value: Any) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.2f}×"


def _batch_order(keys: Any) -> list[str]:
    return sorted(keys, key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k)))


def compare_line(report: Mapping[str, Any]) -> str:
    """``candidate: 2.87× at batch 32, 2.12× at batch 1; accuracy 98.62% vs 98.55% (+0.07 points); budget
    passed``."""
    parts = []
    latency = report.get("latency") or {}
    speed = [f"{_x((latency[b] or {}).get('speedup'))} at batch {b}" for b in _batch_order(latency)]
    if speed:
        parts.append("speed-up " + ", ".join(speed))
    headline = (report.get("task") or {}).get("headline") or {}
    cand, ref = headline.get("candidate"), headline.get("reference")
    if isinstance(cand, (int, float)) and isinstance(ref, (int, float)):
        scale, unit = (100.0, "%") if headline.get("key") == "accuracy" else (1.0, "")
        label = headline.get("label", headline.get("key"))
        parts.append(f"{label} {cand * scale:.2f}{unit} vs {ref * scale:.2f}{unit} "
                     f"({(cand - ref) * scale:+.2f} points)")
    budget = report.get("budget") or {}
    if budget:
        parts.append("budget " + ("passed" if budget.get("passed", True) else "MISSED"))
    parity = report.get("parity") or {}
    if parity.get("precision"):
        parts.append(f"parity ({parity['precision']}) " + ("FAILED" if parity.get("failures") else "passed"))
    return "candidate vs reference: " + ("; ".join(parts) if parts else "nothing measured")


def bench_line(report: Mapping[str, Any]) -> str:
    """``bench vs dense: lowrank 1.93× at batch 1, 2.40× at batch 32; gates passed``."""
    reference = report.get("reference")
    batches = report.get("batches") or {}
    names = [n for n in (report.get("runtimes") or []) if n != reference]
    per_model = []
    for name in names:
        speed = [f"{_x(((batches[b] or {}).get('speedup') or {}).get(name))} at batch {b}"
                 for b in _batch_order(batches)]
        per_model.append(f"{name} {', '.join(speed)}")
    gates = report.get("gates") or []
    tail = ("; gates " + ("passed" if report.get("gates_passed", True) else "MISSED")) if gates else ""
    return f"bench vs {reference}: " + ("; ".join(per_model) or "one model, nothing to compare") + tail


def check_line(result: Mapping[str, Any]) -> str:
    verdict = "passed" if result.get("passed") else "FAILED"
    return f"golden check {verdict} ({result.get('precision')})"


def loadtest_line(result: Mapping[str, Any]) -> str:
    """``loadtest lenet: 1 → 812 req/s (p99 2.1 ms), 8 → …; 0 errors``."""
    levels = [f"{lv['concurrency']} → {lv['throughput_rps']:.0f} req/s (p99 "
              + ("n/a" if lv.get("p99_ms") is None else f"{lv['p99_ms']:.1f} ms") + ")"
              for lv in result.get("levels") or []]
    return f"loadtest {result.get('model', '')}: {', '.join(levels)}; {result.get('errors', 0)} errors"
