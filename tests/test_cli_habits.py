"""The habits of a practitioner's command line, through the real CLI: --version, -h, -q/-v, choices from the
registries, --config, the run record and `lrdeploy rerun`, --json -, exit codes, shell completion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lrdeploy import __version__
from lrdeploy.cli import app

runner = CliRunner()
TINY = ("--model", "lenet5", "--epochs", "1", "--limit-train", "256", "--limit-test", "128",
        "--batch-size", "64")


def cli(*args: object, cwd: Path | None = None):
    """The CLI in this process (stdout and stderr apart), from ``cwd``."""
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def lrdeploy(*args: object, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed console script in a fresh process (what a shell sees)."""
    exe = Path(sys.executable).with_name("lrdeploy")
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def work(tmp_path_factory, data_dir) -> Path:
    """A directory with a tiny trained bundle (``dense``) and its export (``dense.onnx``, --fold factored)."""
    root = tmp_path_factory.mktemp("habits")
    os.environ.setdefault("LRDEPLOY_DATA", str(data_dir))
    r = cli("train", *TINY, "--out", "dense", cwd=root)
    assert r.exit_code == 0, r.output
    r = cli("export", "dense", "--out", "dense.onnx", "--fold", "factored", "--optimize", "none", cwd=root)
    assert r.exit_code == 0, r.output
    return root


# ------------------------------------------------------------------------------------- version, help
def test_version_and_short_help():
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"lrdeploy {__version__}"
    root = cli("-h")
    assert root.exit_code == 0 and "Exit codes: 0 ok" in root.stdout and "--install-completion" in root.stdout
    for command in ("train", "export", "compare", "bench", "rerun", "serve"):
        r = cli(command, "-h")
        assert r.exit_code == 0, command
        assert "--quiet" in r.stdout and "--verbose" in r.stdout and "Exit codes" in r.stdout, command


# ------------------------------------------------------------------------------------------- choices
def test_help_lists_the_registered_values():
    from lrdeploy.layers.lowrank import FOLD_MODES
    from lrdeploy.methods import list_methods
    from lrdeploy.parity_stats import TOLERANCES
    from lrdeploy.serving.runtimes import runtime_kinds
    from lrdeploy.tasks import list_tasks

    def helptext(command: str) -> str:
        return " ".join(runner.invoke(app, [command, "-h"], terminal_width=1000).stdout.split())

    train, export, bench, compare = (helptext(c) for c in ("train", "export", "bench", "compare"))
    assert all(m in train for m in list_methods("training")) and "dense" in train
    assert all(t in train for t in list_tasks()) and "pkg.module:factory" in train
    assert "fashion-mnist" in train
    assert all(f in export for f in FOLD_MODES) and "basic" in export and "int8" in export
    assert all(k in bench for k in runtime_kinds("onnx"))
    assert all(p in compare for p in TOLERANCES)


def test_a_newly_registered_method_appears_without_a_cli_edit():
    from lrdeploy.methods import base

    @base.register_method("test-only-method")
    class _Dummy(base.MethodHook):
        pass

    try:
        text = " ".join(runner.invoke(app, ["train", "-h"], terminal_width=1000).stdout.split())
        assert "test-only-method" in text
        r = cli("train", "--method", "test-only-methd", "--out", "never")
        assert r.exit_code == 2 and "did you mean test-only-method" in r.stderr
    finally:
        del base._METHODS["test-only-method"]


@pytest.mark.parametrize("args, named", [
    (("train", "--method", "cutlefish"), "cuttlefish"),
    (("train", "--data", "mnits"), "fashion-mnist"),
    (("train", "--model", "lenet"), "lenet5"),
    (("train", "--task", "classify"), "classification"),
    (("train", "--device", "gpu"), "cuda:N"),
    (("train", "--schedule", "linear"), "inverse_sqrt"),
    (("export", "x", "--out", "x.onnx", "--fold", "folded"), "factored"),
    (("export", "x", "--out", "x.onnx", "--optimize", "max"), "basic"),
    (("export", "x", "--out", "x.onnx", "--precision", "int4"), "bf16"),
    (("compare", "a", "b", "--precision", "fp8"), "int8"),
    (("bench", "a.onnx", "--runtime", "ort-gpux"), "ort-cpu"),
])
def test_a_wrong_choice_is_one_line_naming_the_values(args, named, tmp_path):
    r = cli(*args, cwd=tmp_path)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and named in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())  # refused before any work


