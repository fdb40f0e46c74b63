"""The engine-side jobs behind the CLI: train a dense bundle, make one from a checkpoint, compress one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import RenderableType
from rich.table import Table

from lrdeploy import run_record
from lrdeploy.errors import UserError
from lrdeploy.tables import fit


@dataclass
class TrainRequest:
    """Everything `lrdeploy train` needs; defaults are the CLI's (``None``: the task's default)."""

    model_name: str = "lenet5"
    dataset: str | None = None  # None: the task's default dataset
    data_dir: Path | None = None
    method: str = "dense"
    method_settings: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    augment: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    seed: int = 0
    out: Path = Path("runs/bundle")
    progress: bool = True
    force: bool = False  # replace an existing bundle at ``out``
    task: str | None = None  # None: the task the model declares
    input_shape: tuple[int, ...] | None = None  # one sample; must match the data's where the data has one
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: str = "off"  # off, bf16, fp16
    checkpoint_every: int = 1  # epochs between training checkpoints; 0: none
    checkpoint_dir: Path | None = None  # None: beside the bundle, <out>.checkpoint
    resume: bool = False  # continue the killed run whose checkpoint is in checkpoint_dir
    holdout: float = 0.0  # share of the training split held out as a validation set (the λ search's)

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.out.with_name(self.out.name + ".checkpoint")


def model_task(spec: Any, task: str | None = None) -> Any:
    """The task of a model: the one it declares, or ``task`` (``--task``) for a model that declares none
    (a user's module) or to override a user's module's own; a registry model's task cannot be changed."""
    from lrdeploy.tasks import get_task, list_tasks

    if not (task or spec.task):
        raise UserError(f"model {spec.name} declares no task, so --task is needed",
                        f"pass --task {' or '.join(list_tasks())} (or set lrdeploy_task on the factory)")
    chosen = get_task(task or spec.task)
    if task is not None and spec.task and spec.task != chosen.name and spec.source == "registry":
        raise UserError(f"model {spec.name} is a {spec.task} model, not {chosen.name}",
                        f"drop --task or use --task {spec.task}")
    return chosen


def model_input_shape(spec: Any, given: tuple[int, ...] | None, model: torch.nn.Module | None = None,
                      data_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """One sample's shape: the data's (``given`` must agree), else ``given`` (``--input-shape``), else what
    the model declares (its spec, or its own ``example_inputs``); none of them is a one-line error."""
    if data_shape and given and tuple(given) != tuple(data_shape):
        raise UserError(f"--input-shape {','.join(map(str, given))} does not match the data's samples "
                        f"({','.join(map(str, data_shape))})", "drop --input-shape: the data decides it")
    shape = tuple(data_shape or given or spec.input_shape or ())
    if not shape and model is not None:
        from lrdeploy.models.inputs import declares_inputs, example_inputs

        if declares_inputs(model):
            shape = tuple(example_inputs(model, 1)[0].shape[1:])
    if not shape:
        raise UserError(f"model {spec.name} declares no input shape, so --input-shape is needed",
                        "pass one sample's shape without the batch, e.g. --input-shape 1,28,28 (or set "
                        "lrdeploy_input_shape on the factory)")
    return tuple(int(d) for d in shape)


def resolve_task(spec: Any, dataset: str | None, task: str | None = None) -> tuple[Any, str]:
    """(task, dataset name) for a model: the task the model declares (or ``task`` when given for a model
    that declares none), checked against the dataset. Never inferred from the number of inputs."""
    from lrdeploy.tasks import task_for_dataset

    chosen = model_task(spec, task)
    name = dataset or chosen.default_dataset
    if name is None:
        raise UserError(f"task {chosen.name} has no built-in dataset", "name one with --data")
    if not chosen.accepts_dataset(name):
        other = task_for_dataset(name)
        fix = (f"use --data {chosen.default_dataset}" if chosen.default_dataset else "pick a matching --data")
        what = f"a {other.name} dataset" if other is not None else "not a dataset this task reads"
        raise UserError(f"model {spec.name} is a {chosen.name} model and {name} is {what}", fix)
    return chosen, name


def train_bundle(req: TrainRequest) -> dict[str, Any]:
    """Train a model with a method (dense, cuttlefish, maestro …) for its task and write its bundle.

    The method is a trainer hook from :mod:`lrdeploy.methods`; what it learnt (ranks, switch epoch,
    stable-rank history …) goes into the manifest under ``method``, with the training settings beside it.
    The task (:mod:`lrdeploy.tasks`) loads the data, supplies the loss and metrics, and records what the
    bundle needs to read its data again (e.g. a translation model's tokenizers).
    """
    from lrdeploy import distributed
    from lrdeploy.devices import resolve_amp, resolve_device

    device = resolve_device(req.device)  # a GPU asked for where there is none: one line, before any work
    resolve_amp(req.amp, device)
    with distributed.session(device):
        return _train_bundle(req)


def split_holdout(train_set: Any, fraction: float) -> tuple[Any, Any]:
    """(first 1 − fraction, last fraction) of an in-memory training split; the tail is the validation set."""
    from lrdeploy.data.datasets import ArrayDataset

    if not isinstance(train_set, ArrayDataset):
        raise UserError("a validation hold-out needs an in-memory classification dataset",
                        "use an image dataset (mnist, fashion-mnist, cifar10, your .npz or folder)")
    if not 0.0 < fraction < 1.0:
        raise UserError(f"the hold-out share must be in (0, 1), got {fraction!r}")
    n = len(train_set)
    held = max(1, min(n - 1, round(n * fraction)))
    keep = train_set.head(n - held)
    tail = ArrayDataset(train_set.x[n - held:], train_set.y[n - held:], train_set.name, "train[hold-out]",
                        train_set.classes, train_set.preprocess, train_set.source, held, dict(train_set.info))
    return keep, tail


def _check_checkpoint_dir(req: TrainRequest) -> None:
    """A fresh run must not silently shadow an interrupted one; ``--resume`` needs one to continue."""
    from lrdeploy import checkpoint, distributed

    path = req.checkpoints
    if req.resume:
        if not checkpoint.exists(path):
            finished = req.out.exists()
            done = " (a finished run removes its checkpoint; its bundle is the result)" if finished else ""
            raise UserError(f"--resume: no training checkpoint at {path}{done}",
                            "run without --resume to start training, or point --checkpoint-dir at the run's "
                            "checkpoint")
        return
    if req.checkpoint_every and checkpoint.exists(path):
        if not req.force:
            raise UserError(f"a checkpoint of an interrupted run is at {path}",
                            "add --resume to continue that run, or --force to start over (it is replaced)")
        if distributed.is_main():
            checkpoint.remove_checkpoint(path)
        distributed.barrier()


def _train_bundle(req: TrainRequest) -> dict[str, Any]:
    from lrdeploy import checkpoint, distributed
    from lrdeploy.bundle import check_output_dir, save_bundle
    from lrdeploy.layers.maestro import compact
    from lrdeploy.methods import get_method
    from lrdeploy.models import create_model, get_spec
    from lrdeploy.train import TrainConfig, train

    check_output_dir(req.out, force=req.force)
    _check_checkpoint_dir(req)
    spec = get_spec(req.model_name)
    task, ds_name = resolve_task(spec, req.dataset, req.task)
    hook = None if req.method == "dense" else get_method(req.method, **req.method_settings)
    if hook is None and req.method_settings:
        raise UserError("--method-opt was given but --method is dense", "drop it or choose a method")
    config = TrainConfig.for_task(
        task, epochs=req.epochs, batch_size=req.batch_size, lr=req.lr, weight_decay=req.weight_decay,
        schedule=req.schedule, seed=req.seed, limit_train=req.limit_train, progress=req.progress,
        augment=req.augment, device=req.device, amp=req.amp, checkpoint_every=req.checkpoint_every,
        checkpoint_dir=str(req.checkpoints) if req.checkpoint_every or req.resume else None,
        resume=req.resume,
    )
    settings = {**spec.default_args, **req.model_args}
    train_set = task.load(ds_name, "train", data_dir=req.data_dir, limit=req.limit_train, model_args=settings)
    test_set = task.load(ds_name, "test", data_dir=req.data_dir, limit=req.limit_test,
                         manifest=task.manifest_extra(train_set), model_args=settings)
    validation = None
    if req.holdout:
        train_set, validation = split_holdout(train_set, req.holdout)
    model_args = task.model_args(spec, train_set, req.model_args)
    torch.manual_seed(req.seed)  # the initial weights are part of the run: seed them too
    model = create_model(req.model_name, **model_args)
    task.check_model(model, train_set, req.model_name, ds_name)
    # one sample: the data's for image inputs (--input-shape must agree), else the model's (a source length)
    input_shape = model_input_shape(spec, req.input_shape, model, getattr(train_set, "input_shape", None))
    if hook is not None and hasattr(hook, "model_args_for"):  # e.g. Sparse Wide: a wider model of the family
        wider = hook.model_args_for(model, model_args, input_shape, spec.builder)
        if wider is not None:
            model_args = wider
            torch.manual_seed(req.seed)
            model = create_model(req.model_name, **model_args)
    if hook is not None and hasattr(hook, "prepare") and not req.resume:  # a resumed model gets its structure
        model = hook.prepare(model)                                        # from the checkpoint
    run = {"model": req.model_name, "model_args": model_args, "task": task.name, "dataset": ds_name,
           "method": req.method, "method_settings": req.method_settings}
    result = train(model, train_set, validation or test_set, config, hooks=[hook] if hook is not None else [],
                   task=task, run=run)
    model = compact(result.model.cpu())  # Maestro keeps dead components in storage while training; drop them
    metrics: dict[str, Any] = {f"test_{k}": v for k, v in result.metrics.items()}
    if validation is not None:  # the run was judged on the held-out part; the test split is reported beside
        metrics = {f"validation_{k}": v for k, v in result.metrics.items()}
        metrics.update({f"test_{k}": v for k, v in task.evaluate_model(model.eval(), test_set).items()})
        metrics["validation_samples"] = len(validation)
    metrics.update({
        "test_samples": len(test_set),
        "train_loss": result.train_loss,
        "train_seconds": result.seconds,
        "train_samples_per_s": result.samples_per_s,
        "train_rate_unit": task.rate_unit,
        "train_device": result.device,
        "train_amp": result.amp,
        "train_processes": result.world_size,
        "train_checkpoint_seconds": result.checkpoint_seconds,
        "history": result.history,
    })
    if result.resumed_after_epoch is not None:
        metrics["train_resumed_after_epoch"] = result.resumed_after_epoch
    if result.replica_digests is not None:
        metrics["train_replica_digests"] = result.replica_digests
    if not distributed.is_main():  # rank 0 writes the bundle; the others wait for it
        distributed.barrier()
        return metrics
    method = hook.manifest_record() if hook is not None else {"name": "dense"}
    method["train"] = config.to_dict()
    save_bundle(
        req.out,
        model,
        force=req.force,
        model_name=req.model_name,
        model_args=model_args,
        input_shape=input_shape,
        task=task.name,
        method=method,
        dataset=task.dataset_record(train_set, len(train_set)),
        metrics=metrics,
        extra=task.manifest_extra(train_set) or None,
    )
    checkpoint.remove_checkpoint(req.checkpoints)  # the bundle is the result now
    distributed.barrier()
    return metrics


def init_bundle(*, model_name: str, num_classes: int | None, checkpoint: Path | None, out: Path,
                force: bool = False, model_args: dict[str, Any] | None = None,
                input_shape: tuple[int, ...] | None = None, task: str | None = None) -> None:
    """Write a bundle from a model at its initial weights or from a user's dense state dict.

    The model is a registry name or a user's ``pkg.module:factory``, called with ``model_args``; the bundle
    records the name and the arguments, the task (``task`` where the model declares none) and one sample's
    shape (``input_shape`` where the model declares none).
    """
    import inspect

    from lrdeploy.bundle import check_output_dir, load_state_dict_checkpoint, save_bundle
    from lrdeploy.models import create_model, get_spec

    check_output_dir(out, force=force, inputs=(checkpoint,))
    spec = get_spec(model_name)
    chosen = model_task(spec, task)
    classifier = "num_classes" in inspect.signature(spec.builder).parameters
    if num_classes is not None and not classifier:  # e.g. the translation Transformer: vocabularies instead
        kind = ("a translation model (source and target vocabularies, no classes)"
                if spec.task == "translation" else "not a classifier")
        raise UserError(f"--num-classes does not apply: model '{spec.name}' is {kind}",
                        f"drop --num-classes; `lrdeploy init --model {spec.name}` builds it at its defaults")
    # a Hugging Face folder is recorded by its absolute path: the bundle then loads from any directory
    args: dict[str, Any] = dict(spec.default_args) if spec.source == "hf" else {}
    if classifier and (num_classes or spec.num_classes):
        args["num_classes"] = num_classes or spec.num_classes
    args.update(model_args or {})
    model = create_model(model_name, **args)
    shape = model_input_shape(spec, input_shape, model)
    _check_forward(model, spec.name, shape)
    source = "init"
    if checkpoint is not None:
        load_state_dict_checkpoint(checkpoint, model)
        source = str(checkpoint)
    save_bundle(
        out,
        model,
        force=force,
        model_name=model_name,
        model_args=args,
        input_shape=shape,
        task=chosen.name,
        method={"name": "dense", "source": source},
        dataset={},
        metrics={},
    )


def _check_forward(model: torch.nn.Module, name: str, shape: tuple[int, ...]) -> None:
    """One forward of a zero sample, so a wrong --input-shape is one line now, not a failed export later
    (models with their own ``example_inputs`` are checked by export)."""
    from lrdeploy.models.inputs import declares_inputs
    from lrdeploy.tasks.base import probe_forward

    if declares_inputs(model):
        return
    probe_forward(model, (torch.zeros((1, *shape)),),
                  f"model {name} cannot take one input of shape {','.join(map(str, shape))}",
                  "give the shape the model takes with --input-shape C,H,W")


DEFAULT_CALIB_SAMPLES = 256  # activation-aware SVD: a few hundred examples settle XᵀX


def compress_bundle(
    bundle_path: Path,
    *,
    rank_ratio: float | None,
    energy: float | None,
    finetune_epochs: int,
    dataset: str | None,
    data_dir: Path | None,
    limit_train: int | None,
    lr: float | None,
    seed: int,
    out: Path,
    progress: bool = True,
    force: bool = False,
    activation_aware: bool = False,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    device: str = "auto",
    amp: str = "off",
    limit_test: int | None = None,
) -> dict[str, Any]:
    """Post-training path: SVD-compress a bundle, evaluate, optionally fine-tune, write a low-rank bundle.

    ``lr`` defaults to 0.01 (SGD) for classifiers and :data:`TRANSLATION_FINETUNE_LR` (AdamW) for translation
    models, which are evaluated and fine-tuned on their own sentence pairs with the bundle's tokenizers.
    ``activation_aware`` whitens each layer's SVD by its inputs on ``calib_samples`` training examples of
    the bundle's dataset (the registered "svd" method, :mod:`lrdeploy.methods.svd`).
    """
    from lrdeploy.bundle import check_output_dir, load_bundle, save_bundle
    from lrdeploy.flops import count_params
    from lrdeploy.layers.svd import check_fraction
    from lrdeploy.methods import get_method
    from lrdeploy.tasks import manifest_task

    if (rank_ratio is None) == (energy is None):
        raise UserError(
            "give exactly one of --rank-ratio or --energy", "e.g. --rank-ratio 0.25 or --energy 0.9"
        )
    if rank_ratio is not None:
        check_fraction(rank_ratio, "rank ratio", "--rank-ratio")
    if energy is not None:
        check_fraction(energy, "energy", "--energy")
    if not (isinstance(calib_samples, int) and calib_samples >= 1):
        raise UserError(f"--calib-samples must be a positive integer, got {calib_samples!r}", "e.g. 256")
    method_obj = get_method("svd", stage="post-training", rank_ratio=rank_ratio, energy=energy,
                            activation_aware=activation_aware)
    check_output_dir(out, force=force, inputs=(bundle_path,))
    src = load_bundle(bundle_path)
    model = src.model
    dense_params = count_params(model)
    task = manifest_task(src.manifest)
    ds_name = dataset or src.manifest.get("dataset", {}).get("name")
    calibration, calib_record = None, None
    if activation_aware:
        calibration, calib_record = calibration_inputs(task, src.manifest, model, ds_name, data_dir=data_dir,
                                                       samples=calib_samples, source=bundle_path)
    report = method_obj.apply(model, calibration=calibration)
    if not report.compressed:
        low_rank = [layer.name for layer in report.layers if layer.skipped == "already low-rank"]
        method_name = (src.manifest.get("method") or {}).get("name")
        why = (f"its {len(low_rank)} eligible layers are already low-rank ({method_name})"
               if low_rank else "no layer is eligible or worth factorising at these settings")
        raise UserError(f"nothing to compress in {bundle_path}: {why}",
                        "compress a dense bundle, or export this one as it is (Maestro: --rank-budget)")

    model, metrics, train_record = evaluate_and_finetune(
        model, task, src.manifest, ds_name, data_dir=data_dir, epochs=finetune_epochs,
        limit_train=limit_train, lr=lr, seed=seed, progress=progress, source=bundle_path,
        limit_test=limit_test, device=device, amp=amp)
    extra = task.manifest_extra_from(src.manifest) or None

    method = {
        **method_obj.manifest_record(),  # name "svd", rank_ratio, energy, activation_aware, settings, log
        "finetune_epochs": finetune_epochs,
        "source_bundle": str(bundle_path),
        "source_weights_sha256": src.manifest.get("weights_sha256"),
    }
    if calib_record:
        method["calibration"] = calib_record
    if train_record:
        method["finetune"] = train_record
    ds_record = src.manifest.get("dataset", {}) if not dataset else {"name": dataset, "task": task.name}
    save_bundle(
        out,
        model,
        force=force,
        model_name=src.manifest["model"]["name"],
        model_args=src.manifest["model"]["args"],
        task=task.name,
        method=method,
        dataset=ds_record,
        metrics=metrics,
        input_shape=src.input_shape,
        extra=extra,
    )
    note = _kept_stem_note(model, dense_params)
    table = _compression_table(report, dense_params, count_params(model), note)
    return {
        "metrics": metrics,
        "report": report,
        "table": table,
    }


def calibration_inputs(task: Any, manifest: dict[str, Any], model: torch.nn.Module, ds_name: str | None, *,
                       data_dir: Path | None, samples: int, source: Path | str = "the bundle",
                       ) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """(the model's positional inputs for ``samples`` training examples, their manifest record).

    The task provides them (``task.feeds`` on the train split: images, sentence pairs, token ids …) in the
    order of the model's forward (``task.input_names``), so activation-aware SVD works for any task.
    """
    import numpy as np

    if not ds_name:
        raise UserError(f"{source} records no dataset, so there are no calibration inputs",
                        f"pass --data (e.g. --data {task.default_dataset or 'NAME'})")
    model_args = (manifest.get("model") or {}).get("args") or {}
    train_set = task.load(ds_name, "train", data_dir=data_dir, limit=samples, manifest=manifest,
                          model_args=model_args)
    n = min(samples, task.num_examples(train_set))
    if n < 1:
        raise UserError(f"the train split of {ds_name} is empty: no calibration inputs", "pass --data")
    feeds = task.feeds(train_set, n)
    names = task.input_names(model)
    missing = [name for name in names if name not in feeds]
    if missing:
        raise UserError(f"task {task.name} gives no calibration input named {', '.join(missing)}",
                        f"the model takes {', '.join(names)}; the task feeds {', '.join(feeds)}")
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in names)
    return tensors, {"samples": n, "dataset": ds_name, "split": "train", "inputs": list(names)}


def evaluate_and_finetune(model: torch.nn.Module, task: Any, manifest: dict[str, Any], ds_name: str | None, *,
                          data_dir: Path | None, epochs: int, limit_train: int | None, lr: float | None,
                          seed: int, progress: bool, source: Path | str = "the bundle",
                          limit_test: int | None = None, device: str | None = None, amp: str = "off",
                          hooks: Any = (),
                          ) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any] | None]:
    """Evaluate a compressed model on its task's test split and optionally fine-tune it with the one trainer.

    Returns (model, metrics: ``test_<metric>`` after and ``test_<metric>_before_finetune``, the fine-tune's
    training settings or None). The fine-tune takes the task's ``finetune_defaults`` (a lower learning rate
    than training from scratch); ``lr`` overrides it.
    """
    from lrdeploy.devices import resolve_amp, resolve_device
    from lrdeploy.train import TrainConfig, train

    if epochs > 0:  # a GPU asked for where there is none: one line before the data loads
        from lrdeploy import distributed

        if distributed.launched():
            raise UserError("compress --finetune-epochs runs in one process, not under torchrun",
                            "run `lrdeploy compress` without torchrun (--device cuda for a GPU)")
        resolve_amp(amp, resolve_device(device) if device is not None else torch.device("cpu"))
    if not ds_name:
        if epochs > 0:
            raise UserError(f"{source} records no dataset, so there is nothing to fine-tune on",
                            f"pass --data (e.g. --data {task.default_dataset or 'NAME'})")
        return model, {}, None
    model_args = (manifest.get("model") or {}).get("args") or {}
    test_set = task.load(ds_name, "test", data_dir=data_dir, limit=limit_test, manifest=manifest,
                         model_args=model_args)
    before = task.evaluate_model(model.eval(), test_set)
    metrics: dict[str, Any] = {f"test_{k}_before_finetune": v for k, v in before.items()}
    metrics.update({f"test_{k}": v for k, v in before.items()})
    if epochs == 0:
        return model, metrics, None
    config = TrainConfig.for_task(task, **{**task.finetune_defaults, "epochs": epochs, "seed": seed,
                                           "limit_train": limit_train, "progress": progress,
                                           "device": device, "amp": amp,
                                           **({"lr": lr} if lr is not None else {})})
    train_set = task.load(ds_name, "train", data_dir=data_dir, limit=limit_train, manifest=manifest,
                          model_args=model_args)
    result = train(model, train_set, test_set, config, task=task, hooks=list(hooks))
    metrics.update({f"test_{k}": v for k, v in result.metrics.items()})
    metrics["finetune_seconds"] = result.seconds
    metrics["finetune_device"] = result.device
    return result.model.cpu(), metrics, config.to_dict()


def _kept_stem_note(model: torch.nn.Module, dense_params: int) -> str | None:
    """What the model spec's stem keeps dense beyond the Linear/Conv2d rows of the table (an encoder's
    embedding tables: most of a small encoder's parameters), so the report says where they went."""
    from lrdeploy.methods.selection import layer_modules, matches
    from lrdeploy.models.registry import spec_of

    spec = spec_of(model)
    stem = tuple(getattr(spec, "stem", ()) or ())
    listed = {name for name, _ in layer_modules(model)}
    kept = [(n, m) for n, m in model.named_modules() if n and matches(n, stem) and n not in listed]
    top = [(n, m) for n, m in kept if not any(n.startswith(o + ".") for o, _ in kept)]  # outermost only
    params = sum(p.numel() for _, m in top for p in m.parameters())
    if not top or not params:
        return None
    names = ", ".join(n for n, _ in top)
    return (f"kept dense as the model's stem: {names} ({params:,} parameters, {params / dense_params:.0%} of "
            "the dense model)")


def _compression_table(report: Any, dense_params: int, params: int,
                       note: str | None = None) -> RenderableType:
    """Per layer: kind, rank, parameters before → after (activation-aware: output error of plain SVD → the
    aware factors, and the reduction), why a layer was kept; split by columns on a narrow console."""
    aware = getattr(report, "activation_aware", None)
    how = f", activation-aware ({aware}, {report.calibration_samples} calibration samples)" if aware else ""
    counts = f"{dense_params:,} → {params:,} parameters ({dense_params / params:.2f}×)"
    table = Table(title=f"SVD compression{how}: {counts}", caption=note)
    columns = ["layer", "kind", "rank / full", "params before → after"]
    if aware:  # relative output error on the calibration inputs, and how much lower than plain SVD's
        columns += ["output error: svd → aware", "reduction"]
    for col in (*columns, "note"):  # names and notes fold; the figures never wrap
        text = col in ("layer", "note")
        table.add_column(col, overflow="fold" if text else "ellipsis", no_wrap=not text)
    for layer in report.layers:
        row = [
            layer.name,
            layer.kind,
            f"{layer.rank}/{layer.full_rank}" if layer.rank else f"—/{layer.full_rank}",
            f"{layer.params_before:,} → {layer.params_after:,}",
        ]
        if aware:
            ratio = layer.error_reduction
            row += [f"{layer.output_error_svd:.2%} → {layer.output_error:.2%}" if ratio is not None else "",
                    f"{ratio:.2f}×" if ratio is not None else ""]
        table.add_row(*row, layer.skipped or layer.note or "")
    return fit(table, keys=1)


def _example_input(model: torch.nn.Module, input_shape: tuple[int, ...]) -> Any:
    """One example batch for tracing layer input sizes (the model's own for multi-input models)."""
    from lrdeploy.models.inputs import declares_inputs, example_inputs, nominal_sizes

    if declares_inputs(model):  # each length axis at the nominal size, passed by name (models differ)
        return example_inputs(model, 1, nominal_sizes(model, input_shape), torch.Generator().manual_seed(0))
    return torch.randn((1, *input_shape))


def export_bundle(
    bundle_path: Path,
    out: Path,
    *,
    opset: int = 20,
    optimize: bool = True,
    rank_budget: float | None = None,
    data_dir: Path | None = None,
    calibration_examples: int = 2048,
    fold: str = "factored",
    fold_batch: int = 1,
    threads: int | None = None,
) -> tuple[Any, Any]:
    """Export a bundle to ONNX; returns (ExportResult, FoldReport).

    ``fold``: "factored" keeps every factor pair, "dense" re-multiplies them, "auto" decides per layer by
    timing both forms in ONNX Runtime at ``fold_batch`` (cached); the report goes to ``<stem>.fold.json``.
    With ``rank_budget``, a Maestro model is first cut to that share of its factors; a truncated model
    normalises different activations, so BatchNorm statistics are recomputed on the first
    ``calibration_examples`` training examples of the bundle's dataset (when the model has BatchNorm).
    """
    import json

    from lrdeploy import atomic
    from lrdeploy.bundle import Bundle, load_bundle
    from lrdeploy.exporters.fold import fold_batchnorm, fold_with_report
    from lrdeploy.exporters.onnx import export_onnx
    from lrdeploy.flops import count_flops, count_params
    from lrdeploy.layers.structure import describe

    if Path(out).suffix != ".onnx":
        raise UserError(f"--out {out} must end in .onnx", "e.g. --out model.onnx")
    if fold not in ("factored", "dense", "auto"):
        raise UserError(f"--fold {fold!r} is not known", "use auto, factored or dense")
    bundle = load_bundle(bundle_path)
    model, manifest = bundle.model, dict(bundle.manifest)
    if rank_budget is not None:
        from lrdeploy.exporters.budget import truncate_to_budget

        calibration = None
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        ds_name = (manifest.get("dataset") or {}).get("name")
        if has_bn and ds_name:
            from lrdeploy.tasks import manifest_task

            calibration = manifest_task(manifest).load(ds_name, "train", data_dir=data_dir,
                                                       limit=calibration_examples, manifest=manifest).x
        model = truncate_to_budget(model, rank_budget, calibration_x=calibration).eval()
        manifest["structure"] = describe(model)
        manifest["params"] = count_params(model)
        manifest["flops"] = count_flops(model, bundle.input_shape)
        manifest["method"] = {
            **manifest.get("method", {}),
            "export_rank_budget": rank_budget,
            "bn_recalibrated_on": calibration_examples if calibration is not None else None,
        }
        manifest["metrics"] = {"note": "metrics of the untruncated model are in the source bundle"}
    folded, report = fold_with_report(
        model,
        fold,
        example_input=_example_input(model, bundle.input_shape),
        batch_size=fold_batch,
        threads=threads,
    )
    folded, bn_note = fold_batchnorm(folded)
    manifest["fold"] = {**report.to_dict().get("summary", {"mode": fold}), "batchnorm": bn_note}
    result = export_onnx(Bundle(bundle.path, manifest, folded), out, opset=opset, optimize=optimize)
    if report.layers:
        measure_in_model(report, model, Path(out), fold_batch, threads)
    atomic.write_text(
        Path(out).with_suffix(".fold.json"),
        json.dumps({**report.to_dict(), "run": run_record.current()}, indent=2, default=str)
    )
    assets = getattr(model, "export_assets", None)  # an encoder's tokenizer: the artefact is usable alone
    for suffix, data in (assets() if callable(assets) else {}).items():
        atomic.write_bytes(Path(out).with_suffix(suffix), data)
    return result, report


def measure_in_model(report: Any, model: torch.nn.Module, onnx_path: Path, batch_size: int,
                     threads: int | None, runs: int = 20) -> None:
    """Profile the exported graph at ``batch_size`` and fill the fold report's per-layer ``measured_ms``.

    The same ONNX Runtime settings as serving (all graph optimisations, ``threads`` intra-op threads); kernel
    times are attributed to layers by :mod:`lrdeploy.exporters.layer_times`.
    """
    import onnx

    from lrdeploy.exporters.layer_times import attribute_kernel_time
    from lrdeploy.models.inputs import declares_inputs, example_inputs, input_names
    from lrdeploy.serving.profile import profile_onnx
    from lrdeploy.serving.runtimes.base import resolve_threads

    n_threads = resolve_threads(threads)
    feeds = None
    if declares_inputs(model):
        gen = torch.Generator().manual_seed(0)
        tensors = example_inputs(model, batch_size, None, gen)
        feeds = {n: t.numpy() for n, t in zip(input_names(model), tensors, strict=True)}
    shape = read_export_shape(onnx_path)
    prof = profile_onnx(onnx_path, shape, batch_size, threads=n_threads, runs=runs, warmup_runs=3,
                        feeds=feeds)
    times = attribute_kernel_time(onnx.load(str(onnx_path), load_external_data=False), prof["by_node"],
                                  [lf.name for lf in report.layers], runs=int(prof["runs"] or runs))
    run = prof.get("run_us") or {}
    report.attach_measured(times, {
        "how": "ONNX Runtime profiler, kernel time per call, mean over timed runs",
        "batch_size": batch_size, "threads": n_threads, "runs": prof["runs"],
        "run_ms_median": run["median"] / 1000.0 if run else None,
    })


def read_export_shape(onnx_path: Path) -> tuple[int, ...]:
    """One sample's input shape as recorded at export (empty for multi-input graphs, which pass feeds)."""
    from lrdeploy.exporters.onnx import read_export_info

    shape = read_export_info(onnx_path).get("input_shape")
    return tuple(int(d) for d in shape) if shape else ()


def export_precision_variant(
    bundle_path: Path,
    onnx_path: Path,
    precision: str,
    *,
    data_dir: Path | None = None,
    calibration_examples: int = 256,
    test_examples: int = 1000,
    dataset: str | None = None,
) -> Any:
    """Write ``<stem>.<precision>.onnx`` from the exported fp32 graph and judge it against fp32.

    int8 calibrates on the first training examples of the bundle's dataset (static QDQ for conv nets,
    dynamic for Linear-heavy ones) and is judged, like fp16, on held-out test examples: the precision's
    tolerance preset plus the accuracy delta.
    """
    from lrdeploy.bundle import read_manifest
    from lrdeploy.exporters.precision import convert_precision
    from lrdeploy.tasks import manifest_task

    manifest = read_manifest(bundle_path)
    ds_name = dataset or (manifest.get("dataset") or {}).get("name")
    calibration = test_x = labels = None
    named = manifest_task(manifest)  # reads built-in datasets and a user's own (data/user_data.py) alike
    if ds_name:
        model_args = (manifest.get("model") or {}).get("args") or {}
        test = named.load(ds_name, "test", data_dir=data_dir, limit=test_examples, manifest=manifest,
                          model_args=model_args)
        n = named.num_examples(test)
        test_x, labels = named.feeds(test, n), named.labels(test, n)  # the graph's named inputs
        if precision == "int8" and len(test_x) == 1:
            # one input (images): static QDQ for conv nets calibrates on real training inputs; models with
            # several (token ids + mask) are Linear-heavy and get dynamic int8, which needs no calibration
            train = named.load(ds_name, "train", data_dir=data_dir, limit=calibration_examples,
                               manifest=manifest, model_args=model_args)
            calibration = next(iter(named.feeds(train, named.num_examples(train)).values()))
    elif precision == "int8":
        raise UserError(
            f"bundle {bundle_path} records no dataset to calibrate int8 on",
            "name one with --calib-data (e.g. --calib-data mnist), or use --precision fp16",
        )
    return convert_precision(
        onnx_path,
        Path(onnx_path).with_suffix(f".{precision}.onnx"),
        precision,
        calibration=calibration,
        test_inputs=test_x,
        labels=labels,
        tolerance=named.precision_tolerance(precision),  # the task's own limits (None: the preset)
    )
