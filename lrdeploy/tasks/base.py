"""The ``Task`` protocol: everything that differs between classification, translation and embedding.

The trainer, ``compare``, ``bench``, precision judging and golden sets never branch on the kind of model;
they ask its task. A task knows

- which datasets it reads and how to load a split (``load``), and what the model's constructor needs from
  the data (``model_args``);
- how to cut a split into training batches (``train_batches``), the loss of one batch (``loss``) and the
  running statistic shown while training (``step_stats``);
- how to evaluate a *predict function* on a split (``evaluate``): ``predict(feeds) -> outputs`` maps named
  numpy inputs to named numpy outputs, so the same code judges the PyTorch model (:func:`torch_predict`) and
  any runtime (ONNX Runtime, TensorRT) of the exported graph;
- real inputs for calibration, latency and golden sets (``feeds``), which output rows parity compares
  (``parity_rows``), its budgets (``budget_checks``), and how reports name its metrics (``metrics``).

A new task is one file that subclasses :class:`Task` and calls :func:`lrdeploy.tasks.register_task`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

Feeds = dict[str, np.ndarray]
Predict = Callable[[Feeds], Mapping[str, np.ndarray]]
Batch = tuple[tuple[torch.Tensor, ...], Any]  # (model inputs in forward order, target)


@dataclass(frozen=True)
class Metric:
    """How reports and budgets treat one task metric."""

    key: str  # key in the task's metrics dict, e.g. "accuracy", "bleu", "cosine_mean"
    label: str  # what a person reads, e.g. "accuracy", "BLEU"
    higher_is_better: bool = True
    points: float = 100.0  # multiplier from a difference to "points" (100 for fractions, 1 for BLEU)
    percent: bool = True  # shown as a percentage


@dataclass
class BudgetSettings:
    """The user's budgets for ``compare``; ``None`` means the task's default."""

    max_drop: float | None = None  # headline metric, in points
    min_agreement: float | None = None  # top-1 / neighbour agreement
    max_perplexity_increase: float | None = None  # translation, relative


class Task:
    """Base class of a task; subclasses override what differs (see the module docstring)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    headline: ClassVar[Metric] = Metric("accuracy", "accuracy")
    datasets: ClassVar[tuple[str, ...]] = ()  # built-in datasets this task reads
    default_dataset: ClassVar[str | None] = None
    train_defaults: ClassVar[dict[str, Any]] = {}  # TrainConfig fields this task sets differently
    finetune_defaults: ClassVar[dict[str, Any]] = {}  # ... and for fine-tuning a compressed model
    rate_unit: ClassVar[str] = "samples"  # what the training progress counts (img, tok, sentences)
    hits_label: ClassVar[str] = "acc"  # what the share of ``step_stats`` hits is called in progress lines
    default_max_drop: ClassVar[float] = 1.0

    # --- data ------------------------------------------------------------------------------------------
    def accepts_dataset(self, name: str) -> bool:
        return _norm(name) in {_norm(d) for d in self.datasets}

    def load(self, dataset: str, split: str, *, data_dir: Path | None = None, limit: int | None = None,
             manifest: Mapping[str, Any] | None = None,
             model_args: Mapping[str, Any] | None = None) -> Any:
        """One split of ``dataset``, prepared for this task (``manifest``: the bundle's, for its vocabularies
        or tokenizer; ``model_args``: the model's constructor arguments, for data that depends on them, e.g.
        a maximum sequence length)."""
        raise NotImplementedError

    def model_args(self, spec: Any, train_data: Any, user_args: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments that follow from the data (classes, vocabularies) plus the user's own."""
        return dict(user_args)

    def manifest_extra(self, train_data: Any) -> dict[str, Any]:
        """What the bundle must keep to read this task's data again (tokenizers …)."""
        return {}

    def manifest_extra_from(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """The :meth:`manifest_extra` keys of an existing manifest (carried into a compressed bundle)."""
        return {}

    def dataset_record(self, data: Any, examples: int | None = None) -> dict[str, Any]:
        record: dict[str, Any] = {"name": data.name, "preprocess": getattr(data, "preprocess", {}),
                                  "task": self.name}
        if examples is not None:
            record["train_examples"] = examples
        return record

    def check_model(self, model: nn.Module, data: Any, model_name: str, dataset_name: str) -> None:
        """One forward on one example, so a model/data mismatch is a clear error, not a deep traceback."""
        inputs, _ = next(iter(self.train_batches(data, 1, torch.Generator().manual_seed(0), limit=1)))
        shapes = ", ".join(str(tuple(t.shape[1:])) for t in inputs)
        probe_forward(model, inputs, f"model {model_name} cannot take {dataset_name} inputs ({shapes})",
                      "pick a model and dataset that match (see `lrdeploy models`)")

    # --- training --------------------------------------------------------------------------------------
    def num_examples(self, data: Any) -> int:
        return len(data)

    def num_batches(self, n: int, batch_size: int) -> int:
        """Training batches per epoch over ``n`` examples."""
        return -(-n // batch_size)

    def train_batches(self, data: Any, batch_size: int, generator: torch.Generator,
                      limit: int | None = None) -> Iterator[Batch]:
        raise NotImplementedError

    def raw_inputs(self, data: Any) -> Any:
        """The split's model inputs as tensors (one tensor, or a tuple in forward order), e.g. for
        re-estimating BatchNorm statistics after a method changed ranks."""
        raise NotImplementedError

    def loss(self, outputs: Any, target: Any, config: Any) -> torch.Tensor:
        raise NotImplementedError

    def step_stats(self, outputs: Any, target: Any) -> tuple[int, torch.Tensor]:
        """(units counted, correct units as a device tensor) of one batch, for the progress line."""
        raise NotImplementedError

    def evaluate_model(self, model: nn.Module, data: Any, *, final: bool = True,
                       batch_size: int = 256) -> dict[str, float | None]:
        """Metrics of the PyTorch model on ``data`` (``final``: the expensive ones too, e.g. BLEU)."""
        return self.evaluate(torch_predict(model, self.input_names(model), self.output_names(model)), data,
                             final=final, batch_size=batch_size)

    # --- judging any runtime -----------------------------------------------------------------------------
    def input_names(self, model: nn.Module | None = None) -> tuple[str, ...]:
        names = tuple(getattr(model, "input_names", ()) or ())
        return names or ("input",)

    def output_names(self, model: nn.Module | None = None) -> tuple[str, ...]:
        names = tuple(getattr(model, "output_names", ()) or ())
        return names or ("output",)

    def metrics(self) -> tuple[Metric, ...]:
        return (self.headline,)

    def format_metrics(self, values: Mapping[str, Any], prefix: str = "") -> str:
        """``"accuracy 98.10%"`` / ``"BLEU 31.20, perplexity 9.87, token accuracy 61.00%"``: the task's
        metrics found in ``values`` (keys ``prefix + metric.key``), as reports name them."""
        shown = []
        for metric in self.metrics():
            value = values.get(prefix + metric.key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                shown.append(f"{metric.label} {value:.2%}" if metric.percent
                             else f"{metric.label} {value:.2f}")
        return ", ".join(shown)

    def evaluate(self, predict: Predict, data: Any, *, final: bool = True,
                 batch_size: int = 256) -> dict[str, float | None]:
        """Metrics of ``predict`` on ``data``; keys include ``self.headline.key``."""
        raise NotImplementedError

    def evaluate_with_rows(self, predict: Predict, data: Any, *, final: bool = True, batch_size: int = 256,
                           parity_examples: int = 128) -> tuple[dict[str, float | None], np.ndarray]:
        """(metrics, parity rows): one pass that also keeps the rows parity compares."""
        metrics = self.evaluate(predict, data, final=final, batch_size=batch_size)
        feeds = self.feeds(data, parity_examples)
        return metrics, self.parity_rows(predict(feeds), feeds)

    def feeds(self, data: Any, n: int, *, offset: int = 0) -> Feeds:
        """``n`` real examples as the graph's named inputs (cycled when the split is smaller)."""
        raise NotImplementedError

    def precision_tolerance(self, precision: str) -> Any:
        """The parity preset a reduced-precision variant of this task's model is judged by (None: the
        standard preset of ``lrdeploy.serving.parity``)."""
        return None

    def labels(self, data: Any, n: int) -> np.ndarray | None:
        """Labels matching :meth:`feeds` (for golden sets), or None where the task has none."""
        return None

    def describe_data(self, data: Any) -> dict[str, Any]:
        """What a report says about a split beyond its name and size (e.g. a translation's languages)."""
        return {}

    def parity_note(self, data: Any, examples: int) -> str | None:
        """Which rows :meth:`evaluate_with_rows` gives parity, in words, where it is not one per example."""
        return None

    def parity_rows(self, outputs: Mapping[str, np.ndarray], feeds: Feeds) -> np.ndarray:
        """The 2-D rows parity compares (first output by default: one row per example)."""
        first = np.asarray(next(iter(outputs.values())))
        return first.reshape(first.shape[0], -1) if first.ndim != 2 else first

    def budget_checks(self, reference: Mapping[str, Any], candidate: Mapping[str, Any],
                      parity: Mapping[str, Any], budgets: BudgetSettings) -> list[dict[str, Any]]:
        """The task's budget checks (each ``{name, limit, value, passed}``); a drop of the headline metric
        by default, and agreement when asked."""
        h = self.headline
        limit = self.default_max_drop if budgets.max_drop is None else budgets.max_drop
        ref, cand = reference.get(h.key), candidate.get(h.key)
        drop = None if ref is None or cand is None else h.points * (ref - cand) * (1 if h.higher_is_better
                                                                                     else -1)
        checks = [{"name": f"{h.label} drop (points)", "limit": limit, "value": drop,
                   "passed": drop is not None and drop <= limit}]
        if budgets.min_agreement is not None:
            agreement = parity.get("top1_agreement")
            checks.append({"name": "top-1 agreement", "limit": budgets.min_agreement, "value": agreement,
                           "passed": agreement is not None and agreement >= budgets.min_agreement})
        return checks


def probe_forward(model: nn.Module, inputs: Sequence[torch.Tensor], problem: str, hint: str) -> None:
    """One forward in eval mode (mode restored); a failure is one UserError line ``problem: <first line of
    the error>`` with ``hint``, instead of a deep traceback later."""
    from lrdeploy.errors import UserError

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    except (RuntimeError, IndexError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{problem}: {first}", hint) from None
    finally:
        model.train(was_training)


def torch_predict(model: nn.Module, input_names: Sequence[str], output_names: Sequence[str]) -> Predict:
    """A predict function over a PyTorch model: named numpy feeds → named numpy outputs, in eval mode."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    @torch.no_grad()
    def predict(feeds: Feeds) -> dict[str, np.ndarray]:
        was_training = model.training
        model.eval()
        try:
            out = model(*(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in input_names))
        finally:
            model.train(was_training)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().float().cpu().numpy() for n, o in zip(output_names, outs, strict=False)}

    return predict


def runtime_predict(runtime: Any) -> Predict:
    """A predict function over a runtime with the named-I/O ``run(feeds) -> outputs`` (host arrays: a device
    runtime's outputs are copied back)."""
    return lambda feeds: {k: np.asarray(v) for k, v in runtime.run(feeds).items()}


def batched(predict: Predict, feeds: Feeds, batch_size: int) -> dict[str, np.ndarray]:
    """``predict`` over ``feeds`` in slices of ``batch_size`` rows, outputs concatenated."""
    n = len(next(iter(feeds.values())))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        out = predict({k: np.ascontiguousarray(v[start : start + batch_size]) for k, v in feeds.items()})
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")
