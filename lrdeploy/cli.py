"""The `lrdeploy` command line: train, init, compress, export, compare, check, report, demo, models, bench,
serve, triton, loadtest."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from lrdeploy import bench_cmd, rerun_cmd, run_record, serve_cmd, terminal
from lrdeploy.cli_checks import DAY_S, OneLineUsageGroup
from lrdeploy.cli_choices import (
    AMP_MODES,
    AUGMENTATIONS,
    DATASETS,
    DEVICES,
    EXPORT_PRECISIONS,
    FOLD_MODES,
    METHODS,
    MODELS,
    OPTIMIZE_PRESETS,
    PARITY_PRESETS,
    SCHEDULES,
    TASKS,
    choice_option,
)
from lrdeploy.cli_command import EXIT_CODES, INTERNAL_ERROR, register  # noqa: F401  (INTERNAL_ERROR: API)
from lrdeploy.errors import UserError

app = typer.Typer(
    cls=OneLineUsageGroup,  # Click's usage errors as one line, like every other error
    name="lrdeploy",
    help="Train or load low-rank networks, fold them into ONNX, and prove the speed-up and parity.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # Click's plain help: it wraps at any width where Rich's panels cut option names
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = terminal.out  # tables and details (quiet: nothing; --json -: stderr)
err_console = terminal.alert  # missed budgets and gates: always shown


def _version(value: bool) -> None:
    if value:
        from lrdeploy import __version__

        terminal.result(f"lrdeploy {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Every command: say more (also warnings)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Every command: only the result line, errors."),
) -> None:
    """Train or load low-rank networks, fold them into ONNX, and prove the speed-up and parity."""
    if verbose or quiet:  # `lrdeploy -q train …`: the command's own -v/-q win
        ctx.meta["lrdeploy.verbosity"] = terminal.VERBOSE if verbose else terminal.QUIET


DataDir = typer.Option(
    None,
    "--data-dir",
    help="Directory holding the dataset files (else $LRDEPLOY_DATA, the cache, or shipped MNIST).",
)
Download = typer.Option(  # read by cli_command.run_command, which allows downloads for the command's duration
    False,
    "--download",
    help="Fetch missing dataset files (checksum-verified) into --data-dir or the cache; without it, "
    "nothing is ever downloaded.",
)


Force = typer.Option(
    False, "--force", help="Replace outputs that already exist (never an input; a directory only if lrdeploy "
    "wrote it).",
)


def _parse_batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"--batch {text!r} is not a comma-separated list of integers", "e.g. --batch 1,32"
        ) from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"--batch {text!r} must list positive batch sizes", "e.g. --batch 1,32")
    return values


def models_table() -> Any:
    """The registry as a table; every column but the class count wraps (an input list between inputs, long
    names fold), so it fits 80 columns with nothing elided (see :func:`lrdeploy.tables.fit`)."""
    from rich.table import Table

    from lrdeploy.models import list_models
    from lrdeploy.tables import Items, fit

    table = Table(title="lrdeploy models")
    for col in ("name", "input", "classes", "description"):  # an input list wraps between inputs, not in one
        table.add_column(col, overflow="ellipsis" if col == "input" else "fold", no_wrap=col == "classes")
    for spec in list_models():
        shape = (
            Items([f"{i.name} ({i.dtype})" for i in spec.input_specs], ", ")
            if spec.multi_input
            else "×".join(map(str, spec.input_shape))
        )
        table.add_row(spec.name, shape, str(spec.num_classes or "—"), spec.description)
    return fit(table, keys=1)


def models_cmd() -> None:
    """List the models in the registry."""
    from lrdeploy.models import list_models

    console.print(models_table())
    if terminal.is_quiet():
        terminal.result(" ".join(spec.name for spec in list_models()), highlight=False)


def parse_settings(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON (numbers, true/false, lists), else kept as text."""
    settings: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {item!r} is not key=value", f"e.g. {flag} window=3")
        try:
            settings[key.strip()] = json.loads(raw)
        except ValueError:
            settings[key.strip()] = raw
    return settings


ModelHelp = ("Registry model name (see `lrdeploy models`), or your own model as pkg.module:factory (imported "
             "from the current directory or PYTHONPATH).")
InputShape = typer.Option(
    None, "--input-shape", help="One sample's shape without the batch, e.g. 1,28,28: for a model (your own "
    "pkg.module:factory) that does not declare it.",
)
DeviceOption = choice_option("auto", "--device", choices=DEVICES,
                             help="Where training runs (auto: CUDA when present).")
AmpOption = choice_option("off", "--amp", choices=AMP_MODES,
                          help="Mixed-precision training (fp16: CUDA only, with a GradScaler).")
TaskOption = choice_option(None, "--task", choices=TASKS,
                           help="The model's task: for your own model when its factory does not declare it.")


def parse_shape(text: str | None, flag: str = "--input-shape") -> tuple[int, ...] | None:
    """``C,H,W`` as positive integers (None passes)."""
    if text is None:
        return None
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise UserError(f"{flag} {text!r} is not a list of positive integers", f"e.g. {flag} 1,28,28")
    return dims


