"""Tasks: one file per task, registered by name (see :mod:`lrdeploy.tasks.base` for the protocol).

The model spec declares its task, the bundle records it, and every command asks ``get_task(name)``; nothing
infers a task from the number of inputs. Adding a task: a file with a :class:`Task` subclass decorated with
:func:`register_task`, plus its import line below.
"""

from __future__ import annotations

import difflib
from typing import TypeVar

from lrdeploy.errors import UserError
from lrdeploy.tasks.base import BudgetSettings, Metric, Predict, Task, batched, runtime_predict, torch_predict

T = TypeVar("T", bound=type[Task])
_TASKS: dict[str, Task] = {}


def register_task(cls: T) -> T:
    """Class decorator: make ``get_task(cls.name)`` return an instance of ``cls``."""
    key = cls.name.lower()
    if not key or key in _TASKS:
        raise ValueError(f"task {cls.name!r} is unnamed or already registered")
    _TASKS[key] = cls()
    return cls


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str | Task) -> Task:
    """The registered task ``name``; an unknown one is a one-line UserError listing the known tasks."""
    if isinstance(name, Task):
        return name
    key = str(name).strip().lower()
    if key in _TASKS:
        return _TASKS[key]
    close = difflib.get_close_matches(key, _TASKS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"unknown task '{name}'", f"{hint}known tasks: {', '.join(list_tasks())}")


def task_for_dataset(name: str) -> Task | None:
    """The task that reads the built-in dataset ``name`` (None for a user's own data or unknown names)."""
    for task in _TASKS.values():
        if task.accepts_dataset(name):
            return task
    return None


def manifest_task(manifest: dict | None) -> Task:
    """The task a bundle (or ONNX metadata) records; bundles written before tasks existed are read by what
    they did record (a translation dataset record, else a classifier), never by counting inputs."""
    manifest = manifest or {}
    name = (manifest.get("model") or {}).get("task") or (manifest.get("dataset") or {}).get("task")
    if not name:
        name = "translation" if manifest.get("tokenizers") else "classification"
    return get_task(name)


# Registration: importing a task's module registers it.
from lrdeploy.tasks import classification as _classification  # noqa: E402,F401
from lrdeploy.tasks import embedding as _embedding  # noqa: E402,F401
from lrdeploy.tasks import translation as _translation  # noqa: E402,F401

__all__ = ["BudgetSettings", "Metric", "Predict", "Task", "batched", "get_task", "list_tasks",
           "manifest_task", "register_task", "runtime_predict", "task_for_dataset", "torch_predict"]
