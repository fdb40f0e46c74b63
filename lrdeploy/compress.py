"""Post-training low-rank compression: replace eligible Linear/Conv2d layers by truncated-SVD factors.

Layers are chosen by module type and fully-qualified name (fnmatch patterns), never by position in a state
dict. The first conv (it sees raw pixels and has few parameters) and the classifier (it produces the logits)
stay dense by default, as in Pufferfish/Cuttlefish. A layer is only factorised when that saves parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.flops import count_params
from lrdeploy.layers.lowrank import LowRankConv2d, LowRankLayer, LowRankLinear
from lrdeploy.layers.structure import set_submodule
from lrdeploy.layers.svd import check_fraction, energy_kept, rank_for_energy, rank_for_ratio, svd_2d

NO_SAVING = "no saving at this rank"


@dataclass
class LayerReport:
    """What happened to one Linear/Conv2d layer. ``skipped`` is None when it was factorised."""

    name: str
    kind: str  # "linear" | "conv2d" | "lowrank_linear" | "lowrank_conv2d"
    shape: tuple[int, ...]  # weight shape of the dense layer
    full_rank: int
    params_before: int
    params_after: int
    rank: int | None = None  # chosen rank (also set when skipped for "no saving", to show why)
    energy_kept: float | None = None  # Σ_{i<r} s_i² / Σ s_i² at the chosen rank
    skipped: str | None = None

    @property
    def compressed(self) -> bool:
        return self.skipped is None


@dataclass
class CompressionReport:
    """Per-layer outcome of ``compress`` plus model-level parameter counts."""

    rank_ratio: float | None
    energy: float | None
    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def compressed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.skipped is None]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.skipped is not None]

    @property
    def param_ratio(self) -> float:
        """Parameters after / before for the whole model (1.0 means nothing was saved)."""
        return self.model_params_after / self.model_params_before if self.model_params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for manifests and reports)."""
        return {
            "rank_ratio": self.rank_ratio,
            "energy": self.energy,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "layers": [{**asdict(layer), "shape": list(layer.shape)} for layer in self.layers],
        }


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(fnmatchcase(name, p) for p in patterns or ())


def _as_patterns(value: Iterable[str] | str | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    patterns = list(value)
    if not all(isinstance(p, str) for p in patterns):
        raise UserError(f"{what} patterns must be strings, got {patterns!r}")
    return patterns


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear/Conv2d/low-rank layers in module order, not descending into low-rank layers' own factors."""
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, LowRankLayer):
            inside.append(name)
            found.append((name, module))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            found.append((name, module))
    return found


