"""`lrdeploy compare` for translation models: both sides run as deployed (ONNX Runtime, CPU), two inputs.

A translation artefact is a bundle of a translation model (``transformer``, or a dataset record with
``task: translation``) or an ``.onnx`` file exported from one; its manifest (stamped into the ONNX file by
``export_onnx``) carries the tokenizers (``tokenizers``), so the test split is encoded with the ids the model
was trained on. Bundles are folded and exported on the fly into a temporary directory, as for classifiers.

What is measured, all through ONNX Runtime on the exported graphs (``src``, ``tgt_in`` → ``logits``):

- ``task``: loss, perplexity and token accuracy by teacher forcing over the non-padding target tokens of the
  test split, and corpus BLEU-4 (0-100) of greedy translations. The graph is the teacher-forced forward, so
  greedy decoding re-runs it on the growing prefix (O(T²), no key/value cache): slower than
  ``lrdeploy.seq2seq.greedy_decode`` in PyTorch, but it is what a deployment of this graph computes. The
  numbers match :func:`lrdeploy.seq2seq.evaluate_translation` up to float rounding.
- ``parity``: :func:`lrdeploy.serving.parity.output_parity` over the teacher-forced logits of every
  non-padding target token of the first :data:`PARITY_SENTENCES` test sentences (one row per predicted
  token, so top-1 agreement is per token). Judged with a ``precision`` preset when one is given.
- ``latency``: :func:`lrdeploy.serving.bench.benchmark` (interleaved blocks, paired speed-ups), on real
  test sentence pairs. The harness feeds each runtime a random float array of ``(batch, *input_shape)``; a
  translation graph takes token ids, so each runtime is wrapped in :class:`_PairsAtBatch`, which keeps the
  first ``batch`` test pairs (cycled when the split is smaller, trimmed to their longest sentence) for every
  batch size and takes only the batch size from the array it is handed (``input_shape=(1,)``: a negligible
  array). Both models get the same pairs; their shapes are recorded under ``environment.latency_inputs``.
- ``budget``: BLEU drop in points (``max_bleu_drop``), relative perplexity increase
  (``max_perplexity_increase``), and optionally token-level top-1 agreement (``min_agreement``).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy.errors import UserError

DEFAULT_MAX_PERPLEXITY_INCREASE = 0.10  # relative: candidate perplexity ≤ 1.1 × the dense one
DEFAULT_MAX_BLEU_DROP = 1.0  # BLEU points
PARITY_SENTENCES = 128  # logits rows of this many sentences' target tokens (vocabulary-sized rows)
EVAL_BATCH = 64  # sentences per ORT call: N×T×V float32 logits, ~100 MB at T = 64 and V = 6,000


# --- artefacts ---------------------------------------------------------------------------------------------
@dataclass
class TranslationArtifact:
    """One side of a translation comparison, resolved to an ONNX file plus its manifest."""

    label: str
    source: Path
    kind: str  # "bundle" or "onnx"
    onnx_path: Path
    manifest: dict[str, Any]
    params: int
    flops: int | None
    onnx_bytes: int
    weights_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    trained: dict[str, Any] | None = None  # the manifest's figures (``comparison.trained_figures``)
    graph: dict[str, Any] | None = None  # how params/flops/weights_bytes were counted from the graph

    @property
    def name(self) -> str:
        return self.source.stem if self.kind == "onnx" else (self.source.name or str(self.source))

    def summary(self) -> dict[str, Any]:
        """The keys of ``comparison.Artifact.summary`` (the report schema), plus ``task``."""
        return {
            "name": self.name,
            "label": self.label,
            "source": str(self.source),
            "kind": self.kind,
            "model": (self.manifest.get("model") or {}).get("name"),
            "method": (self.manifest.get("method") or {}).get("name"),
            "params": self.params,
            "flops": self.flops,
            "onnx_bytes": self.onnx_bytes,
            "weights_bytes": self.weights_bytes,
            "structure": self.manifest.get("structure", {}),
            "task": "translation",
            **({"trained": self.trained} if self.trained else {}),
            **({"graph": self.graph} if self.graph else {}),
            **self.extra,
        }


def is_translation_manifest(manifest: Mapping[str, Any] | None) -> bool:
    """A manifest of a translation model: a registry model with several inputs, or a translation dataset."""
    from lrdeploy.models import get_spec

    manifest = manifest or {}
    if (manifest.get("dataset") or {}).get("task") == "translation":
        return True
    name = (manifest.get("model") or {}).get("name")
    if not isinstance(name, str):
        return False
    try:
        return get_spec(name).multi_input
    except UserError:
        return False


def translation_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of the translation artefact at ``path``; None when it is not one.

    Unreadable or missing paths are None too: the classification path reports those with its own errors.
    """
    from lrdeploy.bundle import read_manifest
    from lrdeploy.exporters.onnx import read_onnx_metadata

    path = Path(path)
    try:
        if path.is_dir():
            manifest = read_manifest(path)
        elif path.is_file() and path.suffix == ".onnx":
            manifest = read_onnx_metadata(path)
        else:
            return None
    except UserError:
        return None
    return manifest if is_translation_manifest(manifest) else None


