"""One schema for every manifest lrdeploy reads back, checked on every load.

Three documents share it: a bundle's ``manifest.json``, the same manifest stamped into an exported ONNX
file's ``metadata_props`` (``lrdeploy.manifest``, plus the export record ``lrdeploy.export``), and a golden
set's ``golden.json``. These files travel (CI caches, registries, e-mail) and are easy to edit by hand, while
the code that reads them (model builders, exporters, benchmarks) trusts their values. Checking every value
on load (types, ranges, sizes, nesting depth) turns a bad one into a single line that names its JSON path,
``manifest.json: model.input_shape[0] must be a positive integer, got -1``, instead of a traceback inside
torch, a RecursionError, or an allocation sized by a typo.

Plain Python on purpose, no jsonschema dependency: some rules are not expressible in JSON Schema (model
arguments against the registered builder's signature, a rank at most its full rank, the total number of
input elements), and the error text is ours.

The integrity digest lives here too: :func:`manifest_digest` is the sha256 of the canonical JSON of every key
but ``manifest_sha256`` itself, so a bundle's manifest is covered by a hash just like its weights.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrdeploy.errors import UserError

# --- limits (generous for every real manifest; far below what would exhaust memory or the stack) ---

MAX_JSON_BYTES = 64 << 20  # a Multi30k manifest with both vocabularies is ~0.3 MB
MAX_DEPTH = 32  # real manifests nest 5 deep (metrics.history[i].key)
MAX_STR = 65536  # any one string (a command line, a note)
MAX_NAME = 512  # names: models, layers, datasets, kinds
MAX_ITEMS = 1_000_000  # any one list (a vocabulary is the longest: ~8k)
MAX_KEYS = 100_000  # any one object
MAX_SIZE = 1_000_000  # classes, vocabulary sizes, features, ranks
MAX_DIM = 65536  # one input dimension, channels, kernel/stride, sequence length
MAX_RANK = 8  # dimensions of one input sample
MAX_INPUT_ELEMENTS = 1 << 24  # elements of one input sample (3×2048×2048 fits)
MAX_COUNT = 10**15  # parameters, bytes
MAX_FLOPS = 10**18
MAX_GOLDEN_SAMPLES = 10_000_000
MAX_GOLDEN_ELEMENTS = 1 << 31  # elements of one golden array

DIGEST_KEY = "manifest_sha256"
BUNDLE_HINT = "the manifest was hand-edited or is corrupt; re-create the bundle"
ONNX_HINT = "the ONNX metadata was hand-edited or is corrupt; re-export the model with lrdeploy export"
GOLDEN_HINT = "the golden set was hand-edited or is corrupt; regenerate it with --save-golden"

# Builder arguments that size a model: bounded so an edited value cannot ask for 10^13 output classes.
_ARG_BOUNDS: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("num_classes", "src_vocab", "tgt_vocab"), (1, MAX_SIZE)),
    **dict.fromkeys(("in_channels", "width", "d_model", "nhead", "dim_feedforward", "max_len",
                     "num_encoder_layers", "num_decoder_layers"), (1, MAX_DIM)),
}

JsonPath = tuple[str | int, ...]
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class SchemaError(Exception):
    """A value that breaks the schema, with the JSON path of that value (turned into a UserError)."""

    def __init__(self, path: JsonPath, message: str) -> None:
        self.path, self.message = path, message
        super().__init__(f"{format_path(path)} {message}")


def format_path(path: JsonPath) -> str:
    """``("model", "input_shape", 0)`` → ``model.input_shape[0]``; odd keys quoted: ``structure["a.b"]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(_clip(part, 60))}]"
    return out


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def describe_value(value: Any) -> str:
    """A short rendering of a JSON value for an error message (never the whole of a big container)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        text = str(value) if value.bit_length() < 200 else f"an integer of {len(str(value))} digits"
        return _clip(text, 60)
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity") if math.isinf(
            value) else repr(value)
    if isinstance(value, str):
        return json.dumps(_clip(value, 40))
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    if isinstance(value, dict):
        return f"an object with {len(value)} key{'s' * (len(value) != 1)}"
    return type(value).__name__


def _nested(path: JsonPath, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise SchemaError(path, f"is nested deeper than {MAX_DEPTH} levels")


# --- value specs ---


class Spec:
    """One rule for one JSON value; ``check`` raises SchemaError naming the path of the first bad value."""

    def check(self, value: Any, path: JsonPath, depth: int) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    lo: int
    hi: int

    def check(self, value: Any, path: JsonPath, depth: int) -> None:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(self.lo, "an integer")
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(path, f"must be {what}, got {describe_value(value)}")
        if value < self.lo:
            bound = what if self.lo in (0, 1) else f"at least {self.lo}"
            raise SchemaError(path, f"must be {bound}, got {describe_value(value)}")
        if value > self.hi:
            raise SchemaError(path, f"must be at most {self.hi}, got {describe_value(value)}")


@dataclass(frozen=True)
class Num(Spec):
    lo: float
    hi: float
    finite: bool = True  # False: NaN/Infinity allowed (a diverged training run may record a NaN loss)

    def check(self, value: Any, path: JsonPath, depth: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(path, f"must be a number, got {describe_value(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            if self.finite:
                raise SchemaError(path, f"must be a finite number, got {describe_value(value)}")
            return
        if not self.lo <= value <= self.hi:
            raise SchemaError(path, f"must be in [{self.lo:g}, {self.hi:g}], got {describe_value(value)}")


@dataclass(frozen=True)
class Str(Spec):
    max_len: int = MAX_STR
    pattern: re.Pattern[str] | None = None
    what: str = "a string"

    def check(self, value: Any, path: JsonPath, depth: int) -> None:
        if not isinstance(value, str):
            raise SchemaError(path, f"must be {self.what}, got {describe_value(value)}")
        if len(value) > self.max_len:
            raise SchemaError(path, f"must be at most {self.max_len} characters long, got {len(value)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise SchemaError(path, f"must be {self.what}, got {describe_value(value)}")


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, path: JsonPath, depth: int) -> None:
        if not isinstance(value, bool):
            raise SchemaError(path, f"must be true or false, got {describe_value(value)}")


@dataclass(frozen=True)
class Const(Spec):
    value: Any

    def check(self, value: Any, path: JsonPath, depth: int) -> None:
        if type(value) is not type(self.value) or value != self.value:
            raise SchemaError(path, f"must be {describe_value(self.value)}, got {describe_value(value)}")


@dataclass(frozen=True)
class Nullable(Spec):
    inner: Spec

    def check(self, value: Any, path: JsonPath, depth: int) -> None:
        if value is not None:
            self.inner.check(value, path, depth)


@dataclass(frozen=True)
class Either(Spec):
    """A string or a list (say): the branch is chosen by the value's JSON type, so errors stay precise."""

    branches: tuple[tuple[type, Spec], ...]
    what: str

    def check(self, value: Any, path: JsonPath, depth: int) -> None:
        for kind, spec in self.branches:
            if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
                spec.check(value, path, depth)
                return
        raise SchemaError(path, f"must be {self.what}, got {describe_value(value)}")


