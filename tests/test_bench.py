"""The bench harness driven by a fake clock: exact statistics, interleaving order, paired speed-ups.

No assertion here depends on the real wall clock. Durations are dyadic fractions of a second so the fake
clock's sums are exact in floating point.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrdeploy.errors import UserError
from lrdeploy.serving.bench import (
    LatencyStats,
    benchmark,
    capture_environment,
    cpu_info,
    is_stable,
    window_spread,
)
from lrdeploy.serving.runtimes import IOInfo
from lrdeploy.serving.runtimes.ort_cpu import OrtCpuRuntime


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeRuntime:
    """Each call advances the fake clock by the next duration; every call is logged as (name, batch)."""

    def __init__(self, name: str, clock: FakeClock, durations: Sequence[float] | Callable[[int], float],
                 log: list[tuple[str, int]]) -> None:
        self.name, self.clock, self.durations, self.log = name, clock, durations, log
        self.calls = 0

    def inputs(self) -> list[IOInfo]:
        return [IOInfo("x", np.dtype(np.float32), ("batch", None))]

    def outputs(self) -> list[IOInfo]:
        return [IOInfo("y", np.dtype(np.float32), ("batch", None))]

    def run(self, feeds: dict) -> dict:
        x = feeds["x"]
        d = self.durations(self.calls) if callable(self.durations) else self.durations[self.calls]
        self.calls += 1
        self.clock.t += d
        self.log.append((self.name, len(x)))
        return {"y": x}

    def describe(self) -> dict:
        return {"backend": "fake", "device": "cpu", "providers": ["fake"], "threads": 1, "version": "0"}


def _const(seconds: float) -> Callable[[int], float]:
    return lambda i: seconds


QUICK = {"warmup_s": 0.0, "min_seconds": 0.0, "max_seconds": 1e9, "progress": False, "block_warmup_runs": 0}


def test_latency_stats_known_distribution():
    durations = [i / 1000 for i in np.random.default_rng(0).permutation(np.arange(1, 101))]  # 1..100 ms
    s = LatencyStats.from_durations(durations, batch_size=4)
    assert s.runs == 100
    assert s.median_ms == pytest.approx(50.5, abs=1e-9)
    assert s.p90_ms == pytest.approx(90.1, abs=1e-9)  # linear interpolation at rank 0.9·99 = 89.1
    assert s.p99_ms == pytest.approx(99.01, abs=1e-9)
    assert s.mean_ms == pytest.approx(50.5, abs=1e-9)
    assert (s.min_ms, s.max_ms) == pytest.approx((1.0, 100.0))
    assert s.total_s == pytest.approx(5.05)
    assert s.throughput == pytest.approx(4 * 100 / 5.05)
    with pytest.raises(ValueError):
        LatencyStats.from_durations([], 1)


def test_bench_stats_from_fake_clock_are_exact():
    clock, log = FakeClock(), []
    # one warm-up call (warmup_s=0 still calls once), then 1..64 units of 1/1024 s in shuffled order
    timed = [int(k) / 1024 for k in np.random.default_rng(3).permutation(np.arange(1, 65))]
    rt = FakeRuntime("a", clock, [5.0, *timed], log)
    res = benchmark({"a": rt}, (3,), batch_sizes=(8,), min_runs=64, rounds=1, clock=clock, **QUICK)
    s = res.stats("a", 8)
    units_ms = 1000 / 1024
    assert rt.calls == 65 and s.runs == 64  # the 5 s warm-up call is not counted
    assert s.median_ms == pytest.approx(32.5 * units_ms, rel=1e-12)
    assert s.p90_ms == pytest.approx((57 + 0.7) * units_ms, rel=1e-12)  # rank 0.9·63 = 56.7 → 57.7 units
    assert s.min_ms == pytest.approx(units_ms) and s.max_ms == pytest.approx(64 * units_ms)
    assert s.throughput == pytest.approx(8 * 64 / (64 * 65 / 2 / 1024))
    assert res.speedup("a", 8) == 1.0
    assert all(b == 8 for _, b in log)


def test_interleaving_order_reverses_on_alternate_rounds():
    clock, log = FakeClock(), []
    names = ["A", "B", "C"]
    rts = {n: FakeRuntime(n, clock, _const(1 / 64), log) for n in names}
    res = benchmark(rts, (2, 2), batch_sizes=(1, 4), min_runs=2, rounds=4, clock=clock, **QUICK)
    forward, backward = ["A", "B", "C"], ["C", "B", "A"]
    expected = [(b, r, n) for b in (1, 4) for r in range(4) for n in (forward if r % 2 == 0 else backward)]
    assert res.order == expected
    assert [blk.position for blk in res.blocks[:6]] == [0, 1, 2, 0, 1, 2]
    # the call log: per batch size, one warm-up call each, then blocks of two calls in the same order
    calls_b1 = [n for n, b in log if b == 1]
    assert calls_b1 == ["A", "B", "C"] + [n for r in range(4) for n in (forward if r % 2 == 0 else backward)
                                           for _ in range(2)]
    assert res.settings["rounds"] == 4 and res.reference == "A"


def test_speedup_exactly_two_when_candidate_is_twice_as_fast():
    clock, log = FakeClock(), []
    ref = FakeRuntime("dense", clock, _const(2 / 256), log)
    cand = FakeRuntime("lowrank", clock, _const(1 / 256), log)
    res = benchmark({"dense": ref, "lowrank": cand}, (1, 28, 28), batch_sizes=(1, 32), min_runs=5, rounds=2,
                    clock=clock, **QUICK)
    for batch in (1, 32):
        assert res.speedup("lowrank", batch) == pytest.approx(2.0, rel=1e-12)
        assert res.batches[batch].round_ratios["lowrank"] == pytest.approx([2.0, 2.0], rel=1e-12)
        assert res.speedup("dense", batch) == 1.0
        assert res.stats("lowrank", batch).median_ms == pytest.approx(1000 / 256)
    assert res.stats("lowrank", 32).throughput == pytest.approx(2 * res.stats("dense", 32).throughput)


def test_speedup_is_median_of_per_round_pairs():
    """A machine that slows down over time: pooled medians would mix drift in, per-round pairs do not."""
    clock, log = FakeClock(), []

    def drifting(base: float) -> Callable[[int], float]:
        return lambda i: base * (1 + int(clock.t))  # every elapsed whole second makes calls slower

    ref = FakeRuntime("ref", clock, drifting(1 / 64), log)
    cand = FakeRuntime("cand", clock, drifting(1 / 256), log)  # 4x faster at any moment
    res = benchmark({"ref": ref, "cand": cand}, (1,), batch_sizes=(1,), min_runs=8, rounds=3, clock=clock,
                    **QUICK)
    ratios = res.batches[1].round_ratios["cand"]
    assert len(ratios) == 3
    assert res.speedup("cand", 1) == pytest.approx(sorted(ratios)[1])


def test_one_disturbed_round_is_outvoted():
    """The default 3 rounds: a neighbour's burst during one reference block does not move the speed-up."""
    clock, log = FakeClock(), []
    # reference calls: 0 = warm-up, 1-5 round 0, 6-10 round 1 (disturbed: 50x slower), 11-15 round 2
    ref = FakeRuntime("ref", clock, lambda i: 100 / 256 if 6 <= i <= 10 else 2 / 256, log)
    cand = FakeRuntime("cand", clock, _const(1 / 256), log)
    res = benchmark({"ref": ref, "cand": cand}, (1,), batch_sizes=(1,), min_runs=5, clock=clock, **QUICK)
    assert res.settings["rounds"] == 3
    batch = res.batches[1]
    assert batch.round_ratios["cand"] == pytest.approx([2.0, 100.0, 2.0])
    assert batch.speedup["cand"] == pytest.approx(2.0)
    assert batch.ratio_spread["cand"] == pytest.approx(50.0)
    assert res.to_dict()["batches"]["1"]["ratio_spread"]["ref"] == 1.0


