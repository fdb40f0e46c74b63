"""--device / --amp: resolved and checked before any work; training runs where it was asked to."""

from __future__ import annotations

import pytest
import torch

from lrdeploy.devices import resolve_amp, resolve_device
from lrdeploy.errors import UserError
from lrdeploy.models import create_model
from lrdeploy.train import TrainConfig, train

from .adversarial.conftest import assert_refused, lrdeploy

NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    want = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == want


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu"])
def test_a_device_that_is_not_one_is_refused(spec):
    with pytest.raises(UserError, match="not a device"):
        resolve_device(spec)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: the refusal is for machines without it")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_refused(spec):
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device(spec)


def test_amp_modes_are_checked_against_the_device():
    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu).dtype is None
    assert resolve_amp("bf16", cpu).dtype == torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", cpu)
    with pytest.raises(UserError, match="not a precision"):
        resolve_amp("fp8", cpu)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_the_cli_refuses_cuda_before_any_work(tmp_path):
    proc = lrdeploy("train", "--device", "cuda", "--data-dir", tmp_path / "absent", "--out", tmp_path / "b",
                    cwd=tmp_path)
    assert_refused(proc, "--device cuda", "no CUDA device")
    assert list(tmp_path.iterdir()) == []  # no bundle, no checkpoint, no data read (the data dir is absent)
    proc = lrdeploy("train", "--amp", "fp16", "--device", "cpu", "--out", tmp_path / "b", cwd=tmp_path)
    assert_refused(proc, "fp16 needs a CUDA device")


def test_bf16_autocast_trains_on_the_cpu(data_dir):
    """bf16 autocast is real on the CPU: the run learns as the fp32 one does, and records its precision."""
    from lrdeploy.data import load_dataset

    train_set = load_dataset("mnist", "train", data_dir=data_dir, limit=2048)
    test_set = load_dataset("mnist", "test", data_dir=data_dir, limit=200)
    results = {}
    for amp in ("off", "bf16"):
        torch.manual_seed(0)
        model = create_model("lenet5", num_classes=10)
        config = TrainConfig(epochs=2, batch_size=64, lr=0.05, progress=False, device="cpu", amp=amp)
        results[amp] = train(model, train_set, test_set, config)
    bf16, fp32 = results["bf16"], results["off"]
    assert bf16.amp == "bf16" and bf16.device == "cpu"
    assert bf16.metrics["accuracy"] > 0.6 and abs(bf16.metrics["accuracy"] - fp32.metrics["accuracy"]) < 0.1
    assert bf16.train_loss != fp32.train_loss, "autocast changed nothing: it did not run"
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters()), "autocast keeps fp32 weights"


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU (none here; the device tool lends one to some tasks)")
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_cuttlefish_trains_on_the_gpu(data_dir, amp):
    """The model, the data and Cuttlefish's SVDs and K timing run on CUDA; the result comes back usable."""
    from lrdeploy.data import load_dataset
    from lrdeploy.methods import get_method

    train_set = load_dataset("mnist", "train", data_dir=data_dir, limit=2048)
    test_set = load_dataset("mnist", "test", data_dir=data_dir, limit=500)
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10)
    hook = get_method("cuttlefish", window=1)
    config = TrainConfig(epochs=3, batch_size=128, lr=0.05, progress=False, device="cuda", amp=amp)
    result = train(model, train_set, test_set, config, hooks=[hook])
    assert result.device.startswith("cuda")
    assert next(result.model.parameters()).is_cuda
    assert hook.log["switched"] and hook.log["k_measurement"] is not None
    assert result.metrics["accuracy"] > 0.5


def test_replica_digest_covers_every_tensor_kind():
    """BatchNorm's 0-d long counter, integer buffers, float weights: all hashed; any change shows."""
    from lrdeploy.distributed import digest

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    before = digest(model)
    assert before == digest(model)
    model[1].num_batches_tracked += 1
    assert digest(model) != before
