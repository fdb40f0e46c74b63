"""Every table lrdeploy prints fits an 80-column terminal: no line wider than 80, no cell elided ("…"), no
table cropped at the right edge. Each table is built from the report its command makes (or the same
structure) and rendered at 80 columns; `lrdeploy bench` is also run as a command with COLUMNS=80."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rich.cells import cell_len
from rich.console import Console

from .test_bench_cmd import FAST, mlp_onnx

WIDTH = 80
_LEFT, _RIGHT = "┏┃┡│├└┗", "┓┃┩│┤┘┛"


def assert_fits(text: str, width: int = WIDTH) -> None:
    """No "…", no line over ``width`` cells, and every table row still has its right border (not cropped)."""
    assert "…" not in text, text
    for line in text.splitlines():
        assert cell_len(line) <= width, f"{cell_len(line)} > {width}: {line}\n{text}"
        if line[:1] in _LEFT:
            assert line.rstrip()[-1:] in _RIGHT, f"cropped: {line}\n{text}"


def rendered(renderable: object, width: int = WIDTH) -> str:
    """``renderable`` printed on a ``width``-column console (not cropped: an overflow shows as a long line)."""
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable, crop=False)
    return console.export_text()


# ---------------------------------------------------------------------------------------- the real command
def test_bench_command_fits_80_columns(tmp_path):
    """Three models, batch sizes 1, 8 and 32, with the profile: every table `lrdeploy bench` prints."""
    models = [mlp_onnx(tmp_path / "dense.onnx", 32, 2), mlp_onnx(tmp_path / "lowrank.onnx", 32, 2, rank=4),
              mlp_onnx(tmp_path / "lowrank_r8.onnx", 32, 2, rank=8)]
    env = {**os.environ, "COLUMNS": str(WIDTH)}
    env.pop("LINES", None)
    fast = [a if a != "0.5" else "0.2" for a in FAST]  # --time-limit: 0.2 s per batch size is plenty here
    proc = subprocess.run(
        [sys.executable, "-m", "lrdeploy", "bench", *map(str, models), "--batch", "1,8,32", *fast,
         "--profile", "--profile-runs", "3"],
        capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "lrdeploy bench (reference: dense)" in out and "lowrank_r8" in out and "where the time goes" in out
    assert_fits(out)
    assert Path(models[0]).is_file()
