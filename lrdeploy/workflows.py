"""The engine-side jobs behind the CLI: train a dense bundle, make one from a checkpoint, compress one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from lrdeploy.errors import UserError


def _dataset_record(ds: Any, train_examples: int | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"name": ds.name, "preprocess": ds.preprocess}
    if train_examples is not None:
        record["train_examples"] = train_examples
    return record



# Optimiser settings left unset (None) in a TrainRequest take the task's defaults: SGD recipes for the image
# classifiers, AdamW with warm-up for translation (plain SGD trains a Transformer poorly).
CLASSIFICATION_DEFAULTS: dict[str, Any] = {"lr": 0.05, "weight_decay": 5e-4, "schedule": "cosine"}
TRANSLATION_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.01, "schedule": "inverse_sqrt"}
TRANSLATION_MAX_LEN = 64  # data max_len (with <bos>/<eos>); no Multi30k sentence is cut at 64


@dataclass
class TrainRequest:
    """Everything `lrdeploy train` needs; defaults are the CLI's (``None``: the task's default, see above)."""

    model_name: str = "lenet5"
    dataset: str = "mnist"
    data_dir: Path | None = None
    method: str = "dense"
    method_settings: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = 2
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


def _setting(req: TrainRequest, name: str, defaults: dict[str, Any]) -> Any:
    value = getattr(req, name)
    return defaults[name] if value is None else value


def is_translation_dataset(name: str) -> bool:
    from lrdeploy.data.multi30k import TRANSLATION_DATASETS

    return name.strip().lower().replace("_", "-") in TRANSLATION_DATASETS


def _check_task(spec: Any, dataset: str, translation: bool) -> None:
    if spec.multi_input and not translation:
        raise UserError(
            f"model {spec.name} is a translation model and {dataset} is not a translation dataset",
            "use --data multi30k",
        )
    if translation and not spec.multi_input:
        raise UserError(
            f"{dataset} is a translation dataset and model {spec.name} is not a translation model",
            "use --model transformer",
        )


def train_bundle(req: TrainRequest) -> dict[str, Any]:
    """Train a registry model with a method (dense, cuttlefish, maestro …) and write its bundle.

    The method is a trainer hook from :mod:`lrdeploy.methods`; what it learnt (ranks, switch epoch,
    stable-rank history …) goes into the manifest under ``method``, with the training settings beside it.
    A translation model on a translation dataset (``--model transformer --data multi30k``) goes through
    :func:`train_translation_bundle`.
    """
    from lrdeploy.bundle import check_output_dir, save_bundle
    from lrdeploy.data import load_dataset
    from lrdeploy.layers.maestro import compact
    from lrdeploy.methods import get_method
    from lrdeploy.models import create_model, get_spec
    from lrdeploy.train import TrainConfig, train

    check_output_dir(req.out, force=req.force)
    spec = get_spec(req.model_name)
    translation = is_translation_dataset(req.dataset)
    _check_task(spec, req.dataset, translation)
    if translation:
        return train_translation_bundle(req)
    hook = None if req.method == "dense" else get_method(req.method, **req.method_settings)
    if hook is None and req.method_settings:
        raise UserError("--method-opt was given but --method is dense", "drop it or choose a method")
    config = TrainConfig(
        epochs=req.epochs,
        batch_size=req.batch_size,
        lr=_setting(req, "lr", CLASSIFICATION_DEFAULTS),
        weight_decay=_setting(req, "weight_decay", CLASSIFICATION_DEFAULTS),
        schedule=_setting(req, "schedule", CLASSIFICATION_DEFAULTS),
        seed=req.seed,
        limit_train=req.limit_train,
        progress=req.progress,
        augment=req.augment,
    )
    train_set = load_dataset(req.dataset, "train", data_dir=req.data_dir, limit=req.limit_train)
    test_set = load_dataset(req.dataset, "test", data_dir=req.data_dir, limit=req.limit_test)
    model_args = model_args_for(spec, train_set, req.model_args)
    torch.manual_seed(req.seed)  # the initial weights are part of the run: seed them too
    model = create_model(req.model_name, **model_args)
    check_model_accepts(model, train_set, req.model_name, req.dataset)
    if hook is not None and hasattr(hook, "prepare"):
        model = hook.prepare(model)
    result = train(model, train_set, test_set, config, hooks=[hook] if hook is not None else [])
    model = compact(result.model)  # Maestro keeps dead components in storage while training; drop them
    metrics = {
        "test_accuracy": result.test_accuracy,
        "train_loss": result.train_loss,
        "train_seconds": result.seconds,
        "train_samples_per_s": result.samples_per_s,
        "history": result.history,
    }
    method = hook.manifest_record() if hook is not None else {"name": "dense"}
    method["train"] = config.to_dict()
    save_bundle(
        req.out,
        model,
        force=req.force,
        model_name=req.model_name,
        model_args=model_args,
        input_shape=tuple(train_set.x.shape[1:]),
        method=method,
        dataset=_dataset_record(train_set, len(train_set)),
        metrics=metrics,
    )
    return metrics


def train_translation_bundle(req: TrainRequest) -> dict[str, Any]:
    """Train a translation model (:func:`lrdeploy.seq2seq.train_translation`) and write its bundle.

    Tokenizers come from the whole training split (limited and full runs share ids) and are stored in the
    manifest (``tokenizers``) so the bundle can be evaluated and compared later without rebuilding them.
    Metrics: teacher-forced loss, perplexity and token accuracy and greedy BLEU on the test split (its first
    ``limit_test`` pairs), after the last epoch.
    """
    from lrdeploy.bundle import check_output_dir, save_bundle
    from lrdeploy.data.multi30k import build_tokenizers, load_translation
    from lrdeploy.layers.maestro import compact
    from lrdeploy.methods import get_method
    from lrdeploy.models import create_model, get_spec
    from lrdeploy.seq2seq import TranslationConfig, train_translation

    check_output_dir(req.out, force=req.force)
    spec = get_spec(req.model_name)
    if req.augment is not None:
        raise UserError("data augmentation does not apply to translation", hint="drop --augment")
    hook = None if req.method == "dense" else get_method(req.method, **req.method_settings)
    if hook is None and req.method_settings:
        raise UserError("--method-opt was given but --method is dense", "drop it or choose a method")
    config = TranslationConfig(
        epochs=req.epochs,
        batch_size=req.batch_size,
        lr=_setting(req, "lr", TRANSLATION_DEFAULTS),
        weight_decay=_setting(req, "weight_decay", TRANSLATION_DEFAULTS),
        schedule=_setting(req, "schedule", TRANSLATION_DEFAULTS),
        seed=req.seed,
        limit_train=req.limit_train,
        progress=req.progress,
    )
    model_max = req.model_args.get("max_len", spec.default_args.get("max_len", TRANSLATION_MAX_LEN))
    max_len = min(TRANSLATION_MAX_LEN, int(model_max)) if isinstance(model_max, int) else TRANSLATION_MAX_LEN
    tokenizers = build_tokenizers(req.dataset, req.data_dir)
    train_set = load_translation(
        req.dataset, "train", req.data_dir, limit=req.limit_train, tokenizers=tokenizers, max_len=max_len
    )
    test_set = load_translation(
        req.dataset, "test", req.data_dir, limit=req.limit_test, tokenizers=tokenizers, max_len=max_len
    )
    model_args = {"src_vocab": len(tokenizers[0]), "tgt_vocab": len(tokenizers[1]), **req.model_args}
    torch.manual_seed(req.seed)  # the initial weights are part of the run: seed them too
    model = create_model(req.model_name, **model_args)
    _check_translation_model(model, train_set, req.model_name, req.dataset)
    if hook is not None and hasattr(hook, "prepare"):
        model = hook.prepare(model)
    result = train_translation(model, train_set, test_set, config, hooks=[hook] if hook is not None else [])
    model = compact(result.model)  # Maestro keeps dead components in storage while training; drop them
    metrics: dict[str, Any] = {f"test_{k}": v for k, v in result.metrics.items()}
    metrics.update(
        {
            "test_samples": len(test_set),
            "train_loss": result.train_loss,
            "train_seconds": result.seconds,
            "train_tokens_per_s": result.tokens_per_s,
            "history": result.history,
        }
    )
    method = hook.manifest_record() if hook is not None else {"name": "dense"}
    method["train"] = config.to_dict()
    dataset = _dataset_record(train_set, len(train_set))
    dataset["task"] = "translation"
    save_bundle(
        req.out,
        model,
        force=req.force,
        model_name=req.model_name,
        model_args=model_args,
        input_shape=tuple(spec.input_shape),  # nominal (source length), for the FLOP count
        method=method,
        dataset=dataset,
        metrics=metrics,
        extra={"tokenizers": train_set.tokenizers_dict()},
    )
    return metrics


def _check_translation_model(
    model: torch.nn.Module, dataset: Any, model_name: str, dataset_name: str
) -> None:
    """One forward on one sentence pair, so a model/data mismatch is a clear error, not a deep traceback."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(dataset.src[:1], dataset.tgt_in[:1])
    except (RuntimeError, IndexError) as exc:
        raise UserError(
            f"model {model_name} cannot take {dataset_name} sentence pairs ({exc})",
            "check the --model-arg values (vocabulary sizes come from the data)",
        ) from None
    finally:
        model.train(was_training)


