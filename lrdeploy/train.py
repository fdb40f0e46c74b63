"""The one training loop, for every task and method: reproducible from a seed, with method hooks.

What differs between tasks (batches, loss, metrics, optimiser defaults) comes from the task object
(:mod:`lrdeploy.tasks`): ``train(model, train_set, test_set, config, hooks, task="translation")``.

Compression methods (Cuttlefish, Maestro, Sparse-IFT …) plug in as *hook objects* rather than subclasses of
the trainer, so one loop serves them all. A hook may define any of these methods; missing ones are skipped:

- ``on_schedule(total_steps)``                   (the run's optimiser steps, e.g. to place mask updates)
- ``on_train_start(model, optimizer)``          (a resumed run calls ``on_resume(model, optimizer)`` instead,
  after ``load_state_dict(state, model)`` restored what ``state_dict()`` saved in the checkpoint)
- ``on_epoch_start(epoch)``                      (``epoch`` counts from 0, here and in ``history``)
- ``param_groups(model, config) -> list[dict] | None`` — optimiser parameter groups (e.g. no weight decay on
  factors regularised another way); asked whenever the optimiser is (re)built, first non-None answer wins
- ``training_loss(model, xb, yb) -> (loss, logits) | None`` — replaces the task's loss step (e.g.
  Maestro's full pass + sampled pass + group lasso); first non-None answer wins. ``xb`` is the input tensor
  for single-input tasks and a tuple of tensors (in ``forward`` order) otherwise; ``bind_task(task)`` is
  called first on hooks that define it, so a hook can use ``task.loss``
- ``lr_scale(step) -> float | None`` — a factor on the scheduled learning rate of optimiser step ``step``
  (e.g. Cuttlefish re-warming it after the switch); must be a pure function of the step and the hook's
  checkpointed state, so a resumed run gets the same rates
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
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from lrdeploy import distributed, terminal
from lrdeploy.checkpoint import load_checkpoint, save_checkpoint
from lrdeploy.data.augment import get_augmentation
from lrdeploy.devices import (
    Precision,
    resolve_amp,
    resolve_device,
    synchronize,
    to_device,
    wants_channels_last,
)
from lrdeploy.errors import UserError
from lrdeploy.layers.structure import apply as apply_structure
from lrdeploy.layers.structure import describe as describe_structure

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
    device: str | None = None  # "auto", "cpu", "cuda", "cuda:N"; None: where the model already is
    amp: str = "off"  # "bf16" / "fp16" (GradScaler) autocast; fp16 needs CUDA
    checkpoint_dir: str | None = None  # where training checkpoints go; None: none are written
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always gets one); 0: never
    resume: bool = False  # continue the run whose checkpoint is in checkpoint_dir

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
            ("checkpoint_every", self.checkpoint_every >= 0, "zero (never) or positive"),
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
        if self.resume and self.checkpoint_dir is None:
            raise UserError("resume needs the run's checkpoint directory", "pass --checkpoint-dir")

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
    device: str = "cpu"
    amp: str = "off"
    world_size: int = 1  # training processes (torchrun)
    resumed_after_epoch: int | None = None  # epochs the checkpoint this run continued from had completed
    checkpoint_seconds: float = 0.0  # time spent writing checkpoints
    replica_digests: list[str] | None = None  # every rank's weights digest at the end (equal, or it raised)

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


def _lr_scale(hooks: Sequence[object], step: int) -> float:
    """The product of every hook's ``lr_scale(step)`` answer (None or a missing method: 1)."""
    scale = 1.0
    for hook in hooks:
        fn = getattr(hook, "lr_scale", None)
        answer = fn(step) if fn is not None else None
        if answer is not None:
            scale *= float(answer)
    return scale


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
        console=terminal.info,  # epoch lines are printed on it too: -q silences both
        transient=True,
        disable=not enabled or terminal.is_quiet(),
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

    model: nn.Module  # the module itself; ``forward`` is the same module or its DDP wrapper
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    total_steps: int
    hooks: Sequence[object]
    progress: Progress
    bar: Any
    task: Any
    device: torch.device
    precision: Precision
    channels_last: bool = False
    scaler: Any = None
    step: int = 0
    generator: torch.Generator | None = None  # the shuffling generator; augmentation draws from it too

    def rewrap(self) -> None:
        """Put a (new) model on the device and, with several processes, in a new DDP wrapper."""
        to_device(self.model, self.device, self.channels_last)
        self.forward = distributed.wrap(self.model, self.device)


def _hook_inputs(inputs: tuple[torch.Tensor, ...]) -> Any:
    """What ``training_loss`` hooks receive: the tensor of a single-input model, else the tuple."""
    return inputs[0] if len(inputs) == 1 else inputs


