"""Post-training truncated SVD as a registered method: ``get_method("svd", rank_ratio=0.5).apply(model)``.

Unlike the training methods it is not a trainer hook: it factorises a trained model once (plain, or
activation-aware on calibration inputs; see :func:`lrdeploy.compress.compress`), and a fine-tune, if any,
is an ordinary training run afterwards. ``lrdeploy compress`` builds it from its flags, and the manifest
stores :meth:`PostTrainingSVD.manifest_record` under "method".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.layers.svd import check_fraction
from lrdeploy.methods import selection
from lrdeploy.methods.base import MethodHook, register_method


@register_method("svd")
class PostTrainingSVD(MethodHook):
    """Settings of one post-training SVD; :meth:`apply` compresses a model in place and fills ``log``."""

    name = "svd"
    stage = "post-training"
    usage = "it compresses a trained bundle: lrdeploy compress BUNDLE --rank-ratio 0.5 --out OUT"

    def __init__(
        self,
        rank_ratio: float | None = None,
        energy: float | None = None,
        activation_aware: bool | str = False,
        alpha: float = 0.5,
        include: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str | None = None,
        keep_first_conv: bool = True,
        keep_classifier: bool = True,
        min_saving: float = 0.0,
    ) -> None:
        super().__init__()
        from lrdeploy.compress import _aware_mode

        if (rank_ratio is None) == (energy is None):
            raise UserError("give exactly one of rank ratio or energy",
                            "pass --rank-ratio 0.5 or --energy 0.9, not both")
        if rank_ratio is not None:
            rank_ratio = check_fraction(rank_ratio, "rank ratio", "--rank-ratio")
        if energy is not None:
            energy = check_fraction(energy, "energy", "--energy")
        self.settings = {
            "rank_ratio": rank_ratio,
            "energy": energy,
            "activation_aware": _aware_mode(activation_aware) or False,
            "alpha": float(alpha),
            "include": selection.as_patterns(include, "include"),
            "exclude": selection.as_patterns(exclude, "exclude"),
            "keep_first_conv": bool(keep_first_conv),
            "keep_classifier": bool(keep_classifier),
            "min_saving": float(min_saving),
        }
        self.report: Any = None

    @property
    def activation_aware(self) -> bool:
        return bool(self.settings["activation_aware"])

    def apply(self, model: nn.Module, calibration: Any = None) -> Any:
        """Factorise ``model`` IN PLACE; returns the :class:`lrdeploy.compress.CompressionReport`.

        ``calibration`` (any form :func:`lrdeploy.compress.collect_input_stats` takes) is required when the
        method is activation-aware and unused otherwise.
        """
        from lrdeploy.compress import compress

        report = compress(model, calibration=calibration, **self.settings)
        self.report = report
        layers = {}
        for layer in report.compressed:
            row: dict[str, Any] = {"rank": layer.rank, "full_rank": layer.full_rank,
                                   "energy_kept": layer.energy_kept, "svd": layer.svd}
            if layer.output_error is not None:
                row.update(output_error=layer.output_error, output_error_svd=layer.output_error_svd)
            layers[layer.name] = row
        self.log = {
            "params_before": report.model_params_before,
            "params_after": report.model_params_after,
            "calibration_samples": report.calibration_samples,
            "layers": layers,
            "kept_dense": {layer.name: layer.skipped for layer in report.skipped},
        }
        return report

    def manifest_record(self) -> dict[str, Any]:
        """``{name, settings, log}`` plus the top-level keys ``lrdeploy compress`` has always written."""
        record = super().manifest_record()
        record.update(rank_ratio=self.settings["rank_ratio"], energy=self.settings["energy"],
                      activation_aware=self.activation_aware)
        return record
