"""lrdeploy.cli_checks and what it guards, in-process: every float option of every command refuses NaN/inf,
every integer option refuses 65-bit values, Click's usage errors are one line, memory estimates are exact
lower bounds, --data-dir messages say what the path is, --download fetches (from a file:// mirror, never the
network) only when given. The real-CLI cases are in tests/adversarial/test_values.py."""

from __future__ import annotations

import dataclasses
import inspect
import math
import shutil
import typing
from pathlib import Path

import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from rich.console import Console
from typer.main import get_command
from typer.testing import CliRunner

from lrdeploy import cli_checks as cc
from lrdeploy.cli import app
from lrdeploy.cli_command import CHOICES
from lrdeploy.errors import UserError

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result) -> str:
    """The exit-2, one-stderr-line, no-traceback contract; returns that line."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# ----------------------------------------------------------------------- every option of every command
def _options_of(kind: type) -> list[tuple[str, str, list[str]]]:
    """(command, flag, minimal args) for every option typed ``kind`` (or ``kind | None``) in the app."""
    group = get_command(app)
    found = []
    for info in app.registered_commands:
        name = info.name or info.callback.__name__
        hints = typing.get_type_hints(inspect.unwrap(info.callback))
        command = group.commands[name]
        required: list[str] = []
        choices = CHOICES.get(name, {})
        for param in command.params:
            if param.required:  # a value that passes: a registered one where the option has choices
                value = choices[param.name].names()[0] if param.name in choices else "x"
                required += [value] if param.param_type_name == "argument" else [param.opts[0], value]
        for param in command.params:
            hint = hints.get(param.name)
            if param.param_type_name == "option" and hint in (kind, kind | None):
                found.append((name, param.opts[0], required))
    return found


FLOAT_OPTIONS = _options_of(float)
INT_OPTIONS = _options_of(int)


def test_the_sweep_sees_the_options_of_the_issue():
    floats = {(c, f) for c, f, _ in FLOAT_OPTIONS}
    assert {("compare", "--max-accuracy-drop"), ("compare", "--min-agreement"), ("bench", "--warmup"),
            ("bench", "--max-seconds"), ("export", "--rank-budget"), ("compress", "--energy"),
            ("train", "--lr")} <= floats
    assert {("init", "--num-classes"), ("train", "--batch-size"), ("compare", "--golden-samples")} <= {
        (c, f) for c, f, _ in INT_OPTIONS}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("command, flag, required", FLOAT_OPTIONS, ids=[c + f for c, f, _ in FLOAT_OPTIONS])
def test_every_float_option_refuses_non_finite_values(command, flag, required, value):
    line = one_error_line(invoke(command, *required, flag, value))
    assert flag in line and "not a finite number" in line


@pytest.mark.parametrize("command, flag, required", INT_OPTIONS, ids=[c + f for c, f, _ in INT_OPTIONS])
def test_every_int_option_refuses_65_bit_values(command, flag, required):
    line = one_error_line(invoke(command, *required, flag, "99999999999999999999"))
    assert flag in line and "64 bits" in line


# -------------------------------------------------------------------------------------------- usage
@pytest.mark.parametrize("args, needles", [
    (("train", "--epochs", "0"), ("'--epochs'", "got 0", "see `lrdeploy train --help`")),
    (("train", "--epochs", "many"), ("'--epochs'", "got many", "valid integer")),
    (("train", "--bogus"), ("No such option: --bogus", "see `lrdeploy train --help`")),
    (("init", "--model", "lenet5"), ("Missing option '--out'", "see `lrdeploy init --help`")),
    (("bench",), ("Missing argument", "see `lrdeploy bench --help`")),
    (("trian",), ("No such command 'trian'", "'train'", "see `lrdeploy --help`")),
    (("compare", "a", "b", "--min-agreement", "-1"), ("got -1", "greater than or equal to 0")),
    (("compare", "a", "b", "--max-accuracy-drop", "nan"), ("'--max-accuracy-drop': nan is not a finite",)),
])
def test_usage_errors_are_one_line(args, needles):
    line = one_error_line(invoke(*args))
    for needle in needles:
        assert needle in line, line


def test_help_is_untouched():
    for args in (("--help",), ("train", "--help"), ("bench", "--help")):
        r = invoke(*args)
        assert r.exit_code == 0 and "Usage" in r.output and "error" not in r.stderr
    assert "--download" in invoke("compare", "--help").output
    r = invoke()  # bare `lrdeploy`: the help, as before (Click exits 2 for it)
    assert r.exit_code == 2 and "Commands" in r.output and "error:" not in r.output


# ---------------------------------------------------------------------------------------- validators
@settings(max_examples=50, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_check_finite_accepts_exactly_the_finite_values_in_range(x):
    ok = math.isfinite(x) and 0.0 <= x <= 1.0
    if ok:
        assert cc.check_finite("--f", x, minimum=0.0, maximum=1.0) == x
    else:
        with pytest.raises(UserError, match="--f"):
            cc.check_finite("--f", x, minimum=0.0, maximum=1.0)


def test_check_finite_bounds_and_none():
    assert cc.check_finite("--lr", None, minimum=0.0, strict=True) is None
    with pytest.raises(UserError, match=r"--lr 0 must be > 0 — e\.g\. --lr 0\.05"):
        cc.check_finite("--lr", 0.0, minimum=0.0, strict=True, example="0.05")
    assert cc.check_finite("--wd", 0.0, minimum=0.0) == 0.0


def test_check_int64_boundaries():
    assert cc.check_int64(2**63 - 1, "--n") == 2**63 - 1 and cc.check_int64(-(2**63), "--n") == -(2**63)
    for bad in (2**63, -(2**63) - 1):
        with pytest.raises(UserError, match="64 bits"):
            cc.check_int64(bad, "--n")


def test_data_dir_says_what_the_path_is(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "file").write_text("x")
    assert cc.check_data_dir(tmp_path / "link") == tmp_path / "link"  # a symlink to a folder is followed
    assert cc.check_data_dir(tmp_path / "missing") == tmp_path / "missing"  # the loader / --download decide
    with pytest.raises(UserError, match="is a file, not a directory"):
        cc.check_data_dir(tmp_path / "file")
    with pytest.raises(UserError, match="broken symbolic link"):
        cc.check_data_dir(tmp_path / "dangling")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "multi30k"])
def test_loaders_do_not_call_a_file_missing(tmp_path, name):
    from lrdeploy.data import load_dataset, load_translation

    (tmp_path / "file").write_text("x")
    load = load_translation if name == "multi30k" else load_dataset
    with pytest.raises(UserError) as err:
        load(name, "test", data_dir=tmp_path / "file")
    assert "(a file, not a directory)" in err.value.message and "does not exist" not in err.value.message
    assert "--download" in err.value.hint


# ---------------------------------------------------------------------------------------------- memory
def test_available_memory_reads_meminfo():
    assert cc._meminfo_available("MemTotal: 100 kB\nMemAvailable:    2048 kB\n") == 2048 * 1024
    assert cc._meminfo_available("MemTotal: 100 kB\n") is None
    available = cc.available_memory()
    assert available is None or available > 0


def test_batch_estimate_is_exact_at_the_boundary():
    need = 7 * 1 * 28 * 28 * 4
    cc.check_batch_fits([1, 28, 28], [1, 7], available=need)
    with pytest.raises(UserError) as err:
        cc.check_batch_fits([1, 28, 28], [1, 7], available=need - 1)
    assert "--batch" in err.value.message and "7 samples of 1×28×28" in err.value.message
    assert "21.4 KiB" in err.value.message  # the estimate and the limit are both named
    cc.check_batch_fits(None, [10**30])  # unknown shape: not checked (the command's loader reports it)


@pytest.mark.parametrize("name, args", [("lenet5", {"num_classes": 1000}), ("resnet18", {"width": 8}),
                                        ("transformer", {"d_model": 64, "dim_feedforward": 128})])
def test_model_bytes_equal_the_real_model(name, args):
    from lrdeploy.models import create_model

    model = create_model(name, **args)
    real = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert cc.model_bytes(name, args) == real


def test_model_fits_refuses_and_ignores_foreign_arguments():
    with pytest.raises(UserError, match=r"--num-classes: the weights alone of model 'lenet5'.*TiB"):
        cc.check_model_fits("lenet5", {"num_classes": 10**10}, "--num-classes")
    with pytest.raises(UserError, match="too large to build"):
        cc.check_model_fits("lenet5", {"num_classes": 2**62}, "--num-classes")
    # the transformer has no num_classes: estimated at its defaults, init_bundle explains the refusal
    assert cc.model_bytes("transformer", {"num_classes": 3}) == cc.model_bytes("transformer", {})


def test_sample_shape_of_bundle_onnx_and_unknown(tmp_path):
    from lrdeploy.bundle import save_bundle
    from lrdeploy.models import create_model

    bundle = save_bundle(tmp_path / "b", create_model("lenet5"), model_name="lenet5",
                         model_args={"num_classes": 10}, method={"name": "dense"}, dataset={}, metrics={})
    assert cc.sample_shape_of(bundle) == ([1, 28, 28], 4)

    def graph(dims: list) -> Path:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, dims)
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, dims)
        path = tmp_path / f"g{len(list(tmp_path.iterdir()))}.onnx"
        onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                                      [x], [y])), path)
        return path

    assert cc.sample_shape_of(graph(["N", 3, 8])) == ([3, 8], 2)
    assert cc.sample_shape_of(graph(["N", "T", 8])) is None  # dynamic per-sample axis
    assert cc.sample_shape_of(tmp_path / "missing.onnx") is None


def test_compare_and_export_refuse_a_batch_larger_than_memory_before_work(tmp_path):
    from lrdeploy.bundle import save_bundle
    from lrdeploy.models import create_model

    bundle = save_bundle(tmp_path / "b", create_model("lenet5"), model_name="lenet5",
                         model_args={"num_classes": 10}, method={"name": "dense"}, dataset={}, metrics={})
    line = one_error_line(invoke("compare", bundle, bundle, "--batch", "1,100000000000"))
    assert "--batch: an input batch of 100000000000 samples of 1×28×28" in line and "memory available" in line
    line = one_error_line(invoke("export", bundle, "--out", tmp_path / "m.onnx", "--fold-batch", 10**11))
    assert "--fold-batch" in line and "memory available" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_bench_max_seconds_below_seconds(tmp_path):
    from lrdeploy.bench_cmd import run_bench

    with pytest.raises(UserError, match="--max-seconds 0.5 is below --seconds 1"):
        run_bench([tmp_path / "m.onnx"], seconds=1.0, max_seconds=0.5)
    with pytest.raises(UserError, match="--warmup inf is not a finite number"):  # programmatic callers too
        run_bench([tmp_path / "m.onnx"], warmup=math.inf)


def test_trt_batch_range_defaults_and_order():
    from lrdeploy.exporters.tensorrt import batch_range

    assert batch_range() == (1, 32, 32) and batch_range(1, 8) == (1, 8, 32)
    assert batch_range(64) == (64, 64, 64)
    with pytest.raises(UserError, match=r"min \(8\) <= opt \(4\) <= max \(4\)"):
        batch_range(8, None, 4)


# ------------------------------------------------------------------------------------------- messages
def test_negative_flops_are_never_shown():
    from lrdeploy.serving.report import render_compare_table

    report = {"reference": {"name": "dense", "flops": -845000, "params": 10},
              "candidate": {"name": "lr", "flops": 120000, "params": 5}}
    console = Console(width=200, record=True)
    console.print(render_compare_table(report))
    row = next(ln for ln in console.export_text().splitlines() if "FLOPs" in ln)
    assert "-845" not in row and "—" in row and "120.00 kFLOP" in row
    assert "×" not in row  # no ratio against a negative count


def test_init_without_num_classes_for_a_model_without_classes(tmp_path):
    r = invoke("init", "--model", "transformer", "--out", tmp_path / "t")
    assert r.exit_code == 0, r.output
    from lrdeploy.bundle import load_bundle

    assert load_bundle(tmp_path / "t").manifest["model"]["args"] == {}
    r = invoke("init", "--model", "transformer", "--num-classes", 5, "--out", tmp_path / "u")
    line = one_error_line(r)
    assert "translation model" in line and not (tmp_path / "u").exists()


def test_download_flag_fetches_only_when_given(data_dir, tmp_path, monkeypatch):
    """train reads MNIST from an empty --data-dir: refused with a hint naming --download; with --download the
    files come (checksum-verified) from a file:// mirror — the network is never used."""
    from lrdeploy.data import DATASETS
    from lrdeploy.download_scope import _DOWNLOADS

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for f in DATASETS["mnist"].all_files():
        shutil.copyfile(data_dir / "mnist" / f.filename, mirror / f.filename)
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], mirrors=(mirror.as_uri(),)))
    data = tmp_path / "data"
    args = ("train", "--data-dir", data, "--limit-train", "64", "--limit-test", "32", "--epochs", "1",
            "--batch-size", "32", "--out", tmp_path / "b")
    line = one_error_line(invoke(*args))
    assert "files not found" in line and "add --download" in line and not data.exists()
    r = invoke(*args, "--download")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (data / "mnist").iterdir()) == sorted(p.name for p in mirror.iterdir())
    assert _DOWNLOADS.get() is False  # the permission ended with the command