@dataclass(frozen=True)
class Json(Spec):
    """Any JSON value, bounded: depth, string and list lengths, object sizes (and finiteness if asked)."""

    finite: bool = False

    def check(self, value: Any, path: JsonPath, depth: int) -> None:
        if value is None or isinstance(value, (bool, int)):
            return
        if isinstance(value, float):
            if self.finite and not math.isfinite(value):
                raise SchemaError(path, f"must be a finite number, got {describe_value(value)}")
        elif isinstance(value, str):
            Str(MAX_STR).check(value, path, depth)
        elif isinstance(value, list):
            _nested(path, depth + 1)
            if len(value) > MAX_ITEMS:
                raise SchemaError(path, f"must hold at most {MAX_ITEMS} items, got {len(value)}")
            for i, item in enumerate(value):
                self.check(item, (*path, i), depth + 1)
        elif isinstance(value, dict):
            _nested(path, depth + 1)
            if len(value) > MAX_KEYS:
                raise SchemaError(path, f"must hold at most {MAX_KEYS} keys, got {len(value)}")
            for key, item in value.items():
                Str(MAX_NAME, what="a key").check(key, (*path, _clip(str(key), 60)), depth)
                self.check(item, (*path, key), depth + 1)
        else:
            raise SchemaError(path, f"must be a JSON value, got {type(value).__name__}")


