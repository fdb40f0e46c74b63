"""``--config run.toml``: any option of a command from a TOML file; flags on the command line win.

Keys are the long flags without ``--`` (``batch-size``; ``batch_size`` is accepted too) and arguments by
name (``bundle``). A file may hold one table per command (``[train]``, ``[export]`` …): the command then reads
only its own table. An unknown key, a missing table or a value of the wrong kind is a one-line error.

    # run.toml
    model = "lenet5"
    data = "mnist"
    epochs = 3
    method-opt = {window = 3}      # a table becomes repeated key=value settings
    batch = [1, 32]                # a list becomes 1,32 where the option takes a comma-separated list

The values become the command's Click ``default_map``: Click converts and validates them like typed values,
and records that they came from the file (``run.from_config`` in what the command writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomllib
import typer

from lrdeploy.run_record import NOT_RECORDED, key_of


def _keys(command: Any) -> dict[str, Any]:
    """Every key a config file may use for ``command`` (flag and parameter spellings) -> its parameter."""
    keys: dict[str, Any] = {}
    for param in command.params:
        if param.name in NOT_RECORDED:
            continue
        for key in {key_of(param), key_of(param).replace("-", "_"), str(param.name)}:
            keys[key] = param
    return keys


def read_table(path: Path, command_name: str, known_commands: set[str]) -> dict[str, Any]:
    """The settings ``path`` holds for ``command_name`` (its own table, or the whole file)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise typer.BadParameter(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise typer.BadParameter(f"{path} cannot be read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise typer.BadParameter(f"{path} is not valid TOML ({e})") from None
    tables = {k for k, v in data.items() if isinstance(v, dict) and k in known_commands}
    if not tables:
        return data
    if command_name not in tables:
        raise typer.BadParameter(f"{path} has tables for {', '.join(sorted(tables))} but none for "
                                 f"{command_name}; add a [{command_name}] table")
    stray = sorted(k for k in data if k not in tables)
    if stray:
        raise typer.BadParameter(f"{path}: {', '.join(stray)} outside a command table; with per-command "
                                 "tables, every key goes in one")
    return data[command_name]


def _value(param: Any, value: Any, key: str, path: Path) -> Any:
    """A TOML value in the form Click converts for ``param``."""
    multiple = getattr(param, "multiple", False) or getattr(param, "nargs", 1) == -1
    if isinstance(value, dict):
        if not multiple:
            raise typer.BadParameter(f"{path}: {key} takes one value, not a table")
        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items()]
    if isinstance(value, list):
        if multiple:
            return [str(v) if not isinstance(v, str) else v for v in value]
        if any(isinstance(v, (list, dict)) for v in value):
            raise typer.BadParameter(f"{path}: {key} must be a value or a flat list")
        return ",".join(str(v) for v in value)  # --batch 1,32
    if multiple:
        return [value]
    return value


def config_callback(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Eager Click callback of ``--config``: the file's settings become the command's defaults."""
    if value is None or ctx.resilient_parsing:
        return value
    parent = ctx.parent.command if ctx.parent is not None else None
    known = set(getattr(parent, "commands", {}) or {})
    name = ctx.info_name or ""
    table = read_table(value, name, known)
    keys = _keys(ctx.command)
    defaults: dict[str, Any] = {}
    for key, item in table.items():
        target = keys.get(key)
        if target is None:
            known_keys = sorted({key_of(p) for p in keys.values()})
            raise typer.BadParameter(f"{value}: unknown key {key!r} for `lrdeploy {name}` (known: "
                                     f"{', '.join(known_keys)})")
        defaults[target.name] = _value(target, item, key, value)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["lrdeploy.config_file"] = value
    return value
