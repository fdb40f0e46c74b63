"""One layer-selection policy for every compression method: which Linear/Conv2d layers may be factorised.

Selection is by module type and qualified name (fnmatch patterns), never by position in a state dict. The
stem and the classifier stay dense: the model spec names them (``register_model(..., stem=...,
classifier=...)``, as timm's cfgs name ``first_conv`` and ``classifier``); a model whose spec declares
neither (a user's module) falls back to the first Conv2d and the last Linear. Methods add their own rules
on top (Cuttlefish keeps residual shortcuts dense) through ``rules``.

Never selected, whatever the patterns say: layers already factorised, the root module (it cannot be replaced
in place), grouped convs, layers whose weight is tied to another module's, and the projections of
``nn.MultiheadAttention`` (its forward hands ``out_proj.weight`` and the fused ``in_proj_weight`` to
``F.multi_head_attention_forward`` directly, so a factorised child, which has no ``.weight``, breaks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.layers.lowrank import LowRankConv2d, LowRankLayer, LowRankLinear

Rule = Callable[[str, nn.Module], "str | None"]
"""A method's extra rule: (layer name, module) → why it stays dense, or None."""

MHA_CHILD = "inside nn.MultiheadAttention, which reads its weight directly: kept dense"
MHA_IN_PROJ = "fused in_proj_weight of nn.MultiheadAttention: not a Linear module"
FALLBACK_STEM = "stem (first conv)"
FALLBACK_CLASSIFIER = "classifier (last Linear)"
SPEC_STEM = "stem (first conv, named by the model spec)"
SPEC_CLASSIFIER = "classifier (named by the model spec)"


def matches(name: str, patterns: Iterable[str] | None) -> bool:
    """Whether ``name`` matches any fnmatch pattern (case-sensitive)."""
    return any(fnmatchcase(name, p) for p in patterns or ())


def as_patterns(value: Iterable[str] | str | None, what: str) -> list[str] | None:
    """A user's pattern argument as a list (a bare string is one pattern); None stays None ("all")."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    patterns = list(value)
    if not all(isinstance(p, str) for p in patterns):
        raise UserError(f"{what} patterns must be strings, got {patterns!r}")
    return patterns


def layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear/Conv2d/low-rank layers in module order, not descending into low-rank layers' own factors."""
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, LowRankLayer):
            inside.append(name)
            found.append((name, module))
        elif _sparse_block(module):  # a Sparse-IFT block: its branches/factors are its own business
            inside.append(name)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            found.append((name, module))
    return found


def _masked(module: nn.Module) -> bool:
    from lrdeploy.layers.masked import MaskedMixin

    return isinstance(module, MaskedMixin)


def _sparse_block(module: nn.Module) -> bool:
    from lrdeploy.layers import sparse_ift

    return isinstance(module, (sparse_ift._Parallel, sparse_ift._Factorized, sparse_ift._Doped))


def attention_modules(model: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    """Every ``nn.MultiheadAttention`` with its qualified name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


def fused_attention_weights(mha: nn.MultiheadAttention) -> list[str]:
    """Names of the attention projection weights that are bare Parameters, not Linear modules."""
    if getattr(mha, "in_proj_weight", None) is not None:
        return ["in_proj_weight"]
    separate = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    return [n for n in separate if getattr(mha, n, None) is not None]


def model_spec(model: nn.Module) -> Any:
    """The spec ``create_model`` built ``model`` from, or None (a module built by hand)."""
    from lrdeploy.models.registry import spec_of

    return spec_of(model)


def tied_weights(model: nn.Module) -> dict[str, str]:
    """{layer: another owner of its weight Parameter} for weights shared between modules (tied embeddings
    and output projections): replacing the layer would silently untie them."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rsplit(".", 1)[0] if "." in name else "")
    tied: dict[str, str] = {}
    for name, module in layer_modules(model):
        weight = getattr(module, "weight", None)
        others = [o for o in owners.get(id(weight), []) if o != name] if weight is not None else []
        if others:
            tied[name] = others[0] or "the root module"
    return tied


def _declared(layers: Sequence[tuple[str, nn.Module]], patterns: Sequence[str]) -> set[str]:
    return {name for name, _ in layers if matches(name, patterns)}


def select_layers(
    model: nn.Module,
    *,
    spec: Any = None,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    keep_stem: bool = True,
    keep_classifier: bool = True,
    rules: Sequence[Rule] = (),
) -> tuple[list[str], dict[str, str]]:
    """(layer names a method may factorise, {layer kept dense: why}), both in module order.

    ``spec`` (default: the spec ``create_model`` attached to ``model``) names the stem and classifier as
    fnmatch patterns; when it declares neither, the first Conv2d is the stem and the last Linear the
    classifier. ``keep_stem``/``keep_classifier`` False let them be factorised. ``rules`` are a method's
    extra keep-dense rules, asked after the stem/classifier and before ``include``/``exclude``. Every
    layer of :func:`layer_modules` is in exactly one of the two results.
    """
    include_p = as_patterns(include, "include")
    exclude_p = as_patterns(exclude, "exclude")
    layers = layer_modules(model)
    spec = model_spec(model) if spec is None else spec
    declared = tuple(getattr(spec, "stem", ()) or ()), tuple(getattr(spec, "classifier", ()) or ())
    attention = [name + "." for name, _ in attention_modules(model)]
    tied = tied_weights(model)
    # the stem/classifier fallback looks past attention projections: they are never the model's classifier
    plain = [(n, m) for n, m in layers if not any(n.startswith(p) for p in attention)]
    if any(declared):
        stems, classifiers = _declared(layers, declared[0]), _declared(layers, declared[1])
        stem_why, classifier_why = SPEC_STEM, SPEC_CLASSIFIER
    else:
        first = next((n for n, m in plain if isinstance(m, (nn.Conv2d, LowRankConv2d))), None)
        last = next((n for n, m in reversed(plain) if isinstance(m, (nn.Linear, LowRankLinear))), None)
        stems, classifiers = {first} - {None}, {last} - {None}
        stem_why, classifier_why = FALLBACK_STEM, FALLBACK_CLASSIFIER

    selected: list[str] = []
    kept: dict[str, str] = {}
    for name, module in layers:
        why: str | None = None
        if isinstance(module, LowRankLayer):
            why = "already low-rank"
        elif _sparse_block(module) or _masked(module):
            why = "already sparse (masked)"
        elif name == "":
            why = "the root module cannot be replaced in place"
        elif any(name.startswith(prefix) for prefix in attention):
            why = MHA_CHILD
        elif name in tied:
            why = f"weight tied to {tied[name]}: factorising would untie them"
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            why = f"grouped conv (groups={module.groups}) is not eligible"
        elif keep_stem and name in stems:
            why = stem_why
        elif keep_classifier and name in classifiers:
            why = classifier_why
        else:
            why = next((w for w in (rule(name, module) for rule in rules) if w), None)
        if why is None and include_p is not None and not matches(name, include_p):
            why = "not matched by include patterns"
        if why is None and matches(name, exclude_p):
            why = "matched an exclude pattern"
        if why is None:
            selected.append(name)
        else:
            kept[name] = why
    return selected, kept