def is_translation_artifact(path: str | Path) -> bool:
    return translation_manifest(path) is not None


def resolve_translation_artifact(label: str, path: Path, workdir: Path) -> TranslationArtifact:
    """Load a translation bundle and export it (folded, parity-checked), or check a translation .onnx file."""
    from lrdeploy.comparison import deployed_figures, trained_figures
    from lrdeploy.exporters.onnx import export_onnx, load_onnx_checked

    path = Path(path)
    if not path.exists():
        raise UserError(f"{label} {path} does not exist", "pass a bundle directory or an .onnx file")
    manifest = translation_manifest(path)
    if manifest is None:
        raise UserError(f"{label} {path} is not a translation model, but the other side is",
                        "compare two translation artefacts (bundles or their .onnx exports)")
    if path.is_dir():
        from lrdeploy.bundle import load_bundle

        bundle = load_bundle(path)
        onnx_path = workdir / f"{label}.onnx"
        export_onnx(bundle, onnx_path, optimize=False)
        return TranslationArtifact(
            label=label, source=path, kind="bundle", onnx_path=onnx_path, manifest=bundle.manifest,
            onnx_bytes=onnx_path.stat().st_size, trained=trained_figures(bundle.manifest),
            **deployed_figures(onnx_path),  # counted from the exported graph at the nominal 32 tokens
        )  # fmt: skip
    load_onnx_checked(path)
    return TranslationArtifact(
        label=label, source=path, kind="onnx", onnx_path=path, manifest=manifest,
        onnx_bytes=path.stat().st_size, trained=trained_figures(manifest), **deployed_figures(path),
    )  # fmt: skip


def _tokenizers(art: TranslationArtifact) -> Any:
    from lrdeploy.data.multi30k import tokenizers_from_dict

    for holder in (art.manifest, art.manifest.get("dataset") or {}):
        if isinstance(holder, Mapping) and holder.get("tokenizers"):
            return tokenizers_from_dict(holder["tokenizers"])
    return None


