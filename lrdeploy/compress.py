"""Post-training low-rank compression: replace eligible Linear/Conv2d layers by truncated-SVD factors.

Layers are chosen by module type and fully-qualified name (fnmatch patterns), never by position in a state
dict. The first conv (it sees raw pixels and has few parameters) and the classifier (it produces the logits)
stay dense by default, as in Pufferfish/Cuttlefish (one policy for every method:
:mod:`lrdeploy.methods.selection`, which asks the model spec). A layer is only factorised when that saves
parameters.

``activation_aware`` picks each layer's factors by the error of its *outputs* on calibration inputs rather
than the error of its weights (SVD-LLM's whitening, or ASVD's per-channel scaling; see
:func:`lrdeploy.layers.svd.whitened_svd`). The inputs are seen through forward pre-hooks, and each layer
keeps only XᵀX (in × in, float64), never X, so memory does not grow with the calibration set. A Conv2d's
statistics are taken on its unfolded (im2col) input patches, the rows its weight (out × in·kh·kw) multiplies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.flops import count_params
from lrdeploy.layers.lowrank import LowRankConv2d, LowRankLayer, LowRankLinear
from lrdeploy.layers.structure import set_submodule
from lrdeploy.layers.svd import (
    SVD,
    check_fraction,
    energy_kept,
    output_error,
    rank_for_energy,
    rank_for_ratio,
    scaled_svd,
    svd_2d,
    truncation,
    whitened_svd,
)
from lrdeploy.methods import selection

NO_SAVING = "no saving at this rank"
AWARE_MODES = ("whiten", "scale")
"""``activation_aware`` modes: "whiten" (SVD-LLM, the exact optimum of the output error; what True means)
and "scale" (ASVD, W·diag(mean|x|^α), a cheaper heuristic)."""
DEFAULT_ALPHA = 0.5  # ASVD's exponent (the paper's best on LLaMA)
CALIBRATION_BATCH = 32


@dataclass
class LayerReport:
    """What happened to one Linear/Conv2d layer. ``skipped`` is None when it was factorised."""

    name: str
    kind: str  # "linear" | "conv2d" | "lowrank_linear" | "lowrank_conv2d" | "mha_in_proj"
    shape: tuple[int, ...]  # weight shape of the dense layer
    full_rank: int
    params_before: int
    params_after: int
    rank: int | None = None  # chosen rank (also set when skipped for "no saving", to show why)
    energy_kept: float | None = None  # Σ_{i<r} s_i² / Σ s_i² at the chosen rank (activation-aware: of W·S)
    skipped: str | None = None
    svd: str | None = None  # how the factors were chosen: "plain", "whiten" or "scale"
    output_error: float | None = None  # relative output error on the calibration inputs (activation-aware)
    output_error_svd: float | None = None  # the same for plain SVD at the same rank, for comparison
    note: str | None = None

    @property
    def compressed(self) -> bool:
        return self.skipped is None

    @property
    def error_reduction(self) -> float | None:
        """Plain SVD's output error / this layer's (> 1: the activation-aware factors are better)."""
        if self.output_error is None or self.output_error_svd is None:
            return None
        if self.output_error == 0.0:
            return 1.0 if self.output_error_svd == 0.0 else float("inf")
        return self.output_error_svd / self.output_error


@dataclass
class CompressionReport:
    """Per-layer outcome of ``compress`` plus model-level parameter counts."""

    rank_ratio: float | None
    energy: float | None
    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    activation_aware: str | None = None  # None, "whiten" or "scale"
    calibration_samples: int | None = None  # model inputs (batch rows) seen while collecting statistics

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
            "activation_aware": self.activation_aware,
            "calibration_samples": self.calibration_samples,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "layers": [{**asdict(layer), "shape": list(layer.shape)} for layer in self.layers],
        }


# Kept importable under their old names (scripts and methods used them before selection.py existed).
_matches = selection.matches
_as_patterns = selection.as_patterns
_candidates = selection.layer_modules


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


# ----------------------------------------------------------------------------------------------------
# Calibration: per-layer input statistics through forward hooks
# ----------------------------------------------------------------------------------------------------


@dataclass
class InputStats:
    """What a layer's inputs looked like: C = Σ x·xᵀ and Σ|x| over ``rows`` input rows (float64).

    For a Conv2d a row is one unfolded input patch (in·kh·kw values), so C matches the 2D view of its weight.
    """

    gram: torch.Tensor
    abs_sum: torch.Tensor
    rows: int = 0

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)


_PATCH_ELEMENTS = 1 << 22  # unfold at most ~4M values at a time (a batch of 32×32 feature maps is large)


def _input_rows(module: nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The rows the layer's 2D weight multiplies, in chunks: Linear features, or Conv2d im2col patches."""
    if isinstance(module, nn.Linear):
        yield x.reshape(-1, x.shape[-1])
        return
    assert isinstance(module, nn.Conv2d)
    if x.dim() == 3:  # unbatched (C, H, W)
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = module._reversed_padding_repeated_twice  # covers int, tuple and "same" padding alike
    per_sample = max(1, module.weight[0].numel() * x.shape[-2] * x.shape[-1])
    step = max(1, _PATCH_ELEMENTS // per_sample)
    for start in range(0, x.shape[0], step):
        part = x[start : start + step]
        if any(pad):
            part = F.pad(part, pad, mode=mode)
        cols = F.unfold(part, module.kernel_size, dilation=module.dilation, stride=module.stride)
        yield cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _batches(calibration: Any, batch_size: int) -> Iterator[tuple[Any, ...]]:
    """Positional argument tuples for the model's forward, from the forms ``compress`` accepts."""
    if isinstance(calibration, torch.Tensor):
        calibration = (calibration,)
    tensors = isinstance(calibration, tuple) and all(isinstance(t, torch.Tensor) for t in calibration)
    if tensors and calibration:
        n = int(calibration[0].shape[0]) if calibration[0].dim() else 0
        for start in range(0, n, batch_size):
            yield tuple(t[start : start + batch_size] for t in calibration)
        return
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise UserError("calibration must be a tensor, a tuple of input tensors, an iterable of batches or "
                        f"a callable that runs the model, got {type(calibration).__name__}")
    for batch in calibration:
        yield tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


@torch.no_grad()
def collect_input_stats(model: nn.Module, names: Iterable[str], calibration: Any, *,
                        batch_size: int = CALIBRATION_BATCH) -> tuple[dict[str, InputStats], int]:
    """Run ``calibration`` through ``model`` (eval mode, no grad) and return ({layer: InputStats}, samples).

    ``calibration``: a callable ``f(model)`` that runs the model itself; a tensor (one input, split into
    batches of ``batch_size`` rows); a tuple of tensors (the inputs of a multi-input model, in forward order);
    or an iterable of batches, each a tensor or a tuple/list of tensors. ``samples`` counts the rows of the
    model's first tensor argument over all calls. Layers no input reached are left out of the result.
    """
    stats: dict[str, InputStats] = {}
    seen = [0]

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if x is None or not x.is_floating_point():
                return
            for rows in _input_rows(module, x.detach()):
                rows = rows.to(torch.float64)
                entry = stats.get(name)
                if entry is None:
                    dim = rows.shape[1]
                    entry = stats[name] = InputStats(rows.new_zeros(dim, dim), rows.new_zeros(dim))
                entry.gram.addmm_(rows.T, rows)
                entry.abs_sum.add_(rows.abs().sum(0))
                entry.rows += rows.shape[0]

        return hook

    def count(_module: nn.Module, args: tuple[Any, ...]) -> None:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        seen[0] += int(first.shape[0]) if first is not None and first.dim() else 1

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    handles.append(model.register_forward_pre_hook(count))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        if callable(calibration) and not isinstance(calibration, nn.Module):
            calibration(model)
        else:
            for args in _batches(calibration, batch_size):
                model(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen[0] == 0:
        raise UserError("the calibration inputs never ran the model (no samples)",
                        "pass at least one batch of real inputs")
    return stats, seen[0]


# ----------------------------------------------------------------------------------------------------
# compress
# ----------------------------------------------------------------------------------------------------


def _aware_mode(activation_aware: bool | str) -> str | None:
    if activation_aware is False or activation_aware is None:
        return None
    if activation_aware is True:
        return "whiten"
    if isinstance(activation_aware, str) and activation_aware.lower() in AWARE_MODES:
        return activation_aware.lower()
    raise UserError(f"activation_aware must be True, False or one of {', '.join(AWARE_MODES)}, "
                    f"got {activation_aware!r}", "True means 'whiten' (SVD-LLM)")


def _fused_entries(mha: nn.MultiheadAttention, prefix: str) -> list[LayerReport]:
    """Report rows for attention projections stored as bare Parameters (they cannot be replaced)."""
    entries = []
    for attr in selection.fused_attention_weights(mha):
        weight = getattr(mha, attr)
        bias = mha.in_proj_bias if attr == "in_proj_weight" and mha.in_proj_bias is not None else None
        params = weight.numel() + (bias.numel() if bias is not None else 0)
        why = selection.MHA_IN_PROJ if attr == "in_proj_weight" else (
            f"separate {attr} of nn.MultiheadAttention: not a Linear module")
        entries.append(LayerReport(f"{prefix}.{attr}" if prefix else attr, "mha_in_proj", tuple(weight.shape),
                                   min(weight.shape), params, params, skipped=why))
    return entries


def _layer_svd(weight: torch.Tensor, mode: str | None, stats: InputStats | None, alpha: float) -> SVD:
    if mode is None or stats is None or stats.rows == 0:
        return svd_2d(weight)
    if mode == "whiten":
        return whitened_svd(weight, stats.gram)
    return scaled_svd(weight, stats.abs_mean, alpha)


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
    activation_aware: bool | str = False,
    calibration: Any = None,
    alpha: float = DEFAULT_ALPHA,
    calibration_batch_size: int = CALIBRATION_BATCH,
) -> CompressionReport:
    """Factorise eligible layers of ``model`` IN PLACE by truncated SVD; return what was done per layer.

    Exactly one of ``rank_ratio`` (rank = ceil(ratio · full rank)) or ``energy`` (smallest rank keeping
    that fraction of Σ s²) must be given, each in (0, 1]. ``include``/``exclude`` are fnmatch patterns on
    qualified module names (``include=None`` means every layer). A layer is skipped when factorising would
    not save parameters (r·(m+n) ≥ m·n) or would save less than ``min_saving`` of its weight parameters.
    The stem and classifier (``keep_first_conv``/``keep_classifier``) are those the model spec names, else
    the first conv and last Linear (:func:`lrdeploy.methods.selection.select_layers`).

    ``activation_aware`` (True = "whiten", or "scale"; see :data:`AWARE_MODES`) chooses the factors that
    minimise the error of each layer's outputs on ``calibration`` (forms: :func:`collect_input_stats`) —
    with ``energy``, the share of the *output* energy Σ‖W·x‖² to keep — and reports, per layer, the
    relative output error next to plain SVD's at the same rank. ``alpha`` is ASVD's exponent ("scale").
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
    mode = _aware_mode(activation_aware)
    if mode is not None and calibration is None:
        raise UserError("activation-aware SVD needs calibration inputs",
                        "pass calibration=... (input tensors, batches, or a callable that runs the model)")
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) <= 2.0):
        raise UserError(f"alpha must be in (0, 2], got {alpha!r}", "ASVD uses 0.5")
    selected, kept = selection.select_layers(model, include=include, exclude=exclude,
                                             keep_stem=keep_first_conv, keep_classifier=keep_classifier)
    check_finite_weights(model)  # before any layer is replaced: the model is changed in place

    report = CompressionReport(rank_ratio=rank_ratio, energy=energy, model_params_before=count_params(model),
                               activation_aware=mode)
    stats: dict[str, InputStats] = {}
    if mode is not None:
        stats, report.calibration_samples = collect_input_stats(model, selected, calibration,
                                                                batch_size=calibration_batch_size)
    layers = dict(selection.layer_modules(model))
    order: list[tuple[str, nn.Module]] = []  # layers and attention modules, in module order
    for name, module in model.named_modules():
        if name in layers or isinstance(module, nn.MultiheadAttention):
            order.append((name, module))

    for name, module in order:
        if isinstance(module, nn.MultiheadAttention):
            report.layers.extend(_fused_entries(module, name))
            continue
        params = sum(p.numel() for p in module.parameters())
        if isinstance(module, LowRankLayer):
            report.layers.append(LayerReport(name, module.kind, module.dense_shape, module.full_rank, params,
                                             params, rank=module.rank, skipped="already low-rank"))
            continue
        weight = module.weight
        shape = tuple(weight.shape)
        out_dim, in_dim = shape[0], weight[0].numel()
        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        entry = LayerReport(name, kind, shape, min(out_dim, in_dim), params, params, skipped=kept.get(name))
        report.layers.append(entry)
        if entry.skipped:
            continue

        layer_stats = stats.get(name)
        svd = _layer_svd(weight, mode, layer_stats, alpha)
        entry.svd = "plain" if mode is None or layer_stats is None else mode
        if mode is not None and layer_stats is None:
            entry.note = "no calibration input reached this layer: plain SVD"
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
        if layer_stats is not None:
            entry.output_error = output_error(weight, truncation(svd, rank), layer_stats.gram)
            plain = svd if entry.svd == "plain" else svd_2d(weight)
            entry.output_error_svd = output_error(weight, truncation(plain, rank), layer_stats.gram)
        cls = LowRankLinear if isinstance(module, nn.Linear) else LowRankConv2d
        new = cls.from_dense(module, rank, svd=svd)
        set_submodule(model, name, new)
        entry.params_after = new.param_count()

    report.model_params_after = count_params(model)
    return report