def _to_device(t: torch.Tensor, loop: _Loop) -> torch.Tensor:
    t = distributed.shard(t).to(loop.device, non_blocking=True)
    if loop.channels_last and t.dim() == 4 and t.is_floating_point():
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _train_epoch(loop: _Loop, data: Any, epoch: int, steps: int) -> dict:
    model, config, task = loop.model, loop.config, loop.task
    device = loop.device
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, lr = 0, config.lr
    augment = get_augmentation(config.augment) if config.augment is not None else None
    watch = NonFiniteLossWatch(device)
    show = config.progress and distributed.is_main()
    start = time.perf_counter()
    batches = task.train_batches(data, config.batch_size, loop.generator, limit=config.limit_train,
                                 augment=augment)
    for i, (inputs, target) in enumerate(batches):
        inputs = tuple(_to_device(t, loop) for t in inputs)
        target = distributed.shard(target).to(device, non_blocking=True)
        lr = lr_at(config, loop.step, loop.total_steps) * _lr_scale(loop.hooks, loop.step)
        for group in loop.optimizer.param_groups:
            group["lr"] = lr
        with loop.precision.autocast():
            custom = _first(loop.hooks, "training_loss", loop.forward, _hook_inputs(inputs), target)
            if custom is None:
                outputs = loop.forward(*inputs)
                loss = task.loss(outputs, target, config)
            else:
                loss, outputs = custom
        watch.observe(loss, i)
        loop.optimizer.zero_grad(set_to_none=True)
        if loop.scaler is not None:
            loop.scaler.scale(loss).backward()
            loop.scaler.unscale_(loop.optimizer)  # hooks and clipping see true gradients
        else:
            loss.backward()
        _call(loop.hooks, "after_backward", model)
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if loop.scaler is not None:
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
        else:
            loop.optimizer.step()
        _call(loop.hooks, "after_step", model)
        loop.step += 1
        units, hits = task.step_stats(outputs, target)
        seen += units
        loss_sum += loss.detach().float() * units
        correct += hits
        last = i == steps - 1
        if i % 10 == 9 or last:  # not every step: .item() syncs a GPU
            watch.check(epoch, config.lr)
        if show and (i % 10 == 9 or last):
            rate = seen * distributed.world_size() / max(time.perf_counter() - start, 1e-9)
            stats = (f"loss {loss_sum.item() / max(seen, 1):.4f}  "
                     f"{task.hits_label} {correct.item() / max(seen, 1):.1%}  "
                     f"{rate:,.0f} {task.rate_unit}/s")
            desc = f"epoch {epoch + 1}/{config.epochs}"
            loop.progress.update(loop.bar, completed=loop.step, stats=stats, description=desc)
    synchronize(device)
    seconds = time.perf_counter() - start
    totals = distributed.all_sum(torch.stack([loss_sum.double(), correct.double(),
                                              torch.tensor(float(seen), device=device, dtype=torch.float64)]))
    loss_total, hits_total, seen_total = (float(v) for v in totals.cpu())
    return {
        "epoch": epoch,
        "train_loss": loss_total / max(seen_total, 1),
        "train_accuracy": hits_total / max(seen_total, 1),
        "test_accuracy": None,
        "lr": lr,
        "seconds": seconds,
        "samples_per_s": seen_total / max(seconds, 1e-9),
        "units": int(seen_total),
    }


def _epoch_line(m: dict, epochs: int, task: Any) -> str:
    shown = task.format_metrics(m, prefix="test_")
    test = f"  test {shown}" if shown else ""
    return (
        f"epoch {m['epoch'] + 1}/{epochs}  loss {m['train_loss']:.4f}  train {task.hits_label} "
        f"{m['train_accuracy']:.2%}"
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
        loop.rewrap()  # a new DDP wrapper broadcasts rank 0's bits to every replica
        if distributed.active():
            metrics["replica_digests"] = distributed.replica_digests(loop.model)
        loop.optimizer = _make_optimizer(loop.model, loop.config, loop.hooks)
        _call(loop.hooks, "on_model_replaced", loop.model, loop.optimizer)


def _evaluate(loop: _Loop, test_set: Any, raw: Any, full: bool) -> dict[str, Any]:
    """Hooks' ``before_evaluate`` on every rank (their decisions are agreed inside), the task's evaluation on
    rank 0 only, its metrics handed to every rank (``on_epoch_end`` hooks may use them)."""
    _call(loop.hooks, "before_evaluate", loop.model, raw)
    distributed.sync_module(loop.model)
    metrics = None
    if distributed.is_main():
        metrics = loop.task.evaluate_model(loop.model, test_set, final=full,
                                           batch_size=loop.config.eval_batch_size)
    return distributed.agree(metrics)


# --- checkpoints -------------------------------------------------------------------------------------------

# settings a resumed run must share with the run it continues (the rest — progress, threads, device,
# checkpointing — may change between the two)
RUN_SETTINGS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "seed", "limit_train",
                "augment", "optimizer", "warmup_steps", "label_smoothing", "grad_clip", "amp")


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _hook_states(hooks: Sequence[object]) -> list[Any]:
    states = []
    for hook in hooks:
        fn = getattr(hook, "state_dict", None)
        if fn is None:
            raise UserError(f"the training hook {type(hook).__name__} cannot be checkpointed (no state_dict)",
                            "train without --checkpoint-dir / with --checkpoint-every 0")
        states.append(fn())
    return states


