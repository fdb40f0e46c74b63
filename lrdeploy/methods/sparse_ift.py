"""Sparse-IFT (Thangarasa et al., ICML 2024): sparse iso-FLOP transformations trained with dynamic sparsity.

``--method sparse-ift --method-opt family=wide|parallel|factorized|doped --method-opt sparsity=0.5|0.75|0.9
--method-opt dst=static|set|rigl`` (methods.md §3). Each selected layer (by type and name through the one
selection policy: stem and classifier dense, never by position) is replaced by its family's sparse form at the
same FLOPs as the dense model:

- **wide**: the model is rebuilt with its ``width`` argument × √(1/(1−s)) and every selected layer masked at
  the one density that makes the masked wide model's FLOPs equal the dense model's (closed form: the dense
  stem and classifier grow with the width, the body's density absorbs it — the reference binary-searches the
  same number, §3.4);
- **parallel** / **factorized** / **doped**: :mod:`lrdeploy.layers.sparse_ift` blocks, each iso-FLOP by its
  own density (exact rather than the nominal s, which misses by up to 0.7 %).

Training: masks are drawn at those densities and kept or updated by :class:`~lrdeploy.methods.dst.
MaskUpdater` (RigL by default: drop fraction 0.3 with cosine decay, ΔT scaled to the run, no updates after
75 % of the steps). The manifest records per layer the density and pattern, and the method's log the dense
FLOP budget, the sparse FLOPs reached and every mask update.

Departures from the reference, on purpose: U and V of Sparse Doped stay dense (the paper's definition; the
code masks them, §3.11 #3); masks have exact counts (§3.11 #7); the four families are applied to every
selected Linear/Conv2d the same way (the reference keeps ResNet shortcuts as one masked conv in Parallel).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.flops import count_flops, flops_by_module
from lrdeploy.layers import sparse_ift as blocks
from lrdeploy.layers.masked import MaskedConv2d, MaskedLinear, masked_layers
from lrdeploy.layers.structure import set_submodule
from lrdeploy.methods import selection
from lrdeploy.methods.base import MethodHook, register_method
from lrdeploy.methods.dst import ALGORITHMS, MaskUpdater

FAMILIES = ("wide", "parallel", "factorized", "doped")
_BLOCKS = {
    "parallel": (blocks.ParallelConv2d, blocks.ParallelLinear),
    "factorized": (blocks.FactorizedConv2d, blocks.FactorizedLinear),
    "doped": (blocks.DopedConv2d, blocks.DopedLinear),
}


def wide_width(width: int, sparsity: float) -> int:
    """Sparse Wide's width: ``width`` × √(1/(1−s)), rounded."""
    return max(1, round(width * math.sqrt(1.0 / (1.0 - sparsity))))


