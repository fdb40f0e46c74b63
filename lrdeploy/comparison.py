"""`lrdeploy compare`: the dense original against a candidate, both run as deployed (ONNX Runtime, CPU), for
any registered task.

Either side may be a bundle (exported on the fly through the pipeline of ``lrdeploy export``) or an .onnx
file (:func:`lrdeploy.artifacts.resolve_artifact`). The artefacts' task (:func:`lrdeploy.tasks.manifest_task`
of their manifests; ONNX files carry theirs in metadata) supplies everything that differs between tasks, so
nothing here names one:

- ``task``: the test split (``task.load``, with the manifest's vocabularies or tokenizer), both runtimes
  judged on it (``task.evaluate_with_rows``: the task's metrics, e.g. accuracy; perplexity and BLEU), with the
  headline metric and every delta;
- ``parity``: :func:`lrdeploy.serving.parity.output_parity` over the rows the task compares (logits per image,
  per target token, embeddings per sentence), judged with a ``precision`` preset when one is given (a
  candidate that is the same model in another precision or runtime). Without one, parity is reported but not
  judged: a compressed model differs by design and is judged by its budgets;
- ``latency``: :func:`lrdeploy.serving.bench.benchmark` (interleaved blocks, paired speed-ups) on the task's
  real test inputs (``task.feeds``), the same arrays for both models;
- ``budget``: the task's checks (``task.budget_checks`` with :class:`lrdeploy.tasks.BudgetSettings`: a drop
  of the headline metric in points, the task's own limits, optionally top-1 agreement) plus the checks every
  comparison applies (NaN/Inf in the candidate's outputs);
- optional: a golden set of the dense model's outputs on the first test inputs (``--save-golden``, for
  ``lrdeploy check``) and ONNX Runtime's per-operator profile (``--profile``).

``report["verdict"]`` sums up every miss (the CLI exits 1 on one).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy import __version__, run_record
from lrdeploy.artifacts import Artifact, resolve_artifact
from lrdeploy.errors import UserError

SCHEMA = "lrdeploy.compare/1"
PARITY_EXAMPLES = 128  # parity rows of this many test examples where a task keeps fewer than all of them
GOLDEN_MAX_BYTES = 64 << 20  # a golden set's reference outputs (sequence logits are vocabulary-sized)
RUNTIME = "ort-cpu"


# --- budgets ------------------------------------------------------------------------------------------------
def check_reference_finite(parity: dict[str, Any], what: str = "dense model") -> None:
    """UserError when the reference's outputs hold NaN/Inf: it cannot vouch for any candidate, so the
    comparison is refused (exit 2) rather than judged; called before the minutes of timing."""
    from lrdeploy.parity_stats import describe_nonfinite

    nonfinite = parity.get("nonfinite") or {}
    if nonfinite.get("reference"):
        nan, inf = nonfinite.get("reference_nan"), nonfinite.get("reference_inf")
        counts = describe_nonfinite(nan, inf) if nan is not None and inf is not None else "NaN/Inf values"
        raise UserError(f"the reference ({what}) outputs contain {counts} on the test data, so it cannot "
                        "judge a candidate", "fix or re-create the reference model (NaN weights?)")


def nonfinite_budget_checks(parity: dict[str, Any]) -> list[dict[str, Any]]:
    """The budget check every comparison applies: NaN/Inf in the candidate's outputs is a named miss (no
    entry when there are none, so a clean report lists only the user's budgets).

    The task metric alone would not catch it (an arg-max over NaN scores still gives a class), and the
    parity preset is only applied with ``--precision``.
    """
    from lrdeploy.parity_stats import describe_nonfinite

    nonfinite = parity.get("nonfinite") or {}
    count = int(nonfinite.get("candidate") or 0)
    if not count:
        return []
    nan, inf = nonfinite.get("candidate_nan"), nonfinite.get("candidate_inf")
    split = nan is not None and inf is not None
    counts = describe_nonfinite(nan, inf) if split else f"{count} NaN/Inf values"
    return [{"name": "non-finite candidate outputs", "limit": 0, "value": count, "passed": False,
             "message": f"candidate outputs contain {counts}"}]


def budget_failures(checks: list[dict[str, Any]]) -> list[str]:
    """One line per missed check: its own message, or the name, value and limit (NaN named as such)."""
    def line(c: dict[str, Any]) -> str:
        if c.get("message"):
            return c["message"]
        if c["value"] is None:
            return f"{c['name']} not available (limit {c['limit']:g})"
        if c["value"] != c["value"]:  # NaN
            return f"{c['name']} is NaN (not measurable; limit {c['limit']:g})"
        return f"{c['name']} {c['value']:.4g} misses the limit {c['limit']:g}"

    return [line(c) for c in checks if not c["passed"]]


def evaluate_budget(task: Any, reference: Mapping[str, Any], candidate: Mapping[str, Any],
                    parity: dict[str, Any], budgets: Any) -> dict[str, Any]:
    """The task's budget checks on both sides' metrics plus the non-finite check; a miss is listed by name,
    with the numbers (``{"checks", "failures", "passed"}``)."""
    checks = [*task.budget_checks(reference, candidate, parity, budgets), *nonfinite_budget_checks(parity)]
    failures = budget_failures(checks)
    return {"checks": checks, "failures": failures, "passed": not failures}


def budget_settings(task: Any, *, max_accuracy_drop: float | None = None, max_bleu_drop: float | None = None,
                    max_perplexity_increase: float | None = None,
                    min_agreement: float | None = None) -> Any:
    """The CLI's budget flags as :class:`lrdeploy.tasks.BudgetSettings` for ``task``.

    ``--max-accuracy-drop`` is the drop of the task's headline metric, in points; ``--max-bleu-drop`` names
    it where the headline is BLEU; ``--max-perplexity-increase`` needs a task that measures perplexity. A
    flag the task cannot apply is a UserError, never ignored.
    """
    from lrdeploy.tasks import BudgetSettings

    for flag, value in (("--max-accuracy-drop", max_accuracy_drop), ("--max-bleu-drop", max_bleu_drop),
                        ("--max-perplexity-increase", max_perplexity_increase),
                        ("--min-agreement", min_agreement)):
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        if value is not None and not (finite and value >= 0):
            raise UserError(f"{flag} must be a finite number >= 0, got {value!r}")
    keys = {m.key for m in task.metrics()}
    if max_bleu_drop is not None and task.headline.key != "bleu":
        raise UserError(f"--max-bleu-drop applies where the headline metric is BLEU; {task.name} models are "
                        f"judged by {task.headline.label}", "use --max-accuracy-drop (the headline metric)")
    if max_perplexity_increase is not None and "perplexity" not in keys:
        raise UserError("--max-perplexity-increase applies to tasks that measure perplexity, not "
                        f"{task.name}", "drop it")
    max_drop = max_bleu_drop if max_bleu_drop is not None else max_accuracy_drop
    return BudgetSettings(max_drop=max_drop, min_agreement=min_agreement,
                          max_perplexity_increase=max_perplexity_increase)


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """The overall verdict: every budget miss and, when a precision preset was given, every parity miss."""
    failures = [f"budget: {f}" for f in (report.get("budget") or {}).get("failures", [])]
    parity = report.get("parity") or {}
    failures += [f"parity: {f}" for f in parity.get("failures") or []]
    return {"passed": not failures, "failures": failures}


# --- what the two sides are ---------------------------------------------------------------------------------
def common_task(ref: Artifact, cand: Artifact) -> Any:
    """The task both artefacts record; two different tasks cannot be compared."""
    a, b = ref.task, cand.task
    if a.name != b.name:
        raise UserError(f"the dense artefact is a {a.name} model and the candidate a {b.name} model",
                        "compare two artefacts of the same model (a bundle, its export, its compressed copy)")
    return a


def load_test_data(task: Any, ref: Artifact, cand: Artifact, *, dataset: str | None, data_dir: Path | None,
                   limit: int | None) -> tuple[Any, str]:
    """(test split, dataset name), prepared with what the artefacts' manifests record (vocabularies, a
    tokenizer), which both sides must share: the same ids must mean the same inputs."""
    manifests = [a.manifest for a in (ref, cand) if a.manifest]
    extras = [task.manifest_extra_from(m) for m in manifests]
    extras = [e for e in extras if e]
    if len(extras) == 2 and extras[0] != extras[1]:
        keys = ", ".join(sorted(extras[0]))
        raise UserError(f"the two models were trained with different {keys}",
                        "their inputs would mean different things; compare models trained on the same data")
    manifest = next((m for m in manifests if task.manifest_extra_from(m)), manifests[0] if manifests else {})
    records = [m.get("dataset") or {} for m in manifests]
    name = dataset or next((r["name"] for r in records if r.get("name")), None) or task.default_dataset
    if not name:
        raise UserError(f"neither artefact records a dataset, and task {task.name} has no built-in one",
                        "name one with --data")
    model_args = (manifest.get("model") or {}).get("args") or {}
    return task.load(name, "test", data_dir=data_dir, limit=limit, manifest=manifest,
                     model_args=model_args), name


def task_section(task: Any, data: Any, dataset: str, ref: Mapping[str, Any],
                 cand: Mapping[str, Any]) -> dict[str, Any]:
    """The ``task`` part of the report: every metric per side, their deltas, the headline, how to show
    them (the task's metric descriptors, so report readers need not know the task)."""
    def delta(key: str) -> float | None:
        a, b = ref.get(key), cand.get(key)
        return b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None

    h = task.headline
    return {
        "task": task.name,
        "dataset": dataset,
        "split": "test",
        "samples": int(task.num_examples(data)),
        **task.describe_data(data),
        "metrics": [asdict(m) for m in task.metrics()],
        "headline": {"key": h.key, "label": h.label, "reference": ref.get(h.key),
                     "candidate": cand.get(h.key), "delta": delta(h.key)},
        "reference": dict(ref),
        "candidate": dict(cand),
        "delta": {k: delta(k) for k in ref},
        "runtime": "onnxruntime cpu (the exported graphs)",
    }


def accuracy_alias(section: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``accuracy`` part of reports written before the ``task`` part existed, for tasks that measure
    ``accuracy`` (kept so readers of ``report["accuracy"]`` keep working; new readers use ``task``)."""
    ref, cand = section["reference"].get("accuracy"), section["candidate"].get("accuracy")
    if ref is None or cand is None:
        return None
    return {"dataset": section["dataset"], "split": section["split"], "samples": section["samples"],
            "reference": ref, "candidate": cand, "delta": cand - ref}


def assemble_report(ref: Any, cand: Any, sections: dict[str, Any]) -> dict[str, Any]:
    """The compare report's common frame: both model summaries, size ratios, the sections, provenance."""
    from lrdeploy.serving.report import command_line

    def ratio(a: Any, b: Any) -> float | None:
        return a / b if a and b else None

    return {
        "schema": SCHEMA,
        "reference": ref.summary(),
        "candidate": cand.summary(),
        "ratios": {
            "params": ratio(ref.params, cand.params),
            "flops": ratio(ref.flops, cand.flops),
            "onnx_bytes": ratio(ref.onnx_bytes, cand.onnx_bytes),
        },
        **sections,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "lrdeploy_version": __version__,
        "run": run_record.current(),  # the resolved command-line configuration (lrdeploy rerun)
    }


# --- golden sets --------------------------------------------------------------------------------------------
def golden_set(task: Any, data: Any, predict: Any, samples: int) -> tuple[dict[str, np.ndarray],
                                                                           dict[str, np.ndarray],
                                                                           np.ndarray | None, str]:
    """(inputs, reference outputs, labels, selection) of the first ``samples`` test examples, fewer when the
    outputs would pass :data:`GOLDEN_MAX_BYTES` (vocabulary-sized logits per token)."""
    from lrdeploy.tasks import batched

    n = min(samples, task.num_examples(data))
    probe = predict(task.feeds(data, 1))
    per_example = max(sum(np.asarray(v).nbytes for v in probe.values()), 1)
    capped = max(1, min(n, GOLDEN_MAX_BYTES // per_example))
    selection = f"first {capped} test examples"
    if capped < n:
        selection += f" (of {n} asked: outputs capped at {GOLDEN_MAX_BYTES >> 20} MiB)"
    feeds = task.feeds(data, capped)
    return feeds, batched(predict, feeds, 64), task.labels(data, capped), selection


def check_against_golden(candidate: Path, golden: Path, *, precision: str | None = None,
                         threads: int | None = None) -> dict[str, Any]:
    """`lrdeploy check`: run the golden set's named inputs through the candidate (resolved like
    ``compare``'s sides, on ONNX Runtime CPU) and judge every output (:func:`serving.golden.check_golden`)."""
    from lrdeploy.serving.golden import check_golden, load_golden
    from lrdeploy.serving.runtimes import load_runtime

    gold = load_golden(golden)
    with tempfile.TemporaryDirectory(prefix="lrdeploy-check-") as tmp:
        art = resolve_artifact("candidate", Path(candidate), Path(tmp))
        runtime = load_runtime(RUNTIME, art.onnx_path, threads=threads, name="candidate")
        return check_golden(gold, runtime, precision=precision, candidate=art.summary())


# --- the comparison -----------------------------------------------------------------------------------------
def compare_artifacts(
    dense: Path,
    candidate: Path,
    *,
    dataset: str | None = None,
    data_dir: Path | None = None,
    limit_test: int | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int | None = None,
    min_seconds: float = 1.0,
    max_accuracy_drop: float | None = None,
    min_agreement: float | None = None,
    max_bleu_drop: float | None = None,
    max_perplexity_increase: float | None = None,
    precision: str | None = None,
    json_path: Path | None = None,
    out_dir: Path | None = None,
    save_golden: Path | None = None,
    golden_samples: int | None = None,
    profile: bool = False,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Measure candidate against dense on the task's metrics, parity and interleaved latency (module
    docstring); return the report dict.

    Budgets (None: the task's default): ``max_accuracy_drop`` is the headline metric's drop in points
    (``max_bleu_drop`` where that is BLEU), ``max_perplexity_increase`` relative, ``min_agreement`` top-1.
    ``precision`` judges parity with that preset; ``json_path`` writes the report; ``out_dir`` writes
    ``report.json``, ``report.md`` and ``plot.png`` there; ``save_golden`` writes the dense model's inputs and
    outputs on the first ``golden_samples`` test examples as a golden set for ``lrdeploy check``;
    ``profile`` adds ONNX Runtime's per-operator breakdown of both models at every batch size (after the
    timing) under ``profile``.
    """
    from lrdeploy.serving.bench import benchmark
    from lrdeploy.serving.golden import DEFAULT_SAMPLES
    from lrdeploy.serving.golden import check_destination as check_golden_destination
    from lrdeploy.serving.golden import save_golden as write_golden
    from lrdeploy.serving.parity import get_tolerance, judge, output_parity
    from lrdeploy.serving.report import latency_section, write_json, write_reports
    from lrdeploy.serving.runtimes import load_runtime
    from lrdeploy.sparsity_note import sparsity_note
    from lrdeploy.tasks import runtime_predict

    # every check on the user's arguments before the minutes of work
    if json_path is not None and Path(json_path).is_dir():
        raise UserError(f"--json {json_path} is a directory", "give a file path, e.g. --json report.json")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory", "give a directory for the report")
    if precision is not None:
        precision = get_tolerance(precision).precision
    if save_golden is not None:
        check_golden_destination(save_golden, force)
    golden_samples = DEFAULT_SAMPLES if golden_samples is None else golden_samples
    if golden_samples < 1:
        raise UserError(f"--golden-samples must be at least 1, got {golden_samples}")

    golden_record = None
    with tempfile.TemporaryDirectory(prefix="lrdeploy-compare-") as tmp:
        ref = resolve_artifact("dense", Path(dense), Path(tmp))
        cand = resolve_artifact("candidate", Path(candidate), Path(tmp))
        task = common_task(ref, cand)
        budgets = budget_settings(task, max_accuracy_drop=max_accuracy_drop, max_bleu_drop=max_bleu_drop,
                                  max_perplexity_increase=max_perplexity_increase,
                                  min_agreement=min_agreement)
        data, ds_name = load_test_data(task, ref, cand, dataset=dataset, data_dir=data_dir, limit=limit_test)
        runtimes = {name: load_runtime(RUNTIME, art.onnx_path, threads=threads, name=name)
                    for name, art in (("dense", ref), ("candidate", cand))}
        predicts = {name: runtime_predict(rt) for name, rt in runtimes.items()}
        results = {name: task.evaluate_with_rows(predict, data, final=True, parity_examples=PARITY_EXAMPLES)
                   for name, predict in predicts.items()}
        (ref_metrics, ref_rows), (cand_metrics, cand_rows) = results["dense"], results["candidate"]
        parity = output_parity(ref_rows, cand_rows)
        check_reference_finite(parity)
        parity["output"] = runtimes["dense"].outputs()[0].name
        note = task.parity_note(data, PARITY_EXAMPLES)
        if note:
            parity["rows"] = note
        if precision is not None:
            parity = judge(parity, precision)
        section = task_section(task, data, ds_name, ref_metrics, cand_metrics)
        if save_golden is not None:
            inputs, outputs, labels, selection = golden_set(task, data, predicts["dense"], golden_samples)
            record = {"name": ds_name, "split": "test", "selection": selection, "task": task.name}
            write_golden(save_golden, inputs, outputs, labels=labels, dataset=record,
                         precision=precision or "fp32", reference=ref.summary(), force=force)
            golden_record = {"path": str(save_golden), "samples": len(next(iter(inputs.values()))),
                             "precision": precision or "fp32"}

        def feeds_for(batch: int) -> dict[str, np.ndarray]:
            return task.feeds(data, batch)

        bench = benchmark(runtimes, feeds_for, batch_sizes, min_seconds=min_seconds, progress=progress)
        runtime_info = {name: rt.describe() for name, rt in runtimes.items()}
        sections: dict[str, Any] = {
            "task": section,
            "parity": parity,
            "latency": latency_section(bench, "dense", "candidate"),
            "environment": {**bench.environment, "runtimes": runtime_info,
                            "latency_inputs": {b: {k: v["shape"] for k, v in fed.items()}
                                               for b, fed in bench.settings["inputs"].items()}},
            "budget": evaluate_budget(task, ref_metrics, cand_metrics, parity, budgets),
            "notes": [f"latency is timed on the first <batch> {ds_name} test examples ({task.name} task "
                      "inputs; shapes in environment.latency_inputs), the same arrays for both models"],
        }
        sparse = sparsity_note(cand.manifest, cand.flops, ref.flops,
                               {b: v["speedup"] for b, v in sections["latency"].items()})
        if sparse:
            sections["notes"].append(sparse)
            sections["sparsity"] = sparse
        alias = accuracy_alias(section)
        if alias is not None:
            sections["accuracy"] = alias
        if profile:  # after the timing, so the profiler never touches the timed numbers
            from lrdeploy.serving.profile import profile_onnx

            sections["profile"] = {
                name: {str(b): profile_onnx(art.onnx_path, (), b, feeds=feeds_for(b),
                                            threads=runtime_info[name].get("threads", threads))
                       for b in batch_sizes}
                for name, art in (("dense", ref), ("candidate", cand))
            }
    report = assemble_report(ref, cand, sections)
    if golden_record is not None:
        report["golden"] = golden_record
    report["verdict"] = verdict(report)
    if json_path is not None:
        write_json(json_path, report)
    if out_dir is not None:
        write_reports(report, out_dir, force=force)
    return report
