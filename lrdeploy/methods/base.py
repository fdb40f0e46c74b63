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


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str, **settings: Any) -> Any:
    """Build the hook object of a registered method; unknown names or settings are a UserError."""
    key = name.strip().lower()
    if key not in _METHODS:
        close = difflib.get_close_matches(key, _METHODS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown method '{name}'", hint=f"{hint}known methods: {', '.join(list_methods())}")
    factory = _METHODS[key]
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(settings) - set(params))
        if unknown:
            raise UserError(
                f"method '{key}' has no setting(s) {', '.join(unknown)}",
                hint=f"it accepts: {', '.join(params) or 'none'}",
            )
    return factory(**settings)
