"""``lrdeploy rerun SOURCE --out DIR``: repeat the command that wrote a bundle or report — same seed, data
and settings, from the run record it carries (:mod:`lrdeploy.run_record`) — with its outputs in DIR, then
say whether the result is the same (``--check``: exit 1 when it is not).

What is compared is what a rerun can reproduce: a bundle's weights (sha256), an exported graph (its bytes;
``--fold auto`` decides by timing, so a different decision is reported as such), a compare report's accuracy
and counts. Timings are measurements and are never compared.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from lrdeploy import run_record, terminal
from lrdeploy.errors import UserError

RECORD_FILES = ("manifest.json", "report.json", "summary.json")  # what a directory's record is read from


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e})",
                        "pass a bundle, a report or an exported .onnx") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not an lrdeploy record", "pass a bundle, a report or an exported .onnx")
    return data


def record_file(source: Path) -> Path:
    """The JSON file holding ``source``'s run record: a bundle's manifest, a run directory's report, an
    export's ``<stem>.fold.json``, or a JSON report itself."""
    if source.is_dir():
        for name in RECORD_FILES:
            if (source / name).is_file():
                return source / name
        raise UserError(f"{source} holds no {', '.join(RECORD_FILES)}",
                        "pass a bundle, a compare/report run directory, a JSON report or an exported .onnx")
    if source.suffix == ".onnx":
        fold = source.with_suffix(".fold.json")
        if not fold.is_file():
            raise UserError(f"{source} has no {fold.name} beside it (the export's report)",
                            "pass the .onnx that `lrdeploy export` wrote, with its family")
        return fold
    if not source.is_file():
        raise UserError(f"{source} does not exist", "pass a bundle, a report or an exported .onnx")
    return source


