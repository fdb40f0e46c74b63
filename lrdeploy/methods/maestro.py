"""Maestro (Horváth et al., ICML 2024) as a trainer hook: ordered low-rank training, progressive shrinking.

Per step (methods.md §1.4): loss = CE(full pass, labels) + CE(sampled pass, softmax(full pass).detach())
+ λ_gl·Σ hierarchical group lasso. The sampled pass truncates exactly one layer to a rank drawn by the
per-layer sampler (every (layer, rank) pair once per sweep, shuffled), which teaches each layer an importance
order over its components. After each epoch, components whose importance fell below ε are dropped for good;
before each evaluation, BatchNorm statistics are recomputed on training data, because the running averages
were collected over a mix of full and truncated passes (and ranks may have changed).

Defaults and why:

- ``lambda_gl="auto"``: λ is derived from the run's budget. Over a run, the group lasso pulls a component's
  factors towards zero by about λ·2√r·Σ_t lr_t (r the layer's rank, Σ lr over every optimiser step of the
  schedule), whatever the data does. A fixed λ is therefore right for one budget only: the reference's
  argparse default 5e-3 pulls ≈ 1.3 over a 474-step LeNet-5 run, more than the factors' norms (0.6–0.9), so
  every weakly used rank dies; its shell scripts' 1e-6 pulls nothing on a short run. "auto" sets
  λ = ``pull`` / (2√r_max · Σ lr) with ``pull=0.1`` (r_max the largest decomposed rank), so the total pull is
  about a tenth of a typical factor norm on any budget (LeNet-5, 474 steps at lr 0.05: λ ≈ 3.9e-4). A larger
  pull shrinks more but slows learning on short runs (126 steps: pull 0.2, λ 7e-3, left LeNet-5 at 28 %
  test accuracy, pull 0.05 at 57 %, dense 85 %). ``lambda_scale`` multiplies λ (what the λ search halves);
  a number fixes λ as before. "auto" is capped at 5e-3 (the reference's default) for runs too short to learn
  anything under a larger one. "auto" is the *safe* λ, not the compressing one: on a long run (LeNet-5, 2,814
  steps: λ 6.5e-5) it kills almost no component. To compress, search λ (``--target-accuracy-drop``) or
  raise ``pull``. The paper's Algorithm 2 (start large, halve until the accuracy target holds) is
  ``lrdeploy train --method maestro --target-accuracy-drop D`` (:mod:`lrdeploy.lambda_search`).
- Learning rate: the balanced factors (U = P√S, Vᵀ = √S Qᵀ) take about twice the effective step of the dense
  weight; LeNet-5 (no BatchNorm) diverged at lr 0.1 and trains at 0.05.
- ``full_pass=False``: one sampled (ordered-dropout) pass per step, the task loss on it — what both authors'
  scripts run (``--no-full-pass``); ``full_pass=True`` adds the full pass and self-distils the sampled pass
  from it (the code's default, twice the compute).
- BatchNorm statistics are recalibrated before each evaluation on a bounded subset of the training data
  (``bn_limit=4096`` images), not the whole set: the estimate is as good and the cost stays bounded.
- ``threshold=1e-5`` (ε) is the reference code's default; the paper reportedly used 1e-7 (§1.5).
- ``dense_warmup=N`` (the reference's option, 0 by default): train the dense model N epochs, then decompose
  it by SVD (exact at full rank) and go on with Maestro; λ "auto" then counts only the decomposed steps.
- the first conv and the classifier stay dense (``keep_first_conv``/``keep_classifier``), as in
  :func:`lrdeploy.compress.compress`; the reference's CIFAR script decomposed them too — pass False for that.

Departures from the reference (§1.11): BN momentum is restored after recalibration (bug #5); the sampler is
set on the layer (no forward signature threading); shrinking happens before BN recalibration and
evaluation, as in the reference's loop, even though our trainer calls ``before_evaluate`` before
``on_epoch_end`` (``before_evaluate`` shrinks first when the epoch has not been shrunk yet).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrdeploy import distributed
from lrdeploy.errors import UserError
from lrdeploy.layers.maestro import MaestroConv2d, MaestroLinear, maestro_layers
from lrdeploy.layers.structure import set_submodule
from lrdeploy.methods import selection
from lrdeploy.methods.base import MethodHook, register_method

MaestroLayer = MaestroLinear | MaestroConv2d

LAMBDA_AUTO_MAX = 5e-3
"""The "auto" λ never exceeds the reference's default: a run of a few dozen steps would otherwise get a λ
whose penalty dominates the loss before the network has learnt anything."""


def decompose(
    model: nn.Module,
    *,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    keep_first_conv: bool = True,
    keep_classifier: bool = True,
) -> list[str]:
    """Replace eligible nn.Linear/nn.Conv2d layers by full-rank Maestro layers IN PLACE; return their names.

    Selection is the shared policy (:func:`lrdeploy.methods.selection.select_layers`: by type and qualified
    name, fnmatch ``include``/``exclude``, the stem and classifier the model spec names — else the first conv
    and last Linear — kept dense unless ``keep_first_conv``/``keep_classifier`` are False). Grouped convs,
    the root module, nn.MultiheadAttention's projections and already factorised layers are left alone. At
    full rank the decomposed network computes the same function as the dense one.
    """
    chosen, _kept = selection.select_layers(model, include=include, exclude=exclude,
                                            keep_stem=keep_first_conv, keep_classifier=keep_classifier)
    for name in chosen:
        module = model.get_submodule(name)
        cls = MaestroLinear if isinstance(module, nn.Linear) else MaestroConv2d
        set_submodule(model, name, cls.from_dense(module))
    return chosen


class SingleLayerSampler:
    """Ordered Dropout's "per_layer" sampler: each step truncates one layer to one rank.

    Every (layer, rank j) pair with 1 ≤ j ≤ rank is visited exactly once per sweep, in a shuffled order;
    the next sweep is reshuffled. Larger layers therefore get picked proportionally more often. Call
    :meth:`rebuild` after ranks change. Seeded with its own RNG, so it neither uses nor disturbs torch's.
    """

    def __init__(self, layers: Sequence[MaestroLayer], seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self.rebuild(layers)

    def rebuild(self, layers: Sequence[MaestroLayer]) -> None:
        self.layers = list(layers)
        self.pairs = [(i, j) for i, layer in enumerate(self.layers) for j in range(1, layer.rank + 1)]
        self._order: list[tuple[int, int]] = []
        self._pos = 0

    def __len__(self) -> int:
        """Pairs per sweep."""
        return len(self.pairs)

    def next(self) -> tuple[int, int] | None:
        """The next (layer index, rank) pair, or None when no layer has a component left."""
        if not self.pairs:
            return None
        if self._pos >= len(self._order):
            self._order = list(self.pairs)
            self._rng.shuffle(self._order)
            self._pos = 0
        pair = self._order[self._pos]
        self._pos += 1
        return pair

    @contextlib.contextmanager
    def sampled(self) -> Iterator[tuple[int, int] | None]:
        """Truncate the next sampled layer for the duration of the block (one forward)."""
        pair = self.next()
        if pair is None:
            yield None
            return
        with self.layers[pair[0]].active_rank(pair[1]):
            yield pair


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, x: Any, *, batch_size: int = 256, limit: int | None = None
) -> int:
    """Recompute BatchNorm running statistics as an equal-weight average over one pass of ``x``.

    ``x``: input tensor, a dataset with ``.x``, or a tuple of tensors for a multi-input model.

    Stats are reset, momentum set to None (cumulative average), batches run in train mode without grad,
    then every BN's momentum and the model's train/eval mode are restored — the reference left momentum at
    None for the rest of training (methods.md §1.11 bug #5). A trailing partial batch is skipped when at
    least one full batch exists, so each batch carries the same weight. Returns the number of images used.
    """
    bns = _bn_modules(model)
    if not bns:
        return 0
    x = x.x if hasattr(x, "x") else x
    parts = x if isinstance(x, tuple) else (x,)  # a tuple: several model inputs (e.g. src, tgt_in)
    if limit is not None:
        parts = tuple(p[:limit] for p in parts)
    n = int(parts[0].shape[0])
    if n == 0:
        return 0
    usable = n if n < batch_size else (n // batch_size) * batch_size
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        for start in range(0, usable, batch_size):
            model(*(p[start : start + batch_size].to(device) for p in parts))
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    return usable


@register_method("maestro")
class MaestroMethod(MethodHook):
    """Trainer hook object for Maestro; build with ``get_method("maestro", **settings)``.

    The model is decomposed when the trainer first builds its optimiser (``param_groups``), so the optimiser
    holds the factors; call :meth:`prepare` yourself to decompose earlier. A model that already has Maestro
    layers (e.g. loaded from a Maestro bundle) is trained as it is.
    """

    name = "maestro"

    def __init__(
        self,
        lambda_gl: float | str = "auto",
        threshold: float = 1e-5,
        full_pass: bool = False,
        progressive: bool = True,
        recalibrate_bn: bool = True,
        bn_batch_size: int = 256,
        bn_limit: int | None = 4096,
        pull: float = 0.1,
        lambda_scale: float = 1.0,
        dense_warmup: int = 0,
        keep_first_conv: bool = True,
        keep_classifier: bool = True,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        sampler: str = "per_layer",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if sampler != "per_layer":
            raise UserError(f"unknown maestro sampler {sampler!r}",
                            hint="only per_layer (the one the paper uses) is implemented")
        checks = (
            ("lambda_gl", lambda_gl == "auto" or (_number(lambda_gl) and lambda_gl >= 0),
             "auto, zero or positive"),
            ("pull", _number(pull) and pull > 0, "positive"),
            ("lambda_scale", _number(lambda_scale) and lambda_scale > 0, "positive"),
            ("threshold", _number(threshold) and threshold >= 0, "zero or positive"),
            ("bn_batch_size", _integer(bn_batch_size) and bn_batch_size >= 1, "an integer ≥ 1"),
            ("bn_limit", bn_limit is None or (_integer(bn_limit) and bn_limit >= 1), "an integer ≥ 1"),
            ("seed", _integer(seed), "an integer"),
            ("dense_warmup", _integer(dense_warmup) and dense_warmup >= 0, "an integer ≥ 0 (epochs)"),
        )
        for key, ok, want in checks:
            if not ok:
                raise UserError(f"maestro setting {key} must be {want}, got {locals()[key]!r}")
        for key, flag in (("full_pass", full_pass), ("progressive", progressive),
                          ("recalibrate_bn", recalibrate_bn), ("keep_first_conv", keep_first_conv),
                          ("keep_classifier", keep_classifier)):
            if not isinstance(flag, bool):
                raise UserError(f"maestro setting {key} must be true or false, got {flag!r}")
        self.settings = {
            "lambda_gl": lambda_gl if lambda_gl == "auto" else float(lambda_gl), "pull": float(pull),
            "lambda_scale": float(lambda_scale), "threshold": float(threshold), "full_pass": full_pass,
            "progressive": progressive, "recalibrate_bn": recalibrate_bn, "bn_batch_size": bn_batch_size,
            "bn_limit": bn_limit, "keep_first_conv": keep_first_conv, "keep_classifier": keep_classifier,
            "include": selection.as_patterns(include, "include"),
            "exclude": selection.as_patterns(exclude, "exclude"),
            "sampler": sampler, "seed": seed, "dense_warmup": dense_warmup,
        }
        self.layers: list[tuple[str, MaestroLayer]] = []
        self.sampler: SingleLayerSampler | None = None
        self._epoch = -1
        self._shrunk_epoch: int | None = None
        self._label_smoothing = 0.0  # from a TranslationConfig, when the seq2seq trainer builds the optimiser
        self._config: Any = None
        self._total_steps: int | None = None
        self._start_step = 0  # the first step trained decomposed (after a dense warm-up)
        self._lambda: float | None = None
        self.log = {"decomposed": [], "full_ranks": {}, "epochs": [], "lambda_gl": None, "lambda_rule": None}

    # --- setup ---

    @property
    def decomposed(self) -> bool:
        """Whether the model has been decomposed (False during a dense warm-up)."""
        return bool(self.layers)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Decompose ``model`` in place (unless it already has Maestro layers) and build the sampler; with a
        dense warm-up, a dense model is left as it is (decomposed after ``dense_warmup`` epochs)."""
        s = self.settings
        if s["dense_warmup"] and not maestro_layers(model) and self._epoch < s["dense_warmup"] - 1:
            return model
        if not maestro_layers(model):
            self.log["decomposed"] = decompose(
                model, include=s["include"], exclude=s["exclude"], keep_first_conv=s["keep_first_conv"],
                keep_classifier=s["keep_classifier"],
            )
        self._attach(model)
        if not self.layers:
            raise UserError("maestro found no layer to decompose",
                            hint="the model needs Linear/Conv2d layers beyond the kept first conv/classifier")
        return model

    def _attach(self, model: nn.Module) -> None:
        self.layers = maestro_layers(model)
        self.log["full_ranks"] = {name: layer.full_rank for name, layer in self.layers}
        if self.sampler is None:
            self.sampler = SingleLayerSampler([m for _, m in self.layers], seed=self.settings["seed"])
        else:
            self.sampler.rebuild([m for _, m in self.layers])

    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers}

    # --- trainer hooks ---

    def param_groups(self, model: nn.Module, config: Any) -> None:
        """Decompose before the optimiser is built, so it holds the factors; the default groups then apply."""
        self._label_smoothing = float(getattr(config, "label_smoothing", 0.0) or 0.0)  # translation only
        self._config = config
        if not self.layers or not maestro_layers(model):
            self.prepare(model)
        return None

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not self.layers and not self.settings["dense_warmup"]:
            raise RuntimeError("MaestroMethod.prepare(model) must run before the optimiser is built "
                               "(another hook answered param_groups first)")

    def on_schedule(self, total_steps: int) -> None:
        self._total_steps = int(total_steps)

    def lambda_gl(self) -> float:
        """λ for this run: the fixed setting, or the "auto" rule (module docstring) once the schedule is
        known; recorded in the log with how it was derived."""
        if self._lambda is not None:
            return self._lambda
        s = self.settings
        if s["lambda_gl"] != "auto":
            self._lambda = float(s["lambda_gl"]) * s["lambda_scale"]
            self.log["lambda_rule"] = f"fixed {s['lambda_gl']:g} × lambda_scale {s['lambda_scale']:g}"
        else:
            from lrdeploy.train import lr_at

            if self._config is None or not self._total_steps:
                raise RuntimeError("maestro's auto λ needs the trainer's config and schedule "
                                   "(param_groups and on_schedule run first)")
            steps = range(self._start_step, self._total_steps)  # after a dense warm-up: the factorised part
            lr_sum = sum(lr_at(self._config, t, self._total_steps) for t in steps)
            r_max = max((layer.full_rank for _, layer in self.layers), default=1)
            derived = s["pull"] / (2.0 * math.sqrt(r_max) * max(lr_sum, 1e-12))
            capped = min(derived, LAMBDA_AUTO_MAX)
            self._lambda = capped * s["lambda_scale"]
            self.log["lambda_rule"] = (f"auto: pull {s['pull']:g} / (2·√{r_max} · Σlr {lr_sum:.4g} over "
                                       f"{len(steps)} steps) = {derived:.3g}"
                                       f"{f', capped at {LAMBDA_AUTO_MAX:g}' if capped < derived else ''}"
                                       f" × lambda_scale {s['lambda_scale']:g}")
        self.log["lambda_gl"] = self._lambda
        return self._lambda

    def on_model_replaced(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._attach(model)

    def on_epoch_start(self, epoch: int) -> None:
        self._epoch = epoch

    def group_lasso(self) -> torch.Tensor:
        return torch.stack([layer.group_lasso() for _, layer in self.layers]).sum()

    def training_loss(self, model: nn.Module, xb: Any, yb: torch.Tensor):
        """Full pass + self-distilled sampled pass + λ·GL. ``xb`` may be a tuple (translation: the model
        takes ``(src, tgt_in)``, logits are N×T×V and padding targets are ignored, as in ``seq2seq``)."""
        if not self.decomposed:  # dense warm-up: the task's own loss
            return None
        assert self.sampler is not None
        sequence = isinstance(xb, tuple)
        # ``model`` may be a DistributedDataParallel wrapper: the full pass goes through it (one DDP forward
        # per backward, so gradients are averaged once); the sampled pass uses the module itself, and its
        # gradients join the same backward before the wrapper reduces them
        inner = getattr(model, "module", model)
        run = (lambda m=model: m(*xb)) if sequence else (lambda m=model: m(xb))
        task_loss = self._sequence_loss if sequence else F.cross_entropy
        if self.settings["full_pass"]:
            logits = run()
            loss = task_loss(logits, yb)
            with self.sampler.sampled():
                partial = run(inner)
            loss = loss + _distillation(partial, logits.detach(), yb if sequence else None)
        else:
            with self.sampler.sampled():
                logits = run()
            loss = task_loss(logits, yb)
        lam = self.lambda_gl()
        if lam > 0:
            loss = loss + lam * self.group_lasso()
        return loss, logits

    def _sequence_loss(self, logits: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
        from lrdeploy.seq2seq import translation_loss

        return translation_loss(logits, tgt_out, getattr(self, "_label_smoothing", 0.0))

    def shrink(self) -> dict[str, int]:
        """Progressive shrinking of every layer by ε; the sampler is rebuilt when a rank fell."""
        before = self.ranks()
        threshold = self.settings["threshold"]
        # rank 0 decides for every replica (methods.md: decisions that change the model are broadcast)
        target = distributed.on_main(lambda: {name: layer.rank_after_shrink(threshold)
                                              for name, layer in self.layers})
        for name, layer in self.layers:
            layer.set_rank(target[name])
        after = self.ranks()
        if after != before and self.sampler is not None:
            self.sampler.rebuild([m for _, m in self.layers])
        self._shrunk_epoch = self._epoch
        return after

    def before_evaluate(self, model: nn.Module, train_x: Any) -> None:
        if not self.decomposed:
            return
        if self.settings["progressive"] and self._shrunk_epoch != self._epoch:
            self.shrink()
        if self.settings["recalibrate_bn"]:
            recalibrate_batchnorm(
                model, train_x, batch_size=self.settings["bn_batch_size"], limit=self.settings["bn_limit"]
            )

    def on_epoch_end(self, epoch: int, model: nn.Module, metrics: dict) -> nn.Module | None:
        self._epoch = epoch
        if not self.decomposed:  # the end of the dense warm-up: the trainer continues with a decomposed copy
            if epoch + 1 < self.settings["dense_warmup"]:
                return None
            new = self.prepare(copy.deepcopy(model))
            self.log["decomposed_after_epoch"] = epoch + 1
            epochs = getattr(self._config, "epochs", None)
            if self._total_steps and epochs:
                self._start_step = round((epoch + 1) * self._total_steps / epochs)
            return new
        if self.settings["progressive"] and self._shrunk_epoch != epoch:
            self.shrink()
        self.log["epochs"].append({"epoch": epoch, "ranks": self.ranks()})
        return None

    def manifest_record(self) -> dict[str, Any]:
        record = super().manifest_record()
        record["final_ranks"] = self.ranks()
        return record

    # --- checkpoints ---

    def state_dict(self) -> dict[str, Any]:
        """The sampler's RNG and position, the epoch bookkeeping and the log (ranks live in the model)."""
        sampler = self.sampler
        return {
            "epoch": self._epoch, "shrunk_epoch": self._shrunk_epoch, "start_step": self._start_step,
            "label_smoothing": self._label_smoothing,
            "log": self.log,
            "sampler": None if sampler is None else {
                "rng": sampler._rng.getstate(), "order": [list(p) for p in sampler._order],
                "pos": sampler._pos,
            },
        }

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore :meth:`state_dict` onto ``model`` (rebuilt with the checkpoint's Maestro layers)."""
        self._epoch, self._shrunk_epoch = int(state["epoch"]), state["shrunk_epoch"]
        self._start_step = int(state.get("start_step", 0))
        self._label_smoothing = float(state["label_smoothing"])
        self.log = state["log"]
        full_ranks = dict(self.log.get("full_ranks", {}))
        self.sampler = None
        self._attach(model)
        self.log["full_ranks"] = full_ranks or self.log["full_ranks"]
        saved = state["sampler"]
        if saved is not None and self.sampler is not None:
            self.sampler._rng.setstate(saved["rng"])
            self.sampler._order = [tuple(p) for p in saved["order"]]
            self.sampler._pos = int(saved["pos"])


def _distillation(partial: torch.Tensor, full: torch.Tensor, tgt_out: torch.Tensor | None) -> torch.Tensor:
    """CE of the sampled pass against softmax(full pass) — class dim 1 for N×C logits; for N×T×V sequence
    logits, over the non-padding target positions only."""
    if tgt_out is None:
        return F.cross_entropy(partial, full.softmax(1))
    from lrdeploy.data.tokenizer import PAD_ID

    keep = tgt_out.flatten() != PAD_ID
    vocab = partial.shape[-1]
    targets = full.reshape(-1, vocab)[keep].float().softmax(1)
    return F.cross_entropy(partial.reshape(-1, vocab)[keep].float(), targets)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
