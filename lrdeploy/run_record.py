"""The resolved configuration of a command, recorded in what it writes, and the command line that repeats it.

Every CLI command runs with a record (:func:`build` from the parsed Click context, made current with
:func:`active`); bundles (``manifest.json``: ``run``) and JSON reports (``run``) store :func:`current`.
``lrdeploy rerun`` reads it back and rebuilds the command line with :func:`command_line`.

    {"schema": "lrdeploy.run/1", "command": "train", "lrdeploy_version": "0.1.0",
     "argv": ["train", "--model", "lenet5", ...],         # as typed (after `lrdeploy`)
     "options": {"model": "lenet5", "epochs": 2, "out": "runs/x", ...},   # every option, resolved
     "from_config": ["epochs"], "config_file": "run.toml" | null,          # what came from --config
     "paths": ["out", "data-dir"],                        # options that name files (relative to cwd)
     "cwd": "/home/me/project", "env": {"LRDEPLOY_DATA": "/data"}}

Option keys are the long flags without ``--`` (``batch-size``, ``json``); arguments use their names
(``bundle``). The same keys are what a ``--config`` TOML file uses.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA = "lrdeploy.run/1"
NOT_RECORDED = frozenset({"verbose", "quiet", "config", "help"})  # how it talks, not what it computes
RECORDED_ENV = ("LRDEPLOY_DATA",)

_CURRENT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("lrdeploy_run", default=None)
_ARGV: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("lrdeploy_argv", default=None)


def current() -> dict[str, Any] | None:
    """The running command's record (None outside the CLI, e.g. from the Python API)."""
    run = _CURRENT.get()
    return None if run is None else dict(run)


@contextlib.contextmanager
def active(run: dict[str, Any] | None) -> Iterator[None]:
    token = _CURRENT.set(run)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def invoked_with(argv: Sequence[str]) -> Iterator[None]:
    """Record ``argv`` (not this process's ``sys.argv``) as what was typed: ``rerun`` invoking a command."""
    token = _ARGV.set(list(argv))
    try:
        yield
    finally:
        _ARGV.reset(token)


def key_of(param: Any) -> str:
    """The record/config key of a Click parameter: its long flag without dashes, else its name."""
    longs = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    return longs[0][2:] if longs and getattr(param, "param_type_name", "") == "option" else str(param.name)


def plain(value: Any) -> Any:
    """A JSON-friendly copy (paths as text, tuples as lists)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def _is_path(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_is_path(v) for v in value)
    return isinstance(value, os.PathLike)


def build(ctx: Any, command: str) -> dict[str, Any]:
    """The record of the command being run from its parsed Click context (values after defaults)."""
    from lrdeploy import __version__

    options: dict[str, Any] = {}
    from_config, paths = [], []
    for param in ctx.command.params:
        if param.name in NOT_RECORDED or param.name not in ctx.params:
            continue
        key, value = key_of(param), ctx.params[param.name]
        options[key] = plain(value)
        if _is_path(value):
            paths.append(key)
        source = ctx.get_parameter_source(param.name)
        if source is not None and source.name == "DEFAULT_MAP":
            from_config.append(key)
    argv = _ARGV.get()
    return {
        "schema": SCHEMA,
        "command": command,
        "lrdeploy_version": __version__,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "options": options,
        "from_config": from_config,
        "config_file": plain(ctx.meta.get("lrdeploy.config_file")),
        "paths": paths,
        "cwd": os.getcwd(),
        "env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
    }


def command_line(command: Any, name: str, options: Mapping[str, Any]) -> list[str]:
    """The arguments (after ``lrdeploy``) that run Click ``command`` as ``name`` with ``options``
    (record keys); options left at None are omitted, flags are given when true."""
    args: list[str] = [name]
    positional: list[str] = []
    for param in command.params:
        key = key_of(param)
        if key not in options or param.name in NOT_RECORDED:
            continue
        value = options[key]
        if getattr(param, "param_type_name", "") == "argument":
            items = value if isinstance(value, list) else [value]
            positional.extend(str(v) for v in items if v is not None)
            continue
        if value is None:
            continue
        if getattr(param, "is_flag", False):
            secondary = getattr(param, "secondary_opts", [])
            if value:
                args.append(key_flag(param))
            elif secondary:
                args.append(secondary[0])
            continue
        for item in value if isinstance(value, list) else [value]:
            args.extend([key_flag(param), _text(item)])
    return [*args, *positional]


def key_flag(param: Any) -> str:
    return "--" + key_of(param)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def resolve_path(value: str, recorded_cwd: str | None) -> str:
    """A recorded relative path, as seen from here: under the recorded working directory when it is there,
    else as given (relative to the current directory); ``-`` (stdout) stays."""
    if value == "-" or Path(value).is_absolute() or not recorded_cwd:
        return value
    candidate = Path(recorded_cwd) / value
    return str(candidate) if candidate.exists() else value
