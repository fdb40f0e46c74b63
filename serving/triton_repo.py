"""``lrdeploy triton``: a Triton Inference Server model repository for the models ``lrdeploy serve`` serves.

Layout (Triton's)::

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.onnx        platform onnxruntime_onnx    (or 1/model.plan, platform tensorrt_plan)
    REPO/<name>/tokenizer.json      text models: the tokenizer export wrote beside the graph
    REPO/lrdeploy-triton.json       what lrdeploy wrote (so --force replaces only a repository of ours)

``config.pbtxt`` holds the inputs and outputs with their dims (-1 for a dynamic axis; the batch axis is
implied by ``max_batch_size`` when every tensor's first axis is dynamic, else ``max_batch_size: 0`` and full
dims), ``dynamic_batching`` with preferred sizes and the queue delay, an ``instance_group``, and for ONNX the
ORT settings lrdeploy measures with (intra-op threads per instance, one inter-op thread, sequential
execution; graph optimisation left at the backend's default, all). Every file is parsed back into Triton's own
``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``) before anything is installed.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy.errors import UserError

from .runtimes.base import IOInfo

MARKER = "lrdeploy-triton.json"
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "object": "TYPE_STRING",
}
PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx"), ".plan": ("tensorrt_plan", "model.plan")}
INSTALL_HINT = "pip install 'lrdeploy[serve]' (tritonclient[grpc] ships Triton's ModelConfig protobuf)"


@dataclass
class RepoSettings:
    """What every model's config says about batching and instances."""

    max_batch: int = 32
    max_delay_us: int = 2000
    preferred: tuple[int, ...] = ()  # empty: powers of two up to max_batch, from 4
    instances: int = 1
    kind: str = "KIND_CPU"  # KIND_GPU for a TensorRT engine
    threads: int = 1  # ORT intra-op threads per instance
    batching: bool = True


@dataclass
class RepoModel:
    """One model to write: its artefact, the graph's inputs/outputs and whatever ships beside it."""

    name: str
    source: Path  # .onnx or .plan
    inputs: list[IOInfo]
    outputs: list[IOInfo]
    tokenizer: Path | None = None
    max_batch_limit: int | None = None  # a TensorRT profile's largest batch
    notes: list[str] = field(default_factory=list)

    @property
    def platform(self) -> str:
        return PLATFORMS[self.source.suffix.lower()][0]

    @property
    def batchable(self) -> bool:
        return all(t.shape and not _fixed(t.shape[0]) for t in (*self.inputs, *self.outputs))


def _fixed(dim: Any) -> bool:
    return isinstance(dim, int) and dim >= 0


def _dims(shape: Sequence[Any] | None, batchable: bool) -> list[int]:
    dims = [int(d) if _fixed(d) else -1 for d in (shape or [])]
    return dims[1:] if batchable else dims


def _preferred(settings: RepoSettings, max_batch: int) -> list[int]:
    if settings.preferred:
        return sorted({p for p in settings.preferred if p <= max_batch})
    sizes, p = [], 4
    while p < max_batch:
        sizes.append(p)
        p *= 2
    return [*sizes, max_batch] if max_batch > 1 else []


def config_text(model: RepoModel, settings: RepoSettings) -> str:
    """The model's ``config.pbtxt`` (protobuf text format)."""
    max_batch = min(settings.max_batch, model.max_batch_limit or settings.max_batch) if model.batchable else 0
    lines = [f'name: "{model.name}"', f'platform: "{model.platform}"', f"max_batch_size: {max_batch}"]

    def tensors(key: str, infos: list[IOInfo]) -> None:
        lines.append(f"{key} [")
        for k, t in enumerate(infos):
            dtype = TRITON_TYPES.get(np.dtype(t.dtype).name)
            if dtype is None:
                raise UserError(f"{model.source}: {key} {t.name!r} has dtype {np.dtype(t.dtype).name}, which "
                                "Triton has no type for")
            dims = _dims(t.shape, model.batchable)
            comma = "," if k < len(infos) - 1 else ""
            reshape = ""
            if not dims and model.batchable:  # [batch] alone: Triton wants dims [1], reshaped away
                dims, reshape = [1], " reshape: { shape: [] }"
            lines.append(f'  {{ name: "{t.name}" data_type: {dtype} dims: {dims}{reshape} }}{comma}')
        lines.append("]")

    tensors("input", model.inputs)
    tensors("output", model.outputs)
    if max_batch > 1 and settings.batching:
        preferred = _preferred(settings, max_batch)
        lines.append("dynamic_batching {")
        if preferred:
            lines.append(f"  preferred_batch_size: {preferred}")
        lines.append(f"  max_queue_delay_microseconds: {settings.max_delay_us}")
        lines.append("}")
    kind = "KIND_GPU" if model.platform == "tensorrt_plan" else settings.kind
    lines.append(f"instance_group [ {{ count: {settings.instances} kind: {kind} }} ]")
    if model.platform == "onnxruntime_onnx":
        lines += [
            "# ONNX Runtime as lrdeploy measures and serves it: graph optimisation left at the",
            "# backend's default (all, ORT_ENABLE_ALL), intra-op threads per instance, one inter-op",
            "# thread, sequential execution.",
            f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{settings.threads}" }} }}',
            'parameters { key: "inter_op_thread_count" value: { string_value: "1" } }',
            'parameters { key: "execution_mode" value: { string_value: "0" } }',
        ]
    return "\n".join(lines) + "\n"


