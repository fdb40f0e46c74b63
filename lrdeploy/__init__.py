"""lrdeploy: train or load low-rank/sparse networks, fold them for deployment, and prove the gain."""

import os as _os

__version__ = "0.1.0"

# ONNX Runtime's telemetry persists a device id under ~/.cache at import time and prints a warning to stderr
# when it cannot (an unwritable HOME); a deployment tool sends nothing home. A user's own setting wins.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# --- the Python API (lrdeploy/api.py), loaded on first use so that `import lrdeploy` stays instant ---

import sys as _sys  # noqa: E402
import types as _types  # noqa: E402

_API = ("save_bundle", "load_bundle", "compress", "export", "compare")
__all__ = ["__version__", *_API]


def __getattr__(name: str):  # PEP 562: only called for names not already set
    if name == "compress":
        import lrdeploy.compress  # noqa: F401  (binding it makes the module callable: see _Package)

        return _sys.modules["lrdeploy.compress"]
    if name in _API:
        from lrdeploy import api

        return getattr(api, name)
    raise AttributeError(f"module 'lrdeploy' has no attribute {name!r}")


class _CallableModule(_types.ModuleType):
    """``lrdeploy.compress`` is a submodule (``lrdeploy.compress.compress``, its report classes) *and* the API
    function ``lrdeploy.compress(model_or_bundle, ...)``: the import system binds the submodule over any
    function of that name, so the module itself is made callable."""

    def __call__(self, *args, **kwargs):
        from lrdeploy.api import compress

        return compress(*args, **kwargs)


class _Package(_types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        if name == "compress" and type(value) is _types.ModuleType:  # the import system binding the submodule
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
