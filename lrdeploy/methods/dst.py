"""Dynamic sparse training: the mask optimiser of Sparse-IFT (methods.md §3.5), Optimizer-style.

``MaskUpdater(layers, algorithm)`` owns the masks of a set of masked layers (:mod:`lrdeploy.layers.masked`):

- :meth:`init_masks` draws each layer's mask at its density — an exact count per tensor (the reference's
  Bernoulli draw only approximates it, §3.11 #7), from its own seeded generator;
- :meth:`step` (after each optimiser step) keeps masked-out weights and their optimiser state (momentum, Adam
  moments) at zero, and every ``delta_t`` steps until ``end`` (75 % of training) updates the masks:
  drop the α_t·(active) smallest-magnitude active weights, α_t = α₀·(1 + cos(π·t/end))/2, then grow as many
  where the score is highest among the inactive positions — RigL: |dense gradient| (captured on the step
  before the update, unmasked); SET: uniform random; static: no updates. Grown weights start at zero with
  zero momentum; a weight dropped and re-grown in the same update keeps its value.
- :meth:`state_dict` / :meth:`load_state_dict` make it resumable (the masks themselves live in the model);
- under torchrun, rank 0 computes new masks and every rank installs them (:func:`lrdeploy.distributed.agree`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lrdeploy import distributed
from lrdeploy.errors import UserError
from lrdeploy.layers.masked import MaskedMixin

ALGORITHMS = ("static", "set", "rigl")


def random_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """A boolean mask with exactly round(density·numel) True entries at uniformly random positions."""
    n = math.prod(shape)
    keep = min(n, max(1, round(density * n))) if density > 0 else 0
    order = torch.randperm(n, generator=generator)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.reshape(shape)


class MaskUpdater:
    """Masks of ``layers`` (name → masked layer), kept and updated by ``algorithm`` (static, set, rigl)."""

    def __init__(self, layers: Sequence[tuple[str, MaskedMixin]], algorithm: str = "rigl", *,
                 drop_fraction: float = 0.3, delta_t: int | None = None, end_fraction: float = 0.75,
                 seed: int = 0) -> None:
        if algorithm not in ALGORITHMS:
            raise UserError(f"unknown dynamic sparse training algorithm {algorithm!r}",
                            f"use dst={' or dst='.join(ALGORITHMS)}")
        if not 0 <= drop_fraction < 1:
            raise UserError(f"sparse-ift setting drop_fraction must be in [0, 1), got {drop_fraction!r}")
        if delta_t is not None and delta_t < 1:
            raise UserError(f"sparse-ift setting delta_t must be at least 1, got {delta_t!r}")
        if not 0 < end_fraction <= 1:
            raise UserError(f"sparse-ift setting end_fraction must be in (0, 1], got {end_fraction!r}")
        self.layers = list(layers)
        self.algorithm = algorithm
        self.drop_fraction = drop_fraction
        self.delta_t = delta_t
        self.end_fraction = end_fraction
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.end_step = 0
        self.log: list[dict[str, Any]] = []

    def schedule(self, total_steps: int) -> None:
        """Fix ΔT and the last update step for a run of ``total_steps`` optimiser steps.

        ΔT defaults to the reference's 100 steps on long runs, and shrinks on short ones so that about 20
        updates still happen before ``end`` (a 5-epoch CPU run has a few hundred steps, not 78,000).
        """
        self.end_step = int(self.end_fraction * total_steps)
        if self.delta_t is None:
            self.delta_t = max(1, min(100, self.end_step // 20))

    def init_masks(self, densities: dict[str, float]) -> None:
        for name, layer in self.layers:
            layer.set_mask(random_mask(layer.weight.shape, densities[name], self.generator))
            layer.apply_mask_()

    def _update_due(self, step: int) -> bool:
        return (self.algorithm != "static" and self.delta_t is not None and 0 < step < self.end_step
                and step % self.delta_t == 0)

    def alpha(self, step: int) -> float:
        return self.drop_fraction * 0.5 * (1.0 + math.cos(math.pi * step / max(self.end_step, 1)))

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for _, layer in self.layers:
            if layer.weight.grad is not None:
                layer.weight.grad.mul_(layer.mask)

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """After an optimiser step: update masks when due, then zero what the masks exclude."""
        self.step_count += 1
        if self._update_due(self.step_count):
            self._update(self.step_count)
        for _, layer in self.layers:
            layer.apply_mask_()
            if optimizer is not None:
                for value in optimizer.state.get(layer.weight, {}).values():
                    if torch.is_tensor(value) and value.shape == layer.mask.shape:
                        value.mul_(layer.mask)
        capture = self.algorithm == "rigl" and self._update_due(self.step_count + 1)
        for _, layer in self.layers:  # RigL grows by the dense gradient of the step before an update
            layer.capture_dense_grad = capture

    def _update(self, step: int) -> None:
        alpha = self.alpha(step)
        masks = distributed.on_main(lambda: self._new_masks(alpha))  # one decision, every replica
        changed = 0
        total = 0
        for name, layer in self.layers:
            new = masks[name].to(layer.mask.device)
            changed += int((new != layer.mask).sum())
            total += int(layer.mask.sum())
            layer.set_mask(new)
            layer.dense_grad = None
        self.log.append({"step": step, "drop_fraction": round(alpha, 6),
                         "changed_share": round(changed / max(2 * total, 1), 6)})

    def _new_masks(self, alpha: float) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers:
            mask = layer.mask.reshape(-1).cpu()
            weight = layer.weight.detach().reshape(-1).abs().float().cpu()
            active = int(mask.sum())
            n_drop = int(alpha * active)
            if n_drop == 0:
                out[name] = layer.mask.cpu().clone()
                continue
            drop_score = torch.where(mask, weight, torch.full_like(weight, math.inf))
            dropped = torch.topk(drop_score, n_drop, largest=False).indices
            kept = mask.clone()
            kept[dropped] = False
            if self.algorithm == "rigl" and layer.dense_grad is not None:
                grow_score = layer.dense_grad.detach().reshape(-1).abs().float().cpu()
            else:  # SET (and RigL without a captured gradient, e.g. the step right after a resume)
                grow_score = torch.rand(weight.shape, generator=self.generator)
            grow_score = torch.where(kept, torch.full_like(grow_score, -math.inf), grow_score)
            grown = torch.topk(grow_score, n_drop).indices
            kept[grown] = True
            out[name] = kept.reshape(layer.mask.shape)
        return out

    # --- resumable ---

    def state_dict(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "step_count": self.step_count, "end_step": self.end_step,
                "delta_t": self.delta_t, "generator": self.generator.get_state(), "log": list(self.log)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.end_step = int(state["step_count"]), int(state["end_step"])
        self.delta_t = state["delta_t"]
        self.generator.set_state(state["generator"])
        self.log = list(state["log"])
        capture = self.algorithm == "rigl" and self._update_due(self.step_count + 1)
        for _, layer in self.layers:
            layer.capture_dense_grad = capture


class MaskKeeper:
    """Trainer hook for a fixed mask (a pruned model's fine-tune): gradients, weights and optimiser state of
    masked-out positions stay zero, so the pattern (e.g. 2:4) survives training."""

    def __init__(self, model: torch.nn.Module) -> None:
        from lrdeploy.layers.masked import masked_layers

        self.updater = MaskUpdater(masked_layers(model), "static")
        self.optimizer: torch.optim.Optimizer | None = None

    def on_train_start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    on_resume = on_train_start

    def after_backward(self, model: torch.nn.Module) -> None:
        self.updater.mask_gradients()

    def after_step(self, model: torch.nn.Module) -> None:
        self.updater.step(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return self.updater.state_dict()

    def load_state_dict(self, state: dict[str, Any], model: torch.nn.Module) -> None:
        self.updater.load_state_dict(state)
