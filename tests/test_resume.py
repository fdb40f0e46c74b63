"""Resumable training: a run SIGKILLed mid-epoch, or while writing a checkpoint, resumes to the same bits.

The kills are injected (``tests/train_killer.py``), not timed: after N optimiser steps, or at a named step of
the atomic checkpoint write. Every comparison is against an uninterrupted run with the same seed, on the CPU
in one process, where training is bitwise reproducible.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrdeploy import checkpoint
from lrdeploy.errors import UserError
from lrdeploy.methods import get_method
from lrdeploy.models import create_model
from lrdeploy.train import TrainConfig, train

from .adversarial.conftest import assert_refused, lrdeploy

KILLER = Path(__file__).with_name("train_killer.py")
# A user's MLP (tests/orthogonal_mlp.py); 1,500 images at batch 128: 12 steps per epoch; Cuttlefish
# switches after epoch 2 (window 1) and factorises three layers; K fixed, so no timing enters the run
CUTTLEFISH = ["--model", "orthogonal_mlp:mlp", "--data", "mnist", "--epochs", "3", "--limit-train", "1500",
              "--limit-test", "200", "--lr", "0.1", "--method", "cuttlefish", "--method-opt", "window=1",
              "--method-opt", "fixed_k=0"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _killed(how: str, *args: object, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(KILLER), how, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def env(data_dir):
    import os

    return {**os.environ, "LRDEPLOY_DATA": str(data_dir), "COLUMNS": "200",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    root = tmp_path_factory.mktemp("full")
    proc = lrdeploy("train", *CUTTLEFISH, "--out", root / "run", cwd=root, env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (root / "run.checkpoint").exists(), "a finished run keeps no checkpoint"
    return root / "run"


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, env, uninterrupted):
    _killed("steps=30", "train", *CUTTLEFISH, "--out", "run", cwd=tmp_path, env=env)  # mid epoch 3 of 3
    assert not (tmp_path / "run").exists()
    ckpt = tmp_path / "run.checkpoint"
    weights, state = checkpoint.load_checkpoint(ckpt)
    assert state["epoch"] == 2 and state["step"] == 24  # both finished epochs survived the kill
    assert state["hooks"][0]["switched"], "the checkpoint holds the factorised model"

    proc = lrdeploy("train", *CUTTLEFISH, "--out", "run", "--resume", cwd=tmp_path, env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed after epoch 2/3" in proc.stderr
    assert _sha(tmp_path / "run" / "weights.safetensors") == _sha(uninterrupted / "weights.safetensors")
    resumed, full = _manifest(tmp_path / "run"), _manifest(uninterrupted)
    assert resumed["metrics"]["train_resumed_after_epoch"] == 2
    assert [h["train_loss"] for h in resumed["metrics"]["history"]] == \
        [h["train_loss"] for h in full["metrics"]["history"]]
    assert resumed["method"]["log"]["switch_epoch"] == full["method"]["log"]["switch_epoch"] == 2
    assert resumed["structure"] == full["structure"] and len(full["structure"]) == 3
    assert not ckpt.exists(), "the checkpoint is removed once the bundle is written"


@pytest.mark.parametrize("point", ["staged", pytest.param("aside:run.checkpoint", marks=pytest.mark.slow)])
def test_killed_while_writing_a_checkpoint_resumes_to_the_same_weights(tmp_path, env, uninterrupted, point):
    """Killed while the second checkpoint is being installed: before its journal (the first checkpoint
    stays) or after (the old one set aside, the new one not in place yet: the next reader finishes it)."""
    k = 2 if point == "staged" else 1  # "staged": the first checkpoint's commit is number 1
    _killed(f"write={point}:{k}", "train", *CUTTLEFISH, "--out", "run", cwd=tmp_path, env=env)
    _, state = checkpoint.load_checkpoint(tmp_path / "run.checkpoint")
    assert state["epoch"] == (1 if point == "staged" else 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "debris of the killed write left"
    proc = lrdeploy("train", *CUTTLEFISH, "--out", "run", "--resume", cwd=tmp_path, env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _sha(tmp_path / "run" / "weights.safetensors") == _sha(uninterrupted / "weights.safetensors")


def test_a_checkpoint_is_never_silently_overwritten_or_resumed_with_other_settings(tmp_path, env):
    _killed("steps=14", "train", *CUTTLEFISH, "--out", "run", cwd=tmp_path, env=env)
    ckpt = tmp_path / "run.checkpoint"
    before = _sha(ckpt / "weights.safetensors")
    assert_refused(lrdeploy("train", *CUTTLEFISH, "--out", "run", cwd=tmp_path, env_extra=env),
                   "checkpoint of an interrupted run", "--resume")
    changed = [a if a != "1500" else "1400" for a in CUTTLEFISH]
    assert_refused(lrdeploy("train", *changed, "--out", "run", "--resume", cwd=tmp_path, env_extra=env),
                   "limit_train=1500")
    other = [a if a != "fixed_k=0" else "fixed_k=1" for a in CUTTLEFISH]
    assert_refused(lrdeploy("train", *other, "--out", "run", "--resume", cwd=tmp_path, env_extra=env),
                   "method_settings")
    assert _sha(ckpt / "weights.safetensors") == before
    assert_refused(lrdeploy("train", *CUTTLEFISH, "--out", "other", "--resume", cwd=tmp_path, env_extra=env),
                   "no training checkpoint at other.checkpoint")


class _Stop(Exception):
    pass


class _StopAt:
    """A hook that ends the run (like a kill, but in-process) when epoch ``at`` is about to start."""

    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == self.at:
            raise _Stop

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, model) -> None:
        pass


def test_maestro_resumes_bitwise_in_process(mnist_small, tmp_path):
    """Maestro's state (sampler RNG and position, shrinking bookkeeping, Maestro layers at their ranks)
    survives a checkpoint: a run stopped after epoch 1 and resumed equals one that never stopped."""
    train_set, test_set = mnist_small

    def run(stop_at: int | None = None, resume: bool = False):
        torch.manual_seed(0)
        model = create_model("lenet5", num_classes=10)
        hook = get_method("maestro", lambda_gl=1e-3, threshold=1e-2)
        if not resume:
            hook.prepare(model)
        config = TrainConfig(epochs=3, batch_size=64, lr=0.02, progress=False, seed=1,
                             checkpoint_dir=str(tmp_path / ("ckpt" if stop_at or resume else "full")),
                             resume=resume)
        return train(model, train_set, test_set, config, hooks=[hook, _StopAt(stop_at)]), hook

    (full, full_hook) = run()
    with pytest.raises(_Stop):
        run(stop_at=1)
    resumed, resumed_hook = run(resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full_hook.ranks() == resumed_hook.ranks()
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in resumed.history]
    assert resumed.resumed_after_epoch == 1


def test_resume_of_a_run_without_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no training checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "nothing")


@pytest.fixture(scope="module")
def mnist_small(data_dir):
    from lrdeploy.data import load_dataset

    train_set = load_dataset("mnist", "train", data_dir=data_dir, limit=640)
    test_set = load_dataset("mnist", "test", data_dir=data_dir, limit=200)
    return train_set, test_set
