"""The CLI end to end on a small real MNIST subset, and every bad input the user can hand it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lrdeploy.cli import app

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


def lrdeploy_subprocess(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "lrdeploy", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def tree_digest(path: Path) -> str:
    """A digest of every file under ``path`` (names and bytes), to prove nothing was touched."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, data_dir):
    """train → compress → export, through the CLI, on the first 2,000 MNIST training images."""
    root = tmp_path_factory.mktemp("cli")
    dense, lowrank = root / "dense", root / "lowrank"
    r = invoke(
        "train",
        "--model",
        "lenet5",
        "--data",
        "mnist",
        "--data-dir",
        data_dir,
        "--epochs",
        "1",
        "--limit-train",
        "2000",
        "--batch-size",
        "32",
        "--out",
        dense,
    )
    assert r.exit_code == 0, r.output
    r = invoke(
        "compress",
        dense,
        "--rank-ratio",
        "0.5",
        "--finetune-epochs",
        "1",
        "--limit-train",
        "2000",
        "--data-dir",
        data_dir,
        "--out",
        lowrank,
    )
    assert r.exit_code == 0, r.output
    for name in ("dense", "lowrank"):
        r = invoke("export", root / name, "--out", root / f"{name}.onnx")
        assert r.exit_code == 0, r.output
    return root


def test_train_compress_export_compare(pipeline, data_dir):
    report_path = pipeline / "report.json"
    r = invoke(
        "compare",
        pipeline / "dense.onnx",
        pipeline / "lowrank.onnx",
        "--data-dir",
        data_dir,
        "--limit-test",
        "1000",
        "--batch",
        "1,8",
        "--seconds",
        "0.05",
        "--max-accuracy-drop",
        "100",
        "--json",
        report_path,
    )
    assert r.exit_code == 0, r.output
    report = json.loads(report_path.read_text())
    assert report["schema"] == "lrdeploy.compare/1"
    task = report["task"]
    assert task["task"] == "classification" and task["samples"] == 1000 and task["dataset"] == "mnist"
    assert 0.5 < task["reference"]["accuracy"] <= 1.0  # chance is 0.10
    assert 0.5 < task["candidate"]["accuracy"] <= 1.0
    delta = task["candidate"]["accuracy"] - task["reference"]["accuracy"]
    assert task["headline"]["key"] == "accuracy" and task["headline"]["delta"] == pytest.approx(delta)
    assert report["accuracy"]["candidate"] == task["candidate"]["accuracy"]  # the alias older readers use
    assert report["candidate"]["params"] < report["reference"]["params"]
    assert report["ratios"]["params"] > 1.0
    assert report["ratios"]["flops"] and report["ratios"]["flops"] > 1.0
    assert 0.5 < report["parity"]["top1_agreement"] <= 1.0
    assert report["parity"]["max_abs"] > 0.0  # a compressed, fine-tuned model is not bit-identical
    for batch in ("1", "8"):
        entry = report["latency"][batch]
        assert entry["reference"]["median_ms"] > 0 and entry["candidate"]["median_ms"] > 0
        assert entry["speedup"] > 0
    assert report["budget"]["passed"] is True


def test_compare_bundles_directly_and_budget_fails(pipeline, data_dir, tmp_path):
    """Bundles compare like ONNX files; an impossible budget exits 1 and says which budget was missed."""
    r = invoke(
        "compare",
        pipeline / "dense",
        pipeline / "lowrank",
        "--data-dir",
        data_dir,
        "--limit-test",
        "300",
        "--batch",
        "1",
        "--seconds",
        "0.05",
        "--min-agreement",
        "1",  # above 1 is refused as meaningless; a fine-tuned low-rank model never agrees on all 300
        "--json",
        tmp_path / "r.json",
    )
    assert r.exit_code == 1, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["budget"]["passed"] is False and report["parity"]["top1_agreement"] < 1
    assert any("agreement" in f for f in report["budget"]["failures"])


def test_models_lists_lenet():
    r = invoke("models")
    assert r.exit_code == 0 and "lenet5" in r.output