@dataclass(frozen=True)
class List(Spec):
    item: Spec
    min_len: int = 0
    max_len: int = MAX_ITEMS

    def check(self, value: Any, path: JsonPath, depth: int) -> None:
        if not isinstance(value, list):
            raise SchemaError(path, f"must be a list, got {describe_value(value)}")
        _nested(path, depth + 1)
        if not self.min_len <= len(value) <= self.max_len:
            span = (f"exactly {self.min_len}" if self.min_len == self.max_len
                    else f"{self.min_len} to {self.max_len}")
            raise SchemaError(path, f"must hold {span} items, got {len(value)}")
        for i, item in enumerate(value):
            self.item.check(item, (*path, i), depth + 1)


@dataclass(frozen=True)
class Map(Spec):
    """An object whose keys are names and whose values all follow ``value``."""

    value: Spec
    max_keys: int = MAX_KEYS
    min_keys: int = 0

    def check(self, value: Any, path: JsonPath, depth: int) -> None:
        if not isinstance(value, dict):
            raise SchemaError(path, f"must be an object, got {describe_value(value)}")
        _nested(path, depth + 1)
        if not self.min_keys <= len(value) <= self.max_keys:
            raise SchemaError(path, f"must hold {self.min_keys} to {self.max_keys} entries, got {len(value)}")
        for key, item in value.items():
            Str(MAX_NAME, what="a key").check(key, (*path, _clip(str(key), 60)), depth)
            self.value.check(item, (*path, key), depth + 1)


@dataclass(frozen=True)
class F:
    """A field of an :class:`Obj`: its spec and whether it must be present."""

    spec: Spec
    required: bool = False


@dataclass(frozen=True)
class Obj(Spec):
    """An object with known fields (checked in order), other keys checked by ``rest`` (None: refused), then
    ``check(obj, path)`` for rules across fields."""

    fields: dict[str, F]
    rest: Spec | None = field(default_factory=Json)
    cross: Callable[[dict[str, Any], JsonPath], None] | None = None

    def check(self, value: Any, path: JsonPath, depth: int) -> None:
        if not isinstance(value, dict):
            raise SchemaError(path, f"must be a JSON object, got {describe_value(value)}")
        _nested(path, depth + 1)
        if len(value) > MAX_KEYS:
            raise SchemaError(path, f"must hold at most {MAX_KEYS} keys, got {len(value)}")
        for key, f in self.fields.items():
            if key in value:
                f.spec.check(value[key], (*path, key), depth + 1)
            elif f.required:
                raise SchemaError(path, f"lacks the required key {key!r}")
        for key, item in value.items():
            if key in self.fields:
                continue
            if self.rest is None:
                raise SchemaError((*path, key), "is not a known key")
            Str(MAX_NAME, what="a key").check(key, (*path, _clip(str(key), 60)), depth)
            self.rest.check(item, (*path, key), depth + 1)
        if self.cross is not None:
            self.cross(value, path)


def req(spec: Spec) -> F:
    return F(spec, True)


def opt(spec: Spec) -> F:
    return F(spec, False)


# --- model arguments, against the registered builder ---


def _arg_spec(name: str, default: Any) -> Spec:
    if name in _ARG_BOUNDS:
        return Int(*_ARG_BOUNDS[name])
    if isinstance(default, bool):
        return Bool()
    if isinstance(default, int):
        return Int(-MAX_SIZE, MAX_SIZE)
    if isinstance(default, float):
        return Num(-MAX_SIZE, MAX_SIZE)
    if isinstance(default, str):
        return Str(MAX_NAME)
    return Json(finite=True)


def check_model_args(name: str, args: Mapping[str, Any], path: JsonPath = ("model",)) -> None:
    """``name`` is a registered model and ``args`` fit its builder's signature (names, types, sizes).

    Raises SchemaError at ``path.name`` / ``path.args.<arg>``: a bad argument is reported here, in one
    line, rather than as a traceback inside the model's constructor.
    """
    import lrdeploy.models  # noqa: F401  (registers the model zoo)
    from lrdeploy.models.registry import get_spec, list_models, model_source

    if model_source(name) is not None:  # a user's module or a Hugging Face directory: checking its arguments
        return  # here would import code or read files; its source checks them when it builds the model

    try:
        spec = get_spec(name)
    except UserError:
        known = ", ".join(s.name for s in list_models())
        raise SchemaError((*path, "name"), f"must name a registered model ({known}), "
                          f"got {describe_value(name)}") from None
    params = inspect.signature(spec.builder).parameters
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in args.items():
        p = named.get(key)
        if p is None:
            if takes_any:
                continue
            raise SchemaError((*path, "args", key), f"is not an argument of model {spec.name} "
                              f"(it takes {', '.join(named) or 'none'})")
        _arg_spec(key, p.default).check(value, (*path, "args", key), len(path) + 2)
    missing = [n for n, p in named.items() if p.default is inspect.Parameter.empty and n not in args]
    if missing:
        raise SchemaError((*path, "args"), f"lacks the required argument {missing[0]!r} of model {spec.name}")