def _out_name(*parts: str) -> str:
    """A default output folder name from a model and data name (``my_models:build``, ``./data/x.npz``)."""
    import re

    clean = [re.sub(r"[^A-Za-z0-9._-]+", "_", Path(p).stem if "/" in p or os.sep in p else p) for p in parts]
    return "-".join(clean)


def train(
    model: str = choice_option("lenet5", "--model", choices=MODELS, help=ModelHelp),
    data: str = choice_option(
        "mnist", "--data", choices=DATASETS, help="Dataset (multi30k: with --model transformer), or your own "
        "classification data: an .npz file or an image folder (README, 'Your own model')."
    ),
    data_dir: Path | None = DataDir,
    download: bool = Download,
    method: str = choice_option("dense", "--method", choices=METHODS, help="Training method."),
    method_opt: list[str] | None = typer.Option(
        None, "--method-opt", help="A method setting as key=value (repeatable), e.g. window=3."
    ),
    model_arg: list[str] | None = typer.Option(
        None, "--model-arg", help="A model constructor argument as key=value (repeatable), e.g. width=16."
    ),
    input_shape: str | None = InputShape,
    task: str | None = TaskOption,
    epochs: int = typer.Option(2, "--epochs", min=1),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    lr: float | None = typer.Option(
        None, "--lr", help="Peak learning rate (default 0.05; translation: 1e-3, AdamW)."
    ),
    weight_decay: float | None = typer.Option(
        None, "--weight-decay", help="Weight decay (default 5e-4; translation: 0.01)."
    ),
    schedule: str | None = choice_option(
        None, "--schedule", choices=SCHEDULES, help="Learning-rate schedule (default cosine; translation: "
        "inverse_sqrt)."
    ),
    augment: str | None = choice_option(None, "--augment", choices=AUGMENTATIONS,
                                        help="Training augmentation (crop-flip: CIFAR)."),
    limit_train: int | None = typer.Option(
        None, "--limit-train", min=1, help="Use the first N training examples."
    ),
    limit_test: int | None = typer.Option(
        None, "--limit-test", min=1, help="Evaluate on the first N test examples."
    ),
    seed: int = typer.Option(0, "--seed"),
    device: str = DeviceOption,
    amp: str = AmpOption,
    checkpoint_every: int = typer.Option(
        1, "--checkpoint-every", min=0,
        help="Write a training checkpoint every N epochs (and after the last); 0: none."),
    checkpoint_dir: Path | None = typer.Option(
        None, "--checkpoint-dir", help="Where checkpoints go (default: <out>.checkpoint, beside the bundle)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the killed run whose checkpoint is in the checkpoint directory; "
        "give the same settings."),
    target_accuracy_drop: float | None = typer.Option(
        None, "--target-accuracy-drop",
        help="Maestro: search λ (the paper's Algorithm 2) — a dense run, then Maestro runs from a large λ, "
        "halved until the validation accuracy is within this many points of dense (10 % of the training "
        "data held out); the first that meets it is written."),
    search_trials: int = typer.Option(5, "--search-trials", min=1, help="At most this many λ values."),
    out: Path | None = typer.Option(
        None, "--out", help="Bundle directory (default: runs/MODEL-DATA-METHOD)."
    ),
    force: bool = Force,
) -> None:
    """Train a model (dense, or low-rank with Cuttlefish or Maestro) and write a bundle.

    Several processes: torchrun --nproc-per-node N -m lrdeploy train ... (--batch-size is the global batch).
    """
    from lrdeploy.cli_checks import check_finite, check_model_fits
    from lrdeploy.outputs import check_bundle_destination

    out = out or Path("runs") / _out_name(model, data, method)
    check_bundle_destination(out, force=force)  # at once, before torch is imported or data loaded
    from lrdeploy.workflows import TrainRequest, train_bundle

    check_finite("--lr", lr, minimum=0.0, strict=True, example="0.05")
    check_finite("--weight-decay", weight_decay, minimum=0.0, example="5e-4")
    check_model_fits(model, parse_settings(model_arg, "--model-arg"), "--model-arg")  # e.g. width=10**9
    request = (
        TrainRequest(
            model_name=model,
            dataset=data,
            data_dir=data_dir,
            method=method.lower(),
            method_settings=parse_settings(method_opt, "--method-opt"),
            model_args=parse_settings(model_arg, "--model-arg"),
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            schedule=schedule,
            augment=augment,
            limit_train=limit_train,
            limit_test=limit_test,
            seed=seed,
            out=out,
            force=force,
            task=task,
            input_shape=parse_shape(input_shape),
            device=device,
            amp=amp,
            checkpoint_every=checkpoint_every,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
        )
    )
    from lrdeploy import distributed

    if target_accuracy_drop is not None:
        _search_lambda(request, target_accuracy_drop, search_trials)
        return
    metrics = train_bundle(request)
    if not distributed.launched_as_main():  # under torchrun: rank 0 reports
        return
    _print_test_metrics(out, metrics)
    terminal.result(f"bundle written to [bold]{out}[/]")