def _save_checkpoint(loop: _Loop, epoch: int, history: list[dict[str, Any]], run: dict[str, Any]) -> float:
    """Write the checkpoint after ``epoch`` (rank 0; every rank's RNG state goes in); seconds it took."""
    start = time.perf_counter()
    rngs = distributed.gather(_rng_state(loop.device))
    hooks = _hook_states(loop.hooks)
    if distributed.is_main():
        state = {
            "epoch": epoch + 1,
            "step": loop.step,
            "config": {k: getattr(loop.config, k) for k in RUN_SETTINGS},
            "run": run,
            "world_size": distributed.world_size(),
            "structure": describe_structure(loop.model),
            "optimizer": loop.optimizer.state_dict(),
            "scaler": loop.scaler.state_dict() if loop.scaler is not None else None,
            "hooks": hooks,
            "rng": {"shuffle": loop.generator.get_state() if loop.generator is not None else None,
                    "ranks": rngs},
            "history": history,
        }
        save_checkpoint(Path(loop.config.checkpoint_dir), loop.model.state_dict(), state)
    distributed.barrier()
    return time.perf_counter() - start


def _check_resumable(state: dict[str, Any], config: TrainConfig, run: dict[str, Any], path: str) -> None:
    hint = "resume with the same settings, or start over without --resume (with --force)"
    saved = state.get("config", {})
    for key in RUN_SETTINGS:
        if key in saved and saved[key] != getattr(config, key):
            raise UserError(f"--resume: the checkpoint in {path} was trained with {key}={saved[key]!r}, this "
                            f"run has {key}={getattr(config, key)!r}", hint)
    for key, value in run.items():
        if state.get("run", {}).get(key) != value:
            raise UserError(f"--resume: the checkpoint in {path} belongs to a run with a different {key} "
                            f"({state.get('run', {}).get(key)!r}, now {value!r})", hint)
    if state.get("world_size", 1) != distributed.world_size():
        raise UserError(f"--resume: the checkpoint in {path} was written by {state.get('world_size')} "
                        f"process(es), this run has {distributed.world_size()}",
                        "resume with the same --nproc-per-node × --nnodes (each rank's data shard and RNG "
                        "state are part of the run)")


def _restore(model: nn.Module, config: TrainConfig, run: dict[str, Any],
             hooks: Sequence[object]) -> tuple[nn.Module, dict[str, Any]]:
    """The model of the checkpoint (its structure applied to ``model``, its weights loaded) and its state."""
    path = str(config.checkpoint_dir)
    weights, state = load_checkpoint(path)
    _check_resumable(state, config, run, path)
    model = apply_structure(model, state["structure"])
    model.load_state_dict(weights)
    for hook, saved in zip(hooks, state["hooks"], strict=True):
        hook.load_state_dict(saved, model)
    return model, state


