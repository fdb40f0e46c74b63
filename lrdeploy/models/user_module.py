"""The user's own PyTorch model, named ``pkg.module:factory`` (``--model my_models:build``).

The module is imported from the current directory or ``PYTHONPATH`` (as ``python -m`` would find it) and
``factory(**model_args)`` must return an ``nn.Module``. A bundle records only the import string and the
arguments, never a pickled module, so every later command rebuilds the model by importing the module again:
that runs the module's code, which is why loading such a bundle says so on stderr
(:func:`announce_bundle_import`) and why the spec is marked ``trusted=False``.

What lrdeploy cannot learn without data, the factory may declare as attributes (a class works too, with
class attributes)::

    def build(num_classes: int = 10, in_channels: int = 1) -> nn.Module: ...
    build.lrdeploy_task = "classification"     # else --task is needed
    build.lrdeploy_input_shape = (1, 28, 28)   # one sample, no batch (``input_shape`` is read too);
                                               # else --input-shape (or the data's samples) decides
    build.lrdeploy_stem = ("conv1",)           # optional: modules compression methods keep dense
    build.lrdeploy_classifier = ("fc",)

``num_classes``/``in_channels`` keyword arguments are filled from the data by the classification task. A
model with several inputs follows :mod:`lrdeploy.models.inputs` (``input_names``/``example_inputs``).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lrdeploy import terminal
from lrdeploy.errors import UserError
from lrdeploy.models.registry import ModelSource, ModelSpec, builder_defaults, register_model_source

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FORM = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")
_PATH_HINT = "run lrdeploy from the folder that holds the module, or add that folder to PYTHONPATH"
_ANNOUNCED: set[str] = set()


def claims(name: str) -> bool:
    """``pkg.mod:factory`` (dotted identifiers, one colon); ``hf:PATH`` belongs to the Hugging Face source."""
    name = str(name).strip()
    return not name.lower().startswith("hf:") and _FORM.fullmatch(name) is not None


def announce_bundle_import(name: str, bundle: str | os.PathLike) -> None:
    """One line on stderr, once per module and process, before a bundle's model is rebuilt by importing it."""
    module = str(name).partition(":")[0]
    if module in _ANNOUNCED:
        return
    _importable_cwd()
    top = module.split(".")[0]
    if _refused(top) or importlib.util.find_spec(top) is None:  # nothing will run: the error says why
        return
    _ANNOUNCED.add(module)
    terminal.note(f"note: loading bundle {bundle} imports Python module '{module}' (model {name}); that runs "
                  "the module's code — load bundles of user modules only from sources you trust")


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _importable_cwd() -> str:
    """Put the current directory first on ``sys.path``, as ``python -m`` does (the console script's
    ``sys.path[0]`` is its own bin folder, not the directory the user runs it from)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return cwd


def _refused(top: str) -> bool:
    return top in sys.stdlib_module_names or top == "lrdeploy"


def _import(module_name: str, name: str) -> Any:
    """Import ``module_name`` from the current directory or PYTHONPATH; never the standard library or
    lrdeploy itself (a manifest naming ``os:system`` is refused before anything runs)."""
    top = module_name.split(".")[0]
    if _refused(top):
        raise UserError(f"model {name} names the module '{top}', which is not a model module",
                        "name your own module, e.g. --model my_models:build")
    cwd = _importable_cwd()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise UserError(f"model {name}: no module named '{module_name}' in {cwd} or on PYTHONPATH",
                            _PATH_HINT) from None
        raise UserError(f"model {name}: importing '{module_name}' failed: {_first_line(exc)}",
                        f"install what {module_name} imports") from None
    except Exception as exc:  # SyntaxError, the module's own errors at import time
        raise UserError(f"model {name}: importing '{module_name}' raised {type(exc).__name__}: "
                        f"{_first_line(exc)}", f"fix module {module_name}") from None


def _factory(module: Any, attr: str, name: str) -> Callable[..., Any]:
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            close = difflib.get_close_matches(part, public, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"model {name}: module '{module.__name__}' has no '{attr}'",
                            f"{hint}name a function (or class) that returns the model, e.g. "
                            f"{module.__name__}:build")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"model {name}: '{attr}' in module '{module.__name__}' is a {type(obj).__name__}, "
                        "not callable", "name a function (or class) that returns an nn.Module")
    return obj


def _declared_task(factory: Any, name: str) -> str:
    task = getattr(factory, "lrdeploy_task", None)
    if task is None:
        return ""
    if not isinstance(task, str) or not task.strip():
        raise UserError(f"model {name} declares lrdeploy_task={task!r}, not a task name",
                        "set it to a task name, e.g. 'classification'")
    from lrdeploy.tasks import get_task

    return get_task(task).name  # an unknown task: one line listing the known ones


def _declared_shape(factory: Any, name: str) -> tuple[int, ...]:
    for attr in ("lrdeploy_input_shape", "input_shape"):
        shape = getattr(factory, attr, None)
        if shape is None or isinstance(shape, property):
            continue
        dims = tuple(shape) if isinstance(shape, (tuple, list)) else ()
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            if attr == "input_shape":  # a plain name the factory may use for something else: not ours
                continue
            raise UserError(f"model {name} declares {attr}={shape!r}, not a sample shape",
                            "declare one sample without the batch, e.g. (1, 28, 28)")
        return dims
    return ()


def _patterns(factory: Any, attr: str) -> tuple[str, ...]:
    value = getattr(factory, attr, None) or ()
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def _on_meta() -> bool:
    return torch.get_default_device().type == "meta"


def _builder(factory: Callable[..., Any], name: str) -> Callable[..., nn.Module]:
    """``factory`` with its errors as one line and its result checked; keeps its signature (``wraps``)."""

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> nn.Module:
        try:
            model = factory(*args, **kwargs)
        except UserError:
            raise
        except Exception as exc:
            if _on_meta():  # a shapes-only probe (memory check, bundle dry build): callers build for real
                raise RuntimeError(f"{name} cannot be built on the meta device") from exc
            hint = ("check the --model-arg values it was called with" if kwargs
                    else "fix the factory, or pass its arguments with --model-arg")
            raise UserError(f"model {name}: the factory raised {type(exc).__name__}: {_first_line(exc)}",
                            hint) from None
        if not isinstance(model, nn.Module):
            raise UserError(f"model {name}: the factory returned {type(model).__name__}, not a "
                            "torch.nn.Module", "return the model (an nn.Module) from the factory")
        return model

    return build


def import_spec(name: str) -> ModelSpec:
    """Import the module and describe its factory; what it does not declare stays empty (task ``""``, input
    shape ``()``) and the command asks for it (``--task``, ``--input-shape``)."""
    name = str(name).strip()
    module_name, _, attr = name.partition(":")
    factory = _factory(_import(module_name, name), attr, name)
    try:
        defaults = builder_defaults(factory)
    except (TypeError, ValueError):  # a builtin without a signature
        defaults = {}
    declared_classes = getattr(factory, "lrdeploy_num_classes", None)
    num_classes = declared_classes if isinstance(declared_classes, int) else defaults.get("num_classes", 0)
    doc = (inspect.getdoc(factory) or "").split("\n", 1)[0]
    return ModelSpec(
        name=name,
        builder=_builder(factory, name),
        input_shape=_declared_shape(factory, name),
        num_classes=num_classes if isinstance(num_classes, int) else 0,
        description=doc or f"{attr} from module {module_name}",
        default_args=defaults,
        task=_declared_task(factory, name),
        stem=_patterns(factory, "lrdeploy_stem"),
        classifier=_patterns(factory, "lrdeploy_classifier"),
        source="import",
        trusted=False,
    )


SOURCE = register_model_source(ModelSource(
    kind="import", claims=claims, spec=import_spec, describe="pkg.module:factory for your own model",
))
