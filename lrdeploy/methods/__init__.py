"""lrdeploy.methods: compression methods looked up by name with :func:`get_method`.

Training methods are trainer hook objects (``stage == "training"``); post-training SVD is ``apply(model)``
on a trained one (``stage == "post-training"``). :mod:`lrdeploy.methods.selection` is the one policy for
which layers any of them may factorise.
"""

from __future__ import annotations

from lrdeploy.methods import cuttlefish, maestro, sparse_ift, svd  # noqa: F401  (register each method)
from lrdeploy.methods.base import MethodHook, get_method, list_methods, register_method

__all__ = ["MethodHook", "get_method", "list_methods", "register_method"]