def _search_lambda(request: Any, target_drop: float, trials: int) -> None:
    """`train --target-accuracy-drop`: Maestro's λ search; exit 1 when no λ met the target."""
    from lrdeploy import distributed
    from lrdeploy.lambda_search import search_lambda

    if distributed.launched():
        raise UserError("--target-accuracy-drop runs successive trainings in one process, not under torchrun",
                        "run it without torchrun")
    record = search_lambda(request, target_drop, trials=trials, say=console.print)
    chosen = record["trials"][record["chosen_trial"]]
    terminal.result(
        f"λ = {record['lambda_gl']:.3g} chosen after {len(record['trials'])} trial(s): validation accuracy "
        f"{chosen['validation_accuracy']:.2%} vs dense {record['dense_validation_accuracy']:.2%}, test "
        f"accuracy {chosen['test_accuracy']:.2%} (dense {record['dense_test_accuracy']:.2%}), "
        f"{chosen['params']:,} parameters; bundle written to [bold]{request.out}[/]")
    if not record["met"]:
        err_console.print(f"[red]no λ met the target (a drop of at most {target_drop:g} points); the least "
                          f"regularised trial was written[/]")
        raise typer.Exit(code=1)


def init(
    model: str = choice_option(..., "--model", choices=MODELS, help=ModelHelp),
    num_classes: int | None = typer.Option(None, "--num-classes", min=1),
    model_arg: list[str] | None = typer.Option(
        None, "--model-arg", help="A model constructor argument as key=value (repeatable), e.g. width=16."
    ),
    input_shape: str | None = InputShape,
    task: str | None = TaskOption,
    from_checkpoint: Path | None = typer.Option(
        None, "--from-checkpoint", help="A plain PyTorch state dict (.pt), loaded with weights_only=True."
    ),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write."),
    force: bool = Force,
) -> None:
    """Make a bundle from a model (registry or pkg.module:factory) at its initial weights or from a dense
    checkpoint ("load" path)."""
    from lrdeploy.outputs import check_bundle_destination

    check_bundle_destination(out, force=force, inputs=[from_checkpoint])  # at once, before torch loads
    from lrdeploy import workflows
    from lrdeploy.cli_checks import check_model_fits

    model_args = parse_settings(model_arg, "--model-arg")
    shape = parse_shape(input_shape)
    check_model_fits(model, {"num_classes": num_classes} if num_classes else {}, "--num-classes")
    check_model_fits(model, model_args, "--model-arg")
    workflows.init_bundle(model_name=model, num_classes=num_classes, checkpoint=from_checkpoint, out=out,
                          force=force, model_args=model_args, input_shape=shape, task=task)
    terminal.result(f"bundle written to [bold]{out}[/]")


def compress(
    bundle: Path = typer.Argument(..., help="Dense bundle directory."),
    rank_ratio: float | None = typer.Option(
        None, "--rank-ratio", help="Rank as a share of full rank, in (0, 1]."
    ),
    energy: float | None = typer.Option(None, "--energy", help="Retained spectral energy, in (0, 1]."),
    sparsity: str | None = typer.Option(
        None, "--sparsity", help="N:M magnitude pruning instead of SVD, e.g. 2:4 (2 of every 4 input weights "
        "kept; faster only with NVIDIA 2:4 kernels); --finetune-epochs keeps the pattern."),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", min=0),
    data: str | None = choice_option(
        None, "--data", choices=DATASETS, help="Dataset for fine-tuning/eval (default: the bundle's)."
    ),
    data_dir: Path | None = DataDir,
    download: bool = Download,
    limit_train: int | None = typer.Option(None, "--limit-train", min=1),
    limit_test: int | None = typer.Option(None, "--limit-test", min=1,
                                          help="Evaluate on the first N test examples only."),
    lr: float | None = typer.Option(None, "--lr",
                             help="Fine-tuning learning rate (default 0.01; translation: 3e-4, AdamW)."),
    seed: int = typer.Option(0, "--seed"),
    activation_aware: bool = typer.Option(
        False, "--activation-aware",
        help="Choose each layer's factors by the error of its outputs on calibration inputs from the "
             "bundle's training data (SVD-LLM whitening), not by the error of its weights."),
    calib_samples: int = typer.Option(256, "--calib-samples", min=1,
                                      help="Training examples for --activation-aware's statistics."),
    device: str = DeviceOption,
    amp: str = AmpOption,
    out: Path = typer.Option(..., "--out", help="Low-rank bundle directory to write."),
    force: bool = Force,
) -> None:
    """Compress a bundle by truncated SVD (rank ratio or energy) or N:M pruning (--sparsity 2:4), optionally
    fine-tune, write a new bundle."""
    from lrdeploy.outputs import check_bundle_destination

    check_bundle_destination(out, force=force, inputs=[bundle])  # at once, before torch loads
    from lrdeploy import workflows
    from lrdeploy.cli_checks import check_finite

    check_finite("--lr", lr, minimum=0.0, strict=True, example="0.01")
    if sparsity is not None:
        if rank_ratio is not None or energy is not None or activation_aware:
            raise UserError("--sparsity prunes; --rank-ratio/--energy/--activation-aware factorise",
                            "give one of the two")
        from lrdeploy.pruning import prune_bundle

        result = prune_bundle(bundle, pattern=sparsity, finetune_epochs=finetune_epochs, dataset=data,
                              data_dir=data_dir, limit_train=limit_train, lr=lr, seed=seed, out=out,
                              force=force, device=device, amp=amp, limit_test=limit_test)
        console.print(result["table"])
        _print_test_metrics(bundle, result["metrics"])
        terminal.result(f"{sparsity}-sparse bundle written to [bold]{out}[/]")
        return

    result = workflows.compress_bundle(
        bundle,
        rank_ratio=rank_ratio,
        energy=energy,
        finetune_epochs=finetune_epochs,
        dataset=data,
        data_dir=data_dir,
        limit_train=limit_train,
        lr=lr,
        seed=seed,
        out=out,
        force=force,
        activation_aware=activation_aware,
        calib_samples=calib_samples,
        limit_test=limit_test,
        device=device,
        amp=amp,
    )
    console.print(result["table"])
    _print_test_metrics(bundle, result["metrics"])
    terminal.result(f"low-rank bundle written to [bold]{out}[/]")


