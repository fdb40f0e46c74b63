"""Training and evaluation for translation: :mod:`lrdeploy.train`'s loop conventions, for two inputs.

What is shared with ``train``: the config's common fields, the seeding/determinism/thread context, the
progress bar, and the hook protocol, with the same names and call points. What differs:

- inputs are ``(src, tgt_in)`` pairs and labels are ``tgt_out`` (N×T ids), so ``training_loss(model,
  (src, tgt_in), tgt_out)`` receives a tuple; call ``model(*xb)``. A hook that replaces the loss should use
  :func:`translation_loss` (label smoothing, padding ignored) so its objective matches the default one.
  ``before_evaluate(model, (src, tgt_in))`` likewise gets the training pairs.
- AdamW (β₁ = ``momentum``, β₂ = 0.98) by default: plain SGD trains Transformers poorly; ``optimizer="sgd"``
  remains for methods whose recipe is SGD.
- Warm-up then inverse-square-root decay (Vaswani et al.) or cosine decay, per step.
- Batches are length-bucketed (shuffled, sorted by source length within pools of 50 batches, pool order
  shuffled) and trimmed to their longest sequence: a random batch of Multi30k is ~60 % padding otherwise.

Metrics: perplexity and token accuracy by teacher forcing (cheap, every epoch), and corpus BLEU-4 of greedy
translations (decoding is the expensive part, so by default only once, after the last epoch).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrdeploy.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, WordTokenizer
from lrdeploy.errors import UserError
from lrdeploy.train import NonFiniteLossWatch, TrainConfig, _call, _device, _first, _progress, _reproducible

SCHEDULES = ("inverse_sqrt", "cosine")
OPTIMIZERS = ("adamw", "sgd")
_POOL = 50  # batches per length-sorting pool


@dataclass
class TranslationConfig(TrainConfig):
    """TrainConfig with translation defaults; ``momentum`` is Adam's β₁ when ``optimizer="adamw"``."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3  # peak, reached after warm-up
    weight_decay: float = 0.01
    schedule: str = "inverse_sqrt"
    optimizer: str = "adamw"
    warmup_steps: int = 400
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    eval_batch_size: int = 256
    bleu_every_epoch: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"unknown learning-rate schedule '{self.schedule}'", hint=f"use {' or '.join(SCHEDULES)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer '{self.optimizer}'", hint=f"use {' or '.join(OPTIMIZERS)}")
        checks = (
            ("warmup_steps", self.warmup_steps >= 0, "zero or positive"),
            ("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "in [0, 1)"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "positive or None"),
            ("eval_batch_size", self.eval_batch_size >= 1, "at least 1"),
        )
        for name, ok, want in checks:
            if not ok:
                raise UserError(f"training setting {name} must be {want}, got {getattr(self, name)!r}")
        if getattr(self, "augment", None) is not None:  # an image-only TrainConfig option
            raise UserError("data augmentation does not apply to translation", hint="drop --augment")
        # The base class checks the shared fields but knows only its own schedules: show it one of them.
        own, self.schedule = self.schedule, "cosine"
        try:
            super().__post_init__()
        finally:
            self.schedule = own


@dataclass
class TranslationResult:
    metrics: dict[str, Any]  # final evaluation of the validation set (empty without one)
    train_loss: float
    epochs: int
    seconds: float
    tokens_per_s: float
    history: list[dict[str, Any]]
    model: nn.Module | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def translation_lr_at(config: TranslationConfig, step: int, total_steps: int) -> float:
    """Learning rate before optimiser step ``step``: linear warm-up to ``lr``, then the chosen decay."""
    warm = config.warmup_steps
    if warm and step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "inverse_sqrt":
        return config.lr * math.sqrt(max(warm, 1) / (step + 1))
    frac = (step - warm) / max(total_steps - warm, 1)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def translation_loss(
    logits: torch.Tensor, tgt_out: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy over non-padding target tokens (N×T×V logits, N×T labels)."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD_ID, label_smoothing=label_smoothing
    )


def _make_optimizer(
    model: nn.Module, config: TranslationConfig, hooks: Sequence[object]
) -> torch.optim.Optimizer:
    groups = _first(hooks, "param_groups", model, config)
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.momentum, 0.98), eps=1e-9, weight_decay=config.weight_decay
    )


def _trim(ids: torch.Tensor) -> torch.Tensor:
    """Drop the columns that are padding in every row (keeps at least one)."""
    width = int((ids != PAD_ID).sum(1).max().clamp(min=1))
    return ids[:, :width]