def load_test_split(
    ref: TranslationArtifact,
    cand: TranslationArtifact,
    *,
    dataset: str | None,
    data_dir: Path | None,
    limit: int | None,
) -> Any:
    """The test split encoded with the artefacts' tokenizers (both sides must share them)."""
    from lrdeploy.data.multi30k import TRANSLATION_DATASETS, load_translation

    toks = {art.label: _tokenizers(art) for art in (ref, cand)}
    known = [t for t in toks.values() if t is not None]
    if not known:
        raise UserError(f"translation artefacts {ref.source} and {cand.source} record no tokenizers",
                        "re-create the bundle with `lrdeploy train --data multi30k` (it stores them)")
    if len(known) == 2 and known[0] != known[1]:
        raise UserError("the two translation models were trained with different vocabularies",
                        "token ids would mean different words; compare models trained on the same data")
    record = ref.manifest.get("dataset") or cand.manifest.get("dataset") or {}
    name = dataset or record.get("name") or "multi30k"
    if name.strip().lower().replace("_", "-") not in TRANSLATION_DATASETS:
        raise UserError(f"--data {name} is not a translation dataset",
                        f"use one of: {', '.join(TRANSLATION_DATASETS)}")
    pre = record.get("preprocess") or {}
    kwargs: dict[str, Any] = {k: pre[k] for k in ("src_lang", "tgt_lang") if pre.get(k)}
    caps = [pre.get("max_len")] + [(a.manifest.get("model") or {}).get("args", {}).get("max_len")
                                   for a in (ref, cand)]
    caps = [int(c) for c in caps if isinstance(c, int)]
    if caps:
        kwargs["max_len"] = min(caps)
    return load_translation(name, "test", data_dir=data_dir, limit=limit, tokenizers=known[0], **kwargs)


# --- running the graphs ------------------------------------------------------------------------------------
def _trim(ids: np.ndarray) -> np.ndarray:
    """Drop the columns that are padding in every row (keeps at least one): ids are padded at the end."""
    from lrdeploy.data.tokenizer import PAD_ID

    width = max(int((ids != PAD_ID).sum(1).max(initial=1)), 1)
    return np.ascontiguousarray(ids[:, :width])


def teacher_forced(
    runtime: Any, dataset: Any, *, batch_size: int = EVAL_BATCH, parity_sentences: int = PARITY_SENTENCES
) -> tuple[dict[str, float], np.ndarray]:
    """(loss/perplexity/token accuracy over non-padding target tokens, logits rows of the first
    ``parity_sentences`` sentences' target tokens) from one teacher-forced pass of ``runtime``."""
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
        logits = np.asarray(runtime.run((src, tgt_in)), dtype=np.float32)
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
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
               "token_accuracy": correct / max(tokens, 1)}
    return metrics, np.concatenate(rows, axis=0)


