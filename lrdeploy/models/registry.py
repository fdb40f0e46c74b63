"""Model registry: builders looked up by name, so bundles can record ``(name, args)`` and rebuild the model.

A bundle stores the registry name and constructor arguments instead of a pickled module; loading calls
:func:`create_model` with them. That is why builders take only JSON-friendly keyword arguments and why an
unknown name or argument is a :class:`UserError` (it usually comes from a user's flag or an edited manifest).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lrdeploy.errors import UserError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class InputSpec:
    """One model input, for models that take several tensors or integer ids (e.g. a translation model).

    ``shape`` is one sample without the batch dimension, at the nominal size used for FLOP counts;
    ``dynamic`` names each of those axes that may vary at run time (None: fixed). The batch axis is always
    dynamic and is not listed. Values of integer inputs come from the model's ``example_inputs`` (only the
    model knows its vocabulary).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic: tuple[str | None, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "dynamic": list(self.dynamic),
        }


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Builder
    input_shape: tuple[int, ...]
    num_classes: int
    description: str
    default_args: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[InputSpec, ...] = ()  # empty: one float32 input of ``input_shape`` named "input"

    @property
    def input_specs(self) -> tuple[InputSpec, ...]:
        """Every input of the model; single-input models get one described from ``input_shape``."""
        return self.inputs or (InputSpec("input", tuple(self.input_shape)),)

    @property
    def multi_input(self) -> bool:
        return len(self.input_specs) > 1


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    description: str = "",
    inputs: tuple[InputSpec, ...] = (),
) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` under ``name``; its keyword defaults become ``default_args``.

    ``inputs`` describes a model with several (or integer) inputs; ``input_shape`` then describes the first.
    """

    def decorate(builder: Builder) -> Builder:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        defaults = {
            p.name: p.default
            for p in inspect.signature(builder).parameters.values()
            if p.default is not inspect.Parameter.empty
        }
        doc = description or (inspect.getdoc(builder) or "").split("\n", 1)[0]
        _REGISTRY[key] = ModelSpec(
            key, builder, tuple(input_shape), num_classes, doc, defaults, tuple(inputs)
        )
        return builder

    return decorate


def list_models() -> list[ModelSpec]:
    return sorted(_REGISTRY.values(), key=lambda s: s.name)


def get_spec(name: str) -> ModelSpec:
    key = name.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, _REGISTRY, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    known = ", ".join(s.name for s in list_models()) or "(none registered)"
    raise UserError(f"unknown model '{name}'", hint=f"{hint}known models: {known}")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; arguments the builder does not take are a :class:`UserError`, not a crash."""
    spec = get_spec(name)
    params = inspect.signature(spec.builder).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = ", ".join(params) or "none"
        raise UserError(
            f"model '{spec.name}' has no argument(s) {', '.join(unknown)}", hint=f"it accepts: {accepted}"
        )
    return spec.builder(**kwargs)
