"""Translation (seq2seq): inputs ``src``, ``tgt_in`` (int64 token ids, dynamic batch and lengths), output
``logits``; metrics perplexity, token accuracy (teacher forced) and corpus BLEU-4 of greedy translations.

The vocabularies are built from the training split and kept in the bundle (``tokenizers``), so later commands
encode text with the ids the model was trained on. Training batches are length-bucketed and trimmed to their
longest sentence (a random Multi30k batch is ~60 % padding otherwise).

Judging any predict function (PyTorch or a runtime of the exported graph, ``src, tgt_in → logits``):

- perplexity and token accuracy by teacher forcing over the non-padding target tokens
  (:func:`teacher_forced`), and corpus BLEU-4 (0-100) of greedy translations (:func:`greedy_translate`).
  The exported graph is the teacher-forced forward, so greedy decoding re-runs it on the growing prefix
  (O(T²), no key/value cache): slower than ``lrdeploy.seq2seq.greedy_decode`` in PyTorch, but it is what a
  deployment of this graph computes. The numbers match :func:`lrdeploy.seq2seq.evaluate_translation` up to
  float rounding.
- parity rows: the logits of every non-padding target token of the first :data:`PARITY_SENTENCES` sentences
  (one row per predicted token, so top-1 agreement is per token).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.tasks import register_task
from lrdeploy.tasks.base import Batch, BudgetSettings, Feeds, Metric, Predict, Task, probe_forward

MAX_LEN = 64  # data max_len (with <bos>/<eos>); no Multi30k sentence is cut at 64
DEFAULT_MAX_PERPLEXITY_INCREASE = 0.10  # relative: candidate perplexity ≤ 1.1 × the dense one
PARITY_SENTENCES = 128  # parity rows: target tokens of this many sentences (vocabulary-sized rows)
EVAL_BATCH = 64  # sentences per call: N×T×V float32 logits, ~100 MB at T = 64 and V = 6,000


@register_task
class TranslationTask(Task):
    name = "translation"
    description = "sequence-to-sequence translation: perplexity, token accuracy, BLEU"
    headline = Metric("bleu", "BLEU", points=1.0, percent=False)
    datasets = ("multi30k", "multi30k-de-en", "multi30k-en-de")
    default_dataset = "multi30k"
    train_defaults = {"lr": 1e-3, "weight_decay": 0.01, "schedule": "inverse_sqrt", "optimizer": "adamw",
                      "epochs": 10, "warmup_steps": 400, "label_smoothing": 0.1, "grad_clip": 1.0}
    finetune_defaults = {"lr": 3e-4, "warmup_steps": 100}  # recovering an already trained Transformer
    rate_unit = "tok"
    hits_label = "token acc"

    def accepts_dataset(self, name: str) -> bool:
        from lrdeploy.data.multi30k import TRANSLATION_DATASETS

        return str(name).strip().lower().replace("_", "-") in TRANSLATION_DATASETS

    def metrics(self) -> tuple[Metric, ...]:
        return (self.headline, Metric("perplexity", "perplexity", higher_is_better=False, points=1.0,
                                      percent=False), Metric("token_accuracy", "token accuracy"))

    def input_names(self, model: nn.Module | None = None) -> tuple[str, ...]:
        return tuple(getattr(model, "input_names", ()) or ("src", "tgt_in"))

    def output_names(self, model: nn.Module | None = None) -> tuple[str, ...]:
        return tuple(getattr(model, "output_names", ()) or ("logits",))

    # --- data ----------------------------------------------------------------------------------------
    def load(self, dataset: str, split: str, *, data_dir: Path | None = None, limit: int | None = None,
             manifest: Mapping[str, Any] | None = None,
             model_args: Mapping[str, Any] | None = None) -> Any:
        from lrdeploy.data.multi30k import build_tokenizers, load_translation, tokenizers_from_dict

        recorded = _recorded_tokenizers(manifest)
        tokenizers = tokenizers_from_dict(recorded) if recorded else build_tokenizers(dataset, data_dir)
        cap = (model_args or {}).get("max_len")
        max_len = min(MAX_LEN, int(cap)) if isinstance(cap, int) else MAX_LEN
        return load_translation(dataset, split, data_dir, limit=limit, tokenizers=tokenizers, max_len=max_len)

    def model_args(self, spec: Any, train_data: Any, user_args: Mapping[str, Any]) -> dict[str, Any]:
        src, tgt = train_data.tokenizers
        return {"src_vocab": len(src), "tgt_vocab": len(tgt), **user_args}

    def manifest_extra(self, train_data: Any) -> dict[str, Any]:
        return {"tokenizers": train_data.tokenizers_dict()}

    def manifest_extra_from(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        recorded = _recorded_tokenizers(manifest)
        return {"tokenizers": recorded} if recorded else {}

    def check_model(self, model: nn.Module, data: Any, model_name: str, dataset_name: str) -> None:
        probe_forward(model, (data.src[:1], data.tgt_in[:1]),
                      f"model {model_name} cannot take {dataset_name} sentence pairs",
                      "check the --model-arg values (vocabulary sizes come from the data)")

    # --- training --------------------------------------------------------------------------------------
    def num_batches(self, n: int, batch_size: int) -> int:
        from lrdeploy.seq2seq import POOL

        pool = batch_size * POOL  # bucketed_batches splits each pool of sentences on its own
        return sum(-(-min(pool, n - start) // batch_size) for start in range(0, n, pool))

    def train_batches(self, data: Any, batch_size: int, generator: torch.Generator,
                      limit: int | None = None, augment: Any = None) -> Iterator[Batch]:
        from lrdeploy.data.tokenizer import PAD_ID
        from lrdeploy.seq2seq import bucketed_batches, trim

        if augment is not None:
            raise UserError("data augmentation does not apply to translation", hint="drop --augment")
        src, tgt = data.src, data.tgt
        if limit is not None:
            src, tgt = src[:limit], tgt[:limit]
        for idx in bucketed_batches((src != PAD_ID).sum(1), batch_size, generator):
            t = trim(tgt[idx])
            yield (trim(src[idx]), t[:, :-1]), t[:, 1:]

    def raw_inputs(self, data: Any) -> Any:
        return (data.src, data.tgt[:, :-1])

    def loss(self, outputs: Any, target: Any, config: Any) -> torch.Tensor:
        from lrdeploy.seq2seq import translation_loss

        return translation_loss(outputs, target, float(getattr(config, "label_smoothing", 0.0)))

    def step_stats(self, outputs: Any, target: Any) -> tuple[int, torch.Tensor]:
        from lrdeploy.data.tokenizer import PAD_ID

        keep = target != PAD_ID
        return int(keep.sum()), ((outputs.detach().argmax(-1) == target) & keep).sum()

    def evaluate_model(self, model: nn.Module, data: Any, *, final: bool = True,
                       batch_size: int = 256) -> dict[str, float | None]:
        """In PyTorch with the key/value cache (fast greedy decoding); BLEU only when ``final``."""
        from lrdeploy.seq2seq import evaluate_translation

        return evaluate_translation(model, data, batch_size=batch_size, bleu=final)

    # --- judging any runtime -----------------------------------------------------------------------------
    def evaluate(self, predict: Predict, data: Any, *, final: bool = True,
                 batch_size: int = EVAL_BATCH) -> dict[str, float | None]:
        return self.evaluate_with_rows(predict, data, final=final, batch_size=batch_size)[0]

    def evaluate_with_rows(self, predict: Predict, data: Any, *, final: bool = True,
                           batch_size: int = EVAL_BATCH, parity_examples: int = PARITY_SENTENCES
                           ) -> tuple[dict[str, float | None], np.ndarray]:
        """``({"loss", "perplexity", "token_accuracy", "bleu"}, parity rows)``: teacher-forced metrics and
        (when ``final``) BLEU of greedy translations decoded by re-running ``predict`` on each prefix (see
        the module docstring); parity rows are the logits of every non-padding target token of the first
        ``parity_examples`` sentences."""
        from lrdeploy.seq2seq import corpus_bleu

        metrics: dict[str, float | None]
        metrics, rows = teacher_forced(predict, data, batch_size=batch_size,
                                       parity_sentences=min(parity_examples, len(data)))
        metrics["bleu"] = None
        if final:
            hyps = greedy_translate(predict, data.src.numpy(), int(data.max_len), batch_size=batch_size)
            tok = data.tgt_tokenizer
            metrics["bleu"] = corpus_bleu([tok.decode_tokens(h) for h in hyps], data.references())
        return metrics, rows

    def describe_data(self, data: Any) -> dict[str, Any]:
        return {"languages": f"{data.src_lang}-{data.tgt_lang}"}

    def parity_note(self, data: Any, examples: int) -> str | None:
        n = min(examples, len(data))
        return f"non-padding target tokens of the first {n} sentences (teacher-forced)"

    def feeds(self, data: Any, n: int, *, offset: int = 0) -> Feeds:
        from lrdeploy.seq2seq import trim

        idx = torch.from_numpy((np.arange(n) + offset) % len(data))
        tgt = trim(data.tgt[idx])
        return {"src": trim(data.src[idx]).numpy(), "tgt_in": np.ascontiguousarray(tgt[:, :-1].numpy())}

    def labels(self, data: Any, n: int) -> np.ndarray | None:
        """Target token ids matching :meth:`feeds` (N × T, padding -1): token accuracy of a graph's logits."""
        from lrdeploy.data.tokenizer import PAD_ID
        from lrdeploy.seq2seq import trim

        idx = torch.from_numpy(np.arange(n) % len(data))
        out = trim(data.tgt[idx])[:, 1:].numpy().copy()
        out[out == PAD_ID] = -1
        return out

    def parity_rows(self, outputs: Mapping[str, np.ndarray], feeds: Feeds) -> np.ndarray:
        from lrdeploy.data.tokenizer import EOS_ID, PAD_ID

        logits = np.asarray(outputs.get("logits", next(iter(outputs.values()))))
        # the rows teacher forcing scores: a target token follows (the decoder input is a word or <bos>)
        keep = (feeds["tgt_in"] != PAD_ID) & (feeds["tgt_in"] != EOS_ID)
        return logits[keep]

    def budget_checks(self, reference: Mapping[str, Any], candidate: Mapping[str, Any],
                      parity: Mapping[str, Any], budgets: BudgetSettings) -> list[dict[str, Any]]:
        checks = super().budget_checks(reference, candidate, parity, budgets)
        limit = (DEFAULT_MAX_PERPLEXITY_INCREASE if budgets.max_perplexity_increase is None
                 else budgets.max_perplexity_increase)
        ref, cand = reference.get("perplexity"), candidate.get("perplexity")
        increase = (cand / ref - 1.0 if ref and ref > 0 else math.inf) if cand is not None else None
        checks.insert(1, {"name": "perplexity increase (relative)", "limit": limit, "value": increase,
                          "passed": increase is not None and increase <= limit})
        return checks