def _print_test_metrics(bundle: Path, metrics: dict[str, Any]) -> None:
    """One line with the task's metrics on the test split (after fine-tuning, if any), when evaluated."""
    from lrdeploy.bundle import read_manifest
    from lrdeploy.tasks import manifest_task

    task = manifest_task(read_manifest(bundle))
    before = task.format_metrics({k.replace("_before_finetune", ""): v for k, v in metrics.items()
                                  if k.endswith("_before_finetune")}, prefix="test_")
    line = task.format_metrics(metrics, prefix="test_")
    if before and before != line:
        console.print("test before fine-tuning " + before)
    if line:
        console.print(("test after fine-tuning " if before and before != line else "test ") + line)


def export(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    out: Path = typer.Option(
        ..., "--out", help="ONNX file to write (the ORT-optimised copy goes beside it)."
    ),
    opset: int = typer.Option(20, "--opset", help="ONNX opset (checked against the installed exporter)."),
    optimize: str = choice_option(
        "all", "--optimize", choices=OPTIMIZE_PRESETS,
        help="ORT-optimised copy <stem>.ort.onnx: basic = portable ops only, all = ORT's own ops.",
    ),
    fold: str = choice_option(
        "auto", "--fold", choices=FOLD_MODES,
        help="auto: per layer, keep U·V (factored) or re-multiply W (dense), whichever ONNX Runtime runs "
        "faster.",
    ),
    fold_batch: int = typer.Option(
        1, "--fold-batch", min=1, help="Batch size the fold decision is timed at."
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Threads for the fold timing."),
    rank_budget: float | None = typer.Option(
        None,
        "--rank-budget",
        help="Maestro bundles: keep the most important components, this share of factors.",
    ),
    data_dir: Path | None = DataDir,
    download: bool = Download,
    trt: bool = typer.Option(
        False, "--trt", help="Also build a TensorRT engine (<stem>.plan) from the ONNX file."
    ),
    precision: str = choice_option(
        "fp32",
        "--precision",
        choices=EXPORT_PRECISIONS,
        help="fp16, bf16 or int8: also write <stem>.<precision>.onnx, judged against fp32 (preset + "
        "accuracy); with --trt, the engine's precision (int8: from <stem>.int8.trt.onnx, symmetric Q/DQ).",
    ),
    min_batch: int = typer.Option(1, "--min-batch", min=1),
    opt_batch: int | None = typer.Option(None, "--opt-batch", min=1),
    max_batch: int | None = typer.Option(None, "--max-batch", min=1),
    sparse_weights: bool = typer.Option(
        False, "--sparse-weights", help="Enable 2:4 sparse tactics (TensorRT)."
    ),
    timing_cache: Path | None = typer.Option(None, "--timing-cache", help="TensorRT timing cache file."),
    calib_data: str | None = choice_option(
        None, "--calib-data", choices=DATASETS, help="Dataset to calibrate int8 on and judge variants with "
        "(default: the bundle's; needed for bundles from `lrdeploy init`)."),
    force: bool = Force,
) -> None:
    """Fold a bundle and export it to ONNX (checked, parity-verified, manifest in metadata); --trt too.

    The whole family (model, optimised copy, fold report, precision variant, engine) is written to a staging
    directory and appears at once; an existing family is replaced only with --force.
    """
    failed = export_artifacts(bundle, out, opset=opset, optimize=optimize, fold=fold, fold_batch=fold_batch,
                              threads=threads, rank_budget=rank_budget, data_dir=data_dir, trt=trt,
                              precision=precision, min_batch=min_batch, opt_batch=opt_batch,
                              max_batch=max_batch, sparse_weights=sparse_weights, timing_cache=timing_cache,
                              calib_data=calib_data, force=force)
    if failed:
        raise typer.Exit(code=1)


def export_artifacts(bundle: Path, out: Path, *, opset: int = 20, optimize: str = "all", fold: str = "auto",
                     fold_batch: int = 1, threads: int | None = None, rank_budget: float | None = None,
                     data_dir: Path | None = None, trt: bool = False, precision: str = "fp32",
                     min_batch: int = 1, opt_batch: int | None = None, max_batch: int | None = None,
                     sparse_weights: bool = False, timing_cache: Path | None = None,
                     calib_data: str | None = None, force: bool = False) -> bool:
    """`lrdeploy export` after its flags are parsed (also ``lrdeploy.export``): checks first, then the whole
    family staged and installed at once. Returns True when a precision variant missed its preset."""
    from lrdeploy import atomic
    from lrdeploy.outputs import Outputs, export_family

    if optimize not in ("none", "basic", "all"):
        raise UserError(f"--optimize {optimize!r} is not known", "use none, basic or all")
    if precision not in ("fp32", "fp16", "bf16", "int8"):
        raise UserError(f"--precision {precision!r} is not known", "use fp32, fp16, bf16 or int8")
    if Path(out).suffix != ".onnx":
        raise UserError(f"--out {out} must end in .onnx", "e.g. --out model.onnx")
    family = export_family(Path(out))
    Outputs(force=force, inputs=[bundle]).family(out, "--out", family)
    from lrdeploy.exporters.onnx import check_opset

    check_opset(opset)  # before any work: an unsupported opset used to export 18 and record the request
    from lrdeploy.cli_checks import check_artifact_batch_fits

    check_artifact_batch_fits(bundle, [fold_batch], "--fold-batch")
    if trt:  # fail before the work when the batch range is wrong, TensorRT or a GPU is missing
        from lrdeploy.exporters.tensorrt import batch_range, import_tensorrt

        batch_range(min_batch, opt_batch, max_batch)
        import_tensorrt()
    failed = False
    with atomic.Staging(Path(out).parent, replaces=family) as stage:
        staged = stage.path(Path(out).name)
        failed = _export_family(bundle, staged, stage.final, opset=opset, optimize=optimize, fold=fold,
                                fold_batch=fold_batch, threads=threads, rank_budget=rank_budget,
                                data_dir=data_dir, trt=trt, precision=precision, min_batch=min_batch,
                                opt_batch=opt_batch, max_batch=max_batch, sparse_weights=sparse_weights,
                                timing_cache=timing_cache, calib_data=calib_data)
        atomic.rewrite_paths(stage)
    console.print(f"wrote {', '.join(n for n in family if (Path(out).parent / n).exists())} "
                  f"in {Path(out).parent}")
    _say_sparsity(bundle, Path(out))
    return failed


def _say_sparsity(bundle: Path, onnx_path: Path) -> None:
    """A sparse model deploys as dense weights with zeros: say so, with the FLOPs the graph executes."""
    from lrdeploy.bundle import read_manifest
    from lrdeploy.sparsity_note import sparse_layers, sparsity_note

    manifest = read_manifest(bundle)
    if not sparse_layers(manifest):
        return
    from lrdeploy.artifacts import deployed_figures

    flops = deployed_figures(onnx_path).get("flops")
    note = sparsity_note(manifest, flops)
    console.print(f"[bold]sparsity:[/] {note} (`lrdeploy compare` measures the speed against the dense "
                  "original)", highlight=False)


def _export_family(bundle: Path, out: Path, shown: Any, *, opset: int, optimize: str, fold: str,
                   fold_batch: int, threads: int | None, rank_budget: float | None, data_dir: Path | None,
                   trt: bool, precision: str, min_batch: int, opt_batch: int | None, max_batch: int | None,
                   sparse_weights: bool, timing_cache: Path | None, calib_data: str | None) -> bool:
    """Every file of an export written at ``out`` (a staged path; ``shown`` maps it to where it will appear).

    Returns True when a precision variant missed its preset (the family is still written, exit 1).
    """
    from lrdeploy.workflows import export_bundle

    result, report = export_bundle(
        bundle,
        out,
        opset=opset,
        optimize=False,  # the preset runs below, step by step, each step checked and recorded
        rank_budget=rank_budget,
        data_dir=data_dir,
        fold=fold,
        fold_batch=fold_batch,
        threads=threads,
    )
    optimized = None
    if optimize != "none":  # basic: portable (standard ops only); all: ORT's contrib-op graph
        from lrdeploy.exporters.onnx import optimized_path_for
        from lrdeploy.exporters.optimize import optimize_onnx

        optimized = optimize_onnx(out, optimized_path_for(out), optimize)
    if fold == "auto":
        report.render(console)
    terminal.result(
        f"exported [bold]{shown(result.path)}[/] ({result.exporter} exporter, opset {result.opset}"
        + (f" (asked {opset}: the exporter could not convert)" if result.opset != opset else "") + ", "
        f"{result.nodes} nodes, parity rel-L2 {result.parity_rel_l2:.1e}); fold report "
        f"{shown(out.with_suffix('.fold.json'))}"
        + (f"; optimised copy ({optimize}): {shown(optimized.dst)}" if optimized is not None else "")
    )
    if optimized is not None:
        for step in optimized.steps:
            console.print(f"  {step.name}: {step.outcome}, {step.nodes_before} → {step.nodes_after} nodes"
                          + (f" ({step.reason})" if step.reason else ""))
    failed = False
    if precision in ("fp16", "bf16", "int8"):
        from lrdeploy.workflows import export_precision_variant

        variant = export_precision_variant(bundle, out, precision, data_dir=data_dir, dataset=calib_data)
        _print_variant(variant, shown)
        failed = variant.passed is False and not trt  # None: not judged here (bf16 on CPU), said above
    if trt:
        from lrdeploy.exporters.tensorrt import build_engine

        source = out
        if precision == "int8":  # TensorRT's own int8 graph, judged on ORT CPU before the GPU build
            qdq = _trt_int8_graph(bundle, out, data_dir, calib_data)
            _print_variant(qdq, shown)
            source = qdq.dst
        built = build_engine(
            source,
            out.with_suffix(".plan"),
            min_batch=min_batch,
            opt_batch=opt_batch,
            max_batch=max_batch,
            precision=precision,
            sparse_weights=sparse_weights,
            timing_cache=timing_cache,
        )
        console.print(f"TensorRT engine [bold]{shown(built.engine_path)}[/] (sidecar "
                      f"{shown(built.sidecar_path)})")
        for note in built.notes:
            console.print(f"note: {note}")
    return failed


def _print_variant(variant: Any, shown: Any = lambda p: p) -> None:
    """One line per precision variant: file, method, parity, accuracy delta, verdict (or why none)."""
    from rich.markup import escape

    acc = variant.accuracy or {}
    if variant.passed is None:
        verdict = f"[yellow]parity {escape(variant.judged_by)}[/]"
    else:
        verdict = "PASS" if variant.passed else "FAIL: " + escape("; ".join(variant.failures))
        if variant.judged_by != "onnxruntime-cpu":
            verdict += f" (onnx.reference on {variant.compared_examples} examples: ORT CPU cannot run it)"
    from lrdeploy.exporters.precision import describe_speed

    speed = describe_speed(getattr(variant, "speed_vs_fp32", None), getattr(variant, "timing", None))
    if speed:  # informs, never fails: a variant slower than fp32 here may still be the one a GPU wants
        verdict += " — " + (f"[bold yellow]{speed}[/]" if "SLOWER" in speed else speed)
    # no labels (an encoder's embeddings, random data): the output cosine instead of an accuracy delta
    quality = (f"accuracy delta {100 * acc['delta']:+.2f} points" if "delta" in acc
               else f"cosine {variant.parity.get('cosine', float('nan')):.4f}")
    (terminal.alert if variant.passed is False else console).print(  # a miss says why, even with -q
        f"{variant.precision} variant [bold]{shown(variant.dst)}[/] ({variant.method}): "
        f"rel-L2 {variant.parity.get('rel_l2', float('nan')):.1e}, {quality} — {verdict}"
    )


def _trt_int8_graph(bundle: Path, onnx_path: Path, data_dir: Path | None, calib_data: str | None) -> Any:
    """``<stem>.int8.trt.onnx``: symmetric Q/DQ for TensorRT, calibrated on the bundle's training data and
    judged on its test data like the CPU int8 variant; a miss is a UserError (nothing is built)."""
    from lrdeploy.bundle import read_manifest
    from lrdeploy.exporters.tensorrt import prepare_int8_graph
    from lrdeploy.tasks import manifest_task

    manifest = read_manifest(bundle)
    ds_name = calib_data or (manifest.get("dataset") or {}).get("name")
    if not ds_name:
        raise UserError(f"bundle {bundle} records no dataset to calibrate int8 on",
                        "name one with --calib-data (e.g. --calib-data mnist), or use --precision fp16")
    task = manifest_task(manifest)  # built-in datasets and a user's own data alike
    args = (manifest.get("model") or {}).get("args") or {}
    train = task.load(ds_name, "train", data_dir=data_dir, limit=256, manifest=manifest, model_args=args)
    test = task.load(ds_name, "test", data_dir=data_dir, limit=1000, manifest=manifest, model_args=args)
    n = task.num_examples(test)
    calibration = next(iter(task.feeds(train, task.num_examples(train)).values()))
    test_inputs = next(iter(task.feeds(test, n).values()))
    return prepare_int8_graph(onnx_path, onnx_path.with_suffix(".int8.trt.onnx"), calibration,
                              test_inputs=test_inputs, labels=task.labels(test, n))


Precision = choice_option(
    None,
    "--precision",
    choices=PARITY_PRESETS,
    help="Judge output parity with this preset (docs/parity.md); a miss exits 1. "
    "A preset compares the SAME model in another precision or runtime (model.onnx vs model.int8.onnx, "
    "a bundle vs its export); a compressed model differs from the dense one by design: gate it with "
    "--max-accuracy-drop / --min-agreement instead.",
)


def compare(
    dense: Path = typer.Argument(..., help="Dense original: a bundle directory or an .onnx file."),
    candidate: Path = typer.Argument(..., help="Candidate: a bundle directory or an .onnx file."),
    data: str | None = choice_option(
        None, "--data", choices=DATASETS, help="Dataset (default: from the dense bundle, else mnist)."
    ),
    data_dir: Path | None = DataDir,
    download: bool = Download,
    limit_test: int | None = typer.Option(None, "--limit-test", min=1, help="Use the first N test examples."),
    batch: str = typer.Option("1,32", "--batch", help="Batch sizes to time, comma-separated."),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="Intra-op threads (default: all cores)."
    ),
    seconds: float = typer.Option(
        1.0, "--seconds", min=0.05, max=DAY_S, help="Minimum timed seconds per block."
    ),
    max_accuracy_drop: float | None = typer.Option(
        None, "--max-accuracy-drop", min=0.0, max=100.0,
        help="Budget: drop of the task's headline metric, in points (accuracy; BLEU for translation); "
        "default: the task's, 1."
    ),
    min_agreement: float | None = typer.Option(
        None, "--min-agreement", min=0.0, max=1.0, help="Budget: top-1 agreement in [0, 1]."
    ),
    max_bleu_drop: float | None = typer.Option(
        None, "--max-bleu-drop", min=0.0, max=100.0,
        help="Budget where the headline metric is BLEU (translation), in points: --max-accuracy-drop by name."
    ),
    max_perplexity_increase: float | None = typer.Option(
        None, "--max-perplexity-increase", min=0.0,
        help="Budget for tasks that measure perplexity: relative rise (0.1 = 10%, the default)."
    ),
    precision: str | None = Precision,
    json_path: Path | None = typer.Option(None, "--json", help="Also write the report as JSON here."),
    out: Path | None = typer.Option(
        None, "--out", help="Run directory: write report.json, report.md and plot.png there."
    ),
    save_golden: Path | None = typer.Option(
        None,
        "--save-golden",
        help="Also save the dense model's inputs+outputs on the first test examples as a golden set "
        "(check later artefacts with `lrdeploy check CANDIDATE --golden DIR`).",
    ),
    golden_samples: int = typer.Option(
        256, "--golden-samples", min=1, help="Test examples in the golden set."
    ),
    profile: bool = typer.Option(
        False, "--profile", help="Add ONNX Runtime's per-operator time breakdown (report and plot)."
    ),
    force: bool = Force,
) -> None:
    """Compare a candidate with the dense original: size, FLOPs, accuracy, parity, latency, speed-up."""
    from lrdeploy.cli_checks import check_artifact_batch_fits
    from lrdeploy.comparison import compare_artifacts

    check_artifact_batch_fits(dense, _parse_batches(batch), "--batch")  # before minutes of accuracy runs
    from lrdeploy.outputs import Outputs
    from lrdeploy.serving.golden import is_golden_dir
    from lrdeploy.serving.report import REPORT_FILES, render_compare_table

    outputs = Outputs(force=force, inputs=[dense, candidate])
    outputs.file(json_path, "--json")
    outputs.files_in(out, "--out", REPORT_FILES)
    outputs.directory(save_golden, "--save-golden", what="golden set", is_ours=is_golden_dir)

    report = compare_artifacts(
        dense,
        candidate,
        dataset=data,
        data_dir=data_dir,
        limit_test=limit_test,
        batch_sizes=_parse_batches(batch),
        threads=threads,
        min_seconds=seconds,
        max_accuracy_drop=max_accuracy_drop,
        min_agreement=min_agreement,
        max_bleu_drop=max_bleu_drop,
        max_perplexity_increase=max_perplexity_increase,
        precision=precision,
        json_path=json_path,
        out_dir=out,
        save_golden=save_golden,
        golden_samples=golden_samples,
        profile=profile,
        force=force,
    )
    console.print(render_compare_table(report))
    from lrdeploy.result_lines import compare_line
    if report.get("sparsity"):
        console.print(f"[bold]sparsity:[/] {report['sparsity']}", highlight=False)
    if json_path and not terminal.json_on_stdout():
        console.print(f"JSON report: [bold]{json_path}[/]")
    if out:
        console.print(f"report: [bold]{out}[/] (report.json, report.md, plot.png)")
    if report.get("golden"):
        golden = report["golden"]
        console.print(f"golden set: [bold]{golden['path']}[/] ({golden['samples']} samples)")
    terminal.result(compare_line(report), highlight=False)
    _fail_on_misses(report)


