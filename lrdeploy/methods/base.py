"""Method registry: training methods are hook objects looked up by name, so the CLI and bundles stay generic.

A method is a class whose instances the trainer calls at fixed points (see :mod:`lrdeploy.train`) and which
can describe itself for the bundle manifest. Settings are plain keyword arguments (JSON-friendly), so a
manifest's ``method.settings`` can rebuild the same hook with ``get_method(name, **settings)``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from lrdeploy.errors import UserError


class MethodHook:
    """Base of registered methods: a name, the settings it was built with, and a log filled while training.

    Subclasses set ``settings`` (JSON-friendly) in ``__init__`` and append to ``log`` as training runs;
    :meth:`manifest_record` is what the bundle stores under "method".
    """

    name: str = ""
    stage: str = "training"  # "training": a trainer hook; "post-training": ``apply(model)`` on a trained one

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.log: dict[str, Any] = {}

    def manifest_record(self) -> dict[str, Any]:
        return {"name": self.name, "settings": dict(self.settings), "log": dict(self.log)}


M = TypeVar("M", bound=type)
_METHODS: dict[str, Callable[..., Any]] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make ``get_method(name, **settings)`` build this class."""

    def decorate(cls: M) -> M:
        key = name.lower()
        if key in _METHODS:
            raise ValueError(f"method '{name}' is already registered")
        _METHODS[key] = cls
        if not getattr(cls, "name", ""):
            cls.name = key
        return cls

    return decorate


def list_methods(stage: str | None = None) -> list[str]:
    """Registered method names, optionally only those of one ``stage`` ("training", "post-training")."""
    return sorted(k for k, cls in _METHODS.items() if stage is None or _stage(cls) == stage)


def _stage(cls: Any) -> str:
    return getattr(cls, "stage", "training")


def get_method(name: str, *, stage: str | None = "training", **settings: Any) -> Any:
    """Build a registered method of ``stage`` (None: any); unknown names or settings are a UserError.

    The default asks for a trainer hook, so ``train --method svd`` says svd runs on a trained model
    instead of failing inside the training loop.
    """
    key = name.strip().lower()
    if key not in _METHODS:
        close = difflib.get_close_matches(key, _METHODS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown method '{name}'", hint=f"{hint}known methods: {', '.join(list_methods())}")
    factory = _METHODS[key]
    if stage is not None and _stage(factory) != stage:
        others = ", ".join(list_methods(stage)) or "none"
        raise UserError(f"method '{key}' is a {_stage(factory)} method, not a {stage} one",
                        getattr(factory, "usage", "") or f"{stage} methods: {others}")
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(settings) - set(params))
        if unknown:
            raise UserError(
                f"method '{key}' has no setting(s) {', '.join(unknown)}",
                hint=f"it accepts: {', '.join(params) or 'none'}",
            )
    return factory(**settings)
