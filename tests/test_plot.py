"""The report plot: one point per model and batch size, readable axes, a profile panel when there is one,
and a valid PNG on disk."""

from __future__ import annotations

import copy
import struct

import pytest

from lrdeploy.serving.plot import (
    LATENCY_AXES,
    PROFILE_AXES,
    plot_report,
    plot_summary,
    points_of,
    save_figure,
)
from lrdeploy.serving.report import merge_reports

from .test_report import FULL


def _axes(fig, label):
    found = [ax for ax in fig.axes if ax.get_label() == label]
    return found[0] if found else None


def _run(name: str, speedup: float, acc: float, batches=("1", "32")) -> dict:
    report = copy.deepcopy(FULL)
    report["reference"] = {"name": "dense", "source": "runs/dense.onnx"}
    report["candidate"] = {"name": name, "source": f"runs/{name}.onnx"}
    report["accuracy"]["candidate"] = acc
    report["latency"] = {b: dict(report["latency"][b], speedup=speedup) for b in batches}
    return report


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_one_report_two_models_two_batches(tmp_path):
    fig = plot_report(FULL)
    ax = _axes(fig, LATENCY_AXES)
    assert ax is not None and _axes(fig, PROFILE_AXES) is None
    # one scatter collection, holding one point, per model and batch size
    assert len(ax.collections) == 4
    assert sum(len(c.get_offsets()) for c in ax.collections) == 4
    assert len(fig.lrdeploy_points) == 4
    assert {(p.model, p.batch) for p in fig.lrdeploy_points} == {
        ("lenet5-dense", 1), ("lenet5-dense", 32), ("lenet5-svd", 1), ("lenet5-svd", 32)}
    assert "ms" in ax.get_xlabel() and "%" in ax.get_ylabel()
    assert ax.get_xscale() == "log"  # 0.1 ms .. 1.6 ms spans more than 10×
    assert "Latency vs accuracy" in ax.get_title() and "mnist" in ax.get_title()
    legend_text = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "lenet5-dense (reference)" in legend_text and "lenet5-svd" in legend_text
    assert "batch 1" in legend_text and "batch 32" in legend_text
    svd = [p for p in fig.lrdeploy_points if p.model == "lenet5-svd" and p.batch == 1][0]
    assert svd.score == pytest.approx(98.71) and svd.latency_ms == pytest.approx(0.1) and svd.speedup == 2.0
    path = save_figure(fig, tmp_path / "plot.png")
    width, height = _png_size(path)
    assert width > 600 and height > 400 and path.stat().st_size > 10_000


def test_merged_runs_and_profile_panel(tmp_path):
    a, b = _run("svd", 2.0, 0.98), _run("cuttlefish", 1.5, 0.99, batches=("1",))
    b["profile"] = {"dense": {"Conv": 0.08, "Gemm": 0.05}, "candidate": {"Conv": 0.05, "MatMul": 0.04},
                    "batch_size": 1}
    summary = merge_reports([a, b])
    points = points_of(summary)
    # dense at b1 and b32, svd at b1 and b32, cuttlefish at b1 only
    assert len(points) == 5
    fig = plot_summary(summary)
    ax = _axes(fig, LATENCY_AXES)
    assert len(ax.collections) == 5
    prof = _axes(fig, PROFILE_AXES)
    assert prof is not None
    assert [t.get_text() for t in prof.get_yticklabels()] == ["dense", "cuttlefish"]
    assert len(prof.containers) == 3  # Conv, Gemm, MatMul stacked
    assert "ms" in prof.get_xlabel()
    _png_size(save_figure(fig, tmp_path / "merged.png"))


def test_linear_axis_for_a_narrow_range_and_nothing_to_plot():
    narrow = _run("svd", 1.0, 0.98, batches=("1",))
    fig = plot_report(narrow)
    assert _axes(fig, LATENCY_AXES).get_xscale() == "linear"
    empty = plot_report({"schema": "lrdeploy.compare/1", "candidate": {"name": "x"}})
    ax = _axes(empty, LATENCY_AXES)
    assert len(ax.collections) == 0 and ax.texts  # says why, does not crash


def test_real_ort_profile_feeds_the_chart(tmp_path):
    """The per-operator panel from what `serving.profile.profile_onnx` really writes (µs totals over runs)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lrdeploy.serving.profile import profile_onnx
    from lrdeploy.serving.report import profile_totals

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], initializer=[w])
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    prof = profile_onnx(path, (16,), 4, threads=1, runs=5)
    totals = profile_totals({"dense": {"4": prof, "1": prof}, "candidate": {"available": False}})
    assert set(totals) == {"dense"}  # the unavailable one is skipped, not an error
    expected = {r["op_type"]: r["total_us"] / 5 / 1000 for r in prof["by_op_type"]}
    assert totals["dense"] == pytest.approx(expected)
    report = copy.deepcopy(FULL)
    report["profile"] = {"dense": {"4": prof}, "candidate": {"4": prof}}
    fig = plot_report(report)
    prof_ax = _axes(fig, PROFILE_AXES)
    assert prof_ax is not None and "batch 4" in prof_ax.get_title()
    assert [t.get_text() for t in prof_ax.get_yticklabels()] == ["lenet5-dense", "lenet5-svd"]
