"""Data loss: every command that writes refuses to replace an input, or anything existing without --force.

Each case runs the real CLI in a subprocess and checks exit 2, one stderr line, no traceback, and that every
byte on disk before the command is still there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .conftest import Snapshot, assert_refused, lrdeploy

FAST_COMPARE = ("--limit-test", "64", "--seconds", "0.05", "--batch", "1")


@pytest.fixture()
def work(tmp_path, lenet_bundle, lenet_onnx) -> Path:
    """A scratch directory with a bundle ``b``, its export ``m.onnx`` (+ fold report) and a second copy."""
    shutil.copytree(lenet_bundle, tmp_path / "b")
    for src in lenet_onnx.parent.iterdir():
        shutil.copy(src, tmp_path / src.name.replace(lenet_onnx.stem, "m"))
    shutil.copy(tmp_path / "m.onnx", tmp_path / "other.onnx")
    return tmp_path


@pytest.mark.parametrize("args, needle", [
    (("compare", "b", "m.onnx", "--json", "m.onnx"), "is also an input"),
    (("compare", "b", "m.onnx", "--json", "b/manifest.json"), "inside"),
    (("compare", "b", "m.onnx", "--out", "b"), "is also an input"),
    (("compare", "m.onnx", "other.onnx", "--out", "b", "--force"), "is a bundle"),
    (("check", "m.onnx", "--golden", "g", "--json", "m.onnx"), "is also an input"),
    (("bench", "m.onnx", "other.onnx", "--json", "other.onnx"), "is also an input"),
    (("compress", "b", "--rank-ratio", "0.5", "--out", "b"), "is also an input"),
    (("export", "b", "--out", "m.onnx"), "--force"),
    (("export", "b", "--out", "b/model.onnx", "--force"), "inside"),
    (("init", "--model", "lenet5", "--out", "b"), "--force"),
    (("compare", "b", "m.onnx", "--json", "r/report.json", "--out", "r"), "collides"),
])
def test_refused_and_untouched(work, args, needle):
    snap = Snapshot([work])
    assert_refused(lrdeploy(*args, cwd=work), needle)
    snap.assert_unchanged()


def test_existing_report_files_need_force(work):
    (work / "runs").mkdir()
    (work / "runs" / "report.md").write_text("my notes")
    (work / "runs" / "keep.txt").write_text("mine")
    snap = Snapshot([work])
    assert_refused(lrdeploy("compare", "b", "m.onnx", "--out", "runs", *FAST_COMPARE, cwd=work), "--force")
    snap.assert_unchanged()
    proc = lrdeploy("compare", "b", "m.onnx", "--out", "runs", "--force", *FAST_COMPARE, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "runs" / "keep.txt").read_text() == "mine"  # only the report's own files are replaced
    assert (work / "runs" / "report.md").read_text() != "my notes"
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["keep.txt", "plot.png", "report.json",
                                                                  "report.md"]


def test_failed_export_leaves_the_old_family(work):
    """--force, then a failure half-way (int8 of a bundle with no dataset): the old family is intact."""
    (work / "m.ort.onnx").write_bytes(b"an older optimised copy")
    snap = Snapshot([work])
    proc = lrdeploy("export", "b", "--out", "m.onnx", "--force", "--fold", "factored", "--precision", "int8",
                    cwd=work)
    assert_refused(proc, "--calib-data")
    snap.assert_unchanged()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_force_replaces_a_bundle_but_never_a_foreign_directory(work):
    (work / "mine").mkdir()
    (work / "mine" / "thesis.tex").write_text("years of work")
    snap = Snapshot([work])
    assert_refused(lrdeploy("init", "--model", "lenet5", "--out", "mine", "--force", cwd=work),
                   "not an lrdeploy bundle")
    snap.assert_unchanged()
    before = (work / "b" / "weights.safetensors").read_bytes()
    proc = lrdeploy("init", "--model", "lenet5", "--out", "b", "--force", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "b" / "weights.safetensors").read_bytes() != before  # re-initialised weights


@pytest.mark.parametrize("args", [
    ("demo", "--out", "{file}/demo"),
    ("train", "--out", "/proc/lrdeploy-cannot-write", "--limit-train", "64"),
    ("export", "b", "--out", "/proc/lrdeploy-cannot-write.onnx"),
    ("compare", "b", "m.onnx", "--out", "/proc/lrdeploy-cannot-write"),
])
def test_unwritable_destination_refused_before_any_work(work, args):
    (work / "afile").write_text("x")
    args = [a.replace("{file}", str(work / "afile")) for a in args]
    snap = Snapshot([work])
    proc = lrdeploy(*args, cwd=work, timeout=60)  # refused at once, not after training
    assert_refused(proc)
    assert "--out" in proc.stderr
    snap.assert_unchanged()