# --- the manifest ---

_HEX = Str(64, _HEX64, "a sha256 hex digest (64 characters 0-9a-f)")
_NAME = Str(MAX_NAME)
_SHORT = Str(128)
_INPUT_SHAPE = List(Int(1, MAX_DIM), 1, MAX_RANK)
_DIMS = List(Int(1, MAX_DIM), 1, 3)


def _check_input_elements(shape: Any, path: JsonPath) -> None:
    if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
        n = math.prod(shape)
        if n > MAX_INPUT_ELEMENTS:
            raise SchemaError(path, f"describes {n} elements per sample, more than {MAX_INPUT_ELEMENTS}")


def _shape_cross(model: dict[str, Any], path: JsonPath) -> None:
    _check_input_elements(model.get("input_shape"), (*path, "input_shape"))


def _model_cross(model: dict[str, Any], path: JsonPath) -> None:
    _shape_cross(model, path)
    check_model_args(model["name"], model.get("args") or {}, path)


def _layer_cross(entry: dict[str, Any], path: JsonPath) -> None:
    rank, full, stored = entry.get("rank"), entry.get("full_rank"), entry.get("stored")
    if rank is None:  # a sparse layer (density) needs no rank; a low-rank one (full_rank, stored) does
        if entry.get("density") is None or full is not None or stored is not None:
            raise SchemaError((*path, "rank"), "is required for a low-rank layer (or give density)")
        return
    if full is not None and stored is not None and stored > full:
        raise SchemaError((*path, "stored"), f"must be at most full_rank ({full}), got {stored}")
    if full is not None and rank > full:
        raise SchemaError((*path, "rank"), f"must be at most full_rank ({full}), got {rank}")
    if stored is not None and rank > stored:
        raise SchemaError((*path, "rank"), f"must be at most stored ({stored}), got {rank}")
    n_in, n_out, kernel = entry.get("in"), entry.get("out"), entry.get("kernel")
    if full is not None and n_in is not None and n_out is not None:
        fan_in = n_in * math.prod(kernel) if kernel is not None else n_in  # a conv factorises out × in·kh·kw
        if full > min(n_out, fan_in):
            raise SchemaError((*path, "full_rank"), f"must be at most {min(n_out, fan_in)} for a layer of "
                              f"{n_in} in and {n_out} out, got {full}")


_LAYER = Obj(
    {
        "kind": req(Str(64)),
        "rank": opt(Int(0, MAX_SIZE)),  # Maestro layers may be pruned to rank 0; sparse layers have none
        "density": opt(Num(0.0, 1.0)),  # share of weights kept by a mask (sparse layers)
        "pattern": opt(Str(32)),  # "unstructured" or "N:M"
        "branches": opt(Int(1, 10_000)),  # Sparse Parallel
        "full_rank": opt(Int(1, MAX_SIZE)),
        "stored": opt(Int(1, MAX_SIZE)),
        "in": opt(Int(1, MAX_SIZE)),
        "out": opt(Int(1, MAX_SIZE)),
        "bias": opt(Bool()),
        "kernel": opt(_DIMS),
        "stride": opt(_DIMS),
        "dilation": opt(_DIMS),
        "padding": opt(Either(((str, Str(16)), (list, List(Int(0, MAX_DIM), 1, 3))),
                              "a padding mode or a list of integers")),
        "bn_eps": opt(Num(0.0, 1.0)),
        "bn_momentum": opt(Nullable(Num(0.0, 1.0))),
    },
    cross=_layer_cross,
)

_TOKENIZER = Obj({
    "format": req(Str(64)),
    "format_version": req(Int(0, 1000)),
    "lowercase": opt(Bool()),
    "min_freq": opt(Int(0, 10**9)),
    "tokens": req(List(Str(1024), 1, MAX_SIZE)),
})


