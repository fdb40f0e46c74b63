"""What every ``lrdeploy`` command shares, added when it is registered (:func:`register`) rather than
written into each: ``-v/--verbose`` and ``-q/--quiet``, ``--config`` where asked, ``--json -`` to stdout,
the run record stored in what it writes, and the error convention (exit codes in :data:`EXIT_CODES`).

A command function keeps its own signature; :func:`register` extends it with the shared options, wraps it,
and notes which of its options are outputs, so ``lrdeploy rerun --out DIR`` knows what to move into DIR.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from lrdeploy import terminal
from lrdeploy.cli_checks import check_arguments, get_current_context, print_error
from lrdeploy.cli_choices import choices_of, fill_choices
from lrdeploy.errors import UserError

OK, MISSED, BAD_INPUT, INTERNAL_ERROR, INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = (f"Exit codes: {OK} ok · {MISSED} a missed budget, gate or parity preset · {BAD_INPUT} bad "
              f"input (one line on stderr) · {INTERNAL_ERROR} an internal error, a bug (one line; the "
              f"traceback is saved to a file it names) · {INTERRUPTED} interrupted.")


class LrdeployCommand(TyperCommand):
    """A command whose help lists each choice option's registered values (read when help is drawn)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        fill_choices(self.params, CHOICES.get(self.name or "", {}))
        return super().format_help(ctx, formatter)


@dataclass(frozen=True)
class CommandSpec:
    """How ``rerun`` treats a command's options: ``outputs`` maps an option key to "dir" (the run's own
    directory: becomes DIR) or "file" (goes into DIR under its name); ``reset`` options are cleared."""

    name: str
    outputs: Mapping[str, str] = field(default_factory=dict)
    reset: Mapping[str, Any] = field(default_factory=dict)


COMMANDS: dict[str, CommandSpec] = {}
CHOICES: dict[str, dict[str, Any]] = {}  # command -> parameter -> cli_choices.Choices


def _shared_parameters(config: bool) -> list[inspect.Parameter]:
    from lrdeploy.cli_config import config_callback

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("verbose", kw, annotation=bool, default=typer.Option(
            False, "-v", "--verbose",
            help="Say more: also ONNX Runtime's, the quantiser's and Python's warnings.")),
        inspect.Parameter("quiet", kw, annotation=bool, default=typer.Option(
            False, "-q", "--quiet", help="Say only the result line and errors.")),
    ]
    if config:
        params.append(inspect.Parameter("config", kw, annotation=Path | None, default=typer.Option(
            None, "--config", is_eager=True, callback=config_callback, metavar="TOML",
            help="Read any option from a TOML file (keys: the flags without --); flags given here win, "
                 "unknown keys are an error.")))
    return params


def register(app: typer.Typer, fn: Callable[..., Any], name: str | None = None, *, config: bool = False,
             outputs: Mapping[str, str] | None = None, reset: Mapping[str, Any] | None = None) -> Callable:
    """Add ``fn`` to ``app`` as command ``name`` with the shared options and error handling."""
    name = name or fn.__name__.replace("_cmd", "").replace("_", "-")
    COMMANDS[name] = CommandSpec(name, dict(outputs or {}), dict(reset or {}))
    CHOICES[name] = choices_of(fn)

    @functools.wraps(fn)
    def command(*args: Any, verbose: bool = False, quiet: bool = False, config: Path | None = None,
                **kwargs: Any) -> Any:
        return run_command(fn, name, args, kwargs, verbose=verbose, quiet=quiet)

    own = inspect.signature(fn, eval_str=True)
    command.__signature__ = own.replace(  # type: ignore[attr-defined]
        parameters=[*own.parameters.values(), *_shared_parameters(config)])
    app.command(name, cls=LrdeployCommand, epilog=EXIT_CODES)(command)
    return command


def _level(verbose: bool, quiet: bool, ctx: Any) -> int:
    root = (ctx.find_root().meta if ctx is not None else {}).get("lrdeploy.verbosity")
    if verbose and quiet:
        raise UserError("-v/--verbose and -q/--quiet contradict each other", "give one of them")
    if verbose:
        return terminal.VERBOSE
    if quiet:
        return terminal.QUIET
    return terminal.NORMAL if root is None else int(root)


def run_command(fn: Callable[..., Any], name: str, args: tuple, kwargs: dict[str, Any], *, verbose: bool,
                quiet: bool) -> Any:
    """Run a command: verbosity, the run record, ``--json -`` and the error convention around ``fn``."""
    from lrdeploy import run_record
    from lrdeploy.download_scope import downloads_allowed

    ctx = get_current_context(silent=True)
    try:
        level = _level(verbose, quiet, ctx)
        check_arguments(kwargs)  # NaN/inf, >64-bit integers, a --data-dir that is a file: before any work
    except UserError as e:
        print_error(e.one_line())
        raise typer.Exit(code=BAD_INPUT) from None
    json_stdout = str(kwargs.get("json_path")) == "-"
    run = run_record.build(ctx, name) if ctx is not None else None
    with terminal.session(level, json_stdout=json_stdout), run_record.active(run), \
            tempfile.TemporaryDirectory(prefix="lrdeploy-json-") if json_stdout else nullcontext() as scratch:
        if json_stdout:
            kwargs["json_path"] = Path(scratch) / "result.json"
        try:
            with downloads_allowed(bool(kwargs.get("download"))):  # --download, for the whole command
                result = fn(*args, **kwargs)
        except typer.Exit as e:
            if e.exit_code == MISSED:  # a missed gate still reports what it measured
                _emit_json(kwargs.get("json_path") if json_stdout else None)
            raise
        except UserError as e:
            print_error(e.one_line())
            raise typer.Exit(code=BAD_INPUT) from None
        except (typer.Abort, typer.exceptions.TyperException):
            raise
        except KeyboardInterrupt:
            terminal.alert.print("interrupted — nothing was installed (outputs appear only when complete)",
                                 soft_wrap=True, highlight=False)
            raise typer.Exit(code=INTERRUPTED) from None
        except Exception as e:  # a bug: one line here, the whole traceback in a file for the report
            if os.environ.get("LRDEPLOY_DEBUG"):
                raise
            where = save_traceback()
            terminal.alert.print(
                f"internal error: {type(e).__name__}: {first_line(e)} — this is a bug in lrdeploy; the "
                f"traceback is in {where} (LRDEPLOY_DEBUG=1 prints it); please report it",
                markup=False, soft_wrap=True, highlight=False)
            raise typer.Exit(code=INTERNAL_ERROR) from None
        if json_stdout:
            _emit_json(kwargs.get("json_path"))
        return result


def _emit_json(path: Path | None) -> None:
    """``--json -``: the JSON the command wrote, on stdout and nothing else there."""
    if path is not None and Path(path).is_file():
        sys.stdout.write(Path(path).read_text(encoding="utf-8"))
        sys.stdout.flush()


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def save_traceback() -> str:
    """Write the current exception's traceback to a file in the temp directory; return its path."""
    import traceback

    try:
        fd, path = tempfile.mkstemp(prefix="lrdeploy-crash-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(" ".join(sys.argv) + "\n\n" + traceback.format_exc())
        return path
    except OSError:
        return "(could not be saved)"
