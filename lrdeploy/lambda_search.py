"""Maestro's λ search (Horváth et al., Algorithm 2): start with a large group-lasso λ, halve it until the
accuracy target holds, keep the first model that meets it — the most compressed one the target allows.

``lrdeploy train --method maestro --target-accuracy-drop D`` runs it as *successive runs* (not a
continuation): a dense run and up to ``trials`` Maestro runs, every one with the same data, seed and
schedule, each trained on the first 90 % of the training split and judged on the held-out last 10 % — never
on the test split, which would make the test accuracy a selection criterion. λ of trial i is the run's
"auto" λ (:mod:`lrdeploy.methods.maestro`: derived from its steps and learning rates) × ``start_scale``/2^i.
The chosen trial's bundle is installed at ``--out`` with the search path recorded in its manifest
(``method.lambda_search``): every λ tried, its validation accuracy, ranks and parameters, and the target.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lrdeploy.errors import UserError

HOLDOUT = 0.1
DEFAULT_TRIALS = 5
DEFAULT_START_SCALE = 8.0


def search_lambda(req: Any, target_drop: float, *, trials: int = DEFAULT_TRIALS,
                  start_scale: float = DEFAULT_START_SCALE,
                  say: Callable[[str], None] = lambda _line: None) -> dict[str, Any]:
    """Run the search for ``req`` (a maestro :class:`lrdeploy.workflows.TrainRequest`); return the record.

    ``target_drop`` is in accuracy points against the dense run on the same hold-out. The record's ``met``
    is False when no trial met the target; the least-regularised trial is installed then (the caller exits 1).
    """
    from lrdeploy import atomic
    from lrdeploy.bundle import check_output_dir, read_manifest, update_manifest
    from lrdeploy.workflows import train_bundle

    _check(req, target_drop, trials, start_scale)
    check_output_dir(req.out, force=req.force)
    base = dataclasses.replace(req, holdout=HOLDOUT, checkpoint_every=0, resume=False, force=True)
    req.out.parent.mkdir(parents=True, exist_ok=True)  # e.g. runs/ on a fresh checkout
    with tempfile.TemporaryDirectory(prefix=f".{req.out.name}.search-", dir=req.out.parent) as tmp:
        work = Path(tmp)
        say("λ search: dense reference on the same hold-out")
        dense_req = dataclasses.replace(base, method="dense", method_settings={}, out=work / "dense")
        dense = train_bundle(dense_req)
        reference = float(dense["validation_accuracy"])
        floor = reference - target_drop / 100.0
        path: list[dict[str, Any]] = []
        chosen: int | None = None
        for i in range(trials):
            scale = start_scale / 2**i
            out = work / f"trial-{i}"
            settings = {**req.method_settings, "lambda_scale": scale}
            metrics = train_bundle(dataclasses.replace(base, method_settings=settings, out=out))
            manifest = read_manifest(out)
            log = manifest["method"].get("log", {})
            entry = {"trial": i, "lambda_scale": scale, "lambda_gl": log.get("lambda_gl"),
                     "validation_accuracy": metrics["validation_accuracy"],
                     "test_accuracy": metrics.get("test_accuracy"),
                     "params": manifest.get("params"), "ranks": manifest["method"].get("final_ranks"),
                     "met": metrics["validation_accuracy"] >= floor}
            path.append(entry)
            say(f"λ search trial {i + 1}/{trials}: λ={entry['lambda_gl']:.3g} validation accuracy "
                f"{entry['validation_accuracy']:.2%} (dense {reference:.2%}, floor {floor:.2%}) → "
                f"{'meets the target' if entry['met'] else 'too low: halve λ'}")
            if entry["met"]:
                chosen = i
                break
        met = chosen is not None
        pick = chosen if met else len(path) - 1
        record = {"algorithm": "Maestro Algorithm 2: halve λ from a large start until the target holds",
                  "target_accuracy_drop_points": target_drop, "holdout_fraction": HOLDOUT,
                  "dense_validation_accuracy": reference, "dense_test_accuracy": dense.get("test_accuracy"),
                  "start_scale": start_scale, "trials": path, "chosen_trial": pick, "met": met,
                  "lambda_gl": path[pick]["lambda_gl"]}
        update_manifest(work / f"trial-{pick}", "lambda_search", record)
        with atomic.Staging(req.out.parent, replaces=[req.out.name] if req.out.exists() else []) as stage:
            shutil.move(str(work / f"trial-{pick}"), stage.path(req.out.name))
    return record


def _check(req: Any, target_drop: float, trials: int, start_scale: float) -> None:
    if req.method != "maestro":
        raise UserError(f"--target-accuracy-drop searches Maestro's λ; the method is {req.method}",
                        "add --method maestro")
    if not 0 < target_drop < 100:
        raise UserError(f"--target-accuracy-drop must be in (0, 100) points, got {target_drop!r}", "e.g. 1.0")
    if "lambda_gl" in req.method_settings and req.method_settings["lambda_gl"] != "auto":
        raise UserError("--target-accuracy-drop chooses λ itself, and --method-opt lambda_gl fixes it",
                        "drop one of them")
    if "lambda_scale" in req.method_settings:
        raise UserError("--target-accuracy-drop sets lambda_scale for each trial",
                        "drop --method-opt lambda_scale")
    if req.resume:
        raise UserError("--target-accuracy-drop runs fresh trials and cannot --resume", "drop --resume")
    if trials < 1 or start_scale <= 0:
        raise UserError("the λ search needs at least one trial and a positive start scale")

