"""`lrdeploy export --fold auto` with a broken fold-cost cache: the export completes (exit 0) with a correct
ONNX file, and the cache's problem is ONE warning line on stderr naming the cache path.

ONNX Runtime (1.32) prints a line of its own at import when it cannot persist its telemetry device ID under
$XDG_CACHE_HOME or ~/.cache; lrdeploy turns ORT's telemetry off (``ORT_DISABLE_TELEMETRY``), so that line
must not appear either.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.adversarial.conftest import lrdeploy

ORT_TELEMETRY = "Failed to persist telemetry device ID"


@pytest.fixture(scope="module")
def lowrank_bundle(tmp_path_factory) -> Path:
    """A LeNet-5 bundle with low-rank layers (init + compress at rank ratio 0.5); copied before use."""
    root = tmp_path_factory.mktemp("adv-cache")
    proc = lrdeploy("init", "--model", "lenet5", "--num-classes", "10", "--out", root / "B")
    assert proc.returncode == 0, proc.stderr
    proc = lrdeploy("compress", root / "B", "--rank-ratio", "0.5", "--out", root / "C")
    assert proc.returncode == 0, proc.stderr
    return root / "C"


def _export(bundle: Path, tmp_path: Path, env: dict[str, str]) -> tuple[Path, list[str]]:
    """Export a copy of ``bundle`` with --fold auto; check exit 0, no traceback, and a correct ONNX file.

    Returns the ONNX path and the stderr lines.
    """
    src = tmp_path / "bundle"
    shutil.copytree(bundle, src)
    out = tmp_path / "m.onnx"
    proc = lrdeploy("export", src, "--out", out, "--fold", "auto", "--optimize", "none", env_extra=env)
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, detail
    assert "Traceback" not in proc.stderr + proc.stdout, detail
    assert out.is_file() and (tmp_path / "m.fold.json").is_file(), detail
    _assert_same_outputs(src, out)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert not [ln for ln in lines if ORT_TELEMETRY in ln], detail
    return out, lines


def _assert_same_outputs(bundle: Path, onnx_path: Path) -> None:
    """The exported graph computes what the bundle's PyTorch model computes (whatever was folded how)."""
    import onnxruntime as ort

    from lrdeploy.bundle import load_bundle

    model = load_bundle(bundle).model.eval()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def _one_cache_warning(lines: list[str], cache_file: Path | str) -> str:
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: fold-cost cache") and str(cache_file) in lines[0], lines
    return lines[0]


def test_unwritable_home_without_xdg(lowrank_bundle, tmp_path):
    # Tests run as root, which ignores permission bits: HOME is made unwritable by putting it under a
    # regular file. XDG_CACHE_HOME="" counts as unset (XDG spec: "not set or empty"); the conftest helper can
    # only add variables, not remove them.
    blocker = tmp_path / "home-file"
    blocker.write_text("not a directory")
    home = blocker / "sub"
    _, lines = _export(lowrank_bundle, tmp_path, {"HOME": str(home), "XDG_CACHE_HOME": ""})
    line = _one_cache_warning(lines, home / ".cache" / "lrdeploy" / "fold-cost.json")
    assert "Not a directory" in line and "not saved" in line
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow  # 12 s; the unwritable-home case above takes the same path
def test_xdg_cache_home_is_a_regular_file(lowrank_bundle, tmp_path):
    xdg = tmp_path / "xdg-file"
    xdg.write_bytes(b"\x00precious")
    _, lines = _export(lowrank_bundle, tmp_path, {"XDG_CACHE_HOME": str(xdg)})
    line = _one_cache_warning(lines, xdg / "lrdeploy" / "fold-cost.json")
    assert "Not a directory" in line
    assert xdg.read_bytes() == b"\x00precious"


@pytest.mark.slow  # 20 s: re-times every layer
def test_cache_entries_with_time_zero_are_remeasured_and_replaced(lowrank_bundle, tmp_path):
    xdg = tmp_path / "xdg"
    cache_file = xdg / "lrdeploy" / "fold-cost.json"
    # A healthy cache first: no warning at all, one entry per distinct low-rank layer shape.
    _, lines = _export(lowrank_bundle, tmp_path / "first", {"XDG_CACHE_HOME": str(xdg)})
    assert lines == []
    data = json.loads(cache_file.read_text())
    n = len(data["entries"])
    assert n >= 3
    for entry in data["entries"].values():
        entry["dense_ms"] = 0  # once a ZeroDivisionError in the fold decision
    cache_file.write_text(json.dumps(data))

    _, lines = _export(lowrank_bundle, tmp_path / "second", {"XDG_CACHE_HOME": str(xdg)})
    line = _one_cache_warning(lines, cache_file)
    assert f"{n} invalid entries dropped" in line
    report = json.loads((tmp_path / "second" / "m.fold.json").read_text())
    assert report["measured_shapes"] == n and report["cached_shapes"] == 0
    saved = json.loads(cache_file.read_text())["entries"]  # re-measured times replaced the zeros
    assert set(saved) == set(data["entries"]) and all(e["dense_ms"] > 0 for e in saved.values())
