"""lrdeploy.methods: training methods as trainer hook objects, looked up by name with :func:`get_method`."""

from __future__ import annotations

from lrdeploy.methods import cuttlefish, maestro  # noqa: F401  (register "cuttlefish", "maestro")
from lrdeploy.methods.base import MethodHook, get_method, list_methods, register_method

__all__ = ["MethodHook", "get_method", "list_methods", "register_method"]
