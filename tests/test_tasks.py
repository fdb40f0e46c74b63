"""The task registry and the task-driven trainer: one loop, task defaults, bundles that record their task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrdeploy.errors import UserError
from lrdeploy.models import create_model
from lrdeploy.tasks import get_task, list_tasks, manifest_task, torch_predict
from lrdeploy.train import TrainConfig, evaluate, lr_at, train


def test_registry_knows_the_built_in_tasks_and_names_them_on_a_typo():
    assert {"classification", "translation"} <= set(list_tasks())
    with pytest.raises(UserError, match="unknown task 'clasification'.*did you mean 'classification'"):
        get_task("clasification")


def test_old_manifests_get_their_task_from_what_they_recorded():
    """Bundles written before tasks existed: translation bundles kept tokenizers, others are classifiers."""
    assert manifest_task({"model": {"name": "lenet5"}}).name == "classification"
    assert manifest_task({"model": {"name": "transformer"}, "tokenizers": {"src": {}}}).name == "translation"
    assert manifest_task({"model": {"name": "x", "task": "translation"}}).name == "translation"
    with pytest.raises(UserError, match="unknown task"):
        manifest_task({"model": {"name": "x", "task": "segmentation"}})


def test_task_defaults_fill_only_what_the_user_left_unset():
    config = TrainConfig.for_task("translation", lr=None, epochs=1)
    assert config.optimizer == "adamw" and config.schedule == "inverse_sqrt" and config.epochs == 1
    assert TrainConfig.for_task("classification", lr=0.2).lr == 0.2


def test_warm_up_never_takes_more_than_a_quarter_of_a_short_run():
    config = TrainConfig(lr=1.0, warmup_steps=400, schedule="inverse_sqrt")
    assert lr_at(config, 0, 8) == pytest.approx(0.5)  # warm-up capped at 2 of 8 steps
    assert lr_at(config, 1, 8) == pytest.approx(1.0)
    assert lr_at(config, 99, 10_000) == pytest.approx(100 / 400)  # a long run warms up fully


@pytest.fixture(scope="module")
def mnist(data_dir):
    from lrdeploy.data import load_dataset

    return (load_dataset("mnist", "train", data_dir=data_dir, limit=512),
            load_dataset("mnist", "test", data_dir=data_dir, limit=300))


def test_classification_evaluates_any_predict_function_like_the_model(mnist):
    """The task's runtime-agnostic evaluation (named numpy feeds → named outputs) agrees with PyTorch."""
    _, test = mnist
    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    task = get_task("classification")
    metrics, rows = task.evaluate_with_rows(torch_predict(model, ("input",), ("output",)), test)
    assert metrics["accuracy"] == pytest.approx(evaluate(model, test))
    assert rows.shape == (len(test), 10)
    feeds = task.feeds(test, 7, offset=298)  # cycles past the end of the split
    assert feeds["input"].shape == (7, 1, 28, 28) and np.array_equal(feeds["input"][2], test.x[0].numpy())


def test_the_one_loop_trains_a_classifier_reproducibly(mnist):
    train_set, test = mnist
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("lenet5")
        config = TrainConfig.for_task("classification", epochs=1, batch_size=16, progress=False,
                                      num_threads=1)
        results.append(train(model, train_set, test, config, task="classification"))
    a, b = results
    assert a.metrics["accuracy"] == b.test_accuracy and a.metrics["accuracy"] > 0.25  # chance: 0.1
    assert a.history[0]["test_accuracy"] == a.test_accuracy and a.rate_unit == "img"
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_translation_parity_rows_are_the_teacher_forced_target_tokens(data_dir):
    """One logits row per scored target token: where the decoder input is a word or <bos>."""
    from lrdeploy.data.tokenizer import PAD_ID

    task = get_task("translation")
    data = task.load("multi30k", "test", data_dir=data_dir, limit=6, model_args={"max_len": 32})
    feeds = task.feeds(data, 6)
    logits = np.zeros((*feeds["tgt_in"].shape, 5), dtype=np.float32)
    rows = task.parity_rows({"logits": logits}, feeds)
    tgt_out = data.tgt_out.numpy()[:, : feeds["tgt_in"].shape[1]]
    assert rows.shape == (int((tgt_out != PAD_ID).sum()), 5)
