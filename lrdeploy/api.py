"""The Python API, for notebooks: the CLI's jobs as functions (``import lrdeploy``; see README, "Your own
model").

Each function runs the code the matching command runs — ``save_bundle`` is ``lrdeploy init`` (or saves a
model you trained yourself), ``compress`` is ``lrdeploy compress`` on a bundle and
:func:`lrdeploy.compress.compress` on a model in memory, ``export`` is ``lrdeploy export``, ``compare`` is
``lrdeploy compare`` — so a notebook and a shell give the same artefacts. Bad input raises
:class:`lrdeploy.errors.UserError` (one line, the fix after the dash).

A bundle stores a model's *name* and constructor arguments, never a pickled module, so whatever is saved
must be rebuildable: from a registry name or a ``pkg.module:factory`` import string (``model_name``) and
``model_args``. ``save_bundle`` checks that rebuilding gives the same tensors before it writes anything.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lrdeploy.errors import UserError

PathLike = str | os.PathLike


def load_bundle(path: PathLike) -> Any:
    """The bundle at ``path`` (``.model`` in eval mode, ``.manifest``), as every command loads it."""
    from lrdeploy.bundle import load_bundle as load

    return load(path)


def save_bundle(model: Any, out: PathLike, *, model_name: str | None = None,
                model_args: Mapping[str, Any] | None = None, task: str | None = None,
                input_shape: Sequence[int] | None = None, force: bool = False) -> Path:
    """Write a bundle at ``out`` and return its path.

    ``model`` is either a name — a registry model or your own ``"pkg.module:factory"`` — built with
    ``model_args`` at its initial weights (exactly ``lrdeploy init``), or an ``nn.Module`` you built and
    trained, with ``model_name``/``model_args`` saying how to rebuild it (its low-rank layers, e.g. after
    :func:`compress`, are recorded too). ``task`` and ``input_shape`` (one sample, no batch) are needed
    where the model does not declare them. An existing bundle at ``out`` is replaced only with ``force``.
    """
    from torch import nn

    from lrdeploy import workflows

    args = dict(model_args or {})
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    if isinstance(model, str):
        if model_name is not None and model_name != model:
            raise UserError(f"save_bundle got model {model!r} and model_name {model_name!r}",
                            "name the model once")
        workflows.init_bundle(model_name=model, num_classes=None, checkpoint=None, out=Path(out),
                              force=force, model_args=args, input_shape=shape, task=task)
        return Path(out)
    if not isinstance(model, nn.Module):
        raise UserError(f"save_bundle takes an nn.Module or a model name, not {type(model).__name__}",
                        "pass the model, or its name (registry or 'pkg.module:factory')")
    if not model_name:
        raise UserError("save_bundle needs model_name to save a model object: a bundle rebuilds the model "
                        "from it", "pass model_name='pkg.module:factory' (or a registry name) and model_args")
    return _save_module(model, Path(out), model_name, args, task, shape, force)


def _save_module(model: Any, out: Path, model_name: str, args: dict[str, Any], task: str | None,
                 shape: tuple[int, ...] | None, force: bool) -> Path:
    from lrdeploy.bundle import check_output_dir
    from lrdeploy.bundle import save_bundle as save
    from lrdeploy.layers.structure import describe
    from lrdeploy.models import get_spec
    from lrdeploy.workflows import model_input_shape, model_task

    check_output_dir(out, force=force)
    spec = get_spec(model_name)
    chosen = model_task(spec, task)
    structure = describe(model)
    _check_rebuildable(model, model_name, args, structure)
    was_training = model.training
    try:
        save(out, model.eval(), force=force, model_name=model_name, model_args=args,
             input_shape=model_input_shape(spec, shape, model), task=chosen.name,
             method={"name": "svd" if structure else "dense", "source": "python"}, dataset={}, metrics={})
    finally:
        model.train(was_training)
    return out


def _check_rebuildable(model: Any, model_name: str, args: dict[str, Any], structure: dict[str, Any]) -> None:
    """Rebuild ``model_name(**args)`` with ``structure`` (shapes only where the factory allows) and compare
    every tensor's name and shape with ``model``: a bundle that could not be loaded back is never written."""
    import torch

    from lrdeploy.layers.structure import apply
    from lrdeploy.models import create_model

    def build() -> Any:
        return apply(create_model(model_name, **args), structure)

    try:
        with torch.device("meta"):
            rebuilt = build()
    except UserError:
        raise
    except Exception:  # a factory that cannot run on the meta device
        rebuilt = build()
    want = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want == have:
        return
    missing, extra = [k for k in want if k not in have], [k for k in have if k not in want]
    wrong = [f"{k} {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]]
    problems = "; ".join(f"{label} {', '.join(names[:3])}" + (" …" if len(names) > 3 else "")
                         for label, names in (("missing", missing), ("unexpected", extra),
                                              ("wrong shape", wrong)) if names)
    raise UserError(f"the model does not match {model_name}({_args_text(args)}) rebuilt: {problems}",
                    "pass the model_name and model_args the model was built with")


def _args_text(args: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def compress(model_or_bundle: Any, *, rank_ratio: float | None = None, energy: float | None = None,
             out: PathLike | None = None, finetune_epochs: int = 0, data: str | None = None,
             data_dir: PathLike | None = None, limit_train: int | None = None, lr: float | None = None,
             seed: int = 0, progress: bool = True, force: bool = False, **options: Any) -> Any:
    """Truncated-SVD compression, by ``rank_ratio`` or by retained ``energy`` (exactly one).

    A bundle path: ``lrdeploy compress`` — evaluated (and fine-tuned for ``finetune_epochs`` on ``data``,
    default the bundle's) and written to ``out``; returns its metrics, per-layer report and ``bundle``
    path. An ``nn.Module``: factorised in place by :func:`lrdeploy.compress.compress` (``options`` such as
    ``include``/``exclude`` go to it); returns the per-layer report — save it with :func:`save_bundle`.
    """
    from torch import nn

    if isinstance(model_or_bundle, nn.Module):
        bundle_only = {"out": out, "data": data, "data_dir": data_dir, "limit_train": limit_train, "lr": lr}
        given = [k for k, v in bundle_only.items() if v is not None] + (["finetune_epochs"]
                                                                        if finetune_epochs else [])
        if given:
            raise UserError(f"{', '.join(given)} apply to a bundle, not to a model in memory",
                            "compress the model, then save_bundle() it, or compress a bundle path")
        from lrdeploy.compress import compress as compress_model

        return compress_model(model_or_bundle, rank_ratio=rank_ratio, energy=energy, **options)
    if options:
        raise UserError(f"compress() of a bundle takes no {', '.join(sorted(options))}",
                        "those options apply to a model in memory")
    if out is None:
        raise UserError("compress() of a bundle needs out=: the directory of the low-rank bundle",
                        "e.g. lrdeploy.compress('runs/dense', rank_ratio=0.5, out='runs/lowrank')")
    from lrdeploy.workflows import compress_bundle

    result = compress_bundle(
        Path(model_or_bundle), rank_ratio=rank_ratio, energy=energy, finetune_epochs=finetune_epochs,
        dataset=data, data_dir=Path(data_dir) if data_dir is not None else None, limit_train=limit_train,
        lr=lr, seed=seed, out=Path(out), progress=progress, force=force,
    )
    return {**result, "bundle": Path(out)}


def export(model_or_bundle: Any, out: PathLike, *, model_name: str | None = None,
           model_args: Mapping[str, Any] | None = None, task: str | None = None,
           input_shape: Sequence[int] | None = None, force: bool = False, **options: Any) -> dict[str, Any]:
    """``lrdeploy export``: fold, export to ONNX (checked, parity-verified), optimised copy, precision
    variants; ``options`` are the command's flags as keywords (``opset``, ``optimize``, ``fold``,
    ``fold_batch``, ``threads``, ``rank_budget``, ``data_dir``, ``precision``, ``calib_data``, ``trt`` …).

    An ``nn.Module`` is first saved as a bundle in a temporary directory (``model_name``/``model_args``
    say how to rebuild it, as for :func:`save_bundle`). Returns ``{"onnx": path, "files": [...],
    "passed": False when a precision variant missed its preset}``.
    """
    from torch import nn

    from lrdeploy.cli import export_artifacts
    from lrdeploy.outputs import export_family

    out = Path(out)
    if isinstance(model_or_bundle, nn.Module):
        with tempfile.TemporaryDirectory(prefix="lrdeploy-api-") as tmp:
            bundle = save_bundle(model_or_bundle, Path(tmp) / "bundle", model_name=model_name,
                                 model_args=model_args, task=task, input_shape=input_shape)
            failed = export_artifacts(bundle, out, force=force, **options)
    else:
        extra = [k for k, v in (("model_name", model_name), ("model_args", model_args), ("task", task),
                                ("input_shape", input_shape)) if v is not None]
        if extra:
            raise UserError(f"export() of a bundle takes no {', '.join(extra)}: the bundle records them",
                            "pass them only with a model in memory")
        failed = export_artifacts(Path(model_or_bundle), out, force=force, **options)
    files = [out.parent / name for name in export_family(out) if (out.parent / name).exists()]
    return {"onnx": out, "files": files, "passed": not failed}


def compare(dense: PathLike, candidate: PathLike, **options: Any) -> dict[str, Any]:
    """``lrdeploy compare``: the candidate against the dense original (bundles or .onnx files) on size,
    FLOPs, task metric, parity and interleaved latency; ``options`` are the command's flags as keywords
    (``dataset``, ``data_dir``, ``limit_test``, ``batch_sizes``, ``min_seconds`` …). Returns the report."""
    from lrdeploy.comparison import compare_artifacts

    return compare_artifacts(Path(dense), Path(candidate), **options)