def read_run(source: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run record, the document holding it) of ``source``; one line when there is none."""
    document = _load_json(record_file(source))
    run = document.get("run")
    if not isinstance(run, dict) or not isinstance(run.get("options"), dict) or not run.get("command"):
        raise UserError(f"{source} records no run (written by an older lrdeploy, or from Python)",
                        "rerun works on what the lrdeploy command line wrote")
    return run, document


def relocated(run: Mapping[str, Any], spec: Any, out: Path, force: bool) -> dict[str, Any]:
    """The recorded options with inputs resolved from here and outputs moved into ``out``."""
    options = dict(run["options"])
    for key in run.get("paths") or []:
        value = options.get(key)
        if key in spec.outputs or value is None:
            continue
        if isinstance(value, list):
            options[key] = [run_record.resolve_path(str(v), run.get("cwd")) for v in value]
        else:
            options[key] = run_record.resolve_path(str(value), run.get("cwd"))
    for key, kind in spec.outputs.items():
        value = options.get(key)
        if value is None or value == "-":
            continue
        options[key] = str(out) if kind == "dir" else str(out / Path(str(value)).name)
    options.update(spec.reset)
    if force and "force" in options:
        options["force"] = True
    return options


def fingerprint(source: Path, document: Mapping[str, Any]) -> dict[str, Any]:
    """What a faithful rerun reproduces exactly, by kind of record."""
    if document.get("format") == "lrdeploy-bundle":
        return {"weights sha256": document.get("weights_sha256")}
    if source.suffix == ".onnx" or str(source).endswith(".fold.json"):
        stem = str(source).removesuffix(".fold.json")
        onnx_path = source if source.suffix == ".onnx" else Path(stem + ".onnx")
        if onnx_path.is_file():
            return {"graph sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
                    "fold decisions": _fold_decisions(document)}
        return {}
    if str(document.get("schema", "")).startswith("lrdeploy.compare/"):
        task = document.get("task") or {}
        return {"reference metrics": task.get("reference"), "candidate metrics": task.get("candidate"),
                "reference params": (document.get("reference") or {}).get("params"),
                "candidate params": (document.get("candidate") or {}).get("params")}
    return {}


def _fold_decisions(fold_report: Mapping[str, Any]) -> list[Any]:
    layers = fold_report.get("layers") or []
    return [(layer.get("name"), layer.get("decision") or layer.get("mode")) for layer in layers
            if isinstance(layer, dict)]


def counterpart(source: Path, run: Mapping[str, Any], options: Mapping[str, Any], spec: Any) -> Path | None:
    """Where the rerun wrote what ``source`` is: the output option that named it (or the directory holding
    it), relocated; for a source moved since, the output of the same kind and name."""
    src = source.resolve()
    outputs = [(k, kind) for k, kind in spec.outputs.items() if run["options"].get(k) not in (None, "-")]
    for key, _ in outputs:
        old = Path(run.get("cwd") or ".") / str(run["options"][key])
        old = old.resolve()
        if src == old:
            return Path(str(options[key]))
        if old in src.parents:
            return Path(str(options[key])) / src.relative_to(old)
    for key, kind in outputs:  # moved since it was written
        if (kind == "dir") == source.is_dir() and (kind == "dir" or
                                                   Path(str(run["options"][key])).name == source.name):
            return Path(str(options[key]))
    return None


def rerun(
    source: Path = typer.Argument(..., help="A bundle, a compare/report run directory, a JSON report "
                                  "(bench, check, loadtest …) or an exported .onnx (its .fold.json)."),
    out: Path = typer.Option(..., "--out", help="Directory for the rerun's outputs (a bundle: the bundle "
                             "itself; files: DIR/<their names>)."),
    check: bool = typer.Option(False, "--check", help="Exit 1 when the result differs (weights, graph, "
                               "accuracy); timings are never compared."),
    force: bool = typer.Option(False, "--force", help="Replace outputs that exist in DIR."),
) -> None:
    """Repeat the run that wrote SOURCE (same seed, data and settings), its outputs in DIR."""
    from lrdeploy import __version__
    from lrdeploy.cli_command import COMMANDS

    record = record_file(source)
    run, document = read_run(source)
    spec = COMMANDS.get(str(run["command"]))
    if spec is None or not spec.outputs:
        raise UserError(f"{source} was written by `lrdeploy {run['command']}`, which rerun cannot repeat",
                        f"rerun repeats {', '.join(n for n, s in COMMANDS.items() if s.outputs)}")
    if Path(out).resolve() in (source.resolve(), record.parent.resolve()):
        raise UserError(f"--out {out} is the source itself", "give a new directory")
    if run.get("lrdeploy_version") != __version__:
        terminal.note(f"note: {source} was written by lrdeploy {run.get('lrdeploy_version')}, this is "
                      f"{__version__}: settings may mean other things")
    options = relocated(run, spec, Path(out), force)
    import typer.main

    from lrdeploy.cli import app

    command = typer.main.get_command(app)
    sub = command.commands[spec.name]  # type: ignore[attr-defined]
    argv = run_record.command_line(sub, spec.name, options)
    argv += ["-q"] if terminal.is_quiet() else (["-v"] if terminal.is_verbose() else [])
    terminal.info.print("rerunning: lrdeploy " + shlex.join(argv), markup=False,
                        highlight=False, soft_wrap=True)
    made = _prepare(Path(out), spec, options)
    with run_record.invoked_with(argv):
        code = command.main(args=argv, prog_name="lrdeploy", standalone_mode=False)
    code = int(code or 0)
    if code not in (0, 1):
        if made and Path(out).is_dir() and not any(Path(out).iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise typer.Exit(code=code)
    _judge(source, record, document, run, options, spec, check, gate_code=code)


def _prepare(out: Path, spec: Any, options: Mapping[str, Any]) -> bool:
    """Create DIR when the command writes files into it (a "dir" output is created by the command)."""
    if any(kind == "file" and options.get(k) not in (None, "-") for k, kind in spec.outputs.items()) \
            and not out.exists():
        out.mkdir(parents=True)
        return True
    return False


def _judge(source: Path, record: Path, document: Mapping[str, Any], run: Mapping[str, Any],
           options: Mapping[str, Any], spec: Any, check: bool, gate_code: int) -> None:
    expected = fingerprint(source if source.suffix == ".onnx" else record, document)
    new_source = counterpart(source, run, options, spec)
    got: dict[str, Any] = {}
    if new_source is not None and expected:
        new_record = record_file(new_source)
        got = fingerprint(new_source if new_source.suffix == ".onnx" else new_record,
                          _load_json(new_record))
    differ = [k for k in expected if got.get(k) != expected[k]]
    where = new_source or options.get("out") or options.get("json")
    if not expected:
        terminal.result(f"rerun written to [bold]{where}[/] (its numbers are measurements: nothing to "
                        "compare exactly)")
    elif not differ:
        terminal.result(f"reproduced: {', '.join(expected)} identical; written to [bold]{where}[/]")
    else:
        terminal.result(f"[bold yellow]not reproduced[/]: {', '.join(differ)} differ; written to "
                        f"[bold]{where}[/]")
        if "graph sha256" in differ and "fold decisions" not in differ:
            terminal.note("note: the graph bytes differ but every fold decision is the same")
        elif "fold decisions" in differ:
            terminal.note("note: --fold auto decides by timing; --fold factored or dense decides the same "
                          "way every time")
    if gate_code == 1 or (check and differ):
        raise typer.Exit(code=1)