def bucketed_batches(
    lengths: torch.Tensor, batch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Index batches of similar length, in random order; a pure function of the generator's state."""
    order = torch.randperm(len(lengths), generator=generator)
    batches = []
    pool = batch_size * _POOL
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[torch.sort(lengths[chunk], stable=True).indices]
        batches += list(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# --- evaluation ---


@torch.no_grad()
def teacher_forced_metrics(model: nn.Module, dataset: Any, batch_size: int = 256) -> dict[str, float]:
    """Loss (nats/token), perplexity and token accuracy over non-padding target tokens, in eval mode."""
    if len(dataset) == 0:
        raise UserError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    device = _device(model)
    loss_sum, correct, tokens = 0.0, 0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            src = _trim(dataset.src[start : start + batch_size]).to(device)
            tgt = _trim(dataset.tgt[start : start + batch_size]).to(device)
            tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
            logits = model(src, tgt_in).float()
            keep = tgt_out != PAD_ID
            n = int(keep.sum())
            loss_sum += float(translation_loss(logits, tgt_out)) * n
            correct += int(((logits.argmax(-1) == tgt_out) & keep).sum())
            tokens += n
    finally:
        model.train(was_training)
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": correct / tokens}


@torch.no_grad()
def greedy_decode(
    model: nn.Module, src: torch.Tensor, max_len: int, batch_size: int = 256
) -> list[list[int]]:
    """Greedy translations (ids after ``<bos>``, up to and excluding ``<eos>``) for each row of ``src``.

    Uses the model's key/value cache (``start_decoding``/``decode_step``) when it has one, otherwise re-runs
    ``model(src, prefix)`` each step (any two-input model works, only slower).
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    out: list[list[int]] = []
    cached = all(hasattr(model, a) for a in ("encode", "start_decoding", "decode_step"))
    try:
        for start in range(0, src.shape[0], batch_size):
            batch = _trim(src[start : start + batch_size]).to(device)
            n = batch.shape[0]
            tokens = torch.full((n, 1), BOS_ID, dtype=torch.long, device=device)
            done = torch.zeros(n, dtype=torch.bool, device=device)
            if cached:
                memory, src_mask = model.encode(batch)
                states = model.start_decoding(memory)
            for pos in range(max_len - 1):
                if cached:
                    logits = model.decode_step(tokens[:, -1:], pos, states, src_mask)
                else:
                    logits = model(batch, tokens)[:, -1]
                nxt = logits.argmax(-1).masked_fill(done, PAD_ID)
                tokens = torch.cat((tokens, nxt.unsqueeze(1)), dim=1)
                done |= nxt == EOS_ID
                if bool(done.all()):
                    break
            for row in tokens[:, 1:].tolist():
                out.append(row[: row.index(EOS_ID)] if EOS_ID in row else [t for t in row if t != PAD_ID])
    finally:
        model.train(was_training)
    return out


def _decode_len(model: nn.Module, dataset: Any) -> int:
    model_max = getattr(model, "max_len", None) or 128
    return int(min(model_max, getattr(dataset, "max_len", model_max)))


def evaluate_translation(
    model: nn.Module, dataset: Any, *, batch_size: int = 256, bleu: bool = True
) -> dict[str, float | None]:
    """``{"loss", "perplexity", "token_accuracy", "bleu"}`` on a :class:`TranslationDataset`.

    Perplexity and token accuracy are teacher-forced over non-padding target tokens (no label smoothing).
    BLEU is corpus BLEU-4 in 0–100 (the conventional scale) of greedy translations against the tokenised,
    untruncated references; ``bleu=False`` skips the decoding and reports None.
    """
    metrics: dict[str, float | None] = dict(teacher_forced_metrics(model, dataset, batch_size))
    metrics["bleu"] = None
    if bleu:
        hyps = greedy_decode(model, dataset.src, _decode_len(model, dataset), batch_size)
        tok = dataset.tgt_tokenizer
        metrics["bleu"] = corpus_bleu([tok.decode_tokens(h) for h in hyps], dataset.references())
    return metrics


def translate(
    model: nn.Module,
    sentences: Sequence[str],
    src_tokenizer: WordTokenizer,
    tgt_tokenizer: WordTokenizer,
    max_len: int | None = None,
) -> list[str]:
    """Greedy translations of raw sentences (lower-cased, space-separated tokens)."""
    limit = max_len or getattr(model, "max_len", 128)
    rows = [src_tokenizer.encode(s)[: limit - 1] + [EOS_ID] for s in sentences]
    width = max((len(r) for r in rows), default=1)
    src = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        src[i, : len(r)] = torch.tensor(r)
    return [tgt_tokenizer.decode(h) for h in greedy_decode(model, src, limit)]


# --- BLEU ---


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu_stats(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[str] | Sequence[Sequence[str]]],
    max_n: int = 4,
) -> dict[str, Any]:
    """Corpus BLEU (Papineni et al. 2002) with its parts, on pre-tokenised text.

    Clipped n-gram matches and totals are summed over the corpus before dividing (not averaged per
    sentence); the brevity penalty uses the total hypothesis length and, per sentence, the reference length
    closest to the hypothesis (the shorter on a tie). No smoothing: any n-gram order without a match gives
    0, as in sacreBLEU's ``smooth_method="none"``. Each reference entry may be one token list or several.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        refs = [ref] if not ref or isinstance(ref[0], str) else list(ref)
        hyp_len += len(hyp)
        ref_len += min((len(r) for r in refs), key=lambda n: (abs(n - len(hyp)), n))
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            best: Counter[tuple[str, ...]] = Counter()
            for r in refs:
                best |= _ngrams(r, n)  # per-n-gram maximum over the references
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals, strict=True)]
    bp = math.exp(min(0.0, 1.0 - ref_len / hyp_len)) if hyp_len else 0.0
    score = 0.0
    if min(matches) > 0:
        score = 100.0 * bp * math.exp(sum(math.log(p) for p in precisions) / max_n)
    return {
        "bleu": score,
        "precisions": precisions,
        "matches": matches,
        "totals": totals,
        "brevity_penalty": bp,
        "hyp_len": hyp_len,
        "ref_len": ref_len,
    }


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[str] | Sequence[Sequence[str]]],
    max_n: int = 4,
) -> float:
    """Corpus BLEU-``max_n`` in 0–100 (see :func:`bleu_stats`)."""
    return float(bleu_stats(hypotheses, references, max_n)["bleu"])


