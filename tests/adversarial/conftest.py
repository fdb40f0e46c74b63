"""Shared tools of the adversarial suite: run the real CLI in a subprocess and prove nothing was harmed.

Every case asserts the exit code, a one-line stderr without a traceback, and that the bytes of every file that
existed before the command are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest


def lrdeploy(*args: object, cwd: Path | None = None, env_extra: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m lrdeploy ARGS`` as a user would; no stdin, output captured as text."""
    env = {**os.environ, "COLUMNS": "200", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "lrdeploy", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL,
    )


def assert_refused(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """Exit ``code``, exactly one non-empty line on stderr naming ``needles``, no traceback anywhere."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == code, detail
    assert "Traceback" not in proc.stderr + proc.stdout, detail
    assert len(lines) == 1, detail
    for needle in needles:
        assert needle.lower() in lines[0].lower(), detail


class Snapshot:
    """Bytes of every file (and the set of names) under some roots, to compare after a command."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = [Path(r) for r in roots]
        self.state = self._take()

    def _take(self) -> dict[str, str]:
        state: dict[str, str] = {}
        for root in self.roots:
            paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
            for p in paths:
                state[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        return state

    def assert_unchanged(self) -> None:
        now = self._take()
        changed = sorted(k for k in set(self.state) | set(now) if self.state.get(k) != now.get(k))
        assert not changed, f"files changed, appeared or vanished: {changed[:10]}"


@pytest.fixture(scope="session")
def lenet_bundle(tmp_path_factory) -> Path:
    """A LeNet-5 bundle at its initial weights (``lrdeploy init``), read-only by convention."""
    out = tmp_path_factory.mktemp("adv") / "lenet"
    proc = lrdeploy("init", "--model", "lenet5", "--num-classes", "10", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def lenet_onnx(lenet_bundle, tmp_path_factory) -> Path:
    """That bundle exported to ONNX (fold factored: no timing)."""
    out = tmp_path_factory.mktemp("adv-onnx") / "lenet.onnx"
    proc = lrdeploy("export", lenet_bundle, "--out", out, "--fold", "factored", "--optimize", "none")
    assert proc.returncode == 0, proc.stderr
    return out