def model_args_for(spec: Any, dataset: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Constructor arguments that follow from the data (classes, input channels) plus the user's own."""
    args: dict[str, Any] = {"num_classes": len(dataset.classes)}
    if "in_channels" in spec.default_args:
        args["in_channels"] = int(dataset.x.shape[1])
    args.update(extra or {})
    return args


def check_model_accepts(model: torch.nn.Module, dataset: Any, model_name: str, dataset_name: str) -> None:
    """One forward pass on one sample, so a model/dataset mismatch is a clear error, not a deep traceback."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(dataset.x[:1])
    except RuntimeError:
        raise UserError(
            f"model {model_name} cannot take {dataset_name} inputs of shape {tuple(dataset.x.shape[1:])}",
            "pick a model and dataset that match (see `lrdeploy models`)",
        ) from None
    finally:
        model.train(was_training)


def init_bundle(*, model_name: str, num_classes: int | None, checkpoint: Path | None, out: Path,
                force: bool = False) -> None:
    """Write a bundle from a registry model at its initial weights or from a user's dense state dict."""
    import inspect

    from lrdeploy.bundle import check_output_dir, load_state_dict_checkpoint, save_bundle
    from lrdeploy.models import create_model, get_spec

    check_output_dir(out, force=force, inputs=(checkpoint,))
    spec = get_spec(model_name)
    classifier = "num_classes" in inspect.signature(spec.builder).parameters
    if num_classes is not None and not classifier:  # e.g. the translation Transformer: vocabularies instead
        task = ("a translation model (source and target vocabularies, no classes)" if spec.multi_input
                else "not a classifier")
        raise UserError(f"--num-classes does not apply: model '{spec.name}' is {task}",
                        f"drop --num-classes; `lrdeploy init --model {spec.name}` builds it at its defaults")
    args = {"num_classes": num_classes or spec.num_classes} if classifier else {}
    model = create_model(model_name, **args)
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
        method={"name": "dense", "source": source},
        dataset={},
        metrics={},
    )


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
) -> dict[str, Any]:
    """Post-training path: SVD-compress a bundle, evaluate, optionally fine-tune, write a low-rank bundle.

    ``lr`` defaults to 0.01 (SGD) for classifiers and :data:`TRANSLATION_FINETUNE_LR` (AdamW) for translation
    models, which are evaluated and fine-tuned on their own sentence pairs with the bundle's tokenizers.
    """
    from lrdeploy.bundle import check_output_dir, load_bundle, save_bundle
    from lrdeploy.compress import compress
    from lrdeploy.data import load_dataset
    from lrdeploy.flops import count_params
    from lrdeploy.layers.svd import check_fraction
    from lrdeploy.train import TrainConfig, evaluate, train

    if (rank_ratio is None) == (energy is None):
        raise UserError(
            "give exactly one of --rank-ratio or --energy", "e.g. --rank-ratio 0.25 or --energy 0.9"
        )
    if rank_ratio is not None:
        check_fraction(rank_ratio, "rank ratio", "--rank-ratio")
    if energy is not None:
        check_fraction(energy, "energy", "--energy")
    check_output_dir(out, force=force, inputs=(bundle_path,))
    src = load_bundle(bundle_path)
    model = src.model
    dense_params = count_params(model)
    report = compress(model, rank_ratio=rank_ratio, energy=energy)
    if not report.compressed:
        low_rank = [layer.name for layer in report.layers if layer.skipped == "already low-rank"]
        method_name = (src.manifest.get("method") or {}).get("name")
        why = (f"its {len(low_rank)} eligible layers are already low-rank ({method_name})"
               if low_rank else "no layer is eligible or worth factorising at these settings")
        raise UserError(f"nothing to compress in {bundle_path}: {why}",
                        "compress a dense bundle, or export this one as it is (Maestro: --rank-budget)")

    ds_name = dataset or src.manifest.get("dataset", {}).get("name")
    metrics: dict[str, Any] = {}
    train_record: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None
    from lrdeploy.translation_compare import is_translation_manifest

    if is_translation_manifest(src.manifest):
        model, metrics, train_record = _finetune_translation(
            model, src.manifest, ds_name, data_dir, finetune_epochs, limit_train, lr, seed, progress
        )
        extra = {"tokenizers": src.manifest.get("tokenizers")}
    elif ds_name:
        test_set = load_dataset(ds_name, "test", data_dir=data_dir)
        metrics["test_accuracy_before_finetune"] = evaluate(model, test_set)
        metrics["test_accuracy"] = metrics["test_accuracy_before_finetune"]
        if finetune_epochs > 0:
            train_set = load_dataset(ds_name, "train", data_dir=data_dir, limit=limit_train)
            config = TrainConfig(
                epochs=finetune_epochs,
                lr=0.01 if lr is None else lr,
                seed=seed,
                limit_train=limit_train,
                progress=progress,
            )
            result = train(model, train_set, test_set, config)
            model = result.model
            metrics["test_accuracy"] = result.test_accuracy
            metrics["finetune_seconds"] = result.seconds
            train_record = config.to_dict()
    elif finetune_epochs > 0:
        raise UserError(
            f"bundle {bundle_path} records no dataset, so there is nothing to fine-tune on",
            "pass --data mnist (or fashion-mnist)",
        )

    method = {
        "name": "svd",
        "rank_ratio": rank_ratio,
        "energy": energy,
        "finetune_epochs": finetune_epochs,
        "source_bundle": str(bundle_path),
        "source_weights_sha256": src.manifest.get("weights_sha256"),
    }
    if train_record:
        method["finetune"] = train_record
    ds_record = src.manifest.get("dataset", {}) if not dataset else {"name": dataset}
    save_bundle(
        out,
        model,
        force=force,
        model_name=src.manifest["model"]["name"],
        model_args=src.manifest["model"]["args"],
        method=method,
        dataset=ds_record,
        metrics=metrics,
        input_shape=src.input_shape,
        extra=extra,
    )
    return {
        "metrics": metrics,
        "report": report,
        "table": _compression_table(report, dense_params, count_params(model)),
    }