def _manifest_spec(required: bool) -> Obj:
    """The manifest, as a bundle writes it (``required``) or as stamped into ONNX metadata, where a bare
    module's export may carry only the keys its caller gave (each still typed when present)."""

    def need(spec: Spec) -> F:
        return F(spec, required)

    return Obj({
        "format": need(Str(64)),
        "format_version": need(Int(1, 1000)),
        "lrdeploy_version": opt(Str(64)),
        "created": opt(Str(64)),
        "model": need(Obj(
            {"name": req(_NAME), "args": opt(Map(Json(finite=True), max_keys=256)),
             "input_shape": need(_INPUT_SHAPE), "task": opt(Str(64)), "source": opt(Str(32)),
             "inputs": opt(List(Obj({"name": req(_NAME), "shape": req(List(Int(1, MAX_DIM), 0, MAX_RANK)),
                                     "dtype": req(Str(32)), "dynamic": opt(List(Json(), 0, MAX_RANK))}),
                                1, 64))},
            # a bundle is rebuilt from the registry; a bare module's export may name a model of its own
            cross=_model_cross if required else _shape_cross,
        )),
        "structure": opt(Map(_LAYER, max_keys=100_000)),
        "method": opt(Obj({"name": opt(Nullable(_SHORT)), "log": opt(Nullable(Map(Json())))})),
        "dataset": opt(Obj({
            "name": opt(Nullable(_SHORT)), "task": opt(Nullable(Str(64))), "split": opt(Nullable(Str(64))),
            "train_examples": opt(Nullable(Int(0, 10**12))),
        })),
        "metrics": opt(Map(Json())),
        "params": opt(Nullable(Int(0, MAX_COUNT))),
        "flops": opt(Nullable(Int(0, MAX_FLOPS))),
        "weights_sha256": need(_HEX),
        "weights_bytes": opt(Nullable(Int(0, MAX_COUNT))),
        DIGEST_KEY: opt(_HEX),
        "tokenizers": opt(Nullable(Obj({"src": req(_TOKENIZER), "tgt": req(_TOKENIZER)}))),
        "fold": opt(Map(Json())),
        "run": opt(Nullable(Map(Json()))),  # lrdeploy.run_record: the command line that wrote it
    })


MANIFEST_SPEC = _manifest_spec(required=True)
ONNX_MANIFEST_SPEC = _manifest_spec(required=False)


def _export_cross(info: dict[str, Any], path: JsonPath) -> None:
    _check_input_elements(info.get("input_shape"), (*path, "input_shape"))


EXPORT_INFO_SPEC = Obj(
    {
        "exporter": opt(Str(64)),
        "opset": opt(Int(1, 1000)),
        "input_shape": opt(Nullable(_INPUT_SHAPE)),
        "dynamic_batch": opt(Bool()),
        "fold": opt(Str(64)),
        "input_name": opt(_NAME),
        "output_name": opt(_NAME),
        "torch_version": opt(Str(128)),
        "inputs": opt(List(Obj({"name": req(_NAME), "dtype": req(Str(32)),
                                "dynamic_axes": opt(Map(_NAME, max_keys=MAX_RANK + 1))}), 1, 64)),
        "output_names": opt(List(_NAME, 1, 64)),
        "fallback_from": opt(List(Str(MAX_STR), 0, 16)),
    },
    cross=_export_cross,
)


# --- golden.json ---


def _array_cross(record: dict[str, Any], path: JsonPath) -> None:
    n = math.prod(record["shape"])
    if n > MAX_GOLDEN_ELEMENTS:
        raise SchemaError((*path, "shape"), f"describes {n} elements, more than {MAX_GOLDEN_ELEMENTS}")


def _golden_cross(manifest: dict[str, Any], path: JsonPath) -> None:
    arrays = manifest["arrays"]
    # lrdeploy.golden/1 holds one unnamed 'inputs' array; /2 one 'inputs/<name>' array per model input
    inputs = [k for k in arrays if k == "inputs" or (k.startswith("inputs/") and len(k) > len("inputs/"))]
    if not inputs:
        raise SchemaError((*path, "arrays"), "lacks the required entry 'inputs' (or 'inputs/<name>')")
    if not any(k.startswith("outputs/") and len(k) > len("outputs/") for k in arrays):
        raise SchemaError((*path, "arrays"), "holds no 'outputs/<name>' entry")
    samples = arrays[inputs[0]]["shape"][0]
    for name, record in arrays.items():
        if record["shape"][0] != samples:
            raise SchemaError((*path, "arrays", name, "shape", 0),
                              f"must equal the {samples} samples of '{inputs[0]}', got {record['shape'][0]}")
    recorded = (manifest.get("dataset") or {}).get("samples")
    if recorded is not None and recorded != samples:
        raise SchemaError((*path, "dataset", "samples"),
                          f"must equal the {samples} input samples, got {recorded}")


