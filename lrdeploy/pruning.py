"""Post-training N:M pruning: ``lrdeploy compress BUNDLE --sparsity 2:4 [--finetune-epochs N] --out OUT``.

Every eligible layer (the one selection policy: stem and classifier dense) gets a magnitude N:M mask along its
input dimension (:mod:`lrdeploy.methods.nm`); layers whose fan-in is not a multiple of M stay dense and are
reported. The model is evaluated, optionally fine-tuned with the masks held fixed (weights, gradients and
momentum of pruned positions stay zero, so the pattern survives), and written as a bundle of masked layers.
Its export keeps the pattern in the weights, for TensorRT's ``--sparse-weights``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import RenderableType
from rich.table import Table
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.tables import fit


def prune_bundle(bundle_path: Path, *, pattern: str, finetune_epochs: int, dataset: str | None,
                 data_dir: Path | None, limit_train: int | None, lr: float | None, seed: int, out: Path,
                 progress: bool = True, force: bool = False, device: str = "auto", amp: str = "off",
                 limit_test: int | None = None) -> dict[str, Any]:
    from lrdeploy.bundle import check_output_dir, load_bundle, save_bundle
    from lrdeploy.layers.masked import MaskedConv2d, MaskedLinear
    from lrdeploy.layers.structure import set_submodule
    from lrdeploy.methods import selection
    from lrdeploy.methods.dst import MaskKeeper
    from lrdeploy.methods.nm import nm_eligible, nm_mask, parse_nm
    from lrdeploy.tasks import manifest_task
    from lrdeploy.workflows import evaluate_and_finetune

    n, m = parse_nm(pattern)
    check_output_dir(out, force=force, inputs=(bundle_path,))
    src = load_bundle(bundle_path)
    model = src.model
    task = manifest_task(src.manifest)
    chosen, kept = selection.select_layers(model)
    rows: list[dict[str, Any]] = []
    for name in chosen:
        layer = model.get_submodule(name)
        why = nm_eligible(layer, m)
        if why is not None:
            kept[name] = why
            continue
        cls = MaskedConv2d if isinstance(layer, nn.Conv2d) else MaskedLinear
        masked = cls.from_dense(layer, mask=nm_mask(layer.weight, n, m), pattern=f"{n}:{m}")
        set_submodule(model, name, masked)
        rows.append({"layer": name, "kind": type(layer).__name__, "weights": layer.weight.numel(),
                     "kept": layer.weight.numel() * n // m})
    if not rows:
        raise UserError(f"nothing to prune in {bundle_path}: no eligible layer takes the {n}:{m} pattern",
                        f"layers kept dense: {'; '.join(f'{k}: {v}' for k, v in list(kept.items())[:3])}")
    ds_name = dataset or src.manifest.get("dataset", {}).get("name")
    model, metrics, train_record = evaluate_and_finetune(
        model, task, src.manifest, ds_name, data_dir=data_dir, epochs=finetune_epochs,
        limit_train=limit_train, lr=lr, seed=seed, progress=progress, source=bundle_path,
        limit_test=limit_test, device=device, amp=amp, hooks=[MaskKeeper(model)])
    method: dict[str, Any] = {
        "name": "nm", "settings": {"pattern": f"{n}:{m}"},
        "log": {"pruned": rows, "kept_dense": kept},
        "finetune_epochs": finetune_epochs,
        "source_bundle": str(bundle_path),
        "source_weights_sha256": src.manifest.get("weights_sha256"),
    }
    if train_record:
        method["finetune"] = train_record
    ds_record = src.manifest.get("dataset", {}) if not dataset else {"name": dataset, "task": task.name}
    save_bundle(out, model, force=force, model_name=src.manifest["model"]["name"],
                model_args=src.manifest["model"]["args"], task=task.name, method=method, dataset=ds_record,
                metrics=metrics, input_shape=src.input_shape,
                extra=task.manifest_extra_from(src.manifest) or None)
    return {"metrics": metrics, "table": _table(rows, kept, n, m)}


def _table(rows: list[dict[str, Any]], kept: dict[str, str], n: int, m: int) -> RenderableType:
    """Per pruned layer: kind, weights and non-zero weights; then the layers kept dense and why."""
    total = sum(r["weights"] for r in rows)
    table = Table(title=f"{n}:{m} pruning: {len(rows)} layers, {total:,} weights → {total * n // m:,} "
                        "non-zero (dense storage and dense kernels on CPU; faster only with 2:4 kernels on "
                        "NVIDIA GPUs)")
    for col in ("layer", "kind", "weights", "non-zero", "note"):  # names and notes fold, counts never wrap
        text = col in ("layer", "note")
        table.add_column(col, overflow="fold" if text else "ellipsis", no_wrap=not text,
                         justify="right" if col in ("weights", "non-zero") else "left")
    for r in rows:
        table.add_row(r["layer"], r["kind"], f"{r['weights']:,}", f"{r['kept']:,}", f"{n}:{m}")
    for name, why in kept.items():
        table.add_row(name, "", "", "", f"dense: {why}")
    return fit(table, keys=1)
