"""Image classification: one float input ``input`` (N×C×H×W), logits ``output`` (N×classes), top-1
accuracy."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.tasks import register_task
from lrdeploy.tasks.base import Batch, Feeds, Metric, Predict, Task, batched


@register_task
class ClassificationTask(Task):
    name = "classification"
    description = "image classification: top-1 accuracy, logits parity"
    headline = Metric("accuracy", "accuracy")
    datasets = ("mnist", "fashion-mnist", "cifar10")
    default_dataset = "mnist"
    train_defaults = {"lr": 0.05, "weight_decay": 5e-4, "schedule": "cosine", "optimizer": "sgd"}
    finetune_defaults = {"lr": 0.01}
    rate_unit = "img"

    def accepts_dataset(self, name: str) -> bool:
        """The built-in datasets, and the user's own (an .npz file or image folder named by its path)."""
        from lrdeploy.data.user_data import is_user_data

        return super().accepts_dataset(name) or is_user_data(name)

    def load(self, dataset: str, split: str, *, data_dir: Path | None = None, limit: int | None = None,
             manifest: Mapping[str, Any] | None = None,
             model_args: Mapping[str, Any] | None = None) -> Any:
        from lrdeploy.data import load_dataset
        from lrdeploy.data.user_data import is_user_data, load_user_data

        if not super().accepts_dataset(dataset) and is_user_data(dataset):
            return load_user_data(dataset, split, limit, recorded=(manifest or {}).get("dataset"))
        return load_dataset(dataset, split, data_dir=data_dir, limit=limit)

    def dataset_record(self, data: Any, examples: int | None = None) -> dict[str, Any]:
        """The base record, plus the checksum and format of a user's own data (see data/user_data.py)."""
        record = super().dataset_record(data, examples)
        info = getattr(data, "info", None) or {}
        record.update({k: info[k] for k in ("sha256", "format") if k in info})
        return record

    def model_args(self, spec: Any, train_data: Any, user_args: Mapping[str, Any]) -> dict[str, Any]:
        args: dict[str, Any] = {}
        accepted = getattr(spec, "default_args", {}) or {}
        if "num_classes" in accepted:
            args["num_classes"] = len(train_data.classes)
        if "in_channels" in accepted:
            args["in_channels"] = int(train_data.x.shape[1])
        args.update(user_args)
        return args

    def train_batches(self, data: Any, batch_size: int, generator: torch.Generator,
                      limit: int | None = None, augment: Any = None) -> Iterator[Batch]:
        x, y = data.x, data.y
        n = len(y) if limit is None else min(limit, len(y))
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb = x[idx]
            if augment is not None:
                xb = augment(xb, generator)
            yield (xb,), y[idx]

    def raw_inputs(self, data: Any) -> Any:
        return data.x

    def loss(self, outputs: Any, target: Any, config: Any) -> torch.Tensor:
        smoothing = float(getattr(config, "label_smoothing", 0.0))
        return F.cross_entropy(outputs, target, label_smoothing=smoothing)

    def step_stats(self, outputs: Any, target: Any) -> tuple[int, torch.Tensor]:
        return int(target.shape[0]), (outputs.detach().argmax(1) == target).sum()

    def evaluate_model(self, model: nn.Module, data: Any, *, final: bool = True,
                       batch_size: int = 1000) -> dict[str, float | None]:
        from lrdeploy.train import evaluate

        return {"accuracy": evaluate(model, data, batch_size)}

    def evaluate(self, predict: Predict, data: Any, *, final: bool = True,
                 batch_size: int = 256) -> dict[str, float | None]:
        metrics, _ = self.evaluate_with_rows(predict, data, batch_size=batch_size, parity_examples=len(data))
        return metrics

    def evaluate_with_rows(self, predict: Predict, data: Any, *, final: bool = True, batch_size: int = 256,
                           parity_examples: int | None = None) -> tuple[dict[str, float | None], np.ndarray]:
        """Accuracy over the whole split; parity rows are every example's logits (one pass)."""
        if len(data) == 0:
            raise UserError("cannot evaluate on an empty dataset")
        feeds = self.feeds(data, len(data))
        logits = np.asarray(next(iter(batched(predict, feeds, batch_size).values())))
        labels = data.y.numpy()
        accuracy = float((logits.argmax(1) == labels).mean())
        return {"accuracy": accuracy}, logits

    def feeds(self, data: Any, n: int, *, offset: int = 0) -> Feeds:
        x = data.x.numpy()
        idx = (np.arange(n) + offset) % len(x)
        return {"input": np.ascontiguousarray(x[idx]) if n != len(x) or offset else x}

    def labels(self, data: Any, n: int) -> np.ndarray | None:
        y = data.y.numpy()
        return y[np.arange(n) % len(y)]
