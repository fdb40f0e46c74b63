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
class ModelSpec:
    name: str
    builder: Builder
    input_shape: tuple[int, ...]
    num_classes: int
    description: str
    default_args: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, description: str = ""
) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` under ``name``; its keyword defaults become ``default_args``."""

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
        _REGISTRY[key] = ModelSpec(key, builder, tuple(input_shape), num_classes, doc, defaults)
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