_ARRAY = Obj(
    {"shape": req(List(Int(0, MAX_GOLDEN_ELEMENTS), 1, MAX_RANK + 1)),
     "dtype": req(Str(16, re.compile(r"[<>|=]?[a-zA-Z]\d{0,2}"), "a numpy dtype string such as \"<f4\"")),
     "sha256": req(_HEX)},
    cross=_array_cross,
)

GOLDEN_SPEC = Obj(
    {
        "schema": req(Str(64)),
        "created": opt(Str(64)),
        "lrdeploy_version": opt(Str(64)),
        "command": opt(Str(MAX_STR)),
        "dataset": opt(Obj({
            "name": opt(Nullable(_SHORT)), "split": opt(Nullable(Str(64))),
            "samples": opt(Int(1, MAX_GOLDEN_SAMPLES)), "selection": opt(Nullable(Str(256))),
        }, rest=Json(finite=True))),
        "precision": opt(Nullable(Str(32))),
        "tolerance": opt(Map(Json(finite=True))),
        "reference": opt(Map(Json(finite=True))),
        "arrays": req(Map(_ARRAY, max_keys=256, min_keys=1)),
        "files": req(Obj({"golden.npz": req(_HEX)})),
    },
    rest=Json(finite=True),
    cross=_golden_cross,
)


# --- parsing, validating, digesting ---


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {_clip(dup, 60)!r}")
    return out


def parse_json(text: str | bytes, source: str, hint: str, *, invalid: str = "is not valid JSON") -> Any:
    """``json.loads`` for untrusted text: size-bounded, duplicate keys refused, deep nesting a UserError.

    NaN/Infinity parse (a recorded metric may be NaN); specs that need finite numbers say so by path.
    """
    if len(text) > MAX_JSON_BYTES:
        raise UserError(f"{source} is {len(text)} bytes, more than the {MAX_JSON_BYTES} a manifest may be",
                        hint)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise UserError(f"{source} is nested too deeply (more than {MAX_DEPTH} levels)", hint) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{source} {invalid} ({_clip(str(exc), 200)})", hint) from None


def read_json_file(path: Path, hint: str, *, invalid: str = "is not valid JSON") -> Any:
    """Read and :func:`parse_json` a file, refusing an oversized one before reading it."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise UserError(f"{path} is {size} bytes, more than the {MAX_JSON_BYTES} a manifest may be", hint)
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror or exc})", hint) from None
    return parse_json(data, str(path), hint, invalid=invalid)


def validate(document: Any, spec: Spec, source: str, hint: str) -> None:
    """Check ``document`` against ``spec``; the first bad value is a UserError naming its JSON path."""
    try:
        spec.check(document, (), 0)
    except SchemaError as exc:
        where = f"{source}: {format_path(exc.path)}" if exc.path else source
        raise UserError(f"{where} {exc.message}", hint) from None


def validate_manifest(manifest: Any, source: str = "manifest.json", *, onnx: bool = False,
                      hint: str | None = None) -> None:
    """A bundle manifest; ``onnx``: as stamped into ONNX metadata, where a bare module's export carries only
    the keys its caller gave (a stamped bundle manifest, ``format: lrdeploy-bundle``, needs all of them)."""
    bundle_form = not onnx or (isinstance(manifest, dict) and manifest.get("format") == "lrdeploy-bundle")
    validate(manifest, MANIFEST_SPEC if bundle_form else ONNX_MANIFEST_SPEC, source,
             hint or (ONNX_HINT if onnx else BUNDLE_HINT))


def validate_golden(manifest: Any, source: str = "golden.json") -> None:
    validate(manifest, GOLDEN_SPEC, source, GOLDEN_HINT)


def canonical_json(document: Any) -> str:
    """Sorted keys, no whitespace, ASCII: the same text for the same parsed value, whoever wrote it."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of every key but ``manifest_sha256``, as the manifest reads back.

    The round trip through ``json`` first makes tuples lists and keys strings, so the digest of the dict a
    writer holds equals the digest of the dict a reader parses.
    """
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != DIGEST_KEY}))
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


def text_digest(text: str) -> str:
    """sha256 of a metadata string as stored (the ONNX stamps are compared byte for byte)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