# --- bad input: one line, exit 2, no traceback, nothing on disk touched ------------------------------------


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]


def test_missing_bundle(tmp_path):
    proc = lrdeploy_subprocess("export", tmp_path / "nope", "--out", tmp_path / "m.onnx")
    assert_user_error(proc, "nope")
    assert not (tmp_path / "m.onnx").exists()


def test_unreadable_manifest(pipeline, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    (bad / "weights.safetensors").write_bytes((pipeline / "dense" / "weights.safetensors").read_bytes())
    proc = lrdeploy_subprocess("export", bad, "--out", tmp_path / "m.onnx")
    assert_user_error(proc, "manifest")
    assert not (tmp_path / "m.onnx").exists()


def test_tampered_bundle_refused(pipeline, tmp_path):
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(pipeline / "dense", bad)
    weights = bad / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous artefact")
    proc = lrdeploy_subprocess("export", bad, "--out", target, "--force")  # even when replacing is allowed
    assert_user_error(proc, "checksum")
    assert target.read_bytes() == b"previous artefact"


def test_truncated_onnx(pipeline, tmp_path, data_dir):
    blob = (pipeline / "lowrank.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(blob[: len(blob) // 2])
    report = tmp_path / "report.json"
    proc = lrdeploy_subprocess(
        "compare", pipeline / "dense.onnx", cut, "--data-dir", data_dir, "--json", report
    )
    assert_user_error(proc, "cut.onnx")
    assert not report.exists()


def test_unknown_model(tmp_path):
    proc = lrdeploy_subprocess("train", "--model", "resnet9000", "--out", tmp_path / "b")
    assert_user_error(proc, "resnet9000", "lenet5")
    assert not (tmp_path / "b").exists()


def test_unknown_dataset(tmp_path):
    proc = lrdeploy_subprocess("train", "--data", "imagenet-22k", "--out", tmp_path / "b")
    assert_user_error(proc, "imagenet-22k", "mnist")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.2"])
def test_rank_ratio_out_of_range(pipeline, tmp_path, ratio):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    before = tree_digest(out)
    proc = lrdeploy_subprocess("compress", pipeline / "dense", "--rank-ratio", ratio, "--out", out)
    assert_user_error(proc, "rank")
    assert tree_digest(out) == before


def test_data_dir_without_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = lrdeploy_subprocess("train", "--data-dir", empty, "--out", tmp_path / "b")
    assert_user_error(proc, str(empty), "--data-dir")
    assert not (tmp_path / "b").exists()


def test_compress_refuses_to_overwrite_user_files(pipeline, tmp_path):
    """A valid compress aimed at a non-empty directory that is not a bundle leaves it alone."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("do not delete")
    before = tree_digest(out)
    proc = lrdeploy_subprocess("compress", pipeline / "dense", "--rank-ratio", "0.5", "--out", out)
    assert_user_error(proc, str(out))
    assert tree_digest(out) == before


def test_init_from_user_checkpoint(tmp_path):
    """The "load" path: a plain PyTorch state dict becomes a bundle with exactly those weights."""
    import torch

    from lrdeploy.bundle import load_bundle
    from lrdeploy.models import create_model

    torch.manual_seed(3)
    mine = create_model("lenet5")
    ckpt = tmp_path / "mine.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in mine.state_dict().items()}}, ckpt)
    r = invoke("init", "--model", "lenet5", "--from-checkpoint", ckpt, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    loaded = load_bundle(tmp_path / "b").model.state_dict()
    for key, value in mine.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_init_rejects_mismatched_checkpoint(tmp_path):
    import torch

    from lrdeploy.models import create_model

    state = create_model("lenet5").state_dict()
    state["fc3.weight"] = torch.zeros(7, 84)
    ckpt = tmp_path / "bad.pt"
    torch.save(state, ckpt)
    out = tmp_path / "b"
    proc = lrdeploy_subprocess("init", "--model", "lenet5", "--from-checkpoint", ckpt, "--out", out)
    assert_user_error(proc, "fc3.weight")
    assert not (tmp_path / "b").exists()