def test_blocks_need_min_runs_and_min_seconds():
    clock, log = FakeClock(), []
    rt = FakeRuntime("a", clock, _const(0.125), log)
    res = benchmark({"a": rt}, (1,), batch_sizes=(1,), warmup_s=1.0, min_runs=3, min_seconds=1.0,
                    max_seconds=10.0, rounds=1, progress=False, clock=clock, block_warmup_runs=2)
    assert res.blocks[0].stats.runs == 8  # 1.0 s / 0.125 s beats min_runs=3
    assert rt.calls == 8 + 2 + 8  # 1.0 s of warm-up, 2 untimed block warm-up calls, 8 timed


def test_max_seconds_caps_a_slow_block():
    clock, log = FakeClock(), []
    rt = FakeRuntime("slow", clock, _const(0.125), log)
    res = benchmark({"slow": rt}, (1,), batch_sizes=(1,), warmup_s=0.0, min_runs=100, min_seconds=0.25,
                    max_seconds=0.5, rounds=1, progress=False, clock=clock, block_warmup_runs=0)
    assert res.blocks[0].stats.runs == 4


@pytest.mark.parametrize("kwargs", [
    {"batch_sizes": ()}, {"batch_sizes": (0,)}, {"batch_sizes": (1.5,)}, {"min_runs": 0}, {"rounds": 0},
    {"min_seconds": 2.0, "max_seconds": 1.0}, {"warmup_s": -1.0},
])
def test_bad_settings_are_user_errors(kwargs):
    clock = FakeClock()
    rt = FakeRuntime("a", clock, _const(0.01), [])
    with pytest.raises(UserError):
        benchmark({"a": rt}, (1,), **{"progress": False, "clock": clock, **kwargs})
    with pytest.raises(UserError):
        benchmark({}, (1,), progress=False, clock=clock)