def _recorded_tokenizers(manifest: Mapping[str, Any] | None) -> Any:
    """The vocabularies a manifest records: at the top (bundles from ``train``) or in its dataset record."""
    for holder in (manifest or {}, (manifest or {}).get("dataset") or {}):
        if isinstance(holder, Mapping) and holder.get("tokenizers"):
            return holder["tokenizers"]
    return None


# --- running a graph (any predict function) on a split --------------------------------------------------
def _trim(ids: np.ndarray) -> np.ndarray:
    """Drop the columns that are padding in every row (keeps at least one): ids are padded at the end."""
    from lrdeploy.data.tokenizer import PAD_ID

    width = max(int((ids != PAD_ID).sum(1).max(initial=1)), 1)
    return np.ascontiguousarray(ids[:, :width])


def _logits(predict: Predict, src: np.ndarray, tgt_in: np.ndarray) -> np.ndarray:
    out = predict({"src": src, "tgt_in": tgt_in})
    return np.asarray(out.get("logits", next(iter(out.values()))), dtype=np.float32)


def teacher_forced(predict: Predict, dataset: Any, *, batch_size: int = EVAL_BATCH,
                   parity_sentences: int = PARITY_SENTENCES) -> tuple[dict[str, float | None], np.ndarray]:
    """(loss/perplexity/token accuracy over non-padding target tokens, logits rows of the first
    ``parity_sentences`` sentences' target tokens) from one teacher-forced pass of ``predict``."""
    from lrdeploy.data.tokenizer import PAD_ID

    src_all, tgt_all = dataset.src.numpy(), dataset.tgt.numpy()
    n = len(src_all)
    if n == 0:
        raise UserError("cannot evaluate on an empty dataset")
    loss_sum, correct, tokens = 0.0, 0, 0
    rows = []
    for start in range(0, n, batch_size):
        src = _trim(src_all[start : start + batch_size])
        tgt = _trim(tgt_all[start : start + batch_size])
        tgt_in, tgt_out = np.ascontiguousarray(tgt[:, :-1]), tgt[:, 1:]
        logits = _logits(predict, src, tgt_in)
        keep = tgt_out != PAD_ID
        sel = logits[keep].astype(np.float64)
        labels = tgt_out[keep]
        top = sel.max(axis=1, keepdims=True)
        lse = (top + np.log(np.exp(sel - top).sum(axis=1, keepdims=True)))[:, 0]
        loss_sum += float((lse - sel[np.arange(len(labels)), labels]).sum())
        correct += int((sel.argmax(axis=1) == labels).sum())
        tokens += int(keep.sum())
        m = min(parity_sentences - start, len(src))
        if m > 0:
            rows.append(logits[:m][keep[:m]])
    loss = loss_sum / max(tokens, 1)
    metrics: dict[str, float | None] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                                        "token_accuracy": correct / max(tokens, 1)}
    return metrics, np.concatenate(rows, axis=0)


def greedy_translate(predict: Predict, src_ids: np.ndarray, max_len: int, batch_size: int = EVAL_BATCH
                     ) -> list[list[int]]:
    """Greedy translations (ids after ``<bos>``, up to and excluding ``<eos>``) of each row of ``src_ids``,
    re-running the teacher-forced graph on the growing prefix (what a deployment of this graph does)."""
    from lrdeploy.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

    out: list[list[int]] = []
    for start in range(0, len(src_ids), batch_size):
        src = _trim(src_ids[start : start + batch_size])
        tokens = np.full((len(src), 1), BOS_ID, dtype=np.int64)
        done = np.zeros(len(src), dtype=bool)
        for _ in range(max_len - 1):
            nxt = _logits(predict, src, tokens)[:, -1].argmax(axis=-1).astype(np.int64)
            nxt[done] = PAD_ID
            tokens = np.concatenate((tokens, nxt[:, None]), axis=1)
            done |= nxt == EOS_ID
            if done.all():
                break
        for row in tokens[:, 1:].tolist():
            out.append(row[: row.index(EOS_ID)] if EOS_ID in row else [t for t in row if t != PAD_ID])
    return out