def _fail_on_misses(report: dict[str, Any]) -> None:
    """Exit 1 naming every missed budget and every parity statistic outside its preset."""
    budget = report.get("budget") or {}
    if not budget.get("passed", True):
        err_console.print(
            f"[bold red]budget missed:[/] {'; '.join(budget.get('failures', []))}",
            soft_wrap=True,
            highlight=False,
        )
    parity = report.get("parity") or {}
    if parity.get("failures"):
        err_console.print(
            f"[bold red]parity ({parity.get('precision')}) failed:[/] {'; '.join(parity['failures'])}",
            soft_wrap=True,
            highlight=False,
        )
    if not budget.get("passed", True) or parity.get("failures"):
        raise typer.Exit(code=1)


def check(
    candidate: Path = typer.Argument(..., help="Artefact to check: an .onnx file or a bundle directory."),
    golden: Path = typer.Option(
        ..., "--golden", help="Golden set written by `lrdeploy compare REF CAND --save-golden DIR`: REF's "
        "inputs and outputs. Check an artefact of the same model as REF (its export, or a precision variant "
        "with that precision's preset), not a different model."
    ),
    precision: str | None = choice_option(
        None, "--precision", choices=PARITY_PRESETS,
        help="Preset to judge with (default: the one recorded in the golden set)."
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Intra-op threads."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the result as JSON here."),
    force: bool = Force,
) -> None:
    """Check an artefact against golden outputs (for CI): per-statistic verdict; exit 1 on a miss."""
    from lrdeploy.comparison import check_against_golden
    from lrdeploy.outputs import Outputs
    from lrdeploy.serving.report import render_check_table, write_json

    Outputs(force=force, inputs=[candidate, golden]).file(json_path, "--json")
    result = check_against_golden(candidate, golden, precision=precision, threads=threads)
    console.print(render_check_table(result))
    if json_path is not None:
        write_json(json_path, {**result, "run": run_record.current()})
        if not terminal.json_on_stdout():
            console.print(f"JSON result: [bold]{json_path}[/]")
    from lrdeploy.result_lines import check_line

    terminal.result(check_line(result), highlight=False)
    if not result["passed"]:
        err_console.print(
            f"[bold red]golden check failed ({result['precision']}):[/] {'; '.join(result['failures'])}",
            soft_wrap=True,
            highlight=False,
        )
        raise typer.Exit(code=1)