# --- training ---


@dataclass
class _Loop:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TranslationConfig
    total_steps: int
    hooks: Sequence[object]
    progress: Any
    task: Any
    step: int = 0


def _train_epoch(
    loop: _Loop, src: torch.Tensor, tgt: torch.Tensor, batches: list[torch.Tensor], epoch: int
) -> dict:
    model, config = loop.model, loop.config
    device = _device(model)
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    tokens, lr = 0, config.lr
    watch = NonFiniteLossWatch(device)
    start = time.perf_counter()
    for i, idx in enumerate(batches):
        s = _trim(src[idx]).to(device, non_blocking=True)
        t = _trim(tgt[idx]).to(device, non_blocking=True)
        tgt_in, tgt_out = t[:, :-1], t[:, 1:]
        lr = translation_lr_at(config, loop.step, loop.total_steps)
        for group in loop.optimizer.param_groups:
            group["lr"] = lr
        custom = _first(loop.hooks, "training_loss", model, (s, tgt_in), tgt_out)
        if custom is None:
            logits = model(s, tgt_in)
            loss = translation_loss(logits, tgt_out, config.label_smoothing)
        else:
            loss, logits = custom
        watch.observe(loss, i)
        loop.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _call(loop.hooks, "after_backward", model)
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        loop.optimizer.step()
        _call(loop.hooks, "after_step", model)
        loop.step += 1
        keep = tgt_out != PAD_ID
        n = int(keep.sum())
        tokens += n
        loss_sum += loss.detach() * n
        correct += ((logits.detach().argmax(-1) == tgt_out) & keep).sum()
        if i % 10 == 9 or i == len(batches) - 1:  # where the progress line syncs anyway
            watch.check(epoch, config.lr)
        if config.progress and (i % 10 == 9 or i == len(batches) - 1):
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            acc = correct.item() / tokens
            stats = f"loss {loss_sum.item() / tokens:.4f}  tok acc {acc:.1%}  {rate:,.0f} tok/s"
            desc = f"epoch {epoch + 1}/{config.epochs}"
            loop.progress.update(loop.task, completed=loop.step, stats=stats, description=desc)
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch,
        "train_loss": loss_sum.item() / tokens,
        "train_token_accuracy": correct.item() / tokens,
        "val_loss": None,
        "val_perplexity": None,
        "val_token_accuracy": None,
        "val_bleu": None,
        "lr": lr,
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
    }