def test_result_to_dict_is_json_and_records_environment():
    clock, log = FakeClock(), []
    rts = {n: FakeRuntime(n, clock, _const(1 / 128), log) for n in ("x", "y")}
    res = benchmark(rts, (4,), batch_sizes=(2,), min_runs=3, rounds=2, clock=clock, **QUICK)
    d = json.loads(json.dumps(res.to_dict()))
    assert set(d["batches"]) == {"2"}
    assert d["batches"]["2"]["speedup"] == {"x": 1.0, "y": 1.0}
    assert len(d["blocks"]) == 4 and "durations_ms" not in d["blocks"][0]
    assert len(res.to_dict(samples=True)["blocks"][0]["durations_ms"]) == 3
    env = d["environment"]
    for key in ("cpu_model", "logical_cpus", "available_cpus", "versions", "python", "loadavg"):
        assert key in env
    assert env["threads"] == {"x": 1, "y": 1}
    assert env["runtimes"]["x"]["backend"] == "fake"
    assert "numpy" in env["versions"]


def test_cpu_info_parses_proc_cpuinfo(tmp_path):
    text = "".join(
        f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Test CPU @ 2.00GHz\n"
        f"physical id\t: 0\ncore id\t\t: {i // 2}\n"
        "flags\t\t: fpu sse avx2 fma avx512f avx512_vnni amx_tile\n\n"
        for i in range(4)
    )
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    info = cpu_info(path)
    assert info["model"] == "Intel(R) Xeon(R) Test CPU @ 2.00GHz"
    assert info["physical_cores"] == 2  # 4 logical CPUs, 2 cores (hyper-threading)
    assert info["flags"] == ["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile"]
    assert cpu_info(tmp_path / "missing")["model"]  # falls back to platform info, never empty


def test_capture_environment_without_runtimes():
    env = capture_environment()
    assert "runtimes" not in env and env["available_cpus"] >= 1


