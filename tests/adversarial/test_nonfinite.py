"""A broken model never passes (issue 9): NaN weights, a diverging run, checkpoints that cannot be weights and
an opset the exporter cannot write are each refused by the real CLI in one line, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import Snapshot, assert_refused, lrdeploy

TINY_TRAIN = ("--limit-train", "256", "--limit-test", "64", "--epochs", "1")


@pytest.fixture(scope="module")
def nan_bundle(tmp_path_factory) -> Path:
    """A LeNet-5 bundle whose parameters are all NaN (what a diverged run used to save), built in-process."""
    from lrdeploy.bundle import save_bundle
    from lrdeploy.models import create_model

    model = create_model("lenet5")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    out = tmp_path_factory.mktemp("nan") / "nan-bundle"
    return save_bundle(out, model, model_name="lenet5", model_args={"num_classes": 10},
                       method={"name": "dense"}, dataset={}, metrics={})


def _empty_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_export_of_a_nan_bundle_fails_and_writes_no_onnx(nan_bundle, tmp_path):
    out_dir = _empty_dir(tmp_path / "out")
    before = Snapshot([nan_bundle])
    proc = lrdeploy("export", nan_bundle, "--out", out_dir / "m.onnx", "--fold", "factored",
                    "--optimize", "none")
    assert_refused(proc, "PyTorch outputs contain", "NaN values")
    assert list(out_dir.iterdir()) == []  # no .onnx, no fold report, no staging debris
    before.assert_unchanged()


@pytest.mark.parametrize("lr, needles", [
    ("inf", ("--lr", "finite")),  # refused before any work
    ("1e12", ("loss became", "epoch 1 step", "lower --lr")),  # finite but diverges: the loop stops it
])
def test_train_with_a_runaway_learning_rate_exits_2_and_writes_no_bundle(data_dir, tmp_path, lr, needles):
    out = tmp_path / "bundle"
    proc = lrdeploy("train", "--lr", lr, "--batch-size", "32", *TINY_TRAIN, "--data-dir", data_dir,
                    "--out", out)
    assert_refused(proc, *needles)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _checkpoint(kind: str, folder: Path) -> Path:
    from lrdeploy.models import create_model

    if kind == "directory":
        return _empty_dir(folder / "ckpt.pt")
    state = create_model("lenet5").state_dict()
    w = state["conv2.weight"]
    state["conv2.weight"] = {"nan": lambda: w.clone().fill_(float("nan")), "sparse": w.to_sparse,
                             "complex": lambda: w.to(torch.complex64)}[kind]()
    path = folder / f"{kind}.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("kind, needles", [
    ("nan", ("'conv2.weight'", "2400 NaN values")),
    ("sparse", ("'conv2.weight'", "sparse tensor")),
    ("complex", ("'conv2.weight'", "complex (complex64)")),
    ("directory", ("is a directory",)),
])
def test_init_refuses_checkpoints_that_cannot_be_weights(tmp_path, kind, needles):
    ckpt = _checkpoint(kind, _empty_dir(tmp_path / "in"))
    before = Snapshot([ckpt])
    out = tmp_path / "bundle"
    proc = lrdeploy("init", "--model", "lenet5", "--from-checkpoint", ckpt, "--out", out)
    assert_refused(proc, *needles)
    assert not out.exists()
    before.assert_unchanged()


def test_export_with_an_unsupported_opset_is_refused_before_any_work(lenet_bundle, tmp_path):
    out_dir = _empty_dir(tmp_path / "out")
    before = Snapshot([lenet_bundle])
    proc = lrdeploy("export", lenet_bundle, "--out", out_dir / "m.onnx", "--opset", "99")
    assert_refused(proc, "--opset 99", "opsets 13-")  # the error names the range the installed tools write
    assert "onnxscript" not in proc.stderr + proc.stdout and list(out_dir.iterdir()) == []
    before.assert_unchanged()
