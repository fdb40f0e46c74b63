"""One artefact resolver for every command that runs a model: ``compare``, ``bench`` and ``check``.

An artefact is an ``.onnx`` file (from ``lrdeploy export`` or anywhere else) or a bundle directory. A bundle
is exported on the fly into a working directory through the same pipeline as ``lrdeploy export``
(:func:`lrdeploy.workflows.export_bundle`: folded with ``--fold auto``, checked, parity-verified, manifest
stamped), so every command times and judges the graph that ``export`` would ship. What is known about the
artefact comes with it: its manifest (a bundle's, or the one ``export`` stamps into the ONNX metadata), from
which :func:`lrdeploy.tasks.manifest_task` reads its task, and its size and FLOPs counted from the graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrdeploy.errors import UserError


@dataclass
class Artifact:
    """One artefact, resolved to an ONNX file plus what we know about it."""

    label: str
    source: Path
    kind: str  # "bundle" or "onnx"
    onnx_path: Path
    manifest: dict[str, Any] | None
    onnx_bytes: int
    params: int | None = None
    flops: int | None = None
    weights_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    trained: dict[str, Any] | None = None  # the manifest's figures: the PyTorch model as trained
    graph: dict[str, Any] | None = None  # how params/flops/weights_bytes were counted from the graph

    @property
    def name(self) -> str:
        """What people call it: the file stem of an .onnx file, the directory name of a bundle."""
        return self.source.stem if self.kind == "onnx" else (self.source.name or str(self.source))

    @property
    def task(self) -> Any:
        """The task its manifest records (:func:`lrdeploy.tasks.manifest_task`)."""
        from lrdeploy.tasks import manifest_task

        return manifest_task(self.manifest)

    def summary(self) -> dict[str, Any]:
        manifest = self.manifest or {}
        return {
            "name": self.name,
            "label": self.label,
            "source": str(self.source),
            "kind": self.kind,
            "model": (manifest.get("model") or {}).get("name"),
            "method": (manifest.get("method") or {}).get("name"),
            "task": self.task.name,
            "params": self.params,
            "flops": self.flops,
            "onnx_bytes": self.onnx_bytes,
            "weights_bytes": self.weights_bytes,
            "structure": manifest.get("structure", {}),
            **({"trained": self.trained} if self.trained else {}),
            **({"graph": self.graph} if self.graph else {}),
            **self.extra,
        }


def deployed_figures(path: Path) -> dict[str, Any]:
    """``params``, ``flops``, ``weights_bytes`` of the graph as deployed (``exporters.graph_stats``), and
    ``graph``: how they were counted. A re-multiplied (``--fold dense``/``auto``) layer counts at its dense
    size here, whatever the manifest says; ``flops`` is None when the graph's cost cannot be derived."""
    from lrdeploy.exporters.graph_stats import graph_stats

    stats = graph_stats(path)
    summary = stats.summary()
    graph = {k: v for k, v in summary.items() if k not in ("params", "flops", "weights_bytes")}
    return {"params": stats.params, "flops": stats.flops, "weights_bytes": stats.weights_bytes,
            "graph": graph}


def trained_figures(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """The manifest's ``params``/``flops``: the trained PyTorch model (``count_params``, ``count_flops``),
    kept next to the deployed figures, never instead of them. (Its ``weights_bytes`` is the safetensors
    file's size, header included, so it would differ from the graph's weight bytes for no reason.)"""
    manifest = manifest or {}
    figures = {k: manifest[k] for k in ("params", "flops")
               if isinstance(manifest.get(k), int) and not isinstance(manifest.get(k), bool)}
    return figures or None


def resolve_artifact(label: str, path: Path, workdir: Path, *, figures: bool = True) -> Artifact:
    """A bundle exported (folded, checked) to ``workdir``, or an .onnx file checked where it is.

    ``figures``: count parameters, FLOPs and weight bytes from the graph (``compare``, ``check``; ``bench``
    does not need them). A missing path, a directory that is not a bundle or a file that is not ONNX is a
    one-line UserError naming ``label``.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{label} {path} does not exist", "pass a bundle directory or an .onnx file")
    extra: dict[str, Any] = {}
    if path.is_dir():
        from lrdeploy.bundle import read_manifest
        from lrdeploy.workflows import export_bundle  # the pipeline of `lrdeploy export` (--fold auto)

        onnx_path = Path(workdir) / (re.sub(r"[^\w.-]", "_", label) + ".onnx")
        export_bundle(path, onnx_path, optimize=False, fold="auto")
        manifest: dict[str, Any] | None = read_manifest(path)
        kind = "bundle"
    elif path.suffix.lower() == ".onnx":
        from lrdeploy.exporters.onnx import read_onnx_metadata

        extra = _check_onnx(path)
        onnx_path, kind = path, "onnx"
        manifest = read_onnx_metadata(path) or None
    else:
        raise UserError(f"{label} {path} is neither an .onnx file nor a bundle directory",
                        "pass a file from lrdeploy export or a bundle from lrdeploy train/compress")
    art = Artifact(label=label, source=path, kind=kind, onnx_path=onnx_path, manifest=manifest,
                   onnx_bytes=onnx_path.stat().st_size, extra=extra, trained=trained_figures(manifest))
    if figures:  # what was exported: folding may re-multiply factors, so never the manifest's count
        for key, value in deployed_figures(onnx_path).items():
            setattr(art, key, value)
    return art


def _check_onnx(path: Path) -> dict[str, Any]:
    """The ONNX checker's verdict on ``path``: nothing when it passes, a note when it objects to a file that
    still parses (ONNX Runtime, the judge of what deploys, may run it: ORT's own fp16 converter leaves its
    input Casts out of topological order, for one); a file that does not parse is a UserError."""
    import onnx

    from lrdeploy.exporters.onnx import load_onnx_checked

    try:
        load_onnx_checked(path)
    except UserError as exc:
        try:
            onnx.load(str(path), load_external_data=False)
        except Exception:
            raise exc from None
        cause = str(exc.__cause__ or exc).strip().splitlines()[0].split(", however")[0]
        cause = cause if len(cause) <= 70 else cause[:69] + "…"
        return {"onnx_checker": f"failed ({cause}); run by ORT anyway"}
    return {}