def greedy_translate(runtime: Any, src_ids: np.ndarray, max_len: int, batch_size: int = EVAL_BATCH
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
            logits = np.asarray(runtime.run((src, tokens)))
            nxt = logits[:, -1].argmax(axis=-1).astype(np.int64)
            nxt[done] = PAD_ID
            tokens = np.concatenate((tokens, nxt[:, None]), axis=1)
            done |= nxt == EOS_ID
            if done.all():
                break
        for row in tokens[:, 1:].tolist():
            out.append(row[: row.index(EOS_ID)] if EOS_ID in row else [t for t in row if t != PAD_ID])
    return out


def evaluate_runtime(runtime: Any, dataset: Any, *, bleu: bool = True,
                     parity_sentences: int = PARITY_SENTENCES) -> tuple[dict[str, float | None], np.ndarray]:
    """``({"loss", "perplexity", "token_accuracy", "bleu"}, parity rows)`` of an ORT runtime on a
    :class:`~lrdeploy.data.multi30k.TranslationDataset` (the keys of ``seq2seq.evaluate_translation``)."""
    from lrdeploy.seq2seq import corpus_bleu

    tf, rows = teacher_forced(runtime, dataset, parity_sentences=parity_sentences)
    metrics: dict[str, float | None] = {**tf, "bleu": None}
    if bleu:
        hyps = greedy_translate(runtime, dataset.src.numpy(), int(dataset.max_len))
        tok = dataset.tgt_tokenizer
        metrics["bleu"] = corpus_bleu([tok.decode_tokens(h) for h in hyps], dataset.references())
    return metrics, rows


class _PairsAtBatch:
    """A runtime for ``serving.bench.benchmark`` that feeds real sentence pairs (see the module docstring).

    ``run(x)`` ignores ``x`` except for its length (the batch size) and runs the stored ``(src, tgt_in)``
    pair of that batch size.
    """

    def __init__(self, runtime: Any, feeds: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> None:
        self.runtime = runtime
        self.name = runtime.name
        self.feeds = dict(feeds)

    def run(self, x: Any) -> Any:
        return self.runtime.run(self.feeds[len(x)])

    def describe(self) -> dict[str, Any]:
        return {**self.runtime.describe(), "fed": "test sentence pairs (src, tgt_in) per batch size"}


def latency_feeds(dataset: Any, batch_sizes: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The first ``b`` test pairs for each batch size ``b`` (cycled when the split is smaller), trimmed."""
    src_all, tgt_all = dataset.src.numpy(), dataset.tgt.numpy()
    feeds = {}
    for b in batch_sizes:
        idx = np.arange(b) % len(src_all)
        tgt = _trim(tgt_all[idx])
        feeds[b] = (_trim(src_all[idx]), np.ascontiguousarray(tgt[:, :-1]))
    return feeds


# --- the comparison ----------------------------------------------------------------------------------------
def translation_budget(
    task: Mapping[str, Any],
    parity: Mapping[str, Any],
    *,
    max_bleu_drop: float,
    max_perplexity_increase: float,
    min_agreement: float | None,
) -> dict[str, Any]:
    """Budget checks shaped like ``comparison.evaluate_budget``'s: ``checks``, ``failures``, ``passed``."""
    from lrdeploy.comparison import budget_failures, nonfinite_budget_checks

    ref, cand = task["reference"], task["candidate"]

    def check(name: str, limit: float, value: float | None, passed: bool) -> dict[str, Any]:
        return {"name": name, "limit": limit, "value": value, "passed": passed}

    bleu_drop = None if ref.get("bleu") is None or cand.get("bleu") is None else ref["bleu"] - cand["bleu"]
    ppl_increase = cand["perplexity"] / ref["perplexity"] - 1.0 if ref["perplexity"] > 0 else math.inf
    checks = [
        check("BLEU drop (points)", max_bleu_drop, bleu_drop,
              bleu_drop is not None and bleu_drop <= max_bleu_drop),
        check("perplexity increase (relative)", max_perplexity_increase, ppl_increase,
              ppl_increase <= max_perplexity_increase),  # NaN fails
        *nonfinite_budget_checks(dict(parity)),
    ]
    if min_agreement is not None:
        agreement = parity.get("top1_agreement")
        checks.append(check("top-1 agreement (tokens)", min_agreement, agreement,
                            agreement is not None and agreement >= min_agreement))
    failures = budget_failures(checks)
    return {"checks": checks, "failures": failures, "passed": not failures}


def compare_translation(
    dense: Path,
    candidate: Path,
    *,
    dataset: str | None = None,
    data_dir: Path | None = None,
    limit_test: int | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int | None = None,
    min_seconds: float = 1.0,
    max_bleu_drop: float = DEFAULT_MAX_BLEU_DROP,
    max_perplexity_increase: float = DEFAULT_MAX_PERPLEXITY_INCREASE,
    min_agreement: float | None = None,
    precision: str | None = None,
    json_path: Path | None = None,
    out_dir: Path | None = None,
    save_golden: Path | None = None,
    profile: bool = False,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Compare two translation artefacts (see the module docstring); the report has the top-level keys of
    ``comparison.compare_artifacts`` with a ``task`` section (perplexity, token accuracy, BLEU per side)."""
    from lrdeploy.comparison import assemble_report, check_reference_finite, verdict
    from lrdeploy.serving.bench import benchmark
    from lrdeploy.serving.parity import get_tolerance, judge, output_parity
    from lrdeploy.serving.report import latency_section, write_json, write_reports
    from lrdeploy.serving.runtimes.ort_cpu import OrtCpuRuntime

    if json_path is not None and Path(json_path).is_dir():
        raise UserError(f"--json {json_path} is a directory", "give a file path, e.g. --json report.json")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory", "give a directory for the report")
    if save_golden is not None:
        raise UserError("--save-golden is not supported for translation models yet",
                        "golden sets hold one input tensor; translation models take two")
    if profile:
        raise UserError("--profile is not supported for translation models yet",
                        "the per-operator profiler feeds one input tensor; translation models take two")
    if precision is not None:
        precision = get_tolerance(precision).precision
    budgets = (("--max-bleu-drop", max_bleu_drop), ("--max-perplexity-increase", max_perplexity_increase))
    for name, value in budgets:
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise UserError(f"{name} must be a finite number, got {value!r}")

    with tempfile.TemporaryDirectory(prefix="lrdeploy-compare-") as tmp:
        ref = resolve_translation_artifact("dense", Path(dense), Path(tmp))
        cand = resolve_translation_artifact("candidate", Path(candidate), Path(tmp))
        test_set = load_test_split(ref, cand, dataset=dataset, data_dir=data_dir, limit=limit_test)
        runtimes = {
            "dense": OrtCpuRuntime(ref.onnx_path, threads=threads),
            "candidate": OrtCpuRuntime(cand.onnx_path, threads=threads),
        }
        n_parity = min(PARITY_SENTENCES, len(test_set))
        results = {name: evaluate_runtime(rt, test_set, parity_sentences=n_parity)
                   for name, rt in runtimes.items()}
        metrics = {"reference": results["dense"][0], "candidate": results["candidate"][0]}
        delta = {
            k: metrics["candidate"][k] - metrics["reference"][k]  # type: ignore[operator]
            if metrics["candidate"].get(k) is not None and metrics["reference"].get(k) is not None else None
            for k in metrics["reference"]
        }
        task = {
            "task": "translation",
            "dataset": test_set.name,
            "split": test_set.split,
            "samples": len(test_set),
            "languages": f"{test_set.src_lang}-{test_set.tgt_lang}",
            **metrics,
            "delta": delta,
            "runtime": "onnxruntime cpu (the exported graphs)",
            "notes": "perplexity/token accuracy teacher-forced over non-padding target tokens; BLEU: corpus "
                     "BLEU-4 (0-100) of greedy translations, decoded by re-running the graph on each prefix",
        }
        parity = output_parity(results["dense"][1], results["candidate"][1])
        check_reference_finite(parity)
        parity["output"] = runtimes["dense"].output_name
        parity["rows"] = f"non-padding target tokens of the first {n_parity} sentences (teacher-forced)"
        if precision is not None:
            parity = judge(parity, precision)

        feeds = latency_feeds(test_set, batch_sizes)
        wrapped = {name: _PairsAtBatch(rt, feeds) for name, rt in runtimes.items()}
        bench = benchmark(wrapped, (1,), list(batch_sizes), min_seconds=min_seconds, progress=progress)
        latency_inputs = {str(b): {"src": list(s.shape), "tgt_in": list(t.shape)}
                          for b, (s, t) in feeds.items()}
        sections = {
            "task": task,
            "parity": parity,
            "latency": latency_section(bench, "dense", "candidate"),
            "environment": {**bench.environment, "runtimes": {n: rt.describe() for n, rt in runtimes.items()},
                            "latency_inputs": latency_inputs},
            "budget": translation_budget(task, parity, max_bleu_drop=max_bleu_drop,
                                         max_perplexity_increase=max_perplexity_increase,
                                         min_agreement=min_agreement),
            "notes": [
                "translation: two int64 inputs (src, tgt_in); latency is timed on the first <batch> test "
                "sentence pairs (shapes in environment.latency_inputs), one teacher-forced forward per call",
            ],
        }

    report = assemble_report(ref, cand, sections)
    report["verdict"] = verdict(report)
    if json_path is not None:
        write_json(json_path, report)
    if out_dir is not None:
        write_reports(report, out_dir, force=force)
    return report
