"""The training loop on real MNIST: learning, reproducibility, hooks, evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lrdeploy.data import load_dataset
from lrdeploy.errors import UserError
from lrdeploy.models import create_model
from lrdeploy.train import TrainConfig, TrainResult, evaluate, lr_at, predict_logits, train

# One thread: on a shared 2-core box a second busy process makes 2-thread OpenMP kernels 10-50x slower.
FAST = {"batch_size": 16, "progress": False, "num_threads": 1}


@pytest.fixture(scope="module")
def mnist_small(data_dir):
    train_set = load_dataset("mnist", "train", data_dir=data_dir, limit=2000)
    test_set = load_dataset("mnist", "test", data_dir=data_dir, limit=1000)
    return train_set, test_set


def _fresh(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet5")


def _train_once(mnist_small, **overrides) -> TrainResult:
    train_set, test_set = mnist_small
    return train(_fresh(), train_set, test_set, TrainConfig(**{"epochs": 1, **FAST, **overrides}))


def test_config_validation():
    assert TrainConfig().to_dict()["schedule"] == "cosine"
    for bad in ({"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"momentum": 1.0}, {"limit_train": 0}):
        with pytest.raises(UserError, match=next(iter(bad))):
            TrainConfig(**bad)
    with pytest.raises(UserError, match="schedule"):
        TrainConfig(schedule="linear")
    # NaN passes no comparison, so "lr > 0" alone let it through; inf is > 0
    for bad in ({"lr": math.inf}, {"lr": math.nan}, {"weight_decay": math.inf}, {"weight_decay": math.nan}):
        with pytest.raises(UserError, match=f"{next(iter(bad))} must be .*finite"):
            TrainConfig(**bad)


def test_lr_schedules():
    cos = TrainConfig(lr=0.1)
    assert lr_at(cos, 0, 100) == pytest.approx(0.1)
    assert lr_at(cos, 50, 100) == pytest.approx(0.05)
    assert lr_at(cos, 99, 100) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    step = TrainConfig(lr=0.1, schedule="step")
    assert [lr_at(step, s, 100) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def test_short_training_learns_mnist(mnist_small):
    result = _train_once(mnist_small)
    assert result.test_accuracy is not None and result.test_accuracy > 0.6  # chance is 0.1
    assert result.epochs == 1 and len(result.history) == 1
    epoch = result.history[0]
    keys = {"epoch", "train_loss", "train_accuracy", "test_accuracy", "lr", "seconds", "samples_per_s"}
    assert set(epoch) == keys
    assert epoch["epoch"] == 0 and epoch["test_accuracy"] == result.test_accuracy
    assert result.train_loss == epoch["train_loss"] < math.log(10)
    assert result.samples_per_s > 0 and result.seconds > 0
    assert evaluate(result.model, mnist_small[1]) == result.test_accuracy
    json.dumps(result.to_dict())  # what reports and manifests store


def test_same_seed_gives_identical_weights_and_leaves_global_state_alone(mnist_small):
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    a = _train_once(mnist_small, limit_train=500).model.state_dict()
    torch.manual_seed(123)  # the caller's RNG state must not matter to train()
    b = _train_once(mnist_small, limit_train=500).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _train_once(mnist_small, limit_train=500, seed=1).model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.get_num_threads() == threads


def test_training_does_not_consume_the_callers_rng(mnist_small):
    torch.manual_seed(7)
    model = create_model("lenet5")
    before = torch.get_rng_state()
    train(model, mnist_small[0], None, TrainConfig(epochs=1, limit_train=64, **FAST))
    assert torch.equal(torch.get_rng_state(), before)


class Recorder:
    def __init__(self, replace_at: int | None = None):
        self.calls: list[tuple] = []
        self.replace_at = replace_at
        self.replacement: torch.nn.Module | None = None

    def on_train_start(self, model, optimizer):
        self.calls.append(("on_train_start", type(optimizer).__name__))

    def on_epoch_start(self, epoch):
        self.calls.append(("on_epoch_start", epoch))

    def after_backward(self, model):
        assert all(p.grad is not None for p in model.parameters())
        self.calls.append(("after_backward",))

    def after_step(self, model):
        self.calls.append(("after_step",))

    def on_epoch_end(self, epoch, model, metrics):
        self.calls.append(("on_epoch_end", epoch, round(metrics["train_loss"], 6)))
        if epoch == self.replace_at:
            self.replacement = create_model("lenet5")
            self.initial = {k: v.clone() for k, v in self.replacement.state_dict().items()}
            return self.replacement
        return None

    def on_model_replaced(self, model, optimizer):
        self.calls.append(("on_model_replaced", model is self.replacement))


class OnlyEpochStart:
    """Hooks need only the methods they use."""

    def __init__(self):
        self.epochs = []

    def on_epoch_start(self, epoch):
        self.epochs.append(epoch)


def test_hooks_are_called_in_order(mnist_small):
    train_set, test_set = mnist_small
    rec, partial = Recorder(), OnlyEpochStart()
    config = TrainConfig(epochs=2, batch_size=50, limit_train=200, progress=False, num_threads=1)
    result = train(_fresh(), train_set, test_set, config, hooks=[rec, partial])
    per_epoch = [("after_backward",), ("after_step",)] * 4  # 200 samples / 50
    losses = [round(m["train_loss"], 6) for m in result.history]
    assert rec.calls == [
        ("on_train_start", "SGD"),
        ("on_epoch_start", 0), *per_epoch, ("on_epoch_end", 0, losses[0]),
        ("on_epoch_start", 1), *per_epoch, ("on_epoch_end", 1, losses[1]),
    ]  # fmt: skip
    assert partial.epochs == [0, 1]


def test_a_hook_can_replace_the_model(mnist_small):
    train_set, test_set = mnist_small
    rec = Recorder(replace_at=0)
    original = _fresh()
    config = TrainConfig(epochs=2, batch_size=50, limit_train=200, progress=False, num_threads=1)
    result = train(original, train_set, test_set, config, hooks=[rec])
    assert result.model is rec.replacement is not original
    assert ("on_model_replaced", True) in rec.calls
    assert rec.calls.index(("on_model_replaced", True)) < rec.calls.index(("on_epoch_start", 1))
    trained = result.model.state_dict()
    assert not any(torch.equal(trained[k], rec.initial[k]) for k in trained)  # epoch 2 trained the new model
    assert result.test_accuracy == evaluate(result.model, test_set)

    last = Recorder(replace_at=1)  # replaced after the final epoch: the result reports the new model
    result = train(_fresh(), train_set, test_set, config, hooks=[last])
    assert result.model is last.replacement
    assert result.test_accuracy == evaluate(last.replacement, test_set)


def test_evaluate_and_predict_logits_restore_the_mode(mnist_small):
    _, test_set = mnist_small
    model = _fresh().train()
    logits = predict_logits(model, test_set, batch_size=300)
    assert logits.shape == (1000, 10) and model.training
    acc = evaluate(model, test_set, batch_size=300)
    assert acc == pytest.approx(int((logits.argmax(1) == test_set.y).sum()) / 1000)
    assert predict_logits(model, test_set.x[:5]).shape == (5, 10)


def test_progress_bar_runs(mnist_small, capsys):
    train_set, _ = mnist_small
    config = TrainConfig(epochs=1, batch_size=50, limit_train=200, progress=True, num_threads=1)
    train(_fresh(), train_set, None, config)
    assert "epoch 1/1" in capsys.readouterr().err


# --- a diverging run stops before anything is written (issue 9) --------------------------------------------


class _PoisonAt:
    """Hook: the plain cross-entropy step, except that the loss of global step ``at`` (1-based) is NaN/inf."""

    def __init__(self, at: int, value: float = math.nan) -> None:
        self.at, self.value, self.calls = at, value, 0

    def training_loss(self, model, xb, yb):
        self.calls += 1
        logits = model(xb)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        return (loss * self.value if self.calls == self.at else loss), logits


@pytest.mark.parametrize("at, value, where", [
    (3, math.nan, "NaN at epoch 1 step 3"),
    (12, math.inf, "infinite at epoch 1 step 12"),  # after the first check (step 10): still named exactly
    (23, math.nan, "NaN at epoch 2 step 3"),  # 20 steps per epoch
])
def test_a_nonfinite_loss_stops_training_naming_epoch_and_step(mnist_small, at, value, where):
    train_set, _ = mnist_small
    hook = _PoisonAt(at, value)
    config = TrainConfig(epochs=2, limit_train=320, **FAST)
    with pytest.raises(UserError, match=f"loss became {where} .*no bundle was written — lower --lr"):
        train(_fresh(), train_set, None, config, hooks=[hook])
    assert hook.calls < at + 10  # stopped at the next check, not at the end of training


def test_a_too_high_learning_rate_diverges_into_the_one_line_error(mnist_small):
    train_set, _ = mnist_small
    with pytest.raises(UserError, match=r"training stopped: the loss became (NaN|infinite) at epoch 1 step"):
        train(_fresh(), train_set, None, TrainConfig(epochs=1, limit_train=320, lr=1e12, **FAST))


def test_the_translation_loop_stops_on_a_nonfinite_loss(data_dir):
    from lrdeploy.data.multi30k import build_tokenizers, load_translation
    from lrdeploy.seq2seq import TranslationConfig

    tokenizers = build_tokenizers(data_dir=data_dir)
    data = load_translation("multi30k", "train", data_dir, limit=64, tokenizers=tokenizers)
    torch.manual_seed(0)
    model = create_model("transformer", src_vocab=len(tokenizers[0]), tgt_vocab=len(tokenizers[1]),
                         d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64)

    class Poison:
        calls = 0

        def training_loss(self, model, xb, yb):
            from lrdeploy.seq2seq import translation_loss

            Poison.calls += 1
            logits = model(*xb)
            loss = translation_loss(logits, yb)
            return (loss * math.nan if Poison.calls == 2 else loss), logits

    config = TranslationConfig(epochs=1, batch_size=16, progress=False, num_threads=1)
    with pytest.raises(UserError, match="loss became NaN at epoch 1 step 2"):
        train(model, data, None, config, hooks=[Poison()], task="translation")
