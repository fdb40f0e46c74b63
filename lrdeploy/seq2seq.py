"""Translation helpers: the loss, length-bucketed batches, PyTorch evaluation (teacher forcing, greedy
decoding with the key/value cache) and corpus BLEU.

Training goes through the one loop in :mod:`lrdeploy.train` with ``task="translation"``
(:mod:`lrdeploy.tasks.translation` supplies the batches, loss and metrics); :class:`TranslationConfig` is a
:class:`~lrdeploy.train.TrainConfig` with translation defaults: AdamW (β₁ = ``momentum``, β₂ = 0.98), warm-up
then inverse-square-root decay (Vaswani et al.), label smoothing and gradient clipping.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrdeploy.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, WordTokenizer
from lrdeploy.errors import UserError
from lrdeploy.train import TrainConfig, _device

POOL = 50  # batches per length-sorting pool


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

    def __post_init__(self) -> None:
        if getattr(self, "augment", None) is not None:  # an image-only option
            raise UserError("data augmentation does not apply to translation", hint="drop --augment")
        super().__post_init__()


def translation_loss(
    logits: torch.Tensor, tgt_out: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy over non-padding target tokens (N×T×V logits, N×T labels)."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD_ID, label_smoothing=label_smoothing
    )


def trim(ids: torch.Tensor) -> torch.Tensor:
    """Drop the columns that are padding in every row (keeps at least one)."""
    width = int((ids != PAD_ID).sum(1).max().clamp(min=1))
    return ids[:, :width]


def bucketed_batches(
    lengths: torch.Tensor, batch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Index batches of similar length, in random order; a pure function of the generator's state."""
    order = torch.randperm(len(lengths), generator=generator)
    batches = []
    pool = batch_size * POOL
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
            src = trim(dataset.src[start : start + batch_size]).to(device)
            tgt = trim(dataset.tgt[start : start + batch_size]).to(device)
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
            batch = trim(src[start : start + batch_size]).to(device)
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
