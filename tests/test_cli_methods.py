"""Low-rank training methods through the CLI: their bundles export and compare with no special cases."""

from __future__ import annotations

import json

import pytest

from lrdeploy.bundle import read_manifest
from lrdeploy.exporters.onnx import read_onnx_metadata

from .test_cli import invoke

COMMON = ("--model", "lenet5", "--data", "mnist", "--limit-train", "2000", "--limit-test", "500",
          "--batch-size", "32", "--lr", "0.02")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("methods")
    runs = {
        "cuttlefish": ("--epochs", "3", "--method-opt", "window=1", "--method-opt", "fixed_k=0"),
        "maestro": ("--epochs", "2", "--method-opt", "threshold=0.0001", "--method-opt", "lambda_gl=0.001",
                "--method-opt", "full_pass=true"),  # 126 steps: the self-distilled full pass learns faster
    }
    for method, extra in runs.items():
        args = (*COMMON, "--data-dir", data_dir, "--method", method, *extra, "--out", root / method)
        r = invoke("train", *args)
        assert r.exit_code == 0, r.output
    return root


def test_cuttlefish_manifest_records_switch_and_ranks(trained):
    manifest = read_manifest(trained / "cuttlefish")
    method = manifest["method"]
    assert method["name"] == "cuttlefish"
    assert method["log"]["switch_epoch"] is not None
    assert manifest["structure"], "the switch must have factorised at least one layer"
    for name, entry in manifest["structure"].items():
        assert 1 <= entry["rank"] <= entry["full_rank"], name
    assert manifest["metrics"]["test_accuracy"] > 0.5


def test_maestro_manifest_records_ranks(trained):
    manifest = read_manifest(trained / "maestro")
    assert manifest["method"]["name"] == "maestro"
    final = manifest["method"]["final_ranks"]
    assert final and {k: v["rank"] for k, v in manifest["structure"].items()} == final
    assert manifest["metrics"]["test_accuracy"] > 0.5


@pytest.mark.parametrize("method", ["cuttlefish", "maestro"])
def test_method_bundles_export_and_compare(trained, data_dir, method, tmp_path):
    onnx_path = tmp_path / f"{method}.onnx"
    assert invoke("export", trained / method, "--out", onnx_path).exit_code == 0
    r = invoke("compare", trained / "cuttlefish" if method == "maestro" else trained / "maestro", onnx_path,
               "--data-dir", data_dir, "--limit-test", "300", "--batch", "1", "--seconds", "0.05",
               "--max-accuracy-drop", "100", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["candidate"]["method"] == method
    assert report["accuracy"]["candidate"] > 0.5


def test_maestro_export_at_rank_budget(trained, data_dir, tmp_path):
    full, half = tmp_path / "full.onnx", tmp_path / "half.onnx"
    assert invoke("export", trained / "maestro", "--out", full).exit_code == 0
    r = invoke("export", trained / "maestro", "--out", half, "--rank-budget", "0.5", "--data-dir", data_dir)
    assert r.exit_code == 0, r.output
    m_full, m_half = read_onnx_metadata(full), read_onnx_metadata(half)
    assert m_half["method"]["export_rank_budget"] == 0.5
    assert m_half["params"] < m_full["params"]
    for name, entry in m_half["structure"].items():
        assert entry["rank"] <= m_full["structure"][name]["rank"]


def test_rank_budget_needs_a_maestro_bundle(trained, tmp_path):
    from .test_cli import assert_user_error, lrdeploy_subprocess

    out = tmp_path / "x.onnx"
    proc = lrdeploy_subprocess("export", trained / "cuttlefish", "--out", out, "--rank-budget", "0.5")
    assert_user_error(proc, "maestro")
    assert not (tmp_path / "x.onnx").exists()
