"""Model registry: builders looked up by name, so bundles can record ``(name, args)`` and rebuild the model.

A bundle stores the model's name and constructor arguments instead of a pickled module; loading calls
:func:`create_model` with them. That is why builders take only JSON-friendly keyword arguments and why an
unknown name or argument is a :class:`UserError` (it usually comes from a user's flag or an edited manifest).

Names come from *model sources*, tried in order: registered sources claim names by their form (a user's
module as ``pkg.mod:factory``, a Hugging Face encoder as ``hf:PATH``; see :func:`register_model_source`),
and every other name is looked up in the zoo registered with :func:`register_model`. Each spec declares its
task (``lrdeploy.tasks``), its inputs, and its ``stem`` and ``classifier`` modules (kept dense by compression
methods, as timm's cfgs name ``first_conv`` and ``classifier``).
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
    task: str = "classification"
    stem: tuple[str, ...] = ()  # module names (fnmatch patterns) of the stem: kept dense by methods
    classifier: tuple[str, ...] = ()  # module names of the output layer(s): kept dense by methods
    source: str = "registry"  # which model source built the spec ("registry", "import", "hf" …)
    trusted: bool = True  # False: building it runs code named by the user or a manifest (an import)

    @property
    def keep_dense(self) -> tuple[str, ...]:
        """Patterns of the modules compression methods leave dense (stem and classifier)."""
        return (*self.stem, *self.classifier)

    @property
    def input_specs(self) -> tuple[InputSpec, ...]:
        """Every input of the model; single-input models get one described from ``input_shape``."""
        return self.inputs or (InputSpec("input", tuple(self.input_shape)),)

    @property
    def multi_input(self) -> bool:
        return len(self.input_specs) > 1


_REGISTRY: dict[str, ModelSpec] = {}


@dataclass(frozen=True)
class ModelSource:
    """A way of naming models other than the zoo: ``claims(name)`` decides by the name's form alone (no
    import, no file access), ``spec(name)`` builds the :class:`ModelSpec`."""

    kind: str
    claims: Callable[[str], bool]
    spec: Callable[[str], ModelSpec]
    describe: str = ""


_SOURCES: list[ModelSource] = []


def register_model_source(source: ModelSource) -> ModelSource:
    """Add a model source; sources are asked in registration order, before the zoo."""
    if any(s.kind == source.kind for s in _SOURCES):
        raise ValueError(f"model source {source.kind!r} is already registered")
    _SOURCES.append(source)
    return source


def model_source(name: str) -> ModelSource | None:
    """The source that claims ``name`` (None: a zoo name); decided without importing or reading anything."""
    return next((s for s in _SOURCES if s.claims(str(name).strip())), None)


def builder_defaults(builder: Callable[..., Any]) -> dict[str, Any]:
    """Keyword defaults of a builder's signature (its JSON-friendly settings)."""
    return {
        p.name: p.default
        for p in inspect.signature(builder).parameters.values()
        if p.default is not inspect.Parameter.empty
    }


def register_model(
    name: str,
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    description: str = "",
    inputs: tuple[InputSpec, ...] = (),
    task: str = "classification",
    stem: tuple[str, ...] = (),
    classifier: tuple[str, ...] = (),
) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` under ``name``; its keyword defaults become ``default_args``.

    ``inputs`` describes a model with several (or integer) inputs; ``input_shape`` then describes the first.
    ``task`` names its task; ``stem``/``classifier`` name the modules methods keep dense.
    """

    def decorate(builder: Builder) -> Builder:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        doc = description or (inspect.getdoc(builder) or "").split("\n", 1)[0]
        _REGISTRY[key] = ModelSpec(
            key, builder, tuple(input_shape), num_classes, doc, builder_defaults(builder), tuple(inputs),
            task=task, stem=tuple(stem), classifier=tuple(classifier),
        )
        return builder

    return decorate


def list_models() -> list[ModelSpec]:
    return sorted(_REGISTRY.values(), key=lambda s: s.name)


def get_spec(name: str) -> ModelSpec:
    """The spec of a zoo name or of a name a model source claims (``pkg.mod:fn``, ``hf:PATH``)."""
    source = model_source(name)
    if source is not None:
        return source.spec(str(name).strip())
    key = name.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, _REGISTRY, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    known = ", ".join(s.name for s in list_models()) or "(none registered)"
    forms = "".join(f"; {s.describe}" for s in _SOURCES if s.describe)
    raise UserError(f"unknown model '{name}'", hint=f"{hint}known models: {known}{forms}")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; arguments the builder does not take are a :class:`UserError`, not a crash."""
    spec = get_spec(name)
    params = inspect.signature(spec.builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [] if takes_any else sorted(set(kwargs) - set(params))
    if unknown:
        accepted = ", ".join(params) or "none"
        raise UserError(
            f"model '{spec.name}' has no argument(s) {', '.join(unknown)}", hint=f"it accepts: {accepted}"
        )
    model = spec.builder(**kwargs)
    if isinstance(model, nn.Module):
        # methods ask it which modules are the stem and classifier (lrdeploy.methods.selection)
        object.__setattr__(model, _SPEC_ATTR, spec)
    return model


_SPEC_ATTR = "_lrdeploy_spec"


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The spec :func:`create_model` built ``model`` from (None for a module built by hand)."""
    spec = getattr(model, _SPEC_ATTR, None)
    return spec if isinstance(spec, ModelSpec) else None
