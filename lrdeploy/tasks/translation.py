"""Translation (seq2seq): inputs ``src``, ``tgt_in`` (int64 token ids, dynamic batch and lengths), output
``logits``; metrics perplexity, token accuracy (teacher forced) and corpus BLEU-4 of greedy translations.

The vocabularies are built from the training split and kept in the bundle (``tokenizers``), so later commands
encode text with the ids the model was trained on. Training batches are length-bucketed and trimmed to their
longest sentence (a random Multi30k batch is ~60 % padding otherwise).
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
from lrdeploy.tasks.base import Batch, BudgetSettings, Feeds, Metric, Predict, Task

MAX_LEN = 64  # data max_len (with <bos>/<eos>); no Multi30k sentence is cut at 64
DEFAULT_MAX_PERPLEXITY_INCREASE = 0.10  # relative: candidate perplexity ≤ 1.1 × the dense one


class _TupleRunner:
    """Adapts a named-I/O predict function to the ``run((src, tgt_in)) -> logits`` the decoders use."""

    def __init__(self, predict: Predict) -> None:
        self.predict = predict

    def run(self, pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        out = self.predict({"src": pair[0], "tgt_in": pair[1]})
        return np.asarray(out.get("logits", next(iter(out.values()))))


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

        recorded = (manifest or {}).get("tokenizers")
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
        return {"tokenizers": manifest["tokenizers"]} if manifest.get("tokenizers") else {}

    def check_model(self, model: nn.Module, data: Any, model_name: str, dataset_name: str) -> None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(data.src[:1], data.tgt_in[:1])
        except (RuntimeError, IndexError) as exc:
            raise UserError(f"model {model_name} cannot take {dataset_name} sentence pairs ({exc})",
                            "check the --model-arg values (vocabulary sizes come from the data)") from None
        finally:
            model.train(was_training)

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
                 batch_size: int = 64) -> dict[str, float | None]:
        return self.evaluate_with_rows(predict, data, final=final, batch_size=batch_size)[0]

    def evaluate_with_rows(self, predict: Predict, data: Any, *, final: bool = True, batch_size: int = 64,
                           parity_examples: int = 128) -> tuple[dict[str, float | None], np.ndarray]:
        """Teacher-forced metrics and BLEU of greedy translations decoded by re-running the graph on each
        prefix (what a deployment of this graph computes); parity rows are the logits of every non-padding
        target token of the first ``parity_examples`` sentences."""
        from lrdeploy.translation_compare import evaluate_runtime

        return evaluate_runtime(_TupleRunner(predict), data, bleu=final,
                                parity_sentences=min(parity_examples, len(data)))

    def feeds(self, data: Any, n: int, *, offset: int = 0) -> Feeds:
        from lrdeploy.seq2seq import trim

        idx = torch.from_numpy((np.arange(n) + offset) % len(data))
        tgt = trim(data.tgt[idx])
        return {"src": trim(data.src[idx]).numpy(), "tgt_in": np.ascontiguousarray(tgt[:, :-1].numpy())}

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
