"""Accepted-but-meaningless values, sizes with no limit, usage errors and misleading messages (issue 9),
through the real CLI: each is refused in ONE stderr line with exit 2 before any work — no traceback, nothing
written, the inputs' bytes unchanged. One case per class here; the variants run in-process in
tests/test_cli_checks.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Snapshot, assert_refused, lrdeploy

HUGE = "99999999999999999999"  # parses as a Python int, overflows numpy and torch


@pytest.fixture
def work(lenet_bundle, lenet_onnx, tmp_path) -> tuple[Path, Path, Snapshot]:
    """The session's bundle and ONNX file (never modified) and an empty working folder, snapshotted."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("a file where a folder is expected\n")
    return cwd, lenet_onnx, Snapshot([lenet_bundle, lenet_onnx, lenet_onnx.parent, cwd])


@pytest.mark.parametrize("case, needles", [
    # NaN/inf: a NaN budget is never missed
    (("compare", "{bundle}", "{onnx}", "--max-accuracy-drop", "nan"),
     ("--max-accuracy-drop", "nan is not a finite")),
    # a fraction out of [0, 1]
    (("compare", "{bundle}", "{onnx}", "--min-agreement", "2"),
     ("--min-agreement", "got 2", "less than or equal to 1")),
    # inf warm-up used to hang forever; a negative cap was silently raised to --seconds
    (("bench", "{onnx}", "--warmup", "inf"), ("--warmup inf", "not a finite number")),
    (("bench", "{onnx}", "--max-seconds", "-5"), ("--max-seconds -5", ">= 0")),
    # sizes: an input batch larger than memory (was a 29 GiB MemoryError at 10,000,000), a 65-bit integer,
    # a classifier whose weights alone exceed memory
    (("bench", "{onnx}", "--batch", "100000000000"),
     ("--batch", "input batch of 100000000000", "memory available")),
    (("bench", "{onnx}", "--batch", HUGE), ("--batch " + HUGE, "64 bits")),
    (("init", "--model", "lenet5", "--num-classes", "10000000000", "--out", "{cwd}/b"),
     ("--num-classes", "weights alone", "memory available")),
    # Click's usage error: one line instead of a six-line box, with where to read the help
    (("train", "--epochs", "0", "--out", "{cwd}/b"), ("--epochs", "got 0", "see `lrdeploy train --help`")),
    # misleading messages: a file is not "missing"; a model without classes is not "lacking an argument"
    (("train", "--data-dir", "{cwd}/notes.txt", "--out", "{cwd}/b"),
     ("--data-dir", "is a file, not a directory")),
    (("init", "--model", "transformer", "--num-classes", "3", "--out", "{cwd}/b"),
     ("--num-classes does not apply", "translation model")),
], ids=["nan-budget", "agreement-2", "warmup-inf", "max-seconds-neg", "batch-memory", "batch-65bit",
        "num-classes-memory", "usage-one-line", "data-dir-file", "transformer-num-classes"])
def test_refused_before_any_work(work, lenet_bundle, case, needles):
    cwd, onnx_path, before = work
    args = [a.format(bundle=lenet_bundle, onnx=onnx_path, cwd=cwd) for a in case]
    proc = lrdeploy(*args, cwd=cwd)
    assert_refused(proc, *needles)
    before.assert_unchanged()  # also: nothing new in cwd (no bundle "b", no report)


def test_trt_batch_order_is_checked_before_tensorrt_and_before_any_onnx(work, lenet_bundle):
    """--trt with min > max: the batch range is named (not "TensorRT is not installed"); no .onnx written."""
    cwd, _, before = work
    proc = lrdeploy("export", lenet_bundle, "--out", cwd / "m.onnx", "--trt", "--min-batch", "8",
                    "--max-batch", "4", cwd=cwd)
    assert_refused(proc, "batch range", "min (8)", "max (4)")
    assert "TensorRT" not in proc.stderr and not list(cwd.glob("m*"))
    before.assert_unchanged()