def report_cmd(
    runs: list[Path] = typer.Argument(
        ..., help="Run directories from `lrdeploy compare --out` (or their report.json files)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write summary.json, report.md and plot.png of the merged runs here."
    ),
    force: bool = Force,
) -> None:
    """Merge several compare runs into one table and one latency-vs-accuracy plot."""
    from lrdeploy.outputs import Outputs
    from lrdeploy.serving.report import (
        SUMMARY_FILES,
        load_report,
        merge_reports,
        render_summary_table,
        write_summary,
    )

    Outputs(force=force, inputs=runs).files_in(out, "--out", SUMMARY_FILES)
    reports = [load_report(path) for path in runs]
    summary = {**merge_reports(reports, [str(p) for p in runs]), "run": run_record.current()}
    console.print(render_summary_table(summary))
    if out is not None:
        write_summary(summary, out, force=force)
        terminal.result(f"merged report: [bold]{out}[/] (summary.json, report.md, plot.png)")
    else:
        terminal.result(f"merged {len(reports)} runs", highlight=False)


def demo(
    out: Path = typer.Option(
        Path("runs/demo"), "--out", help="Where the demo's bundles, ONNX files and report go."
    ),
    data_dir: Path | None = DataDir,
    download: bool = Download,
    epochs: int = typer.Option(5, "--epochs", min=1),
    force: bool = typer.Option(False, "--force", help="Replace an earlier demo run at --out."),
) -> None:
    """The main job: dense vs Cuttlefish MLP on MNIST, exported to ONNX and compared as deployed."""
    from lrdeploy.demo import run_demo

    report = run_demo(out=out, data_dir=data_dir, epochs=epochs, console=console, force=force)
    if terminal.is_quiet():
        from lrdeploy.demo import promise_line

        terminal.result(promise_line(report))
    if not report["budget"]["passed"]:
        raise typer.Exit(code=1)


