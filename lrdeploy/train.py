"""The one training loop, for every task and method: reproducible from a seed, with method hooks.

What differs between tasks (batches, loss, metrics, optimiser defaults) comes from the task object
(:mod:`lrdeploy.tasks`): ``train(model, train_set, test_set, config, hooks, task="translation")``.

Compression methods (Cuttlefish, Maestro, Sparse-IFT …) plug in as *hook objects* rather than subclasses of
the trainer, so one loop serves them all. A hook may define any of these methods; missing ones are skipped:

- ``on_train_start(model, optimizer)``
- ``on_epoch_start(epoch)``                      (``epoch`` counts from 0, here and in ``history``)
- ``param_groups(model, config) -> list[dict] | None`` — optimiser parameter groups (e.g. no weight decay on
  factors regularised another way); asked whenever the optimiser is (re)built, first non-None answer wins
- ``training_loss(model, xb, yb) -> (loss, logits) | None`` — replaces the task's loss step (e.g.
  Maestro's full pass + sampled pass + group lasso); first non-None answer wins. ``xb`` is the input tensor
  for single-input tasks and a tuple of tensors (in ``forward`` order) otherwise; ``bind_task(task)`` is
  called first on hooks that define it, so a hook can use ``task.loss``
- ``after_backward(model)``                      (e.g. mask or regularise gradients)
- ``after_step(model)``                          (e.g. re-apply masks to weights)
- ``on_epoch_end(epoch, model, metrics) -> nn.Module | None`` — a returned module replaces the model (e.g.
  Cuttlefish switching from full rank to factorised layers); the optimiser is then rebuilt, so momentum
  restarts, and ``on_model_replaced(model, optimizer)`` is called on hooks that define it.
- ``before_evaluate(model, train_x)``             (e.g. recalibrate BatchNorm statistics after ranks changed;
  ``train_x`` is the task's ``raw_inputs`` of the training split: a tensor or a tuple)

The learning rate is a pure function of the global step (see :func:`lr_at`), so it survives such a rebuild.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from lrdeploy.data.augment import get_augmentation
from lrdeploy.errors import UserError

SCHEDULES = ("cosine", "step", "inverse_sqrt")
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    limit_train: int | None = None
    num_threads: int | None = None
    progress: bool = True
    augment: str | None = None  # "crop-flip" (CIFAR); drawn from the shuffling generator, so still seeded
    optimizer: str = "sgd"  # "adamw": momentum is Adam's beta1 (beta2 0.98, eps 1e-9, as for Transformers)
    warmup_steps: int = 0  # linear warm-up to ``lr`` before the schedule
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global gradient norm
    eval_batch_size: int = 256
    full_eval_every_epoch: bool = False  # e.g. BLEU (greedy decoding) every epoch instead of only the last

    @classmethod
    def for_task(cls, task: Any, **settings: Any) -> TrainConfig:
        """A config with the task's defaults (``None`` settings take them too), then ``settings``."""
        from lrdeploy.tasks import get_task

        given = {k: v for k, v in settings.items() if v is not None}
        return cls(**{**get_task(task).train_defaults, **given})

    def __post_init__(self) -> None:
        checks = (
            ("epochs", self.epochs >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("lr", 0 < self.lr < math.inf, "positive and finite"),  # NaN fails every comparison
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", 0 <= self.weight_decay < math.inf, "zero or positive and finite"),
            ("limit_train", self.limit_train is None or self.limit_train >= 1, "at least 1"),
            ("num_threads", self.num_threads is None or self.num_threads >= 1, "at least 1"),
            ("warmup_steps", self.warmup_steps >= 0, "zero or positive"),
            ("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "in [0, 1)"),
            ("grad_clip", self.grad_clip is None or 0 < self.grad_clip < math.inf, "positive and finite"),
            ("eval_batch_size", self.eval_batch_size >= 1, "at least 1"),
        )
        for name, ok, want in checks:
            if not ok:
                raise UserError(f"training setting {name} must be {want}, got {getattr(self, name)!r}")
        if self.augment is not None:
            get_augmentation(self.augment)  # unknown name -> UserError now, not mid-training
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown learning-rate schedule '{self.schedule}'",
                            hint=f"use one of: {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer '{self.optimizer}'", hint=f"use {' or '.join(OPTIMIZERS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    metrics: dict[str, Any]  # the task's metrics on the test split after training (empty without one)
    train_loss: float
    epochs: int
    seconds: float
    samples_per_s: float  # training throughput in the task's units (images, target tokens, sentences)
    history: list[dict[str, Any]]
    model: nn.Module | None = field(default=None, repr=False)  # the final model (a hook may have replaced it)
    rate_unit: str = "samples"

    @property
    def test_accuracy(self) -> float | None:
        return self.metrics.get("accuracy")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate before optimiser step ``step`` of ``total_steps``: linear warm-up to ``lr`` over
    ``warmup_steps`` (at most a quarter of the run), then the schedule over the remaining steps.

    ``cosine`` anneals per step from ``lr`` towards 0; ``step`` multiplies by 0.1 at 50 % and again at 75 % of
    training — per step rather than per epoch so that both behave sensibly for one- or two-epoch runs;
    ``inverse_sqrt`` decays as 1/√step after the warm-up (Vaswani et al.).
    """
    warm = min(config.warmup_steps, total_steps // 4)  # a short run (a test, a fine-tune) still peaks
    if warm and step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "inverse_sqrt":
        return config.lr * math.sqrt(max(warm, 1) / (step + 1))
    frac = min((step - warm) / max(total_steps - warm, 1), 1.0)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return config.lr * 0.1 ** ((frac >= 0.5) + (frac >= 0.75))


def _make_optimizer(
    model: nn.Module, config: TrainConfig, hooks: Sequence[object] = ()
) -> torch.optim.Optimizer:
    groups = _first(hooks, "param_groups", model, config)
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.98), eps=1e-9,
                                 weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _first(hooks: Sequence[object], method: str, *args: Any) -> Any:
    """The first non-None answer of ``method`` among the hooks that define it."""
    for hook in hooks:
        fn = getattr(hook, method, None)
        if fn is not None:
            answer = fn(*args)
            if answer is not None:
                return answer
    return None


def _call(hooks: Sequence[object], method: str, *args: Any) -> None:
    for hook in hooks:
        fn = getattr(hook, method, None)
        if fn is not None:
            fn(*args)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _reproducible(seed: int, num_threads: int | None) -> Iterator[None]:
    """Seed, deterministic kernels and a thread count for the duration of one call, then restore the caller's
    global state (RNG included), so training neither depends on nor disturbs what ran before."""
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
            torch.set_num_threads(threads)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )


def _inputs(dataset: Any) -> torch.Tensor:
    return dataset.x if hasattr(dataset, "x") else dataset


@torch.no_grad()
def _logit_batches(model: nn.Module, x: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        for start in range(0, x.shape[0], batch_size):
            yield start, model(x[start : start + batch_size].to(device))
    finally:
        model.train(was_training)


def predict_logits(model: nn.Module, dataset: Any, batch_size: int = 1000) -> torch.Tensor:
    """Logits (N × classes, on CPU) for a dataset with ``.x`` or a plain input tensor, in eval mode."""
    return torch.cat([out.float().cpu() for _, out in _logit_batches(model, _inputs(dataset), batch_size)])


def evaluate(model: nn.Module, dataset: Any, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] on ``dataset`` (``.x``/``.y``), in eval mode; the model's mode is restored."""
    y = dataset.y
    if len(y) == 0:
        raise UserError("cannot evaluate on an empty dataset")
    correct = 0
    for start, out in _logit_batches(model, dataset.x, batch_size):
        correct += int((out.argmax(1).cpu() == y[start : start + out.shape[0]]).sum())
    return correct / len(y)


class NonFiniteLossWatch:
    """Remembers the first step whose loss was NaN/Inf, without a device sync per step.

    A diverged run (``--lr`` too high, NaN in the data) otherwise trains on, writes NaN weights to a bundle
    and exits 0; every later command then meets a broken model. ``observe`` is a few device ops per step;
    ``check`` (one sync) runs where the loop already syncs for its progress line and at the end of an epoch,
    and raises a one-line UserError naming the epoch and step, so no bundle is written.
    """

    def __init__(self, device: torch.device) -> None:
        self._first = torch.full((), -1, dtype=torch.long, device=device)
        self._value = torch.zeros((), dtype=torch.float32, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Record ``loss`` of step ``step`` (0-based, within the epoch) if it is the first non-finite one."""
        value = loss.detach().float().reshape(())
        new = ~torch.isfinite(value) & (self._first < 0)
        self._first = torch.where(new, torch.full_like(self._first, step), self._first)
        self._value = torch.where(new, value, self._value)

    def check(self, epoch: int, peak_lr: float, option: str = "--lr") -> None:
        """UserError if a non-finite loss was observed; ``epoch`` 0-based, reported 1-based like the step."""
        step = int(self._first.item())
        if step < 0:
            return
        kind = "NaN" if math.isnan(float(self._value.item())) else "infinite"
        raise UserError(
            f"training stopped: the loss became {kind} at epoch {epoch + 1} step {step + 1} (peak learning "
            f"rate {peak_lr:g}); no bundle was written",
            f"lower {option}, or check the training data for NaN/Inf values",
        )


@dataclass
class _Loop:
    """Mutable state of one ``train`` call, so the epoch body can live in its own function."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    total_steps: int
    hooks: Sequence[object]
    progress: Progress
    bar: Any
    task: Any
    step: int = 0
    generator: torch.Generator | None = None  # the shuffling generator; augmentation draws from it too


def _hook_inputs(inputs: tuple[torch.Tensor, ...]) -> Any:
    """What ``training_loss`` hooks receive: the tensor of a single-input model, else the tuple."""
    return inputs[0] if len(inputs) == 1 else inputs


def _train_epoch(loop: _Loop, data: Any, epoch: int, steps: int) -> dict:
    model, config, task = loop.model, loop.config, loop.task
    device = _device(model)
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, lr = 0, config.lr
    augment = get_augmentation(config.augment) if config.augment is not None else None
    watch = NonFiniteLossWatch(device)
    start = time.perf_counter()
    batches = task.train_batches(data, config.batch_size, loop.generator, limit=config.limit_train,
                                 augment=augment)
    for i, (inputs, target) in enumerate(batches):
        inputs = tuple(t.to(device, non_blocking=True) for t in inputs)
        target = target.to(device, non_blocking=True)
        lr = lr_at(config, loop.step, loop.total_steps)
        for group in loop.optimizer.param_groups:
            group["lr"] = lr
        custom = _first(loop.hooks, "training_loss", model, _hook_inputs(inputs), target)
        if custom is None:
            outputs = model(*inputs)
            loss = task.loss(outputs, target, config)
        else:
            loss, outputs = custom
        watch.observe(loss, i)
        loop.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _call(loop.hooks, "after_backward", model)
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        loop.optimizer.step()
        _call(loop.hooks, "after_step", model)
        loop.step += 1
        units, hits = task.step_stats(outputs, target)
        seen += units
        loss_sum += loss.detach() * units
        correct += hits
        last = i == steps - 1
        if i % 10 == 9 or last:  # not every step: .item() syncs a GPU
            watch.check(epoch, config.lr)
        if config.progress and (i % 10 == 9 or last):
            rate = seen / max(time.perf_counter() - start, 1e-9)
            stats = (f"loss {loss_sum.item() / max(seen, 1):.4f}  acc {correct.item() / max(seen, 1):.1%}  "
                     f"{rate:,.0f} {task.rate_unit}/s")
            desc = f"epoch {epoch + 1}/{config.epochs}"
            loop.progress.update(loop.bar, completed=loop.step, stats=stats, description=desc)
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch,
        "train_loss": loss_sum.item() / max(seen, 1),
        "train_accuracy": correct.item() / max(seen, 1),
        "test_accuracy": None,
        "lr": lr,
        "seconds": seconds,
        "samples_per_s": seen / max(seconds, 1e-9),
        "units": seen,
    }


def _epoch_line(m: dict, epochs: int, task: Any) -> str:
    shown = task.format_metrics(m, prefix="test_")
    test = f"  test {shown}" if shown else ""
    return (
        f"epoch {m['epoch'] + 1}/{epochs}  loss {m['train_loss']:.4f}  train acc {m['train_accuracy']:.2%}"
        f"{test}  {m['samples_per_s']:,.0f} {task.rate_unit}/s  {m['seconds']:.1f}s"
    )


def _end_epoch(loop: _Loop, epoch: int, metrics: dict) -> None:
    """Run ``on_epoch_end`` hooks in order; each sees the model the previous one returned."""
    replaced = False
    for hook in loop.hooks:
        fn = getattr(hook, "on_epoch_end", None)
        new = fn(epoch, loop.model, metrics) if fn is not None else None
        if new is not None and new is not loop.model:
            loop.model, replaced = new, True
    if replaced:
        loop.optimizer = _make_optimizer(loop.model, loop.config, loop.hooks)
        _call(loop.hooks, "on_model_replaced", loop.model, loop.optimizer)


def train(
    model: nn.Module,
    train_set: Any,
    test_set: Any | None = None,
    config: TrainConfig | None = None,
    hooks: Sequence[object] = (),
    task: Any = "classification",
) -> TrainResult:
    """Train ``model`` in place on ``train_set`` for ``task`` (a name or :class:`~lrdeploy.tasks.Task`),
    evaluating ``test_set`` after each epoch (the task's expensive metrics, e.g. BLEU, only after the last
    unless ``config.full_eval_every_epoch``).

    Returns a :class:`TrainResult`; use ``result.model`` afterwards, since a hook may have replaced the model.
    Two calls with the same seed, initial weights, data and thread count give bit-identical weights.
    """
    from lrdeploy.tasks import get_task

    task = get_task(task)
    config = config or TrainConfig.for_task(task)
    n = task.num_examples(train_set)
    if config.limit_train is not None:
        n = min(n, config.limit_train)
    if n == 0:
        raise UserError("the training set is empty")
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    evaluated: nn.Module | None = None
    final: dict[str, Any] = {}
    for hook in hooks:
        bind = getattr(hook, "bind_task", None)
        if bind is not None:
            bind(task)

    with _reproducible(config.seed, config.num_threads), _progress(config.progress) as progress:
        generator = torch.Generator().manual_seed(config.seed)
        steps = task.num_batches(n, config.batch_size)
        total_steps = steps * config.epochs
        optimizer = _make_optimizer(model, config, hooks)
        _call(hooks, "on_train_start", model, optimizer)
        bar = progress.add_task("train", total=total_steps, stats="")
        loop = _Loop(model, optimizer, config, total_steps, hooks, progress, bar, task, generator=generator)
        raw = None
        for epoch in range(config.epochs):
            _call(hooks, "on_epoch_start", epoch)
            metrics = _train_epoch(loop, train_set, epoch, steps)
            if test_set is not None:
                raw = raw if raw is not None else _limited(task.raw_inputs(train_set), config.limit_train)
                _call(hooks, "before_evaluate", loop.model, raw)
                full = config.full_eval_every_epoch or epoch == config.epochs - 1
                final = task.evaluate_model(loop.model, test_set, final=full,
                                            batch_size=config.eval_batch_size)
                evaluated = loop.model
                metrics.update({f"test_{k}": v for k, v in final.items()})
            history.append(metrics)
            if config.progress:
                progress.console.print(_epoch_line(metrics, config.epochs, task))
            _end_epoch(loop, epoch, metrics)
        if test_set is not None and evaluated is not loop.model:  # the last epoch's hook swapped the model
            _call(hooks, "before_evaluate", loop.model, raw)
            final = task.evaluate_model(loop.model, test_set, final=True, batch_size=config.eval_batch_size)

    train_seconds = sum(m["seconds"] for m in history)
    units = sum(m.pop("units") for m in history)
    return TrainResult(
        metrics=dict(final),
        train_loss=history[-1]["train_loss"],
        epochs=config.epochs,
        seconds=time.perf_counter() - started,
        samples_per_s=units / max(train_seconds, 1e-9),
        history=history,
        model=loop.model,
        rate_unit=task.rate_unit,
    )


def _limited(inputs: Any, limit: int | None) -> Any:
    if limit is None:
        return inputs
    return tuple(t[:limit] for t in inputs) if isinstance(inputs, tuple) else inputs[:limit]
