"""A writer killed at any step of installing an artefact family leaves the old family or the new one.

Faults are injected, not timed: ``lrdeploy.atomic.FAULT_HOOK`` SIGKILLs the writer at a named step. The
mechanism is tried at every step in a forked child (cheap), and through the real CLI at the steps that matter
(an export family replaced with --force; a bundle replaced with --force).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lrdeploy import atomic

from .conftest import lrdeploy

OLD = {"m.onnx": b"old model", "m.ort.onnx": b"old optimised", "m.fold.json": b"{\"old\": 1}"}
NEW = {"m.onnx": b"new model", "m.fold.json": b"{\"new\": 1}", "m.fp16.onnx": b"new fp16"}
FAMILY = ["m.onnx", "m.ort.onnx", "m.fold.json", "m.fp16.onnx"]
STEPS = ["staged", "journal", "aside:m.fold.json", "installed:m.fold.json", "installed:m.fp16.onnx",
         "aside:m.onnx", "installed:m.onnx", "removed:m.ort.onnx", "done"]


def _family(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file() and not p.name.startswith(".")}


def _commit_in_child(root: Path, kill_at: str) -> int:
    """Stage NEW over OLD in a forked child that SIGKILLs itself at ``kill_at``; the child's exit status."""
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery past this point
        try:
            atomic.FAULT_HOOK = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == kill_at else None
            with atomic.Staging(root, replaces=FAMILY) as stage:
                for name, data in NEW.items():
                    stage.path(name).write_bytes(data)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("step", STEPS)
def test_file_family_killed_at_every_step(tmp_path, step):
    for name, data in OLD.items():
        (tmp_path / name).write_bytes(data)
    status = _commit_in_child(tmp_path, step)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if step == "staged":  # before the journal: the old family is untouched
        assert _family(tmp_path) == OLD
    atomic.recover(tmp_path)  # what the next reader or writer of the directory does first
    assert _family(tmp_path) in (OLD, NEW)
    assert _family(tmp_path) == (OLD if step == "staged" else NEW)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "debris left behind"


def test_recover_leaves_a_live_writers_stage_alone(tmp_path):
    with atomic.Staging(tmp_path) as stage:
        stage.path("a").write_bytes(b"x")
        assert atomic.recover(tmp_path) == []  # our own stage: a live writer
        assert stage.dir.exists()
    assert (tmp_path / "a").read_bytes() == b"x"


def test_failed_write_leaves_nothing(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.Staging(tmp_path, replaces=FAMILY) as stage:
        stage.path("m.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")
    assert _family(tmp_path) == {"m.onnx": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# --- through the real CLI -------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
from lrdeploy import atomic
step = sys.argv[1]
atomic.FAULT_HOOK = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == step else None
from lrdeploy.cli import main
sys.argv = ["lrdeploy", *sys.argv[2:]]
main()
"""


def _killed(step: str, *args: object, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLER, step, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_bundles(lenet_bundle, tmp_path_factory):
    """A dense bundle and an SVD-compressed one (two different exports of the same family name)."""
    root = tmp_path_factory.mktemp("crash")
    proc = lrdeploy("compress", lenet_bundle, "--rank-ratio", "0.5", "--out", root / "svd")
    assert proc.returncode == 0, proc.stderr
    return lenet_bundle, root / "svd"


@pytest.mark.parametrize("step", [  # every step is tried on the mechanism above; here, the CLI end to end
    pytest.param("journal", marks=pytest.mark.slow), "aside:m.onnx"])
def test_export_killed_while_replacing_a_family(two_bundles, tmp_path, step):
    dense, svd = two_bundles
    export = ("export", "--out", "m.onnx", "--fold", "factored")
    assert lrdeploy(export[0], dense, *export[1:], "--optimize", "basic", cwd=tmp_path).returncode == 0
    ref = tmp_path / "ref"
    ref.mkdir()
    assert lrdeploy(export[0], svd, *export[1:], "--optimize", "none", cwd=ref).returncode == 0
    _killed(step, *export[:1], svd, *export[1:], "--optimize", "none", "--force", cwd=tmp_path)
    # the next command that reads the directory finishes the committed install
    proc = lrdeploy("bench", "m.onnx", "--batch", "1", "--seconds", "0.05", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == ["m.fold.json", "m.onnx"], names  # the old m.ort.onnx went with the old family
    assert _digest(tmp_path / "m.onnx") == _digest(ref / "m.onnx")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lrdeploy")]


def test_bundle_killed_between_the_two_renames(two_bundles, tmp_path):
    dense, _ = two_bundles
    out = tmp_path / "b"
    assert lrdeploy("compress", dense, "--rank-ratio", "0.5", "--out", out).returncode == 0
    before = _digest(out / "weights.safetensors")
    _killed("aside:b", "compress", dense, "--rank-ratio", "0.25", "--out", out, "--force", cwd=tmp_path)
    assert not out.exists()  # the old bundle is aside, the new one staged: the journal says which wins
    proc = lrdeploy("export", out, "--out", tmp_path / "b.onnx", "--fold", "factored", "--optimize", "none")
    assert proc.returncode == 0, proc.stderr  # reading the bundle finished its install
    assert _digest(out / "weights.safetensors") != before
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "weights.safetensors"]