def _model_config_class() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except Exception as exc:  # ImportError, or tritonclient's own RuntimeError without grpc support
        raise UserError(f"Triton's ModelConfig protobuf is not available ({exc})", INSTALL_HINT) from None
    return model_config_pb2.ModelConfig


def validate_config(text: str, model: RepoModel) -> Any:
    """Parse ``text`` into Triton's ``ModelConfig``; check it says what we meant. Returns the message."""
    from google.protobuf import text_format

    config = _model_config_class()()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise UserError(f"config.pbtxt of {model.name!r} does not parse as Triton's ModelConfig: {exc}"
                        ) from None
    problems = []
    if config.name != model.name or config.platform != model.platform:
        problems.append(f"name/platform {config.name!r}/{config.platform!r}")
    if [i.name for i in config.input] != [i.name for i in model.inputs]:
        problems.append("inputs")
    if [o.name for o in config.output] != [o.name for o in model.outputs]:
        problems.append("outputs")
    if config.max_batch_size > 0 and not model.batchable:
        problems.append("max_batch_size on a model without a dynamic batch axis")
    if problems:
        raise UserError(f"config.pbtxt of {model.name!r} parsed, but its {', '.join(problems)} differ from "
                        "the model: a bug in lrdeploy's writer")
    return config


def plan_io(plan: Path) -> tuple[Path, int | None]:
    """The ONNX graph a TensorRT engine was built from (its sidecar's ``onnx_path``, else ``<stem>.onnx``
    beside it) and the largest batch its optimisation profile admits."""
    sidecar = plan.with_name(plan.name + ".json")
    info: dict[str, Any] = {}
    if sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
    candidates = [Path(info["onnx_path"])] if isinstance(info.get("onnx_path"), str) else []
    candidates.append(plan.with_suffix(".onnx"))
    onnx_path = next((c for c in candidates if c.is_file()), None)
    if onnx_path is None:
        raise UserError(f"{plan}: cannot find the ONNX graph it was built from (its sidecar {sidecar.name} "
                        "names none that exists, nor is there a .onnx beside it)",
                        "keep the export family together (lrdeploy export --trt writes both)")
    limit = None
    profile = info.get("profile")
    if isinstance(profile, dict):
        maxima = [s[-1][0] for s in profile.values()
                  if isinstance(s, list) and s and isinstance(s[-1], list) and s[-1]]
        limit = min(maxima) if maxima and all(isinstance(m, int) for m in maxima) else None
    return onnx_path, limit


def perf_analyzer_command(model: RepoModel, url: str = "127.0.0.1:8000", seq: int = 16) -> str:
    """The ``perf_analyzer`` line a user runs against the served repository (dynamic non-batch axes need
    ``--shape``)."""
    args = ["perf_analyzer", "-m", model.name, "-u", url, "-i", "http", "--concurrency-range", "1:32:8",
            "--percentile", "99"]
    for t in model.inputs:
        dims = _dims(t.shape, model.batchable)
        if any(d < 0 for d in dims):
            args += ["--shape", f"{t.name}:{','.join(str(seq if d < 0 else d) for d in dims)}"]
    return " ".join(shlex.quote(a) for a in args)


def is_triton_repo(path: Path) -> bool:
    """A repository lrdeploy wrote, holding nothing else (so --force loses nothing of the user's)."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        listed = set(marker["models"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(p.name == MARKER or p.name in listed for p in path.iterdir())


def write_repository(models: Sequence[RepoModel], repo: Path, settings: RepoSettings) -> list[Path]:
    """Write (staged, then installed whole) the repository; every config is validated first. Returns the
    config files as installed."""
    from lrdeploy import __version__, atomic

    texts = {m.name: config_text(m, settings) for m in models}
    for m in models:
        validate_config(texts[m.name], m)
    with atomic.Staging(repo.parent) as stage:
        root = stage.path(repo.name)
        root.mkdir()
        for m in models:
            folder = root / m.name
            (folder / "1").mkdir(parents=True)
            (folder / "config.pbtxt").write_text(texts[m.name], encoding="utf-8")
            shutil.copyfile(m.source, folder / "1" / PLATFORMS[m.source.suffix.lower()][1])
            if m.tokenizer is not None:
                shutil.copyfile(m.tokenizer, folder / "tokenizer.json")
        (root / MARKER).write_text(json.dumps({"written_by": f"lrdeploy {__version__}",
                                               "models": [m.name for m in models]}, indent=2) + "\n")
    return [repo / m.name / "config.pbtxt" for m in models]