def _epoch_line(m: dict, epochs: int) -> str:
    val = ""
    if m["val_perplexity"] is not None:
        val = f"  val ppl {m['val_perplexity']:.2f}  val tok acc {m['val_token_accuracy']:.2%}"
    if m["val_bleu"] is not None:
        val += f"  BLEU {m['val_bleu']:.2f}"
    return (
        f"epoch {m['epoch'] + 1}/{epochs}  loss {m['train_loss']:.4f}"
        f"  tok acc {m['train_token_accuracy']:.2%}{val}  {m['tokens_per_s']:,.0f} tok/s  {m['seconds']:.1f}s"
    )


def _end_epoch(loop: _Loop, epoch: int, metrics: dict) -> None:
    """``on_epoch_end`` hooks in order; a returned module replaces the model and the optimiser is rebuilt."""
    replaced = False
    for hook in loop.hooks:
        fn = getattr(hook, "on_epoch_end", None)
        new = fn(epoch, loop.model, metrics) if fn is not None else None
        if new is not None and new is not loop.model:
            loop.model, replaced = new, True
    if replaced:
        loop.optimizer = _make_optimizer(loop.model, loop.config, loop.hooks)
        _call(loop.hooks, "on_model_replaced", loop.model, loop.optimizer)


def train_translation(
    model: nn.Module,
    train_set: Any,
    val_set: Any | None = None,
    config: TranslationConfig | None = None,
    hooks: Sequence[object] = (),
) -> TranslationResult:
    """Train ``model`` in place on a :class:`TranslationDataset`, evaluating ``val_set`` after each epoch.

    Returns a :class:`TranslationResult`; use ``result.model``, since a hook may have replaced the model.
    ``result.metrics`` is the final :func:`evaluate_translation` of ``val_set`` (BLEU included). Two calls
    with the same seed, initial weights, data and thread count give bit-identical weights.
    """
    config = config or TranslationConfig()
    if not isinstance(config, TranslationConfig):
        raise TypeError("train_translation needs a TranslationConfig (translation defaults differ)")
    data = train_set if config.limit_train is None else train_set.head(config.limit_train)
    src, tgt = data.src, data.tgt
    n = int(src.shape[0])
    if n == 0:
        raise UserError("the training set is empty")
    lengths = (src != PAD_ID).sum(1)
    total_steps = math.ceil(n / config.batch_size) * config.epochs
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    final: dict[str, Any] = {}
    evaluated: nn.Module | None = None

    with _reproducible(config.seed, config.num_threads), _progress(config.progress) as progress:
        generator = torch.Generator().manual_seed(config.seed)
        optimizer = _make_optimizer(model, config, hooks)
        _call(hooks, "on_train_start", model, optimizer)
        task = progress.add_task("train", total=total_steps, stats="")
        loop = _Loop(model, optimizer, config, total_steps, hooks, progress, task)
        for epoch in range(config.epochs):
            _call(hooks, "on_epoch_start", epoch)
            batches = bucketed_batches(lengths, config.batch_size, generator)
            metrics = _train_epoch(loop, src, tgt, batches, epoch)
            if val_set is not None:
                _call(hooks, "before_evaluate", loop.model, (src, tgt[:, :-1]))
                last = epoch == config.epochs - 1
                with_bleu = config.bleu_every_epoch or last
                final = evaluate_translation(
                    loop.model, val_set, batch_size=config.eval_batch_size, bleu=with_bleu
                )
                evaluated = loop.model
                metrics.update({f"val_{k}": v for k, v in final.items()})
            history.append(metrics)
            if config.progress:
                progress.console.print(_epoch_line(metrics, config.epochs))
            _end_epoch(loop, epoch, metrics)
        if val_set is not None and evaluated is not loop.model:  # the last epoch's hook swapped the model
            _call(hooks, "before_evaluate", loop.model, (src, tgt[:, :-1]))
            final = evaluate_translation(loop.model, val_set, batch_size=config.eval_batch_size)

    train_seconds = sum(m["seconds"] for m in history)
    tokens = int((tgt[:, 1:] != PAD_ID).sum()) * config.epochs
    return TranslationResult(
        metrics=dict(final),
        train_loss=history[-1]["train_loss"],
        epochs=config.epochs,
        seconds=time.perf_counter() - started,
        tokens_per_s=tokens / max(train_seconds, 1e-9),
        history=history,
        model=loop.model,
    )
