"""How much the command line says, and where: one place for ``-q``/``-v`` and for ``--json -``.

Levels: ``QUIET`` (the result line and errors only), ``NORMAL`` (tables, progress bars, notes) and
``VERBOSE`` (also the warnings of ONNX Runtime, its quantiser, PyTorch and Python, silenced otherwise).

- :data:`out`: tables and details (stdout; stderr while ``--json -`` owns stdout); silent when quiet.
- :data:`info`: progress bars, epoch lines and notes (stderr); silent when quiet.
- :data:`alert`: errors, missed budgets and gates (stderr); always shown.
- :func:`result`: a command's result line (stdout, or stderr under ``--json -``); always shown.

Commands run inside :func:`session`, which applies a level and restores everything after (the tests and
``lrdeploy rerun`` run several commands in one process). Importing this module stays light (Rich only).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from rich.console import Console

QUIET, NORMAL, VERBOSE = 0, 1, 2
ORT_ERRORS_ONLY, ORT_WARNINGS = 3, 2  # onnxruntime logger severities (its default is 2, warnings)

out = Console()
info = Console(stderr=True)
alert = Console(stderr=True)
_result = Console()
_state: dict[str, Any] = {"level": NORMAL, "json_stdout": False}


def level() -> int:
    return int(_state["level"])


def is_quiet() -> bool:
    return level() == QUIET


def is_verbose() -> bool:
    return level() >= VERBOSE


def json_on_stdout() -> bool:
    """True while ``--json -`` sends the command's JSON to stdout (everything else goes to stderr)."""
    return bool(_state["json_stdout"])


def result(text: str, **kwargs: Any) -> None:
    """The command's result line: shown at every level, never wrapped (scripts grep it)."""
    _result.print(text, **{"soft_wrap": True, **kwargs})


def note(text: str) -> None:
    """A note on stderr (not shown when quiet), printed as is (no markup)."""
    info.print(text, markup=False, highlight=False, soft_wrap=True)


def ort_severity() -> int:
    """The onnxruntime logger severity that matches the level (warnings only when verbose)."""
    return ORT_WARNINGS if is_verbose() else ORT_ERRORS_ONLY


def _set_ort_severity(severity: int) -> None:
    """Set ONNX Runtime's process-wide logger severity, if onnxruntime is installed (lrdeploy needs it)."""
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - a hard dependency; nothing to silence without it
        return
    onnxruntime.set_default_logger_severity(severity)


@contextlib.contextmanager
def session(verbosity: int = NORMAL, *, json_stdout: bool = False) -> Iterator[None]:
    """Run one command at ``verbosity``; with ``json_stdout`` every console writes to stderr."""
    saved = dict(_state)
    consoles = (out, info, _result)
    saved_quiet = [c.quiet for c in consoles]
    saved_files = [c._file for c in consoles]  # None: follows sys.stdout/sys.stderr as they are swapped
    root = logging.getLogger()
    saved_root = root.level
    _state.update(level=verbosity, json_stdout=json_stdout)
    out.quiet = info.quiet = verbosity == QUIET
    if json_stdout:
        out.file = sys.stderr
        _result.file = sys.stderr
    root.setLevel(logging.INFO if verbosity >= VERBOSE else logging.ERROR)  # the quantiser logs to root
    _set_ort_severity(ort_severity())
    try:
        with warnings.catch_warnings():
            if verbosity < VERBOSE:
                warnings.simplefilter("ignore")  # torch.onnx, numpy, onnxruntime: not the user's concern
            else:
                warnings.simplefilter("default")
            yield
    finally:
        _state.clear()
        _state.update(saved)
        for console, quiet, file in zip(consoles, saved_quiet, saved_files, strict=True):
            console.quiet = quiet
            console._file = file
        root.setLevel(saved_root)
        _set_ort_severity(ORT_WARNINGS)
