"""The error boundary: a bug is one line naming where its traceback went, with an exit code of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lrdeploy.cli import INTERNAL_ERROR

BUGGY = """
import sys
import lrdeploy.workflows as w
def broken(*a, **k):
    raise ZeroDivisionError("division by zero deep inside")
w.init_bundle = broken
from lrdeploy.cli import main
sys.argv = ["lrdeploy", "init", "--model", "lenet5", "--out", sys.argv[1]]
main()
"""


def test_a_bug_is_one_line_and_a_saved_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BUGGY, str(tmp_path / "b")], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin",
                                                                       "TMPDIR": str(tmp_path)})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == INTERNAL_ERROR, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "internal error: ZeroDivisionError: division by zero deep inside" in lines[0]
    saved = Path(lines[0].split("traceback is in ", 1)[1].split(" ", 1)[0])
    assert saved.parent == tmp_path and "Traceback" in saved.read_text() and "broken" in saved.read_text()
    assert not (tmp_path / "b").exists()