# ------------------------------------------------------------------------------------------ verbosity
def test_quiet_says_only_the_result_line(work):
    r = lrdeploy("export", "dense", "--out", "q.onnx", "--precision", "int8", "--optimize", "none", "-q",
                 cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no quantiser WARNING:root lines, no progress
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("exported q.onnx"), r.stdout
    r = cli("-q", "train", *TINY, "--out", "quiet-bundle", cwd=work)  # before the command, for every command
    assert r.exit_code == 0 and r.stderr == "" and r.stdout == "bundle written to quiet-bundle\n", r.output


def test_third_party_warnings_only_when_verbose(work):
    normal = lrdeploy("export", "dense", "--out", "n.onnx", "--precision", "int8", "--optimize", "none",
                      cwd=work)  # a fresh process: pytest's own log capture would hide what leaks
    loud = lrdeploy("export", "dense", "--out", "v.onnx", "--precision", "int8", "--optimize", "none", "-v",
                    cwd=work)
    assert normal.returncode == 0 and loud.returncode == 0, normal.stderr + loud.stderr
    assert "WARNING:root" not in normal.stderr and "Warning" not in normal.stderr
    assert "WARNING:root:Please consider" in loud.stderr  # ONNX Runtime's quantiser, unsilenced
    assert "int8 variant" in normal.stdout  # the details are still there at the normal level


def test_verbose_and_quiet_contradict(work):
    r = cli("models", "-v", "-q")
    assert r.exit_code == 2 and "contradict" in r.stderr


# --------------------------------------------------------------------------------------------- config
def test_config_file_options_and_flags_win(work):
    (work / "run.toml").write_text('model = "lenet5"\nepochs = 1\nlimit-train = 256\nlimit_test = 128\n'
                                   'batch-size = 64\nseed = 3\nout = "from-config"\n')
    r = cli("train", "--config", "run.toml", "--seed", "4", "--out", "cfg", cwd=work)
    assert r.exit_code == 0, r.output
    run = json.loads((work / "cfg" / "manifest.json").read_text())["run"]
    assert run["options"]["seed"] == 4 and run["options"]["out"] == "cfg"  # the command line wins
    assert run["options"]["limit-train"] == 256 and run["options"]["batch-size"] == 64
    assert set(run["from_config"]) == {"model", "epochs", "limit-train", "limit-test", "batch-size"}
    assert run["config_file"] == "run.toml"


def test_config_tables_and_unknown_keys(work, tmp_path):
    (tmp_path / "bad.toml").write_text("epochs = 1\nwarp = 9\n")
    r = cli("train", "--config", "bad.toml", cwd=tmp_path)
    assert r.exit_code == 2 and "unknown key 'warp'" in r.stderr and r.stderr.count("\n") == 1
    (tmp_path / "pipeline.toml").write_text('[train]\nepochs = 1\n\n[export]\nfold = "factored"\n'
                                            'opset = 18\n')
    r = cli("compare", "a", "b", "--config", "pipeline.toml", cwd=tmp_path)
    assert r.exit_code == 2 and "add a [compare] table" in r.stderr
    (tmp_path / "broken.toml").write_text("epochs = [1,\n")
    r = cli("train", "--config", "broken.toml", cwd=tmp_path)
    assert r.exit_code == 2 and "not valid TOML" in r.stderr
    shutil.copy(tmp_path / "pipeline.toml", work / "pipeline.toml")
    r = cli("export", "dense", "--config", "pipeline.toml", "--out", "tab.onnx", "--optimize", "none",
            cwd=work)
    assert r.exit_code == 0, r.output
    fold = json.loads((work / "tab.fold.json").read_text())
    assert fold["run"]["options"]["fold"] == "factored" and fold["run"]["options"]["opset"] == 18


# ----------------------------------------------------------------------------------- record and rerun
def test_rerun_of_a_training_reproduces_its_weights(work):
    r = cli("rerun", "dense", "--out", "again", cwd=work)
    assert r.exit_code == 0, r.output
    old = json.loads((work / "dense" / "manifest.json").read_text())
    new = json.loads((work / "again" / "manifest.json").read_text())
    assert new["weights_sha256"] == old["weights_sha256"]
    assert "reproduced: weights sha256 identical" in r.stdout
    assert new["run"]["options"]["out"] == "again" and new["run"]["argv"][0] == "train"
    assert {k: v for k, v in new["run"]["options"].items() if k != "out"} == \
        {k: v for k, v in old["run"]["options"].items() if k != "out"}


def test_rerun_check_fails_when_the_result_differs(work, tmp_path):
    shutil.copytree(work / "dense", tmp_path / "tampered")
    manifest = tmp_path / "tampered" / "manifest.json"
    record = json.loads(manifest.read_text())
    record["weights_sha256"] = "0" * 64  # as if the recorded run had produced other weights
    record["run"]["cwd"] = str(work)
    manifest.write_text(json.dumps(record))
    r = cli("rerun", tmp_path / "tampered", "--out", tmp_path / "re", "--check", cwd=work)
    assert r.exit_code == 1 and "not reproduced: weights sha256 differ" in r.stdout, r.output


def test_rerun_of_an_export_and_of_a_report_from_elsewhere(work, tmp_path):
    r = cli("rerun", work / "dense.onnx", "--out", tmp_path / "ex", "--check", cwd=tmp_path)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ex" / "dense.onnx").is_file() and "graph sha256" in r.stdout
    r = cli("bench", "dense.onnx", "dense.onnx", "--names", "a,b", "--batch", "1", "--seconds", "0.02",
            "--min-runs", "2", "--rounds", "1", "--time-limit", "1", "--json", "bench.json", cwd=work)
    assert r.exit_code == 0, r.output
    assert json.loads((work / "bench.json").read_text())["run"]["command"] == "bench"
    r = cli("rerun", work / "bench.json", "--out", tmp_path / "b2", cwd=tmp_path)  # inputs found via cwd
    assert r.exit_code == 0, r.output
    model = json.loads((tmp_path / "b2" / "bench.json").read_text())["models"]["a"]
    assert model["source"] == str(work / "dense.onnx") and model["onnx_bytes"] > 0
    assert "measurements" in r.stdout


def test_rerun_refuses_what_records_no_run(tmp_path):
    (tmp_path / "old.json").write_text('{"schema": "lrdeploy.compare/1"}')
    r = cli("rerun", tmp_path / "old.json", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "records no run" in r.stderr and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------- --json -
def test_json_dash_writes_only_json_on_stdout(work):
    r = lrdeploy("compare", "dense", "dense.onnx", "--limit-test", "128", "--batch", "1", "--seconds", "0.05",
                 "--json", "-", cwd=work)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # the whole of stdout is one JSON document
    assert report["schema"] == "lrdeploy.compare/1" and report["run"]["options"]["json"] == "-"
    assert "candidate vs reference" in r.stderr  # the table and result line moved to stderr
    assert not (work / "-").exists()


def test_json_dash_on_a_missed_gate_still_reports(work):
    r = lrdeploy("bench", "dense.onnx", "dense.onnx", "--names", "a,b", "--batch", "1", "--seconds", "0.02",
                 "--min-runs", "2", "--rounds", "1", "--time-limit", "1", "--gate", "speedup>=100@p50",
                 "--json", "-", "-q", cwd=work)
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["gates_passed"] is False
    assert "gates MISSED" in r.stderr


# ----------------------------------------------------------------------------------------- completion
def test_shell_completion_offers_registered_values(tmp_path):
    env = {"_LRDEPLOY_COMPLETE": "complete_bash", "COMP_WORDS": "lrdeploy train --method ", "COMP_CWORD": "3"}
    r = lrdeploy(cwd=tmp_path, env=env)
    assert r.returncode == 0
    from lrdeploy.methods import list_methods

    assert set(r.stdout.split()) == {"dense", *list_methods("training")}
    env = {"_LRDEPLOY_COMPLETE": "complete_bash", "COMP_WORDS": "lrdeploy rer", "COMP_CWORD": "1"}
    assert lrdeploy(cwd=tmp_path, env=env).stdout.split() == ["rerun"]
