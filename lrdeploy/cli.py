"""The `lrdeploy` command line: train, init, compress, export, compare, demo, models."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from lrdeploy.errors import UserError

app = typer.Typer(
    name="lrdeploy",
    help="Train or load low-rank networks, fold them into ONNX, and prove the speed-up and parity.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a UserError into one line on stderr and exit code 2 — no traceback for the user's mistakes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/] {e.one_line()}", soft_wrap=True, highlight=False)
            raise typer.Exit(code=UserError.exit_code) from None

    return wrapper  # type: ignore[return-value]


DataDir = typer.Option(
    None,
    "--data-dir",
    help="Directory holding the dataset files (else $LRDEPLOY_DATA, the cache, or shipped MNIST).",
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


@app.command("models")
@user_errors
def models_cmd() -> None:
    """List the models in the registry."""
    from rich.table import Table

    from lrdeploy.models import list_models

    table = Table(title="lrdeploy models")
    for col in ("name", "input", "classes", "description"):
        table.add_column(col)
    for spec in list_models():
        table.add_row(
            spec.name, "×".join(map(str, spec.input_shape)), str(spec.num_classes), spec.description
        )
    console.print(table)


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


@app.command()
@user_errors
def train(
    model: str = typer.Option("lenet5", "--model", help="Registry model name (see `lrdeploy models`)."),
    data: str = typer.Option("mnist", "--data", help="Dataset: mnist, fashion-mnist, cifar10."),
    data_dir: Path | None = DataDir,
    method: str = typer.Option("dense", "--method", help="dense, cuttlefish or maestro."),
    method_opt: list[str] | None = typer.Option(
        None, "--method-opt", help="A method setting as key=value (repeatable), e.g. window=3."
    ),
    model_arg: list[str] | None = typer.Option(
        None, "--model-arg", help="A model constructor argument as key=value (repeatable), e.g. width=16."
    ),
    epochs: int = typer.Option(2, "--epochs", min=1),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    lr: float = typer.Option(0.05, "--lr", min=0.0),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", min=0.0),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine or step"),
    augment: str | None = typer.Option(None, "--augment", help="Training augmentation: crop-flip (CIFAR)."),
    limit_train: int | None = typer.Option(
        None, "--limit-train", min=1, help="Use the first N training examples."
    ),
    limit_test: int | None = typer.Option(
        None, "--limit-test", min=1, help="Evaluate on the first N test examples."
    ),
    seed: int = typer.Option(0, "--seed"),
    out: Path | None = typer.Option(
        None, "--out", help="Bundle directory (default runs/<model>-<data>-<method>)."
    ),
) -> None:
    """Train a model (dense, or low-rank with Cuttlefish or Maestro) and write a bundle."""
    from lrdeploy.workflows import TrainRequest, train_bundle

    out = out or Path("runs") / f"{model}-{data}-{method}"
    metrics = train_bundle(
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
        )
    )
    console.print(f"test accuracy {metrics['test_accuracy']:.2%} — bundle written to [bold]{out}[/]")


@app.command()
@user_errors
def init(
    model: str = typer.Option(..., "--model", help="Registry model name (see `lrdeploy models`)."),
    num_classes: int | None = typer.Option(None, "--num-classes", min=1),
    from_checkpoint: Path | None = typer.Option(
        None, "--from-checkpoint", help="A plain PyTorch state dict (.pt), loaded with weights_only=True."
    ),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write."),
) -> None:
    """Make a bundle from a registry model at its initial weights or from a dense checkpoint ("load" path)."""
    from lrdeploy import workflows

    workflows.init_bundle(model_name=model, num_classes=num_classes, checkpoint=from_checkpoint, out=out)
    console.print(f"bundle written to [bold]{out}[/]")


@app.command()
@user_errors
def compress(
    bundle: Path = typer.Argument(..., help="Dense bundle directory."),
    rank_ratio: float | None = typer.Option(
        None, "--rank-ratio", help="Rank as a share of full rank, in (0, 1]."
    ),
    energy: float | None = typer.Option(None, "--energy", help="Retained spectral energy, in (0, 1]."),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", min=0),
    data: str | None = typer.Option(
        None, "--data", help="Dataset for fine-tuning/eval (default: the bundle's)."
    ),
    data_dir: Path | None = DataDir,
    limit_train: int | None = typer.Option(None, "--limit-train", min=1),
    lr: float = typer.Option(0.01, "--lr", min=0.0, help="Fine-tuning learning rate."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--out", help="Low-rank bundle directory to write."),
) -> None:
    """Compress a bundle by truncated SVD (rank ratio or energy), optionally fine-tune, write a new bundle."""
    from lrdeploy import workflows

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
    )
    console.print(result["table"])
    console.print(f"low-rank bundle written to [bold]{out}[/]")


@app.command()
@user_errors
def export(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    out: Path = typer.Option(
        ..., "--out", help="ONNX file to write (the ORT-optimised copy goes beside it)."
    ),
    opset: int = typer.Option(20, "--opset", min=13),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="Also write <stem>.ort.onnx."),
    rank_budget: float | None = typer.Option(
        None,
        "--rank-budget",
        help="Maestro bundles: keep the most important components, this share of factors.",
    ),
    data_dir: Path | None = DataDir,
) -> None:
    """Fold a bundle and export it to ONNX (checked, parity-verified, manifest in metadata)."""
    from lrdeploy.workflows import export_bundle

    result = export_bundle(
        bundle, out, opset=opset, optimize=optimize, rank_budget=rank_budget, data_dir=data_dir
    )
    console.print(
        f"exported [bold]{result.path}[/] ({result.exporter} exporter, opset {result.opset}, "
        f"{result.nodes} nodes, parity rel-L2 {result.parity_rel_l2:.1e})"
        + (f"; ORT-optimised copy: {result.optimized_path}" if result.optimized_path else "")
    )


@app.command()
@user_errors
def compare(
    dense: Path = typer.Argument(..., help="Dense original: a bundle directory or an .onnx file."),
    candidate: Path = typer.Argument(..., help="Candidate: a bundle directory or an .onnx file."),
    data: str | None = typer.Option(
        None, "--data", help="Dataset (default: from the dense bundle, else mnist)."
    ),
    data_dir: Path | None = DataDir,
    limit_test: int | None = typer.Option(None, "--limit-test", min=1, help="Use the first N test examples."),
    batch: str = typer.Option("1,32", "--batch", help="Batch sizes to time, comma-separated."),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="Intra-op threads (default: all cores)."
    ),
    seconds: float = typer.Option(1.0, "--seconds", min=0.05, help="Minimum timed seconds per block."),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="Budget, in accuracy points."),
    min_agreement: float | None = typer.Option(
        None, "--min-agreement", help="Budget: top-1 agreement in [0, 1]."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """Compare a candidate with the dense original: size, FLOPs, accuracy, parity, latency, speed-up."""
    from lrdeploy.comparison import compare_artifacts
    from lrdeploy.serving.report import render_compare_table

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
        json_path=json_path,
    )
    console.print(render_compare_table(report))
    if json_path:
        console.print(f"JSON report: [bold]{json_path}[/]")
    if not report["budget"]["passed"]:
        err_console.print(f"[bold red]budget missed:[/] {'; '.join(report['budget']['failures'])}")
        raise typer.Exit(code=1)


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(
        Path("runs/demo"), "--out", help="Where the demo's bundles, ONNX files and report go."
    ),
    data_dir: Path | None = DataDir,
    epochs: int = typer.Option(4, "--epochs", min=1),
) -> None:
    """The main job: train LeNet-5 on MNIST, compress it, fine-tune, export both, compare them."""
    from lrdeploy.demo import run_demo

    report = run_demo(out=out, data_dir=data_dir, epochs=epochs, console=console)
    if not report["budget"]["passed"]:
        raise typer.Exit(code=1)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="lrdeploy")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