@register_method("sparse-ift")
class SparseIFT(MethodHook):
    """Trainer hook for Sparse-IFT; build with ``get_method("sparse-ift", family=..., sparsity=...)``.

    The application layer calls :meth:`model_args_for` before building the model (Sparse Wide builds a wider
    one) and :meth:`prepare` after; a model that already has masked layers (a resumed run) is trained as is.
    """

    name = "sparse-ift"

    def __init__(self, family: str = "wide", sparsity: float = 0.5, dst: str | None = None,
                 drop_fraction: float = 0.3, delta_t: int | None = None, end_fraction: float = 0.75,
                 keep_first_conv: bool = True, keep_classifier: bool = True, include: list[str] | None = None,
                 exclude: list[str] | None = None, seed: int = 0, nm: str | None = None) -> None:
        super().__init__()
        pattern = None
        if nm is not None:  # N:M training: a fixed magnitude N:M mask, at sparsity 1 − N/M
            from lrdeploy.methods.nm import parse_nm

            pattern = parse_nm(nm)
            if family not in ("wide", "factorized"):
                raise UserError(f"sparse-ift nm={nm} applies to family=wide or factorized, not {family}",
                                "drop nm, or use family=wide")
            want = 1 - pattern[0] / pattern[1]
            if abs(float(sparsity) - want) > 1e-9 and sparsity != 0.5:
                raise UserError(f"sparse-ift nm={nm} means sparsity {want:g}, not {sparsity}",
                                f"drop sparsity or set sparsity={want:g}")
            sparsity = want
            if dst not in (None, "static"):
                raise UserError(f"sparse-ift nm={nm} keeps a fixed {nm} mask; dst={dst} would break it",
                                "drop dst (static is implied)")
            dst = "static"
        dst = dst or "rigl"
        self._nm = pattern
        if family not in FAMILIES:
            raise UserError(f"unknown sparse-ift family {family!r}",
                            f"use family={' or family='.join(FAMILIES)}")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise UserError(f"sparse-ift setting sparsity must be in (0, 1), got {sparsity!r}",
                            "the paper uses 0.5, 0.75 or 0.9")
        if dst not in ALGORITHMS:
            raise UserError(f"unknown dynamic sparse training algorithm {dst!r}",
                            f"use dst={' or dst='.join(ALGORITHMS)}")
        self.settings = {
            "family": family, "sparsity": float(sparsity), "dst": dst, "drop_fraction": drop_fraction,
            "delta_t": delta_t, "end_fraction": end_fraction, "keep_first_conv": keep_first_conv,
            "keep_classifier": keep_classifier, "include": selection.as_patterns(include, "include"),
            "exclude": selection.as_patterns(exclude, "exclude"), "seed": seed, "nm": nm,
        }
        # the updater's own checks (drop fraction, ΔT, end), now rather than when training starts
        MaskUpdater([], dst, drop_fraction=drop_fraction, delta_t=delta_t, end_fraction=end_fraction)
        self.updater: MaskUpdater | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._input_shape: tuple[int, ...] | None = None
        self.log = {"family": family, "dense_flops": None, "sparse_flops": None, "flops_ratio": None,
                    "width": None, "layers": {}, "kept_dense": {}, "updates": []}

    # --- building the sparse model ---

    def model_args_for(self, model: nn.Module, args: dict[str, Any], input_shape: tuple[int, ...],
                       builder: Any = None) -> dict[str, Any] | None:
        """Record the dense FLOP budget of ``model``; Sparse Wide returns the wider constructor arguments."""
        self._input_shape = tuple(input_shape)
        self.log["dense_flops"] = count_flops(model, input_shape)
        if self.settings["family"] != "wide":
            return None
        params = inspect.signature(builder).parameters if builder is not None else {}
        if "width" not in args and "width" not in params:
            raise UserError("sparse-ift family=wide widens the model's `width` argument, and this model has "
                            "none", "use family=parallel, factorized or doped, or a model with width")
        width = args.get("width", params["width"].default if "width" in params else None)
        if not isinstance(width, int) or isinstance(width, bool):
            raise UserError(f"sparse-ift family=wide needs an integer width, got {width!r}")
        new = wide_width(width, self.settings["sparsity"])
        if self._nm is not None:  # channels a multiple of M, so every fan-in can take the N:M pattern
            m = self._nm[1]
            new = max(m, m * round(new / m))
        self.log["width"] = {"dense": width, "wide": new}
        return {**args, "width": new}

    def prepare(self, model: nn.Module) -> nn.Module:
        """Replace the selected layers by their family's sparse form and draw the masks (in place)."""
        if masked_layers(model):
            self._attach(model)
            return model
        s = self.settings
        chosen, kept = selection.select_layers(model, include=s["include"], exclude=s["exclude"],
                                               keep_stem=s["keep_first_conv"],
                                               keep_classifier=s["keep_classifier"])
        self.log["kept_dense"] = kept
        if not chosen:
            raise UserError("sparse-ift found no layer to sparsify",
                            hint="the model needs Linear/Conv2d layers beyond the kept stem/classifier")
        densities: dict[str, float] = {}
        if s["family"] == "wide":
            densities = self._wide(model, chosen)
        else:
            for name in chosen:
                densities.update(self._block(model, name))
        if self._nm is not None:
            densities = self._nm_only(model, densities)
        self._attach(model)
        assert self.updater is not None
        self.updater.init_masks(densities)
        if self._nm is not None:
            self._nm_masks(model)
        self._record(model)
        return model

    def _nm_only(self, model: nn.Module, densities: dict[str, float]) -> dict[str, float]:
        """With nm: layers whose fan-in is not a multiple of M go back to dense (reported)."""
        from lrdeploy.methods.nm import nm_eligible

        n, m = self._nm
        out: dict[str, float] = {}
        self._nm_layers = set()
        for name in densities:
            why = nm_eligible(model.get_submodule(name), m)
            if why is None:
                out[name] = n / m
                self._nm_layers.add(name)
            else:  # an all-ones mask: dense, and said so
                out[name] = 1.0
                self.log["kept_dense"][name] = why
        return out

    def _nm_masks(self, model: nn.Module) -> None:
        from lrdeploy.methods.nm import nm_mask

        n, m = self._nm
        for name, layer in masked_layers(model):
            if name in self._nm_layers:
                layer.set_mask(nm_mask(layer.weight, n, m), pattern=f"{n}:{m}")
                layer.apply_mask_()

    def _wide(self, model: nn.Module, chosen: list[str]) -> dict[str, float]:
        """Mask every chosen layer at the density that brings the wide model to the dense FLOP budget."""
        total = count_flops(model, self._input_shape) if self._input_shape else None
        per_module = flops_by_module(model, self._input_shape) if self._input_shape else None
        own = {name: per_module[name] for name in chosen} if per_module is not None else None
        budget = self.log["dense_flops"]
        if total is None or own is None or budget is None or sum(own.values()) == 0:
            density = 1.0 - self.settings["sparsity"]
        else:
            density = 1.0 - (total - budget) / sum(own.values())
            if not 0 < density <= 1:
                raise UserError(f"sparse-ift family=wide cannot reach the dense FLOPs at sparsity "
                                f"{self.settings['sparsity']} (density {density:.3f} needed)",
                                "use a lower sparsity, or keep fewer layers dense")
        for name in chosen:
            dense = model.get_submodule(name)
            cls = MaskedConv2d if isinstance(dense, nn.Conv2d) else MaskedLinear
            set_submodule(model, name, cls.from_dense(dense))
        return {name: density for name in chosen}

    def _block(self, model: nn.Module, name: str) -> dict[str, float]:
        dense = model.get_submodule(name)
        family, s = self.settings["family"], self.settings["sparsity"]
        conv_cls, linear_cls = _BLOCKS[family]
        cls = conv_cls if isinstance(dense, nn.Conv2d) else linear_cls
        k2, c_in, c_out = blocks.fan(dense)
        if family == "parallel":
            block = cls(dense, blocks.parallel_branches(s))
            n, b = dense.weight.numel(), len(block.layers)  # b branches keep n weights between them, exactly
            kept = [n // b + (1 if i < n % b else 0) for i in range(b)]
            return _set(model, name, block, {f"{name}.layers.{i}": kept[i] / n for i in range(b)})
        if family == "factorized":
            rank = blocks.factorized_rank(k2, c_in, c_out, s)
            d = blocks.factorized_density(k2, c_in, c_out, rank)
            return _set(model, name, cls(dense, rank), {f"{name}.first": d, f"{name}.second": d})
        rank = blocks.doped_rank(k2, c_in, c_out, s)
        if rank < 1:
            d = 1.0 - s  # too small a layer for a low-rank part: a plain masked layer at s
            masked = MaskedConv2d.from_dense(dense) if isinstance(dense, nn.Conv2d) else \
                MaskedLinear.from_dense(dense)
            return _set(model, name, masked, {name: d})
        density = blocks.doped_density(k2, c_in, c_out, rank)
        return _set(model, name, cls(dense, rank), {f"{name}.sparse": density})

    def _attach(self, model: nn.Module) -> None:
        layers = masked_layers(model)
        s = self.settings
        if self.updater is None:
            self.updater = MaskUpdater(layers, s["dst"], drop_fraction=s["drop_fraction"],
                                       delta_t=s["delta_t"], end_fraction=s["end_fraction"], seed=s["seed"])
        else:
            self.updater.layers = layers

    def _record(self, model: nn.Module) -> None:
        from lrdeploy.layers.structure import describe

        self.log["layers"] = {name: {k: v for k, v in entry.items() if k in ("kind", "density", "branches",
                                                                           "rank")}
                              for name, entry in describe(model).items()}
        if self._input_shape is not None:
            sparse = count_flops(model, self._input_shape, sparse=True)
            self.log["sparse_flops"] = sparse
            if self.log["dense_flops"]:
                self.log["flops_ratio"] = sparse / self.log["dense_flops"]

    # --- trainer hooks ---

    def param_groups(self, model: nn.Module, config: Any) -> None:
        if self.updater is None or not masked_layers(model):
            self.prepare(model)
        return None

    def on_schedule(self, total_steps: int) -> None:
        if self.updater is not None:
            self.updater.schedule(total_steps)

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def on_resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def on_model_replaced(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._attach(model)

    def after_backward(self, model: nn.Module) -> None:
        if self.updater is not None:
            self.updater.mask_gradients()

    def after_step(self, model: nn.Module) -> None:
        if self.updater is not None:
            self.updater.step(self.optimizer)

    def manifest_record(self) -> dict[str, Any]:
        record = super().manifest_record()
        if self.updater is not None:
            record["log"]["updates"] = list(self.updater.log)
            record["log"]["delta_t"] = self.updater.delta_t
            record["log"]["end_step"] = self.updater.end_step
        return record

    # --- checkpoints ---

    def state_dict(self) -> dict[str, Any]:
        return {"log": self.log, "input_shape": list(self._input_shape) if self._input_shape else None,
                "updater": self.updater.state_dict() if self.updater is not None else None}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.log = state["log"]
        self._input_shape = tuple(state["input_shape"]) if state["input_shape"] else None
        self.updater = None
        self._attach(model)
        if state["updater"] is not None and self.updater is not None:
            self.updater.load_state_dict(state["updater"])


def _set(model: nn.Module, name: str, module: nn.Module, densities: dict[str, float]) -> dict[str, float]:
    set_submodule(model, name, module)
    return densities