TRANSLATION_FINETUNE_LR = 3e-4  # peak AdamW rate for recovering a compressed, already trained Transformer


def _finetune_translation(model: torch.nn.Module, manifest: dict[str, Any], ds_name: str | None,
                          data_dir: Path | None, epochs: int, limit_train: int | None, lr: float | None,
                          seed: int, progress: bool) -> tuple[torch.nn.Module, dict[str, Any], dict | None]:
    """Evaluate a compressed translation model (perplexity, token accuracy, BLEU); optionally fine-tune it."""
    from lrdeploy.data.multi30k import load_translation, tokenizers_from_dict
    from lrdeploy.seq2seq import TranslationConfig, evaluate_translation, train_translation

    if not ds_name or not manifest.get("tokenizers"):
        if epochs > 0:
            raise UserError("this translation bundle records no dataset or tokenizers to fine-tune with",
                            "re-train it with `lrdeploy train --model transformer --data multi30k`")
        return model, {}, None
    tokenizers = tokenizers_from_dict(manifest["tokenizers"])
    max_len = min(TRANSLATION_MAX_LEN, int(getattr(model, "max_len", TRANSLATION_MAX_LEN)))
    test_set = load_translation(ds_name, "test", data_dir, tokenizers=tokenizers, max_len=max_len)
    before = evaluate_translation(model.eval(), test_set)
    metrics: dict[str, Any] = {f"test_{k}_before_finetune": v for k, v in before.items()}
    metrics.update({f"test_{k}": v for k, v in before.items()})
    if epochs == 0:
        return model, metrics, None
    config = TranslationConfig(epochs=epochs, lr=TRANSLATION_FINETUNE_LR if lr is None else lr, seed=seed,
                               warmup_steps=100, limit_train=limit_train, progress=progress)
    train_set = load_translation(ds_name, "train", data_dir, limit=limit_train, tokenizers=tokenizers,
                                 max_len=max_len)
    result = train_translation(model, train_set, test_set, config)
    metrics.update({f"test_{k}": v for k, v in result.metrics.items()})
    metrics["finetune_seconds"] = result.seconds
    return result.model, metrics, config.to_dict()