# Every command, registered with the shared options (-v/-q, --config where listed) and its outputs, which
# `lrdeploy rerun --out DIR` moves into DIR ("dir": DIR itself; "file": DIR/<name>).
_TRAINED = {"out": "dir"}
register(app, models_cmd, "models")
register(app, train, config=True, outputs=_TRAINED,
         reset={"resume": False, "checkpoint-dir": None, "force": False})
register(app, init, outputs=_TRAINED, reset={"force": False})
register(app, compress, config=True, outputs=_TRAINED, reset={"force": False})
register(app, export, config=True, outputs={"out": "file"}, reset={"force": False})
register(app, compare, config=True, outputs={"out": "dir", "json": "file", "save-golden": "file"},
         reset={"force": False})
register(app, check, outputs={"json": "file"}, reset={"force": False})
register(app, report_cmd, "report", outputs={"out": "dir"}, reset={"force": False})
register(app, demo, outputs={"out": "dir"}, reset={"force": False})
# `lrdeploy bench`: options and implementation live in lrdeploy/bench_cmd.py
register(app, bench_cmd.bench, config=True, outputs={"json": "file"}, reset={"force": False})
# `lrdeploy serve`, `triton`, `loadtest`: options in lrdeploy/serve_cmd.py, the work in lrdeploy.serving
register(app, serve_cmd.serve)
register(app, serve_cmd.triton, outputs={"repo": "dir"}, reset={"force": False})
register(app, serve_cmd.loadtest, outputs={"json": "file"}, reset={"force": False})
register(app, rerun_cmd.rerun)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="lrdeploy")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
