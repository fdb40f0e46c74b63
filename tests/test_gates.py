"""CI gates: the grammar, evaluation against a fake-clock benchmark with known numbers, one-line reasons."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lrdeploy.errors import UserError
from lrdeploy.serving.bench import benchmark
from lrdeploy.serving.gates import (
    Gate,
    evaluate_gate,
    evaluate_gates,
    gates_exit_code,
    parse_gate,
    parse_gates,
    validate_gates,
)


# ------------------------------------------------------------------------------------------------- parse
@pytest.mark.parametrize("text, expected", [
    ("speedup>=1.5", Gate("speedup>=1.5", "speedup", ">=", 1.5)),
    ("speedup>=1.5@p90,batch=32", Gate("speedup>=1.5@p90,batch=32", "speedup", ">=", 1.5, "p90", 32)),
    ("speedup >= 2x @ p99 , batch = 8",
     Gate("speedup >= 2x @ p99 , batch = 8", "speedup", ">=", 2.0, "p99", 8)),
    ("latency<=5ms@p99,batch=1,model=lowRank-2",
     Gate("latency<=5ms@p99,batch=1,model=lowRank-2", "latency", "<=", 5.0, "p99", 1, "lowRank-2")),
    ("latency<500us", Gate("latency<500us", "latency", "<", 0.5)),
    ("latency<0.25s@median", Gate("latency<0.25s@median", "latency", "<", 250.0, "median")),
    ("throughput>2000@batch=128", Gate("throughput>2000@batch=128", "throughput", ">", 2000.0, None, 128)),
    ("throughput>=1e3/s@p50", Gate("throughput>=1e3/s@p50", "throughput", ">=", 1000.0, "median")),
    ("SPEEDUP>1.2@P90", Gate("SPEEDUP>1.2@P90", "speedup", ">", 1.2, "p90")),
    ("speedup>=1.5,stat=p90,model=b",
     Gate("speedup>=1.5,stat=p90,model=b", "speedup", ">=", 1.5, "p90", None, "b")),
])
def test_parse(text, expected):
    assert parse_gate(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("speedup", "comparator"),
    ("speedup=>1.5", "comparator"),
    ("speedup==1.5", "comparator"),
    ("speed>=1.5", "unknown metric"),
    ("speedup>=fast", "comparator"),
    ("speedup>=1.5@p95", "unknown qualifier"),
    ("speedup>=1.5@batch=0", "positive integer"),
    ("speedup>=1.5@batch=x", "positive integer"),
    ("speedup>=1.5@model=", "needs a name"),
    ("speedup>=1.5@p90@p99", "twice"),
    ("speedup>=1.5,batch=1,batch=2", "twice"),
    ("speedup>=1.5,,batch=2", "empty qualifier"),
    ("speedup>=1.5ms", "does not fit"),
    ("latency<=5kg", "does not fit"),
    ("latency>=-1", "negative"),
    ("speedup>=1.5 p90", "does not fit"),
    ("speedup>=1.5@colour=red", "unknown qualifier"),
    ("speedup>=1.5@stat=p42", "unknown statistic"),
])
def test_malformed_gates_are_one_line_user_errors(text, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        parse_gate(text)
    message = str(info.value)
    assert "\n" not in message and "--gate" in message and "speedup>=1.5@p90,batch=32" in message
    assert "[" not in message  # the CLI prints through Rich: brackets would be eaten as markup


def test_describe_is_canonical_and_reparses():
    gate = parse_gate("latency < 500us @ p99, batch=4, model=lr")
    assert gate.describe() == "latency<0.5ms@p99,batch=4,model=lr"
    again = parse_gate(gate.describe())
    assert (again.metric, again.op, again.value, again.stat, again.batch, again.model) == \
        (gate.metric, gate.op, gate.value, gate.stat, gate.batch, gate.model)
    assert json.loads(json.dumps(gate.to_dict()))["value"] == 0.5


def test_validate_against_the_run():
    models, batches = ["dense", "lowrank"], [1, 32]
    validate_gates(parse_gates(["speedup>=1.5@batch=32,model=lowrank", "latency<1"]), models, batches)
    with pytest.raises(UserError, match="no model named 'lr'"):
        validate_gates([parse_gate("speedup>=1@model=lr")], models, batches)
    with pytest.raises(UserError, match="batch 8 is not measured"):
        validate_gates([parse_gate("speedup>=1@batch=8")], models, batches)
    with pytest.raises(UserError, match="reference and a candidate"):
        validate_gates([parse_gate("speedup>=1")], ["dense"], batches)
    validate_gates([parse_gate("latency<=5")], ["dense"], batches)  # a single model can be gated on time
    assert parse_gates(None) == []


# --------------------------------------------------------------------------------------------- evaluate
class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Runtime:
    """Each call advances the fake clock: 9 calls of ``fast`` then one of ``slow`` in every block of 10."""

    def __init__(self, name: str, clock: _Clock, fast: float, slow: float) -> None:
        self.name, self.clock, self.fast, self.slow, self.calls = name, clock, fast, slow, 0

    def inputs(self) -> list:
        from lrdeploy.serving.runtimes import IOInfo

        return [IOInfo("x", np.dtype(np.float32), None)]

    def run(self, feeds: dict) -> dict:
        # call 0 is the warm-up; then blocks of 10: calls 1..9 fast, call 10 slow, ...
        self.clock.t += self.slow if self.calls > 0 and self.calls % 10 == 0 else self.fast
        self.calls += 1
        return {"y": feeds["x"]}

    def describe(self) -> dict:
        return {"backend": "fake", "threads": 1}


@pytest.fixture(scope="module")
def result():
    """Per block of 10 calls (unit 1/256 s): dense 9 × 4 + 1 × 44; lowrank 9 × 2 + 1 × 6; fast 10 × 1.

    Medians 4, 2, 1 units → median speed-ups lowrank 2, fast 4. Block p90 (rank 8.1 of 10) = fast + 0.1 ·
    (slow − fast): dense 8, lowrank 2.4, fast 1 → p90 speed-ups 3.33 and 8.
    """
    clock = _Clock()
    u = 1 / 256
    rts = {"dense": _Runtime("dense", clock, 4 * u, 44 * u),
           "lowrank": _Runtime("lowrank", clock, 2 * u, 6 * u),
           "fast": _Runtime("fast", clock, u, u)}
    return benchmark(rts, (3,), batch_sizes=(1, 32), warmup_s=0, min_runs=10, min_seconds=0, max_seconds=1e9,
                     rounds=3, progress=False, clock=clock, block_warmup_runs=0)


def test_known_numbers(result):
    assert result.speedup("lowrank", 32) == pytest.approx(2.0)
    assert result.speedup("lowrank", 32, "p90") == pytest.approx(8 / 2.4)
    assert result.speedup("fast", 1, "p90") == pytest.approx(8.0)


def test_speedup_gate_at_p90_passes_and_fails(result):
    ok = evaluate_gate(parse_gate("speedup>=3@p90,batch=32"), result)
    assert ok.passed and [(c.model, c.batch) for c in ok.checks] == [("lowrank", 32), ("fast", 32)]
    assert ok.checks[0].value == pytest.approx(8 / 2.4)
    assert ok.reason.startswith("PASS speedup>=3@p90,batch=32: lowrank b32 p90 speedup 3.33×")
    at_median = evaluate_gate(parse_gate("speedup>=3@batch=32"), result)  # median: lowrank only 2×
    assert not at_median.passed
    assert at_median.reason == "FAIL speedup>=3@batch=32: lowrank b32 median speedup 2× (needs >= 3×)"
    assert "\n" not in at_median.reason


def test_gates_without_batch_or_model_cover_every_candidate_and_batch(result):
    res = evaluate_gate(parse_gate("speedup>1.5"), result)
    assert res.passed and len(res.checks) == 4  # lowrank and fast (not the reference) × b1, b32
    res = evaluate_gate(parse_gate("speedup>=2.5"), result)
    assert not res.passed and {c.model for c in res.checks if not c.passed} == {"lowrank"}
    assert res.reason.count("lowrank") == 2 and "fast" not in res.reason  # only the misses are named
    only = evaluate_gate(parse_gate("speedup>=3@model=fast"), result)
    assert only.passed and {c.model for c in only.checks} == {"fast"}
    ref = evaluate_gate(parse_gate("speedup>=1@model=dense"), result)
    assert ref.passed and all(c.value == 1.0 for c in ref.checks)


def test_latency_and_throughput_gates(result):
    unit_ms = 1000 / 256
    lat = evaluate_gate(parse_gate("latency<=2ms@batch=1,model=lowrank"), result)  # median 7.8 ms
    assert not lat.passed and lat.checks[0].value == pytest.approx(2 * unit_ms)
    assert "lowrank b1 median latency 7.812 ms (needs <= 2 ms)" in lat.reason
    p90 = evaluate_gate(parse_gate("latency<10ms@p90,model=lowrank"), result)  # p90 = 2.4 units = 9.4 ms
    assert p90.passed and p90.checks[0].value == pytest.approx(2.4 * unit_ms)
    thr = evaluate_gate(parse_gate("throughput>=100@batch=32,model=lowrank"), result)
    expected = 32 * 10 / ((9 * 2 + 6) / 256)  # samples / timed seconds, per block and pooled alike
    assert thr.passed and thr.checks[0].value == pytest.approx(expected)
    thr90 = evaluate_gate(parse_gate("throughput>=4000@p90,batch=32,model=lowrank"), result)
    assert thr90.checks[0].value == pytest.approx(32 * 1000 / (2.4 * unit_ms))  # batch / p90 latency
    assert thr90.passed is (thr90.checks[0].value >= 4000)


def test_evaluate_on_the_json_dict_too(result):
    data = json.loads(json.dumps(result.to_dict()))
    a = evaluate_gate(parse_gate("speedup>=3@p90,batch=32"), data)
    b = evaluate_gate(parse_gate("speedup>=3@p90,batch=32"), result)
    assert a.to_dict() == b.to_dict()


def test_missing_or_non_finite_numbers_fail(result):
    data = json.loads(json.dumps(result.to_dict()))
    data["batches"]["1"]["speedup_at"]["p90"]["lowrank"] = None  # inf/nan serialise as null
    res = evaluate_gate(parse_gate("speedup>=1@p90,batch=1,model=lowrank"), data)
    assert not res.passed and "n/a" in res.reason
    with pytest.raises(UserError):  # a gate naming an unmeasured batch is still the user's error here
        evaluate_gate(parse_gate("speedup>=1@batch=7"), data)


def test_a_nan_statistic_is_a_named_miss_for_every_comparator(result):
    data = result.to_dict()
    data["batches"]["1"]["stats"]["lowrank"]["median_ms"] = float("nan")
    data["batches"]["1"]["speedup_at"]["median"]["lowrank"] = float("inf")
    # NaN fails "<=" and ">=" alike only by accident of how a comparison is written; inf is no speed-up
    for text in ("latency<=1s@batch=1,model=lowrank", "latency>=0@batch=1,model=lowrank",
                 "speedup>=1@batch=1,model=lowrank", "speedup<=1e9@batch=1,model=lowrank"):
        res = evaluate_gate(parse_gate(text), data)
        assert not res.passed and "not a valid measurement" in res.reason, (text, res.reason)


def test_exit_codes(result):
    passing = evaluate_gates(parse_gates(["speedup>=1.5", "latency<=1s"]), result)
    assert gates_exit_code(passing) == 0 and gates_exit_code([]) == 0
    mixed = evaluate_gates(parse_gates(["speedup>=1.5", "speedup>=100@p99"]), result)
    assert [r.passed for r in mixed] == [True, False] and gates_exit_code(mixed) == 1
    assert mixed[1].to_dict()["checks"][0]["passed"] is False