def _compression_table(report: Any, dense_params: int, params: int) -> Table:
    table = Table(
        title=f"SVD compression: {dense_params:,} → {params:,} parameters ({dense_params / params:.2f}×)"
    )
    for col in ("layer", "kind", "rank / full", "params before → after", "note"):
        table.add_column(col)
    for layer in report.layers:
        table.add_row(
            layer.name,
            layer.kind,
            f"{layer.rank}/{layer.full_rank}" if layer.rank else f"—/{layer.full_rank}",
            f"{layer.params_before:,} → {layer.params_after:,}",
            layer.skipped or "",
        )
    return table


def _example_input(model: torch.nn.Module, input_shape: tuple[int, ...]) -> Any:
    """One example batch for tracing layer input sizes (the model's own for multi-input models)."""
    make = getattr(model, "example_inputs", None)
    if callable(make):
        return tuple(make(1, *input_shape, *input_shape))
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
            from lrdeploy.data import load_dataset

            calibration = load_dataset(ds_name, "train", data_dir=data_dir, limit=calibration_examples).x
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
        Path(out).with_suffix(".fold.json"), json.dumps(report.to_dict(), indent=2, default=str)
    )
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


def _translation_test_feeds(manifest: dict[str, Any], data_dir: Path | None, limit: int
                            ) -> tuple[dict[str, Any] | None, Any]:
    """Test sentence pairs as the graph's inputs, and target tokens as labels (padding marked -1)."""
    from lrdeploy.data.multi30k import load_translation, tokenizers_from_dict
    from lrdeploy.data.tokenizer import PAD_ID
    from lrdeploy.models import get_spec

    ds_name = (manifest.get("dataset") or {}).get("name")
    if not ds_name or not manifest.get("tokenizers"):
        return None, None  # judged on random token ids, without an accuracy delta
    test = load_translation(ds_name, "test", data_dir, limit=limit,
                            tokenizers=tokenizers_from_dict(manifest["tokenizers"]))
    labels = test.tgt_out.numpy().copy()
    labels[labels == PAD_ID] = -1
    names = [i.name for i in get_spec(manifest["model"]["name"]).inputs] or ["src", "tgt_in"]
    return dict(zip(names, (test.src.numpy(), test.tgt_in.numpy()), strict=True)), labels


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
    from lrdeploy.translation_compare import is_translation_manifest

    manifest = read_manifest(bundle_path)
    ds_name = dataset or (manifest.get("dataset") or {}).get("name")
    calibration = test_x = labels = None
    if is_translation_manifest(manifest):  # Linear-heavy: dynamic int8 needs no calibration
        test_x, labels = _translation_test_feeds(manifest, data_dir, test_examples)
    elif ds_name:
        from lrdeploy.data import load_dataset

        if precision == "int8":
            calibration = load_dataset(
                ds_name, "train", data_dir=data_dir, limit=calibration_examples
            ).x.numpy()
        test = load_dataset(ds_name, "test", data_dir=data_dir, limit=test_examples)
        test_x, labels = test.x.numpy(), test.y.numpy()
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
    )