def check_finite_weights(model: nn.Module) -> None:
    """UserError naming the first parameter or buffer with NaN/Inf values (in module order).

    SVD of a NaN matrix fails deep inside LAPACK with a traceback; fine-tuning or exporting such a model only
    carries the NaN on. A model with non-finite weights is broken (usually a diverged training run).
    """
    from lrdeploy.parity_stats import describe_nonfinite

    for kind, items in (("weight", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
                continue
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            raise UserError(f"{kind} {name!r} contains {describe_nonfinite(nan, inf)} (of {tensor.numel()}): "
                            "a model with non-finite weights cannot be compressed",
                            "re-train the dense model (lower --lr) or use an earlier checkpoint")


def compress(
    model: nn.Module,
    *,
    rank_ratio: float | None = None,
    energy: float | None = None,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    keep_first_conv: bool = True,
    keep_classifier: bool = True,
    min_saving: float = 0.0,
) -> CompressionReport:
    """Factorise eligible layers of ``model`` IN PLACE by truncated SVD; return what was done per layer.

    Exactly one of ``rank_ratio`` (rank = ceil(ratio · full rank)) or ``energy`` (smallest rank keeping
    that fraction of Σ s²) must be given, each in (0, 1]. ``include``/``exclude`` are fnmatch patterns on
    qualified module names (``include=None`` means every layer). A layer is skipped when factorising would
    not save parameters (r·(m+n) ≥ m·n) or would save less than ``min_saving`` of its weight parameters.
    """
    if (rank_ratio is None) == (energy is None):
        raise UserError(
            "give exactly one of rank ratio or energy", hint="pass --rank-ratio 0.5 or --energy 0.9, not both"
        )
    if rank_ratio is not None:
        rank_ratio = check_fraction(rank_ratio, "rank ratio", "--rank-ratio")
    if energy is not None:
        energy = check_fraction(energy, "energy", "--energy")
    if not 0.0 <= float(min_saving) < 1.0:
        raise UserError(f"min_saving must be in [0, 1), got {min_saving}", hint="pass e.g. 0.1 for 10 %")
    include_p = _as_patterns(include, "include")
    exclude_p = _as_patterns(exclude, "exclude")
    check_finite_weights(model)  # before any layer is replaced: the model is changed in place

    report = CompressionReport(rank_ratio=rank_ratio, energy=energy, model_params_before=count_params(model))
    candidates = _candidates(model)
    # Modules that read a child's ``.weight`` themselves (nn.MultiheadAttention passes out_proj.weight to
    # F.multi_head_attention_forward): a factorised child has no ``.weight``, so replacing it breaks it.
    reads_weights = {f"{n}.{child}" if n else child for n, m in model.named_modules()
                     if isinstance(m, nn.MultiheadAttention) for child in ("out_proj",)}
    first_conv = next((n for n, m in candidates if isinstance(m, (nn.Conv2d, LowRankConv2d))), None)
    classifier = next((n for n, m in reversed(candidates) if isinstance(m, (nn.Linear, LowRankLinear))), None)

    for name, module in candidates:
        params = sum(p.numel() for p in module.parameters())
        if isinstance(module, LowRankLayer):
            report.layers.append(
                LayerReport(
                    name=name,
                    kind=module.kind,
                    shape=module.dense_shape,
                    full_rank=module.full_rank,
                    params_before=params,
                    params_after=params,
                    rank=module.rank,
                    skipped="already low-rank",
                )
            )
            continue
        weight = module.weight
        shape = tuple(weight.shape)
        out_dim, in_dim = shape[0], weight[0].numel()
        full = min(out_dim, in_dim)
        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        entry = LayerReport(name, kind, shape, full, params, params)
        report.layers.append(entry)

        if name == "":
            entry.skipped = "the root module cannot be replaced in place"
        elif name in reads_weights:
            entry.skipped = "inside nn.MultiheadAttention, which reads its weight directly: kept dense"
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            entry.skipped = f"grouped conv (groups={module.groups}) is not eligible"
        elif keep_first_conv and name == first_conv:
            entry.skipped = "first conv kept dense (keep_first_conv)"
        elif keep_classifier and name == classifier:
            entry.skipped = "classifier kept dense (keep_classifier)"
        elif include_p is not None and not _matches(name, include_p):
            entry.skipped = "not matched by include patterns"
        elif _matches(name, exclude_p):
            entry.skipped = "matched an exclude pattern"
        if entry.skipped:
            continue

        svd = svd_2d(weight)
        rank = (
            rank_for_ratio(weight, rank_ratio) if rank_ratio is not None else rank_for_energy(svd.S, energy)
        )
        entry.rank = rank
        entry.energy_kept = energy_kept(svd.S, rank)
        dense_weights = out_dim * in_dim
        factored_weights = rank * (out_dim + in_dim)
        if factored_weights >= dense_weights:
            entry.skipped = NO_SAVING
            continue
        if 1.0 - factored_weights / dense_weights < min_saving:
            entry.skipped = f"saving below min_saving={min_saving:g}"
            continue
        cls = LowRankLinear if isinstance(module, nn.Linear) else LowRankConv2d
        new = cls.from_dense(module, rank, svd=svd)
        set_submodule(model, name, new)
        entry.params_after = new.param_count()

    report.model_params_after = count_params(model)
    return report