def test_real_ort_smoke(tmp_path):
    """The harness around real ORT sessions (structure only: no assertion on measured time)."""
    w = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    paths = []
    for name, k in (("dense", 1), ("other", 2)):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], ["y"])], name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
            initializer=[numpy_helper.from_array(k * w.T.copy(), "W")],
        )
        paths.append(tmp_path / f"{name}.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), paths[-1])
    rts = {"dense": OrtCpuRuntime(paths[0], threads=1), "other": OrtCpuRuntime(paths[1], threads=1)}
    res = benchmark(rts, (5,), batch_sizes=(1, 16), warmup_s=0.01, min_runs=5, min_seconds=0.01,
                    max_seconds=1.0, rounds=2, progress=True)
    assert res.order[0] == (1, 0, "dense") and res.order[2] == (1, 1, "other")
    for batch in (1, 16):
        assert res.stats("other", batch).runs >= 10  # two blocks of >= 5
        assert 0 < res.speedup("other", batch) < float("inf")
    assert res.environment["runtimes"]["dense"]["providers"] == ["CPUExecutionProvider"]
    assert res.environment["threads"] == {"dense": 1, "other": 1}


# ------------------------------------------------------------------------------------ stability windows
STABLE = {"stability_tol": 0.02, "stability_windows": 3}


@pytest.mark.parametrize("medians, expected", [
    ([1.0, 1.0, 1.0], True),
    ([1.00, 1.01, 0.995], True),  # spread 1.5 % of the median
    ([5.0, 1.00, 1.01, 1.00], True),  # a cold first window is outside the last three
    ([1.00, 1.02, 1.04], False),  # steady 2 %/window drift: 4 % spread
    ([1.000, 1.015, 1.030, 1.045, 1.060], False),  # creeping 1.5 %/window: 3 % over the last three
    ([1.00, 1.01, 1.02, 1.03], True),  # 1 %/window: 1.9 % over three, within 2 % (drift < tol/2 passes)
    ([1.0, 1.0], False),  # fewer windows than required
    ([1.0, 1.3, 1.0], False),
    ([0.0, 0.0, 0.0], False),
    ([1.0, float("nan"), 1.0], False),
])
def test_is_stable_rule(medians, expected):
    assert is_stable(medians, tol=0.02, windows=3) is expected


def test_is_stable_arguments_and_spread():
    assert is_stable([1.0, 1.0], tol=0.0, windows=2)
    assert window_spread([1.0, 1.1, 1.05]) == pytest.approx(0.1 / 1.05)
    with pytest.raises(ValueError):
        is_stable([1.0, 1.0], windows=1)
    with pytest.raises(ValueError):
        is_stable([1.0, 1.0, 1.0], tol=-0.1)


def test_harness_stops_early_when_windows_agree():
    clock, log = FakeClock(), []
    rts = {"ref": FakeRuntime("ref", clock, _const(2 / 256), log),
           "cand": FakeRuntime("cand", clock, _const(1 / 256), log)}
    res = benchmark(rts, (1,), batch_sizes=(1, 4), min_runs=4, rounds=3, time_limit_s=100.0, clock=clock,
                    **STABLE, **QUICK)
    for batch in (1, 4):
        b = res.batches[batch]
        assert (b.rounds, b.stop_reason, b.stable) == (3, "stable", True)
        assert b.stability["cand"].window_medians_ms == pytest.approx([1000 / 256] * 3)
        assert b.stability["ref"].spread == 0.0 and b.elapsed_s < 1.0
    assert clock.t < 1.0  # nowhere near the 2 × 100 s limit
    d = res.to_dict()["batches"]["1"]
    assert d["stable"] is True and d["stability"]["ref"]["window_medians_ms"] == pytest.approx([7.8125] * 3)
    assert res.settings["stability"]["tolerance"] == 0.02


def test_harness_runs_to_the_time_limit_on_a_drifting_machine():
    clock, log = FakeClock(), []

    def drifting(base: float) -> Callable[[int], float]:
        return lambda i: base * (1 + clock.t / 2)  # 50 % slower per elapsed second: never settles

    rts = {"ref": FakeRuntime("ref", clock, drifting(2 / 256), log),
           "cand": FakeRuntime("cand", clock, drifting(1 / 256), log)}
    res = benchmark(rts, (1,), batch_sizes=(1,), min_runs=8, rounds=3, time_limit_s=2.0, clock=clock,
                    **STABLE, **QUICK)
    b = res.batches[1]
    assert b.stop_reason == "time_limit" and not b.stable
    assert b.rounds > 3 and b.elapsed_s >= 2.0
    assert b.elapsed_s < 2.0 + 2 * 8 * 0.2  # stopped after the round that crossed the limit
    medians = b.stability["ref"].window_medians_ms
    assert len(medians) == b.rounds and medians == sorted(medians)  # the drift is visible in the report
    assert not b.stability["cand"].stable and b.stability["cand"].spread > 0.02
    # paired ratios stay near 2 despite the drift (each block pair sees almost the same machine)
    assert b.speedup["cand"] == pytest.approx(2.0, rel=0.15)


def test_max_rounds_caps_an_unstable_run():
    clock, log = FakeClock(), []
    noisy = [(1 + (i // 4) % 2) / 256 for i in range(10_000)]  # blocks alternate 1x / 2x
    rts = {"a": FakeRuntime("a", clock, noisy, log)}
    res = benchmark(rts, (1,), batch_sizes=(1,), min_runs=4, rounds=3, time_limit_s=1e9, max_rounds=7,
                    clock=clock, **STABLE, **QUICK)
    assert (res.batches[1].rounds, res.batches[1].stop_reason) == (7, "max_rounds")


def test_without_a_tolerance_the_round_count_is_fixed():
    clock, log = FakeClock(), []
    rts = {"a": FakeRuntime("a", clock, _const(1 / 256), log)}
    res = benchmark(rts, (1,), batch_sizes=(1,), min_runs=2, rounds=5, clock=clock, **QUICK)
    b = res.batches[1]
    assert (b.rounds, b.stop_reason, b.stable) == (5, "rounds", None)  # None: not checked
    assert b.stability["a"].tolerance is None and b.stability["a"].stable is None
    assert res.settings["stability"] is None and res.to_dict()["batches"]["1"]["stable"] is None


@pytest.mark.parametrize("kwargs", [
    {"stability_tol": -0.01}, {"stability_tol": float("nan")},
    {"stability_tol": 0.02, "stability_windows": 1},
    {"stability_tol": 0.02, "time_limit_s": None, "max_rounds": None},
    {"stability_tol": 0.02, "time_limit_s": 0.0}, {"stability_tol": 0.02, "max_rounds": 2},
])
def test_bad_stability_settings_are_user_errors(kwargs):
    clock = FakeClock()
    with pytest.raises(UserError):
        benchmark({"a": FakeRuntime("a", clock, _const(0.01), [])}, (1,), rounds=3, progress=False,
                  clock=clock, **kwargs)


def test_tail_speedups_are_paired_per_round():
    """p90 speed-up = median over rounds of (reference block p90 / candidate block p90), exactly."""
    clock, log = FakeClock(), []
    # every block has 10 calls: nine of 1 unit and one slow call; the reference's slow call is 11 units,
    # the candidate's 3 units, so block p90 = 1 + 0.1·(slow − 1) (numpy linear interpolation at rank 8.1)
    ref_block = [1 / 256] * 9 + [11 / 256]
    cand_block = [1 / 256] * 9 + [3 / 256]
    ref = FakeRuntime("ref", clock, [1 / 256] + ref_block * 3, log)  # first call: warm-up
    cand = FakeRuntime("cand", clock, [1 / 256] + cand_block * 3, log)
    res = benchmark({"ref": ref, "cand": cand}, (1,), batch_sizes=(1,), min_runs=10, rounds=3, clock=clock,
                    **QUICK)
    b = res.batches[1]
    assert b.speedup_at["p90"]["cand"] == pytest.approx(2.0 / 1.2)
    assert b.round_ratios_at["p90"]["cand"] == pytest.approx([2.0 / 1.2] * 3)
    p99_ref, p99_cand = 1 + 0.91 * 10, 1 + 0.91 * 2
    assert res.speedup("cand", 1, "p99") == pytest.approx(p99_ref / p99_cand)
    assert res.speedup("cand", 1) == 1.0 == b.speedup_at["median"]["cand"]
    assert res.to_dict()["batches"]["1"]["speedup_at"]["p90"]["ref"] == 1.0


def test_memory_is_recorded_per_runtime_and_batch():
    clock, log = FakeClock(), []
    rts = {n: FakeRuntime(n, clock, _const(1 / 256), log) for n in ("a", "b")}
    res = benchmark(rts, (1,), batch_sizes=(1, 2), min_runs=2, rounds=1, clock=clock, **QUICK)
    for batch in (1, 2):
        mem = res.batches[batch].memory
        assert set(mem) == {"a", "b"}
        assert mem["a"]["rss_method"] in ("VmHWM", "ru_maxrss") and mem["a"]["peak_rss_bytes"] > 0
        assert "warmup_rss_growth_bytes" in mem["a"] and "cuda_peak_allocated_bytes" not in mem["a"]
    off = benchmark(rts, (1,), batch_sizes=(1,), min_runs=2, rounds=1, clock=clock, memory=False, **QUICK)
    assert off.batches[1].memory == {} and off.settings["memory"] is None


def test_device_runtimes_get_their_input_staged_before_warm_up():
    clock, log = FakeClock(), []

    class Staged(FakeRuntime):
        def stage(self, feeds: dict) -> None:
            self.log.append((f"stage:{self.name}", len(feeds["x"])))

    rts = {"a": Staged("a", clock, _const(1 / 256), log), "b": FakeRuntime("b", clock, _const(1 / 256), log)}
    benchmark(rts, (1,), batch_sizes=(1, 2), min_runs=2, rounds=1, clock=clock, **QUICK)
    assert [e for e in log if e[0].startswith("stage")] == [("stage:a", 1), ("stage:a", 2)]
    assert log.index(("stage:a", 2)) < log.index(("a", 2))


def test_gpu_info(monkeypatch):
    import lrdeploy.serving.bench as bench_mod

    monkeypatch.setattr(bench_mod, "nvidia_driver_version", lambda: None)
    if "torch" not in sys.modules:
        assert bench_mod.gpu_info() is None
    monkeypatch.setattr(bench_mod, "nvidia_driver_version", lambda: "550.54.15")
    info = bench_mod.gpu_info()
    assert info is not None and info["driver"] == "550.54.15"
    import torch

    if not torch.cuda.is_available():
        assert info["cuda_available"] is False and info["devices"] == []
        monkeypatch.setattr(bench_mod, "nvidia_driver_version", lambda: None)
        assert bench_mod.gpu_info() is None  # torch imported, no driver, no CUDA: nothing to report
    else:  # pragma: no cover - GPU machines
        assert info["devices"] and info["devices"][0]["name"]
    assert "gpu" in capture_environment()


class _Pair(FakeRuntime):
    """Two named inputs (token ids + mask); records the very arrays it was handed."""

    def __init__(self, *args, names=("ids", "mask"), **kwargs):
        super().__init__(*args, **kwargs)
        self.names, self.seen = names, []

    def inputs(self) -> list[IOInfo]:
        return [IOInfo(n, np.dtype(np.int64), ("batch", "seq")) for n in self.names]

    def run(self, feeds: dict) -> dict:
        self.seen.append(feeds)
        return super().run({"x": feeds[self.names[0]]})


def test_feeds_builder_gives_each_batch_its_named_inputs_once_for_every_runtime():
    clock, log = FakeClock(), []
    built = []

    def feeds_for(batch):
        built.append(batch)
        ids = np.arange(batch * 3, dtype=np.int64).reshape(batch, 3)
        return {"ids": ids, "mask": np.ones_like(ids)}

    rts = {"a": _Pair("a", clock, _const(1 / 256), log), "b": _Pair("b", clock, _const(1 / 256), log)}
    res = benchmark(rts, feeds_for, batch_sizes=(1, 4), min_runs=2, rounds=3, clock=clock, **QUICK)
    assert built == [1, 4]  # built once per batch size, outside the timing
    for rt in rts.values():
        at4 = [f for f in rt.seen if len(f["ids"]) == 4]
        assert at4 and all(f["ids"] is at4[0]["ids"] for f in at4)  # the same arrays on every call
        assert set(at4[0]) == {"ids", "mask"}
    assert rts["a"].seen[-1]["ids"] is rts["b"].seen[-1]["ids"]  # both models time the same inputs
    assert res.settings["inputs"]["4"] == {"ids": {"shape": [4, 3], "dtype": "int64"},
                                           "mask": {"shape": [4, 3], "dtype": "int64"}}
    assert res.settings["input_shape"] is None  # several inputs: no single sample shape


def test_feeds_that_do_not_match_a_runtimes_inputs_are_refused_before_timing():
    clock, log = FakeClock(), []
    rts = {"a": _Pair("a", clock, _const(1 / 256), log),
           "b": _Pair("b", clock, _const(1 / 256), log, names=("input_ids", "attention_mask"))}
    with pytest.raises(UserError, match="b takes inputs input_ids, attention_mask; got ids, mask"):
        benchmark(rts, lambda b: {"ids": np.zeros((b, 2), np.int64), "mask": np.ones((b, 2), np.int64)},
                  batch_sizes=(1,), min_runs=2, rounds=1, clock=clock, **QUICK)
    assert log == []  # nothing ran


def test_synthetic_feeds_follow_the_input_metadata():
    from lrdeploy.serving.feeds import DEFAULT_LENGTH, synthetic_feeds

    inputs = [IOInfo("input_ids", np.dtype(np.int64), ("batch", "sequence")),
              IOInfo("attention_mask", np.dtype(np.int64), ("batch", "sequence")),
              IOInfo("pixels", np.dtype(np.float32), ("batch", 3, None))]
    feeds = synthetic_feeds(inputs, seed=1)(4)
    assert feeds["input_ids"].shape == feeds["attention_mask"].shape == (4, DEFAULT_LENGTH)
    ids = feeds["input_ids"]
    assert ids.dtype == np.int64 and 0 <= ids.min() <= ids.max() < 100 and len(np.unique(ids)) > 1
    assert (feeds["attention_mask"] == 1).all()  # a mask masks nothing out
    assert feeds["pixels"].shape == (4, 3, DEFAULT_LENGTH) and feeds["pixels"].dtype == np.float32
    again = synthetic_feeds(inputs, seed=1, sizes={"sequence": 7})(4)
    assert again["input_ids"].shape == (4, 7)
    np.testing.assert_array_equal(synthetic_feeds(inputs, seed=1)(4)["pixels"], feeds["pixels"])  # seeded
    with pytest.raises(UserError, match="takes 3 inputs"):
        synthetic_feeds(inputs, sample_shape=(3,))
    with pytest.raises(UserError, match="does not declare its shape"):
        synthetic_feeds([IOInfo("input", np.dtype(np.float32), None)])
    plain = [IOInfo("input", np.dtype(np.float32), None)]
    assert synthetic_feeds(plain, sample_shape=(2, 5))(3)["input"].shape == (3, 2, 5)
