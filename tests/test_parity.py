"""Parity statistics against hand-computed answers, the precision presets on a real model converted to fp16
(accepted) and corrupted (rejected), and batched runs through a real ORT session."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from lrdeploy.errors import UserError
from lrdeploy.serving.parity import (
    REL_FLOOR,
    TOLERANCES,
    Tolerance,
    accuracy,
    check_tolerance,
    get_tolerance,
    judge,
    output_parity,
    run_batched,
    tolerance_with,
    top1_agreement,
    topk_agreement,
)
from lrdeploy.serving.runtimes import IOInfo
from lrdeploy.serving.runtimes.ort_cpu import OrtCpuRuntime


def test_identical_outputs():
    a = np.array([[3.0, 4.0], [1.0, -2.0]], dtype=np.float32)
    p = output_parity(a, a.copy())
    assert p["max_abs"] == p["mean_abs"] == p["rel_l2"] == 0.0
    assert p["cosine"] == pytest.approx(1.0)
    assert p["top1_agreement"] == 1.0
    assert p["shape"] == [2, 2] and p["nonfinite"]["reference"] == p["nonfinite"]["candidate"] == 0


def test_known_offset():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = a + 0.1
    p = output_parity(a, b)
    assert p["max_abs"] == pytest.approx(0.1)
    assert p["mean_abs"] == pytest.approx(0.1)
    assert p["rel_l2"] == pytest.approx(0.2 / math.sqrt(30))  # ||0.1·1_4|| = 0.2, ||a|| = √30
    assert p["cosine"] == pytest.approx(np.dot(a.ravel(), b.ravel()) / (math.sqrt(30) * np.linalg.norm(b)))
    assert p["top1_agreement"] == 1.0


def test_orthogonal_and_opposite():
    p = output_parity(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert p["rel_l2"] == pytest.approx(math.sqrt(2))
    assert p["cosine"] == pytest.approx(0.0)
    assert p["max_abs"] == 1.0 and p["mean_abs"] == 1.0
    assert p["top1_agreement"] is None  # 1-D output: not logits
    assert output_parity(np.array([1.0, 2.0]), np.array([-1.0, -2.0]))["cosine"] == pytest.approx(-1.0)


def test_zero_reference_is_safe():
    z = np.zeros((2, 3))
    both = output_parity(z, z)
    assert both["rel_l2"] == 0.0 and both["cosine"] == 1.0
    one = output_parity(z, np.ones((2, 3)))
    assert one["rel_l2"] == math.inf and one["cosine"] == 0.0 and one["max_abs"] == 1.0
    other = output_parity(np.ones((2, 3)), z)
    assert other["rel_l2"] == 1.0 and other["cosine"] == 0.0


def test_top1_agreement_counts_flips():
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    cand = np.array([[0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.1, 0.9]])  # row 1 flips
    assert top1_agreement(ref, cand) == 0.75
    assert output_parity(ref, cand)["top1_agreement"] == 0.75


def test_nonfinite_counted():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    cand = ref.copy()
    cand[0, 1] = np.inf
    cand[1, 0] = np.nan
    p = output_parity(ref, cand)
    assert p["nonfinite"] == {"reference": 0, "candidate": 2, "reference_nan": 0, "reference_inf": 0,
                              "candidate_nan": 1, "candidate_inf": 1}
    assert check_tolerance(p, "fp32")[0] == "outputs contain 1 NaN / 1 Inf values (fp32)"


def test_shape_mismatch_and_empty_are_user_errors():
    with pytest.raises(UserError, match="shapes differ"):
        output_parity(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(UserError):
        output_parity(np.zeros((0, 3)), np.zeros((0, 3)))


def test_accuracy():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    assert accuracy(logits, np.array([0, 1, 2, 2])) == 0.75
    assert accuracy(logits, [0, 1, 2, 0]) == 1.0
    with pytest.raises(UserError):
        accuracy(logits, np.array([0, 1]))
    with pytest.raises(UserError):
        accuracy(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))


def test_check_tolerance_presets():
    good = {"rel_l2": 3e-7, "cosine": 1.0, "top1_agreement": 1.0, "nonfinite": {"candidate": 0}}
    assert check_tolerance(good, "fp32") == []
    fp16ish = {"rel_l2": 5e-4, "cosine": 0.99999, "top1_agreement": 1.0}
    assert check_tolerance(fp16ish, "fp16") == []
    failures = check_tolerance(fp16ish, "fp32")
    assert len(failures) == 1 and "rel_l2" in failures[0]
    assert set(TOLERANCES) == {"fp32", "fp16", "bf16", "int8"}
    with pytest.raises(UserError):
        check_tolerance(good, "fp8")


class _Recorder:
    """A plain runtime (doubles its input) that records the batch sizes it was given."""

    def inputs(self) -> list:
        return [IOInfo("x", np.dtype(np.float32), None), IOInfo("n", np.dtype(np.int64), None)]

    name = "recorder"

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def run(self, feeds: dict) -> dict:
        x = feeds["x"]
        self.sizes.append(len(x))
        return {"y": 2 * x, "n": feeds["n"] + 1}

    def describe(self) -> dict:
        return {"backend": "numpy"}


def test_run_batched_splits_and_stacks_in_order():
    x = np.arange(23 * 2, dtype=np.float32).reshape(23, 2)
    n = np.arange(23)
    rt = _Recorder()
    out = run_batched(rt, {"x": x, "n": n}, 10)
    assert rt.sizes == [10, 10, 3]
    np.testing.assert_array_equal(out["y"], 2 * x)  # every named output, batches concatenated in order
    np.testing.assert_array_equal(out["n"], n + 1)
    with pytest.raises(UserError):
        run_batched(rt, {"x": x, "n": n}, 0)
    with pytest.raises(UserError, match="no samples"):
        run_batched(rt, {"x": x[:0], "n": n[:0]}, 4)
    with pytest.raises(UserError, match="different numbers of samples"):
        run_batched(rt, {"x": x, "n": n[:3]}, 4)
    with pytest.raises(UserError, match="named inputs"):
        run_batched(rt, x, 4)
    with pytest.raises(UserError, match="takes inputs x, n; got x"):
        run_batched(rt, {"x": x}, 4)


def test_run_batched_through_ort(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["p"], axis=-1)], "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 5])],
    )
    path = tmp_path / "softmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    rt = OrtCpuRuntime(path, threads=1)
    x = np.random.default_rng(1).standard_normal((37, 5)).astype(np.float32)
    y = run_batched(rt, {"x": x}, 8)["p"]
    e = np.exp(x - x.max(axis=1, keepdims=True))
    expected = e / e.sum(axis=1, keepdims=True)
    p = output_parity(expected, y)
    assert y.shape == (37, 5)
    assert p["rel_l2"] < 1e-6 and p["top1_agreement"] == 1.0
    assert accuracy(y, x.argmax(axis=1)) == 1.0


# --- the statistics beyond max/mean -------------------------------------------------------------------------


def test_median_and_p99_on_known_arrays():
    ref = np.arange(1.0, 101.0)  # 1 .. 100
    cand = ref + ref / 100.0  # |Δ_i| = i / 100
    p = output_parity(ref, cand)
    assert p["max_abs"] == pytest.approx(1.0)
    assert p["mean_abs"] == pytest.approx(0.505)
    assert p["median_abs"] == pytest.approx(0.505)
    assert p["p99_abs"] == pytest.approx(np.percentile(ref / 100.0, 99))  # numpy's linear interpolation
    assert p["p99_abs"] == pytest.approx(0.9901)
    floor = REL_FLOOR * math.sqrt(np.mean(ref**2))
    rel = (ref / 100.0) / (ref + floor)
    assert p["rel_floor"] == pytest.approx(floor)
    assert p["max_rel"] == pytest.approx(rel.max())
    assert p["median_rel"] == pytest.approx(np.median(rel))
    assert p["p99_rel"] == pytest.approx(np.percentile(rel, 99))
    assert p["max_rel"] < 0.01  # every entry is 1 % off, a little less with the floor


def test_relative_error_is_safe_near_zero():
    ref = np.array([0.0, 0.0, 10.0, -10.0])
    cand = np.array([1e-6, 0.0, 10.001, -10.0])
    with np.errstate(divide="ignore", invalid="ignore"):
        naive = np.abs(ref - cand) / np.abs(ref)
    assert np.isinf(naive[0])  # what a plain |Δ|/|ref| does at a zero
    p = output_parity(ref, cand)
    floor = REL_FLOOR * math.sqrt(50.0)  # RMS of the reference is √50
    expected = np.abs(ref - cand) / (np.abs(ref) + floor)
    assert math.isfinite(p["max_rel"])
    assert p["max_rel"] == pytest.approx(expected.max())
    assert p["median_rel"] == pytest.approx(np.median(expected))
    # all-zero reference: the floor falls back to REL_FLOOR itself, still finite
    z = output_parity(np.zeros(3), np.full(3, 1e-6))
    assert z["max_rel"] == pytest.approx(1e-6 / REL_FLOOR)


def test_topk_agreement():
    ref = np.array([[8, 7, 6, 5, 4, 3, 2, 1], [8, 7, 6, 5, 4, 3, 2, 1]], dtype=float)
    cand = ref.copy()
    cand[1, 4], cand[1, 7] = 0.0, 9.0  # row 1: class 4 leaves the top 5, class 7 enters as the new top-1
    assert topk_agreement(ref, cand, 5) == pytest.approx((1.0 + 4 / 5) / 2)
    assert topk_agreement(ref, cand, 1) == 0.5
    p = output_parity(ref, cand)
    assert p["top5_agreement"] == pytest.approx(0.9) and p["top1_agreement"] == 0.5
    # order inside the top 5 does not matter
    shuffled = ref.copy()
    shuffled[:, [0, 4]] = shuffled[:, [4, 0]]
    assert topk_agreement(ref, shuffled, 5) == 1.0
    # with exactly five classes the top-5 set is every class: no statistic, rather than a trivial 1.0
    assert topk_agreement(np.eye(5), np.eye(5)[::-1], 5) is None
    assert output_parity(np.eye(5), np.eye(5))["top5_agreement"] is None
    assert topk_agreement(np.eye(6), np.eye(6), 5) == 1.0
    # 3-D outputs (N × T × V, e.g. a decoder's logits): every position is a row
    a = np.random.default_rng(0).standard_normal((2, 3, 7))
    assert topk_agreement(a, a, 5) == 1.0 and topk_agreement(a, a, 1) == 1.0


def test_worst_sample_catches_one_broken_row():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1000, 10))
    cand = ref.copy()
    cand[-1] = 0.0  # e.g. the last, partial batch came back empty
    p = output_parity(ref, cand)
    assert p["rel_l2"] < 0.05  # a whole-output statistic barely notices
    assert p["max_row_rel"] == pytest.approx(1.0, rel=1e-2)
    assert p["median_row_rel"] == 0.0
    failures = check_tolerance(p, "fp16")
    assert any(f.startswith("max_row_rel") for f in failures), failures


# --- presets ------------------------------------------------------------------------------------------------


def test_presets_are_ordered_and_documented():
    order = ["fp32", "fp16", "bf16", "int8"]
    for tighter, looser in zip(order, order[1:], strict=False):
        t, lo = TOLERANCES[tighter], TOLERANCES[looser]
        assert t.rel_l2 < lo.rel_l2 and t.row_rel < lo.row_rel
        assert t.cosine > lo.cosine and t.top1_agreement > lo.top1_agreement
    for name, tol in TOLERANCES.items():
        assert tol.precision == name and len(tol.why) > 40
    assert get_tolerance("FP16") is TOLERANCES["fp16"]
    with pytest.raises(UserError, match="fp8"):
        get_tolerance("fp8")


def test_failures_name_the_statistic_and_preset():
    p = {"rel_l2": 2e-2, "cosine": 0.9, "max_row_rel": 0.5, "top1_agreement": 0.5, "top5_agreement": 0.5,
         "p99_rel": 10.0, "nonfinite": {"reference": 0, "candidate": 0}}
    failures = check_tolerance(p, "fp16")
    for stat in ("rel_l2", "cosine", "max_row_rel", "top1_agreement", "top5_agreement"):
        assert any(f.startswith(stat) and f.endswith("(fp16)") for f in failures), (stat, failures)
    assert not any("p99_rel" in f for f in failures)  # the elementwise gate is off in the presets
    strict = tolerance_with("fp16", rel_err=1.0, error_stat="p99", max_abs=None)
    assert any(f.startswith("p99_rel 10") for f in check_tolerance(p, strict))
    verdict = judge(p, "int8")
    assert verdict["precision"] == "int8" and verdict["passed"] is False
    assert verdict["tolerance"]["rel_l2"] == TOLERANCES["int8"].rel_l2
    with pytest.raises(UserError):
        Tolerance("x", 1, 1, 1, 1, 1, error_stat="p95")
    nan = dict(p, rel_l2=math.nan)
    assert any(f.startswith("rel_l2 is NaN") for f in check_tolerance(nan, "int8"))


@pytest.fixture(scope="module")
def lenet_variants(tmp_path_factory, data_dir):
    """fp32 LeNet-5 ONNX (trained 1 epoch on 2,000 MNIST images), its fp16 conversion, two corrupted ones,
    and the outputs of each on 500 real test images (ORT CPU)."""
    from lrdeploy.data import load_dataset

    from .parity_models import to_fp16, train_lenet_onnx

    root = tmp_path_factory.mktemp("lenet-fp16")
    fp32 = train_lenet_onnx(root, data_dir)
    paths = {
        "fp32": fp32,
        "fp16": to_fp16(fp32, root / "fp16.onnx"),
        "fp16-flip": to_fp16(fp32, root / "fp16-flip.onnx", fault="flip-filter"),
        "fp16-scale": to_fp16(fp32, root / "fp16-scale.onnx", fault="scale"),
    }
    x = load_dataset("mnist", "test", data_dir=data_dir, limit=500).x.numpy()
    return {name: run_batched(OrtCpuRuntime(p, threads=1), {"input": x}, 128)["output"]
            for name, p in paths.items()}


def test_fp16_preset_accepts_a_correct_fp16_model(lenet_variants):
    p = output_parity(lenet_variants["fp32"], lenet_variants["fp16"])
    assert 0 < p["rel_l2"] < 1e-3  # fp16 rounding is visible, and small
    assert check_tolerance(p, "fp16") == []
    assert check_tolerance(p, "bf16") == [] and check_tolerance(p, "int8") == []
    fp32_failures = check_tolerance(p, "fp32")  # the presets differ meaningfully
    assert any(f.startswith("rel_l2") for f in fp32_failures), fp32_failures


@pytest.mark.parametrize("fault", ["fp16-flip", "fp16-scale"])
def test_fp16_preset_rejects_a_corrupted_weight(lenet_variants, fault):
    p = output_parity(lenet_variants["fp32"], lenet_variants[fault])
    failures = check_tolerance(p, "fp16")
    assert any(f.startswith("rel_l2") for f in failures), failures
    assert p["rel_l2"] > 2 * TOLERANCES["fp16"].rel_l2


# --- where the statistics live (DESIGN.md: exporters never import serving) ---------------------------------

EXPORTERS = Path(__file__).resolve().parents[1] / "exporters"


def _is_serving(module: str) -> bool:
    return module == "lrdeploy.serving" or module.startswith("lrdeploy.serving.")


def serving_imports(source: str, package: str = "lrdeploy.exporters") -> set[str]:
    """Modules under ``lrdeploy.serving`` that ``source`` imports anywhere (module level or in functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if _is_serving(a.name)}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[:len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if _is_serving(module):
                found.add(module)
            else:  # `from lrdeploy import serving`
                found |= {f"{module}.{a.name}" for a in node.names if _is_serving(f"{module}.{a.name}")}
    return found


def test_serving_imports_sees_every_form():
    code = ("import numpy\nfrom lrdeploy import serving\nfrom . import onnx\n"
            "def f():\n    from lrdeploy.serving.parity import judge\n    import lrdeploy.serving.bench\n"
            "    from ..serving.runtimes import base\n")
    assert serving_imports(code) == {"lrdeploy.serving", "lrdeploy.serving.parity", "lrdeploy.serving.bench",
                                     "lrdeploy.serving.runtimes"}
    assert serving_imports("from lrdeploy.parity_stats import judge\nfrom .lint import Finding\n") == set()


def test_exporters_never_import_serving():
    found = {(path.name, module) for path in sorted(EXPORTERS.glob("*.py"))
             for module in serving_imports(path.read_text())}
    assert not found, sorted(found)  # no exceptions: shared host helpers live in lrdeploy.host


def test_importing_every_exporter_loads_no_serving_module():
    """The AST check sees direct imports; this one also catches a serving import through an engine module."""
    names = ["lrdeploy.exporters"] + [f"lrdeploy.exporters.{p.stem}" for p in sorted(EXPORTERS.glob("*.py"))
                                      if p.stem != "__init__"]
    assert _loaded_in_fresh_process(names, ("lrdeploy.serving",)) == []


def _loaded_in_fresh_process(imports: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """Modules starting with one of ``prefixes`` that importing ``imports`` loads in a fresh interpreter."""
    code = ("import importlib, sys\n"
            f"for name in {imports!r}:\n"
            "    importlib.import_module(name)\n"
            f"print('\\n'.join(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_host_helpers_are_engine_level_and_serving_reexports_them():
    """Serving and the fold cost model must pin threads, read the CPU and build ORT sessions identically."""
    import lrdeploy.exporters.fold as fold
    import lrdeploy.exporters.fold_cost as fold_cost
    import lrdeploy.host as host
    import lrdeploy.serving.bench as bench
    import lrdeploy.serving.runtimes as runtimes
    import lrdeploy.serving.runtimes.base as base
    import lrdeploy.serving.runtimes.ort_session as ort_session

    assert base.resolve_threads is runtimes.resolve_threads is fold.resolve_threads is host.resolve_threads
    assert base.available_cpus is runtimes.available_cpus is host.available_cpus
    assert bench.cpu_info is fold_cost.cpu_info is host.cpu_info
    assert ort_session.session_options is fold_cost.session_options is host.session_options
    heavy = ("lrdeploy.serving", "torch", "onnxruntime", "numpy")
    assert _loaded_in_fresh_process(["lrdeploy.host"], heavy) == []


def test_parity_stats_is_engine_level_and_serving_reexports_it():
    import lrdeploy.parity_stats as stats
    import lrdeploy.serving.parity as serving_parity

    for name in ("Tolerance", "TOLERANCES", "get_tolerance", "tolerance_with", "output_parity", "judge",
                 "check_tolerance", "accuracy", "top1_agreement", "topk_agreement", "REL_FLOOR"):
        assert getattr(serving_parity, name) is getattr(stats, name), name
    assert "parity" in stats.__doc__ and "cosine" in stats.__doc__  # the statistics are documented there
    code = ("import sys\n"
            "import lrdeploy.parity_stats, lrdeploy.exporters.precision, lrdeploy.exporters.tensorrt\n"
            "bad = sorted(m for m in sys.modules if m.startswith('lrdeploy.serving'))\n"
            "assert not bad, bad\n"
            "assert 'torch' not in sys.modules and 'tensorrt' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- non-finite outputs never pass (issue 9) ----------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 6), classes=st.integers(2, 12), seed=st.integers(0, 2**16),
       nan=st.integers(0, 5), inf=st.integers(0, 5), preset=st.sampled_from(sorted(TOLERANCES)))
def test_any_nan_or_inf_in_the_candidate_fails_every_preset_by_name(rows, classes, seed, nan, inf, preset):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((rows, classes))
    assert judge(output_parity(ref, ref.copy()), preset)["passed"]  # the same output passes: NaN decides
    nan, inf = min(nan, ref.size), min(inf, ref.size - min(nan, ref.size))
    if nan + inf == 0:
        nan = 1
    cand = ref.copy().ravel()
    spots = rng.permutation(ref.size)
    cand[spots[:nan]] = np.nan
    cand[spots[nan:nan + inf]] = rng.choice([np.inf, -np.inf], size=inf)
    verdict = judge(output_parity(ref, cand.reshape(ref.shape)), preset)
    parts = [f"{n} {name}" for n, name in ((nan, "NaN"), (inf, "Inf")) if n]
    expected = f"outputs contain {' / '.join(parts)} value{'' if nan + inf == 1 else 's'} ({preset})"
    assert verdict["passed"] is False and verdict["failures"][0] == expected
    assert verdict["nonfinite"]["candidate_nan"] == nan and verdict["nonfinite"]["candidate_inf"] == inf


def test_nothing_finite_to_compare_is_nan_not_a_perfect_score():
    ref = np.random.default_rng(0).standard_normal((4, 10))
    p = output_parity(ref, np.full_like(ref, np.nan))
    # two empty vectors would give rel-L2 0 and cosine 1; arg-max over NaN rows would "agree" on class 0
    assert math.isnan(p["rel_l2"]) and math.isnan(p["cosine"])
    assert p["top1_agreement"] == 0.0 and p["top5_agreement"] == 0.0
    failures = check_tolerance(p, "int8")
    assert failures[0] == "outputs contain 40 NaN values (int8)"
    assert "rel_l2 is NaN (nothing finite to compare) (int8)" in failures
    logits = np.array([[np.nan, 0.0], [0.0, 1.0]])
    assert accuracy(logits, np.array([0, 1])) == 0.5  # the NaN row is wrong even though arg-max says 0


def test_nan_in_the_reference_is_named():
    ref = np.array([[1.0, np.nan], [np.inf, 2.0]])
    failures = check_tolerance(output_parity(ref, np.ones((2, 2))), "fp16")
    expected = "reference outputs contain 1 NaN / 1 Inf values: it cannot vouch for the candidate (fp16)"
    assert expected in failures


def test_export_rel_l2_is_inf_for_nonfinite_so_the_worst_case_is_order_free():
    from lrdeploy.exporters.onnx import rel_l2
    from lrdeploy.exporters.optimize import worst_rel_l2

    ok = np.ones((2, 3))
    bad = ok.copy()
    bad[0, 0] = np.nan
    assert rel_l2(bad, ok) == rel_l2(ok, bad) == math.inf
    assert rel_l2(np.full((2, 3), np.nan), np.full((2, 3), np.nan)) == math.inf  # was 0.0: "all NaN" passed
    # max() keeps the first of (x, nan) and drops a later NaN: with inf the answer no longer depends on order
    assert worst_rel_l2([ok, ok], [ok, bad]) == worst_rel_l2([ok, ok], [bad, ok]) == math.inf


def test_export_parity_names_nan_in_onnx_runtime_output():
    import torch

    from lrdeploy.exporters.onnx import _parity, ort_session

    graph = helper.make_graph(  # Log of negative inputs: NaN where PyTorch's Identity is finite
        [helper.make_node("Log", ["input"], ["output"])], "log",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )
    session = ort_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                          .SerializeToString())
    x = -torch.ones(3, 4)
    x[0, 0] = 1.0
    with pytest.raises(UserError, match=r"ONNX Runtime outputs contain 11 NaN values .* are finite"):
        _parity(session, torch.nn.Identity(), [x])


def test_export_of_a_nan_model_fails_and_writes_nothing(tmp_path):
    import torch

    from lrdeploy.exporters.onnx import export_onnx

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    out = tmp_path / "nan.onnx"
    with pytest.raises(UserError, match=r"PyTorch outputs contain 3 NaN values"):
        export_onnx(model, out, input_shape=(4,), optimize=False)
    assert list(tmp_path.iterdir()) == []


def test_compare_budget_names_nonfinite_candidate_and_refuses_a_nan_reference():
    from lrdeploy.comparison import check_reference_finite, evaluate_budget
    from lrdeploy.tasks import BudgetSettings, get_task

    task = get_task("classification")
    ref = np.random.default_rng(0).standard_normal((8, 10))
    cand = ref.copy()
    cand[:2] = np.nan
    parity = output_parity(ref, cand)
    same = {"accuracy": 0.9}  # arg-max over NaN scores still picks a class
    budget = evaluate_budget(task, same, same, parity, BudgetSettings(max_drop=1.0))
    assert not budget["passed"] and budget["failures"] == ["candidate outputs contain 20 NaN values"]
    nan_acc = evaluate_budget(task, same, {"accuracy": math.nan}, output_parity(ref, ref), BudgetSettings())
    assert nan_acc["failures"] == ["accuracy drop (points) is NaN (not measurable; limit 1)"]
    assert evaluate_budget(task, same, same, output_parity(ref, ref), BudgetSettings())["passed"]
    with pytest.raises(UserError, match="reference .* outputs contain 20 NaN values"):
        check_reference_finite(output_parity(cand, ref))
