"""`lrdeploy demo`: the main job, end to end on real MNIST with no flags and no network.

train dense LeNet-5 → SVD-compress → fine-tune → export both to ONNX → compare them as deployed.
The MNIST files ship inside the package, so this runs offline on a fresh machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

DEMO_MODEL = "lenet5"
DEMO_DATA = "mnist"
DEMO_RANK_RATIO = 0.25


def run_demo(
    *,
    out: Path,
    data_dir: Path | None = None,
    epochs: int = 3,
    finetune_epochs: int = 1,
    limit_train: int | None = None,
    limit_test: int | None = None,
    min_seconds: float = 1.0,
    console: Console | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole pipeline into ``out`` and return the comparison report (also written as JSON)."""
    from lrdeploy.bundle import load_bundle
    from lrdeploy.comparison import compare_artifacts
    from lrdeploy.exporters.onnx import export_onnx
    from lrdeploy.serving.report import render_compare_table
    from lrdeploy.workflows import TrainRequest, compress_bundle, train_bundle

    console = console or Console()
    out = Path(out)
    dense_dir, lowrank_dir = out / "dense", out / "lowrank"
    dense_onnx, lowrank_onnx = out / "dense.onnx", out / "lowrank.onnx"
    report_path = out / "report.json"

    console.rule(f"[bold]1/4[/] train dense {DEMO_MODEL} on {DEMO_DATA} ({epochs} epochs)")
    dense_metrics = train_bundle(
        TrainRequest(
            model_name=DEMO_MODEL,
            dataset=DEMO_DATA,
            data_dir=data_dir,
            epochs=epochs,
            limit_train=limit_train,
            out=dense_dir,
            progress=progress,
        )
    )
    console.print(f"dense test accuracy: {dense_metrics['test_accuracy']:.2%}")

    console.rule(
        f"[bold]2/4[/] compress by truncated SVD (rank ratio {DEMO_RANK_RATIO}), fine-tune {finetune_epochs}"
    )
    compressed = compress_bundle(
        dense_dir,
        rank_ratio=DEMO_RANK_RATIO,
        energy=None,
        finetune_epochs=finetune_epochs,
        dataset=DEMO_DATA,
        data_dir=data_dir,
        limit_train=limit_train,
        lr=0.01,
        seed=0,
        out=lowrank_dir,
        progress=progress,
    )
    console.print(compressed["table"])
    m = compressed["metrics"]
    console.print(
        f"low-rank test accuracy: {m['test_accuracy_before_finetune']:.2%} after SVD, "
        f"{m['test_accuracy']:.2%} after fine-tuning"
    )

    console.rule("[bold]3/4[/] export both to ONNX (folded, checked, parity-verified)")
    for bundle_dir, onnx_path in ((dense_dir, dense_onnx), (lowrank_dir, lowrank_onnx)):
        result = export_onnx(load_bundle(bundle_dir), onnx_path)
        console.print(f"{onnx_path}: {result.nodes} nodes, parity rel-L2 {result.parity_rel_l2:.1e}")

    console.rule("[bold]4/4[/] compare as deployed (ONNX Runtime, CPU)")
    report = compare_artifacts(
        dense_onnx,
        lowrank_onnx,
        dataset=DEMO_DATA,
        data_dir=data_dir,
        limit_test=limit_test,
        batch_sizes=(1, 32),
        min_seconds=min_seconds,
        json_path=report_path,
        progress=progress,
    )
    console.print(render_compare_table(report))
    console.print(
        f"\nartefacts: bundles [bold]{dense_dir}[/], [bold]{lowrank_dir}[/]; ONNX [bold]{dense_onnx}[/], "
        f"[bold]{lowrank_onnx}[/] (+ .ort.onnx optimised copies); report [bold]{report_path}[/]"
    )
    return report
