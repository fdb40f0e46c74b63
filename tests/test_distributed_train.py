"""Training under real torchrun with two CPU processes (gloo): DDP, agreed decisions, resume after a kill."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KILLER = Path(__file__).with_name("train_killer.py")
ARGS = ["--model", "orthogonal_mlp:mlp", "--data", "mnist", "--epochs", "3", "--limit-train", "1536",
        "--limit-test", "200", "--lr", "0.1", "--method", "cuttlefish", "--method-opt", "window=1",
        "--method-opt", "fixed_k=0"]


def _torchrun(*args: object, cwd: Path, env: dict[str, str], module: bool = True
              ) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    target = ["-m", "lrdeploy"] if module else []
    return subprocess.run([*launcher, *target, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def env(data_dir):
    return {**os.environ, "LRDEPLOY_DATA": str(data_dir), "COLUMNS": "200", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, env):
    root = tmp_path_factory.mktemp("ddp")
    proc = _torchrun("train", *ARGS, "--out", "run", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", proc


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_two_processes_train_one_bundle_with_identical_replicas(two_process_run):
    bundle, proc = two_process_run
    manifest = _manifest(bundle)
    metrics = manifest["metrics"]
    assert metrics["train_processes"] == 2
    assert proc.stdout.count("bundle written to") == 1, "rank 0 alone reports and writes"
    # Cuttlefish switched after epoch 2: the swap was agreed, DDP rebuilt, and both ranks hold the same bits
    assert manifest["method"]["log"]["switch_epoch"] == 2
    after_switch = metrics["history"][1]["replica_digests"]
    assert len(after_switch) == 2 and after_switch[0] == after_switch[1]
    final = metrics["train_replica_digests"]
    assert len(final) == 2 and final[0] == final[1]
    assert len(manifest["structure"]) == 3, "the factorised model family a single process trains"
    assert metrics["test_accuracy"] > 0.5


@pytest.mark.slow  # resume is bitwise-tested in one process (test_resume); this adds the torchrun case
def test_two_processes_resume_after_sigkill_to_the_same_weights(tmp_path, env, two_process_run):
    """Every rank SIGKILLed mid-epoch 3 (a machine lost); torchrun --resume gives the uninterrupted bits."""
    # 1536 images, global batch 128: 12 steps per epoch; 30 steps = mid epoch 3
    killed = _torchrun(str(KILLER), "steps=30", "train", *ARGS, "--out", "run", cwd=tmp_path, env=env,
                       module=False)
    assert killed.returncode != 0
    assert not (tmp_path / "run").exists()
    state = json.loads((tmp_path / "run.checkpoint" / "checkpoint.json").read_text())["state"]
    assert state["epoch"] == 2 and state["world_size"] == 2
    resumed = _torchrun("train", *ARGS, "--out", "run", "--resume", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    digest = [hashlib.sha256((b / "weights.safetensors").read_bytes()).hexdigest()
              for b in (tmp_path / "run", two_process_run[0])]
    assert digest[0] == digest[1]
