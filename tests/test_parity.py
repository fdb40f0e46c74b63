"""Parity statistics against hand-computed answers, and batched runs through a real ORT session."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lrdeploy.errors import UserError
from lrdeploy.serving.parity import (
    TOLERANCES,
    accuracy,
    check_tolerance,
    output_parity,
    run_batched,
    top1_agreement,
)
from lrdeploy.serving.runtimes.ort_cpu import OrtCpuRuntime


def test_identical_outputs():
    a = np.array([[3.0, 4.0], [1.0, -2.0]], dtype=np.float32)
    p = output_parity(a, a.copy())
    assert p["max_abs"] == p["mean_abs"] == p["rel_l2"] == 0.0
    assert p["cosine"] == pytest.approx(1.0)
    assert p["top1_agreement"] == 1.0
    assert p["shape"] == [2, 2] and p["nonfinite"] == {"reference": 0, "candidate": 0}


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
    assert p["nonfinite"] == {"reference": 0, "candidate": 2}
    assert check_tolerance(p, "fp32")  # fails


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

    name = "recorder"

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def run(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        return 2 * x

    def describe(self) -> dict:
        return {"backend": "numpy"}


def test_run_batched_splits_and_stacks_in_order():
    x = np.arange(23 * 2, dtype=np.float32).reshape(23, 2)
    rt = _Recorder()
    y = run_batched(rt, x, 10)
    assert rt.sizes == [10, 10, 3]
    np.testing.assert_array_equal(y, 2 * x)
    with pytest.raises(UserError):
        run_batched(rt, x, 0)
    with pytest.raises(UserError):
        run_batched(rt, x[:0], 4)


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
    y = run_batched(rt, x, 8)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    expected = e / e.sum(axis=1, keepdims=True)
    p = output_parity(expected, y)
    assert y.shape == (37, 5)
    assert p["rel_l2"] < 1e-6 and p["top1_agreement"] == 1.0
    assert accuracy(y, x.argmax(axis=1)) == 1.0