def train(
    model: nn.Module,
    train_set: Any,
    test_set: Any | None = None,
    config: TrainConfig | None = None,
    hooks: Sequence[object] = (),
    task: Any = "classification",
    run: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_set`` for ``task`` (a name or :class:`~lrdeploy.tasks.Task`),
    evaluating ``test_set`` after each epoch (the task's expensive metrics, e.g. BLEU, only after the last
    unless ``config.full_eval_every_epoch``).

    Returns a :class:`TrainResult`; use ``result.model`` afterwards, since a hook may have replaced the model.
    Two calls with the same seed, initial weights, data and thread count give bit-identical weights — also
    when the second was killed and resumed from its checkpoint (``config.resume``; then ``model`` is the
    *initial* model: the checkpoint's structure and weights are applied to it). ``run`` describes what else
    makes the run (model, data, method): a checkpoint only resumes a run that describes itself the same way.

    Under torchrun (:mod:`lrdeploy.distributed`) each rank trains on its shard of every batch
    (``batch_size`` is the global batch), gradients are averaged by DistributedDataParallel, and rank 0
    evaluates and writes checkpoints.
    """
    from lrdeploy.tasks import get_task

    task = get_task(task)
    config = config or TrainConfig.for_task(task)
    run = dict(run or {})
    device = resolve_device(config.device) if config.device is not None else _device(model)
    precision = resolve_amp(config.amp, device)
    n = task.num_examples(train_set)
    if config.limit_train is not None:
        n = min(n, config.limit_train)
    if n == 0:
        raise UserError("the training set is empty")
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    evaluated: nn.Module | None = None
    final: dict[str, Any] = {}
    checkpoint_seconds = 0.0
    for hook in hooks:
        bind = getattr(hook, "bind_task", None)
        if bind is not None:
            bind(task)

    with _reproducible(config.seed + distributed.rank(), config.num_threads), \
            _progress(config.progress and distributed.is_main()) as progress:
        generator = torch.Generator().manual_seed(config.seed)  # the same order on every rank
        steps = task.num_batches(n, config.batch_size)
        total_steps = steps * config.epochs
        state: dict[str, Any] | None = None
        if config.resume:
            model, state = _restore(model, config, run, hooks)
        channels_last = wants_channels_last(model, device)
        to_device(model, device, channels_last)
        optimizer = _make_optimizer(model, config, hooks)
        _call(hooks, "on_schedule", total_steps)
        if state is None:
            _call(hooks, "on_train_start", model, optimizer)
        else:
            _call(hooks, "on_resume", model, optimizer)
        bar = progress.add_task("train", total=total_steps, stats="")
        loop = _Loop(model, distributed.wrap(model, device), optimizer, config, total_steps, hooks, progress,
                     bar, task, device, precision, channels_last, precision.scaler(), generator=generator)
        start_epoch = 0
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            if loop.scaler is not None and state.get("scaler"):
                loop.scaler.load_state_dict(state["scaler"])
            generator.set_state(state["rng"]["shuffle"])
            _set_rng_state(state["rng"]["ranks"][distributed.rank()], device)
            loop.step, start_epoch, history = int(state["step"]), int(state["epoch"]), list(state["history"])
            progress.update(bar, completed=loop.step)
            if config.progress and distributed.is_main():
                progress.console.print(f"resumed after epoch {start_epoch}/{config.epochs} "
                                       f"(step {loop.step}) from {config.checkpoint_dir}")
        raw = None
        for epoch in range(start_epoch, config.epochs):
            _call(hooks, "on_epoch_start", epoch)
            metrics = _train_epoch(loop, train_set, epoch, steps)
            if test_set is not None:
                raw = raw if raw is not None else _limited(task.raw_inputs(train_set), config.limit_train)
                full = config.full_eval_every_epoch or epoch == config.epochs - 1
                final = _evaluate(loop, test_set, raw, full)
                evaluated = loop.model
                metrics.update({f"test_{k}": v for k, v in final.items()})
            history.append(metrics)
            if config.progress and distributed.is_main():
                progress.console.print(_epoch_line(metrics, config.epochs, task))
            _end_epoch(loop, epoch, metrics)
            due = config.checkpoint_every and ((epoch + 1) % config.checkpoint_every == 0
                                               or epoch == config.epochs - 1)
            if config.checkpoint_dir is not None and due:
                checkpoint_seconds += _save_checkpoint(loop, epoch, history, run)
        if test_set is not None and evaluated is not loop.model:  # the last hook swapped it, or all resumed
            raw = raw if raw is not None else _limited(task.raw_inputs(train_set), config.limit_train)
            final = _evaluate(loop, test_set, raw, True)
        digests = distributed.replica_digests(loop.model) if distributed.active() else None

    train_seconds = sum(m["seconds"] for m in history)
    units = sum(m.get("units", 0) for m in history)
    for m in history:
        m.pop("units", None)
    return TrainResult(
        metrics=dict(final),
        train_loss=history[-1]["train_loss"] if history else math.nan,
        epochs=config.epochs,
        seconds=time.perf_counter() - started,
        samples_per_s=units / max(train_seconds, 1e-9),
        history=history,
        model=loop.model,
        rate_unit=task.rate_unit,
        device=str(device),
        amp=precision.mode,
        world_size=distributed.world_size(),
        resumed_after_epoch=int(state["epoch"]) if state is not None else None,
        checkpoint_seconds=checkpoint_seconds,
        replica_digests=digests,
    )


def _limited(inputs: Any, limit: int | None) -> Any:
    if limit is None:
        return inputs
    return tuple(t[:limit] for t in inputs) if isinstance(inputs, tuple) else inputs[:limit]
