"""The values an option accepts, read from the registries: ``--help`` lists them, a wrong value is a one-line
error naming them, and shell completion offers them. A new method, runtime, task or dataset registered in its
module appears in all three without a CLI edit.

A :class:`Choices` reads its registry only when asked (help, validation, completion), so starting the CLI
imports no torch. :func:`choice_option` makes a Typer option from one; :func:`fill_choices` (called by the
command class before help is drawn) appends the values to the option's help.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import typer

from lrdeploy.errors import UserError


class Choices:
    """A fixed set of values from ``names()``; ``also`` names free forms accepted beside them (``PATH``),
    recognised by ``other(value)``. ``normalise`` maps what the user typed to the registry's spelling."""

    def __init__(self, names: Callable[[], Sequence[str]], *,
                 also: Sequence[str] | Callable[[], Sequence[str]] = (),
                 other: Callable[[str], bool] | None = None, what: str = "value") -> None:
        self.names = names
        self.also = also
        self.other = other
        self.what = what

    def listing(self) -> list[str]:
        also = self.also() if callable(self.also) else self.also
        return [*self.names(), *also]

    def validate(self, value: str, flag: str) -> str:
        """``value`` if accepted; else a UserError naming the values (and the closest one)."""
        names = list(self.names())
        if value in names or value.strip().lower() in names or (self.other is not None and self.other(value)):
            return value
        close = difflib.get_close_matches(value.strip().lower(), names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"{flag} {value!r} is not a known {self.what}",
                        f"{hint}choose one of: {', '.join(self.listing())}")

    def check(self, ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        """Click callback: validate each given value (None passes: the option was not given)."""
        if value is None or ctx.resilient_parsing:  # resilient: shell completion is parsing a partial line
            return value
        flag = next((o for o in param.opts if o.startswith("--")), param.name or "value")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            try:
                self.validate(str(item), flag)
            except UserError as e:
                raise typer.BadParameter(e.one_line().removeprefix(f"{flag} ")) from None
        return value

    def complete(self, incomplete: str) -> list[str]:
        """Shell completion: the registered values that start with what was typed."""
        return [n for n in self.names() if n.startswith(incomplete)]


def choice_option(default: Any, *flags: str, choices: Choices, help: str = "", **kwargs: Any) -> Any:
    """A Typer option whose values come from ``choices`` (listed in --help, validated, completed)."""
    option = typer.Option(default, *flags, help=help, callback=choices.check, autocompletion=choices.complete,
                          **kwargs)
    option.lrdeploy_choices = choices  # read by :func:`choices_of` when the command is registered
    return option


def choices_of(fn: Callable[..., Any]) -> dict[str, Choices]:
    """Parameter name -> :class:`Choices` of a command function's choice options."""
    import inspect

    return {name: p.default.lrdeploy_choices for name, p in inspect.signature(fn).parameters.items()
            if isinstance(getattr(p.default, "lrdeploy_choices", None), Choices)}


def fill_choices(params: Sequence[Any], choices: Mapping[str, Choices]) -> None:
    """Append each choice option's registered values to its help (called just before help is drawn)."""
    for param in params:
        owner = choices.get(param.name)
        if owner is not None:
            base = getattr(param, "_lrdeploy_help", None)
            if base is None:
                base = param._lrdeploy_help = (param.help or "").rstrip()
            param.help = f"{base} One of: {', '.join(owner.listing())}.".strip()


# ------------------------------------------------------------------------------------------- registries
def _training_methods() -> list[str]:
    from lrdeploy.methods import list_methods

    return ["dense", *list_methods("training")]


def _tasks() -> list[str]:
    from lrdeploy.tasks import list_tasks

    return list_tasks()


def _datasets() -> list[str]:
    """Every built-in dataset a registered task reads."""
    from lrdeploy.tasks import _TASKS

    return list(dict.fromkeys(d for task in _TASKS.values() for d in task.datasets))


def _is_user_data(value: str) -> bool:
    from lrdeploy.data.user_data import is_user_data

    return is_user_data(value)


def _zoo_models() -> list[str]:
    from lrdeploy.models import list_models

    return [spec.name for spec in list_models()]


def _model_source_forms() -> list[str]:
    from lrdeploy.models.registry import _SOURCES

    return [s.describe.split(" ")[0] for s in _SOURCES if s.describe]


def _claimed_by_source(value: str) -> bool:
    from lrdeploy.models.registry import model_source

    return model_source(value) is not None


def _runtimes(takes: str | None) -> Callable[[], list[str]]:
    def names() -> list[str]:
        from lrdeploy.serving.runtimes import _KINDS, runtime_kinds

        kinds = runtime_kinds(takes)
        return [*kinds, *(a for k in kinds for a in _KINDS[k].aliases)]

    return names


def _parity_presets() -> list[str]:
    from lrdeploy.parity_stats import TOLERANCES

    return list(TOLERANCES)


def _export_precisions() -> list[str]:
    from lrdeploy.exporters.precision import PRECISIONS

    return ["fp32", *PRECISIONS]


def _optimize_presets() -> list[str]:
    from lrdeploy.exporters.optimize import PRESETS

    return list(PRESETS)


def _fold_modes() -> list[str]:
    from lrdeploy.layers.lowrank import FOLD_MODES

    return ["auto", *FOLD_MODES]


def _amp_modes() -> list[str]:
    from lrdeploy.devices import AMP_MODES

    return list(AMP_MODES)


def _schedules() -> list[str]:
    from lrdeploy.train import SCHEDULES

    return list(SCHEDULES)


def _augmentations() -> list[str]:
    from lrdeploy.data.augment import AUGMENTATIONS

    return list(AUGMENTATIONS)


def _is_cuda_index(value: str) -> bool:
    head, _, index = value.strip().lower().partition(":")
    return head == "cuda" and index.isdigit()


METHODS = Choices(_training_methods, what="training method")
TASKS = Choices(_tasks, what="task")
DATASETS = Choices(_datasets, also=("PATH",), other=_is_user_data,
                   what="dataset (nor an .npz file or folder)")
MODELS = Choices(_zoo_models, also=_model_source_forms, other=_claimed_by_source, what="model")
ONNX_RUNTIMES = Choices(_runtimes("onnx"), what="runtime for .onnx files")
PARITY_PRESETS = Choices(_parity_presets, what="parity preset")
EXPORT_PRECISIONS = Choices(_export_precisions, what="precision")
OPTIMIZE_PRESETS = Choices(_optimize_presets, what="optimisation preset")
FOLD_MODES = Choices(_fold_modes, what="fold mode")
AMP_MODES = Choices(_amp_modes, what="mixed-precision mode")
SCHEDULES = Choices(_schedules, what="learning-rate schedule")
AUGMENTATIONS = Choices(_augmentations, what="augmentation")
DEVICES = Choices(lambda: ["auto", "cpu", "cuda"], also=("cuda:N",), other=_is_cuda_index, what="device")

